"""Load a resolved model: its files on disk, verified, then the transformers model and tokenizer.

A registered version's files are downloaded once, checked in that very
directory against its recorded evidence (tags, evidence files, every file
against its manifest), and loaded from it: what is loaded is what was
verified, with no second download in between. A delta's parent is fetched
and verified the same way before any of its bytes are used. A model
directory may come from anywhere, so every path read from it is checked to
stay inside it, and what cannot be pruned fails with one line.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from ..errors import BadInputError
from .resolve import ResolvedModel

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _download_errors(resolved: ResolvedModel):
    """A download that fails is one line (a refusal: the permission line). The artifact proxy's refusal comes
    as a ``requests.HTTPError``, an ``OSError``, so that branch is asked for a refusal too."""
    from .lineage import refuse_if_denied

    try:
        yield
    except MlflowException as exc:
        refuse_if_denied(exc)
        raise BadInputError(f"cannot download '{resolved.uri}': {exc.message.splitlines()[0]}") from None
    except OSError as exc:
        refuse_if_denied(exc)
        raise BadInputError(f"cannot download '{resolved.uri}': {exc}") from None
    except Exception as exc:  # noqa: BLE001 - an HTTP refusal from the artifact proxy is a permission line
        refuse_if_denied(exc)
        raise


def download(resolved: ResolvedModel, dst_path: str | None = None) -> Path:
    """A copy of the model's files on local disk, as stored now and not verified (a local directory as it is):
    for looking at them. What is loaded comes from ``fetch``."""
    if Path(resolved.load_uri).is_dir():
        return Path(resolved.load_uri)
    with _download_errors(resolved):
        local = mlflow.artifacts.download_artifacts(artifact_uri=resolved.load_uri, dst_path=dst_path)
    return Path(local)


def fetch(resolved: ResolvedModel) -> Path:
    """The model's files on local disk, downloaded once for ``resolved`` (and inside ``manifest.one_copy`` once
    for the command: whoever asks first fetches, the manifest check and the loader read that copy); a local
    directory as it is. The copy is removed once nothing refers to it."""
    if Path(resolved.load_uri).is_dir():
        return Path(resolved.load_uri)
    from . import manifest

    if resolved.fetched is None:
        with _download_errors(resolved):
            resolved.fetched = manifest.fetched(resolved.load_uri)
    else:
        manifest.share(resolved.load_uri, resolved.fetched)
    return resolved.fetched.path


def fetch_verified(resolved: ResolvedModel, purpose: str) -> Path:
    """``fetch``, then the version's recorded evidence checked in that very copy, once
    (``evidence.require_recorded``: tags, evidence files, every file against its manifest; refused with exit 1
    naming ``purpose``): what is then loaded from the copy is what was verified, with no second download."""
    from . import manifest
    from .evidence import require_recorded

    with manifest.one_copy():  # the manifest check hashes this copy
        path = fetch(resolved)
        if not resolved.verified:
            require_recorded(resolved, purpose)
            resolved.verified = True
    return path


def load_components(
    resolved: ResolvedModel,
    *,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    _depth: int = 0,
):
    """``(model, preprocessor)`` for a resolved model, with clear errors for what cannot be pruned.

    Loaded from the copy ``fetch`` holds, which the commands verify first (``fetch_verified``). The model's
    kind (``kinds``, from ``config.architectures``) says which transformers class loads it and what prepares
    its inputs: a tokenizer, or an image classifier's image processor. A delta version is verified in that copy
    and rebuilt from its parent (``rebuild_delta``), checked digest by digest.
    """
    import torch
    from transformers import AutoConfig

    from ..kinds import kind_for_architectures

    path = fetch(resolved)
    if (path / "MLmodel").is_file():
        from mlflow.models import Model

        from .delta_format import is_delta

        flavors = Model.load(str(path / "MLmodel")).flavors
        if is_delta(flavors):
            return _rebuild_registered_delta(resolved, path, device, dtype, trust_remote_code, _depth)
    model_dir, component_dir = _model_files(resolved, path)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    architectures = config.architectures or []
    kind = kind_for_architectures(architectures)
    preprocessor_dir = component_dir(kind.preprocessor)
    kind.check_files(preprocessor_dir, resolved.uri, architectures)
    kwargs: dict[str, object] = {"trust_remote_code": trust_remote_code}
    if _dtype(dtype) is not None:
        kwargs["dtype"] = _dtype(dtype)
    if device == "auto":
        kwargs["device_map"] = "auto"
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_not_the_load_report)  # require_all_weights says what it tells, in one line
    try:
        # a weight of another shape is reported in loading_info, where require_all_weights refuses it in one
        # line like a missing one; without this transformers raises its own RuntimeError mid-load
        model, loading_info = kind.auto_class(architectures).from_pretrained(
            model_dir, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except ValueError as exc:
        raise BadInputError(f"'{resolved.uri}' cannot be loaded as a {kind.name}: {str(exc).splitlines()[0]}") from None
    finally:
        report.removeFilter(_not_the_load_report)
    require_all_weights(loading_info, resolved.uri, type(model).__name__)
    if device not in (None, "auto"):
        model.to(torch.device(device))
    model.eval()
    return model, kind.load_preprocessor(preprocessor_dir, trust_remote_code)


def _not_the_load_report(record: logging.LogRecord) -> bool:
    """transformers' table of the weights a checkpoint lacks or adds (its "LOAD REPORT"), logged as it loads."""
    return record.module != "loading_report"


