"""Delta versions: store only what pruning changed, against a registered parent.

A delta model directory holds the bit-packed masks, the final biases of any
projection whose bias ``--attn-mean-offset`` changed, and a ``selprune``
flavor entry naming the parent (``models:/NAME/VERSION``), the parent's
``weights_sha256`` and the version's own. Loading fetches the parent (itself
possibly a delta: the chain resolves down to the first full version), checks
the parent's digest before touching anything, applies the masks, and checks
that the result has the version's own digest. Any mismatch or missing link is
one clear error, never a silently different model.

It is also a ``python_function`` model (``mlflow.pyfunc.load_model`` and
``mlflow models serve`` work): prediction is greedy text generation.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME

from .._version import __version__
from ..config import ATTN, KINDS
from ..errors import BadInputError

logger = logging.getLogger(__name__)

FLAVOR_NAME = "selprune"
DELTA_DIR = "delta"
MASKS_FILE = "masks.safetensors"
BIASES_FILE = "biases.safetensors"
MAX_CHAIN = 50


class DeltaError(BadInputError):
    """A delta version cannot be rebuilt exactly: a link is missing or a digest does not match."""


def pack_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bool masks to bit-packed uint8 tensors (1 bit per neuron) plus their shapes."""
    out = {}
    for kind, mask in masks.items():
        bits = np.packbits(mask.to(torch.bool).cpu().numpy().reshape(-1))
        out[f"{kind}_bits"] = torch.from_numpy(bits.copy())
        out[f"{kind}_shape"] = torch.tensor(list(mask.shape), dtype=torch.int64)
    return out


def unpack_masks(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    masks = {}
    for kind in KINDS:
        shape = tuple(stored[f"{kind}_shape"].tolist())
        count = int(np.prod(shape))
        bits = np.unpackbits(stored[f"{kind}_bits"].numpy())[:count]
        masks[kind] = torch.from_numpy(bits.astype(bool).reshape(shape))
    return masks


def changed_biases(model, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The biases of the attention projections that had neurons pruned (the mean offset changes them)."""
    from ..engine.architecture import find_architecture

    arch = find_architecture(model)
    return {
        p.name: p.bias.detach().cpu().clone()
        for p, row in zip(arch.attn, masks[ATTN])
        if row.any() and p.bias is not None
    }


def save_model(
    path,
    *,
    parent_uri: str,
    parent_weights_sha256: str,
    weights_sha256: str,
    masks: dict[str, torch.Tensor],
    biases: dict[str, torch.Tensor],
    pruning_files: dict | None = None,
    dtype: str | None = None,
    mlflow_model: Model | None = None,
    pip_requirements=None,
) -> None:
    """Write a delta model directory (MLflow model with the ``selprune`` and ``python_function`` flavors).

    ``dtype``: the dtype the parent was loaded in when it was pruned (``prune --dtype``); both digests are of
    weights in that dtype, so the parent is loaded in it again to rebuild the version."""
    from safetensors.torch import save_file

    from .flavor import RECORD_DIR, default_pip_requirements

    path = Path(path)
    (path / DELTA_DIR).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in pack_masks(masks).items()}, str(path / DELTA_DIR / MASKS_FILE))
    save_file({k: v.contiguous() for k, v in biases.items()}, str(path / DELTA_DIR / BIASES_FILE))
    files = {}
    if pruning_files:
        (path / RECORD_DIR).mkdir(exist_ok=True)
        for name, source in pruning_files.items():
            target = path / RECORD_DIR / Path(source).name
            shutil.copyfile(source, target)
            files[name] = f"{RECORD_DIR}/{target.name}"
    mlflow_model = mlflow_model or Model()
    import mlflow.pyfunc

    mlflow.pyfunc.add_to_model(mlflow_model, loader_module="mlflow_selprune.registry.delta")
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        plugin_version=__version__,
        storage="delta",
        parent_model_uri=parent_uri,
        parent_weights_sha256=parent_weights_sha256,
        weights_sha256=weights_sha256,
        masks=f"{DELTA_DIR}/{MASKS_FILE}",
        biases=f"{DELTA_DIR}/{BIASES_FILE}",
        files=files,
        **({"dtype": dtype} if dtype else {}),
    )
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))
    (path / "requirements.txt").write_text("\n".join(pip_requirements or default_pip_requirements()) + "\n")


def log_model(name: str = "model", **kwargs):
    """Log a delta model to the active run (``Model.log`` with this module as the flavor)."""
    import mlflow_selprune.registry.delta as flavor

    return Model.log(artifact_path=None, name=name, flavor=flavor, **kwargs)


def is_delta(flavors: dict) -> bool:
    return flavors.get(FLAVOR_NAME, {}).get("storage") == "delta"


def materialize(
    path: Path,
    what: str,
    *,
    device=None,
    dtype=None,
    trust_remote_code: bool = False,
    depth: int = 0,
    recorded: dict | None = None,
):
    """``(model, tokenizer)`` rebuilt from a delta directory: parent first (checked), then the masks (checked).

    ``recorded``: the version's verified lineage tags; the flavor's parent and digests must be theirs. The
    parent loads in the dtype it was pruned in (recorded in the flavor) unless ``dtype`` says otherwise."""
    from safetensors.torch import load_file

    from .lineage import weights_sha256
    from .loading import inside, load_components
    from .resolve import resolve

    if depth > MAX_CHAIN:
        raise DeltaError(f"{what}: the delta chain is longer than {MAX_CHAIN} links (a loop?)")
    entry = Model.load(str(path / MLMODEL_FILE_NAME)).flavors[FLAVOR_NAME]
    parent_uri = entry["parent_model_uri"]
    if recorded is not None:
        _check_entry(entry, recorded, what)
    dtype = dtype or entry.get("dtype")
    try:
        parent = resolve(parent_uri)
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


def apply_delta(model, masks: dict[str, torch.Tensor], biases: dict[str, torch.Tensor]) -> None:
    """Zero the masked neurons' columns and put back the stored biases: the parent becomes the pruned model."""
    from ..engine.architecture import find_architecture
    from ..engine.surgery import prune_neurons

    arch = find_architecture(model)
    for kind in KINDS:
        if masks[kind].any():
            prune_neurons(arch, kind, masks[kind])
    with torch.no_grad():
        for projection in arch.attn:
            bias = projection.bias
            if projection.name in biases and bias is not None:
                bias.copy_(biases[projection.name].to(bias.device))


class _GreedyGenerator:
    """pyfunc model of a delta version: greedy text generation from the rebuilt weights."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def predict(self, model_input, params=None):
        import pandas as pd

        params = dict(params or {})
        max_new_tokens = int(params.get("max_new_tokens", 20))
        if isinstance(model_input, pd.DataFrame):
            prompts = [str(v) for v in model_input.iloc[:, 0]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(v) for v in model_input]
        outputs = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt")
            with torch.inference_mode():
                generated = self.model.generate(
                    **ids,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
            outputs.append(self.tokenizer.decode(generated[0], skip_special_tokens=True))
        return outputs


def _load_pyfunc(path):
    """MLflow's pyfunc entry point (``loader_module``)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    while not (path / MLMODEL_FILE_NAME).is_file() and path != path.parent:
        path = path.parent
    model, tokenizer = materialize(path, str(path))
    return _GreedyGenerator(model, tokenizer)