def require_all_weights(loading_info: dict, uri: str, class_name: str) -> None:
    """Refuse a checkpoint that does not fill the class it loads as (weights missing, extra or of another
    shape): transformers would initialize the rest at random, and a random head scores like a real one."""
    from ..kinds import supported_heads

    found = {
        "missing": loading_info.get("missing_keys"),
        "unexpected": loading_info.get("unexpected_keys"),
        "of another shape": [k[0] if isinstance(k, tuple) else k for k in loading_info.get("mismatched_keys") or ()],
        "not loaded": [str(m).splitlines()[0] for m in loading_info.get("error_msgs") or () if str(m)],
    }
    problems = [f"{what}: {', '.join(sorted(map(str, keys))[:3])}" for what, keys in found.items() if keys]
    if problems:
        raise BadInputError(
            f"'{uri}': its saved weights do not match {class_name} ({'; '.join(problems)}); refusing to "
            f"initialize any at random: save the model whole, with a head selective pruning measures "
            f"({supported_heads()})"
        )


def _rebuild_registered_delta(resolved, path, device, dtype, trust_remote_code, depth):
    """A delta version, rebuilt only from a verified lineage: its tags, evidence files and files checked in the
    copy it is rebuilt from (``fetch_verified``), its MLmodel naming the parent and digests those tags record."""
    if resolved.is_registered:
        fetch_verified(resolved, "rebuild the delta version")
    return rebuild_delta(
        path,
        resolved.uri,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        depth=depth,
        recorded=resolved.tags if resolved.is_registered else None,
    )


def _model_files(resolved: ResolvedModel, path: Path):
    """``(model directory, component directory by name)``: an MLflow transformers model keeps its weights and
    each component (tokenizer, image processor) in their own directories; a plain Hugging Face directory holds
    them all."""
    from mlflow.models import Model

    if not (path / "MLmodel").is_file():
        if not (path / "config.json").is_file():
            raise BadInputError(f"'{resolved.uri}' is not a Hugging Face model (no MLmodel or config.json)")
        return path, lambda name: path
    flavors = Model.load(str(path / "MLmodel")).flavors
    if "transformers" not in flavors:
        raise BadInputError(
            f"'{resolved.uri}' is not a transformers model (its flavors: {', '.join(sorted(flavors))}); "
            "log it with mlflow.transformers.log_model"
        )
    model_dir = inside(path, flavors["transformers"].get("model_binary", "model"), resolved.uri)
    if not (model_dir / "config.json").is_file():
        raise BadInputError(
            f"'{resolved.uri}' holds no saved weights (it was logged with save_pretrained=False); "
            "log the model with its weights"
        )
    return model_dir, lambda name: inside(path, f"components/{name}", resolved.uri)


def inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, refusing paths (``..``, absolute, symlinks) that lead out of ``root``."""
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise BadInputError(f"'{what}' points at '{relative}', outside its model directory; refusing to load it")
    return candidate


def _dtype(name: str | None):
    import torch

    if name in (None, "auto", "float32", "fp32"):
        return None if name in (None, "auto") else torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise BadInputError(f"unknown dtype '{name}'; choose float32, bfloat16 or float16")
    return table[name]


def rebuild_delta(
    path: Path,
    what: str,
    *,
    device=None,
    dtype=None,
    trust_remote_code: bool = False,
    depth: int = 0,
    recorded: dict | None = None,
):
    """``(model, tokenizer)`` rebuilt from a delta directory: parent first (its files and evidence verified,
    then its weights digest), then the masks (checked).

    ``recorded``: the version's verified lineage tags; the flavor's parent and digests must be theirs. The
    parent loads in the dtype it was pruned in (recorded in the flavor) unless ``dtype`` says otherwise."""
    from mlflow.models import Model
    from safetensors.torch import load_file

    from .delta_format import FLAVOR_NAME, MAX_CHAIN, DeltaError, apply_delta, unpack_masks
    from .lineage import weights_sha256
    from .resolve import resolve

    if depth > MAX_CHAIN:
        raise DeltaError(f"{what}: the delta chain is longer than {MAX_CHAIN} links (a loop?)")
    entry = Model.load(str(path / "MLmodel")).flavors[FLAVOR_NAME]
    parent_uri = entry["parent_model_uri"]
    if recorded is not None:
        _check_entry(entry, recorded, what)
    dtype = dtype or entry.get("dtype")
    try:
        parent = resolve(parent_uri)
        fetch_verified(parent, f"rebuild {what} from")  # its files and evidence, before any byte of it is used
        model, tokenizer = load_components(
            parent, device=device, dtype=dtype, trust_remote_code=trust_remote_code, _depth=depth + 1
        )
    except BadInputError as exc:
        raise DeltaError(
            f"{what} is a delta of {parent_uri}, which cannot be loaded ({str(exc).splitlines()[0]}); "
            "restore that version, or materialize this one while the parent exists"
        ) from None
    actual = weights_sha256(model)
    if actual != entry["parent_weights_sha256"]:
        raise DeltaError(
            f"{what} is a delta of {parent_uri}, whose weights changed since (sha256 {actual[:12]}, "
            f"recorded {entry['parent_weights_sha256'][:12]}); the delta cannot be applied"
        )
    masks = unpack_masks(load_file(str(inside(path, entry["masks"], what))))
    apply_delta(model, masks, load_file(str(inside(path, entry["biases"], what))))
    rebuilt = weights_sha256(model)
    if rebuilt != entry["weights_sha256"]:
        raise DeltaError(
            f"{what}: applying its masks to {parent_uri} gives weights sha256 {rebuilt[:12]}, "
            f"not the recorded {entry['weights_sha256'][:12]}; refusing a different model"
        )
    return model, tokenizer


def _check_entry(entry: dict, recorded: dict, what: str) -> None:
    """The delta's own MLmodel says which parent and digests it means; they must be the verified lineage's."""
    from ..errors import VerificationError
    from . import lineage

    for field_name, tag in (
        ("parent_model_uri", lineage.PARENT),
        ("weights_sha256", lineage.WEIGHTS_SHA),
        ("parent_weights_sha256", lineage.PARENT_WEIGHTS_SHA),
    ):
        if tag in recorded and entry.get(field_name) != recorded[tag]:
            raise VerificationError(
                [
                    f"refusing to rebuild {what}: it does not verify",
                    f"tampered: {what}: its MLmodel names {field_name} "
                    f"{str(entry.get(field_name))[:16]}, its verified lineage records "
                    f"{recorded[tag][:16]}",
                ]
            )
