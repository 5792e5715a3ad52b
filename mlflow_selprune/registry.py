"""Resolve a model URI (registry, run, logged model or local directory) and load it.

Everything here only reads: nothing is written to the registry, so a bad URI
fails before any run or version exists.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))/?$")
_LOGGED_MODEL_SOURCE = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)")


class BadInputError(ValueError):
    """The user asked for something that cannot work; the message says what to do instead."""


@dataclass
class ResolvedModel:
    """Where a model comes from, with enough identity for lineage."""

    uri: str  # as given
    load_uri: str  # what to load from
    canonical_uri: str  # models:/name/version for registry models, else the URI itself
    registered_name: str | None = None
    version: str | None = None
    run_id: str | None = None
    model_id: str | None = None  # the LoggedModel behind a registered version, if any
    tags: dict = field(default_factory=dict)

    @property
    def is_registered(self) -> bool:
        return self.version is not None


def client() -> MlflowClient:
    return MlflowClient()


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def model_version(name: str, version: str):
    """A registered version, or a ``BadInputError`` that says what exists."""
    try:
        return client().get_model_version(name, version)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        try:
            versions = sorted(int(v.version) for v in client().search_model_versions(f"name='{name}'"))
        except MlflowException:
            versions = []
        if not versions:
            raise BadInputError(
                f"registered model '{name}' does not exist in {mlflow.get_registry_uri()}; "
                "check the name or register it first"
            ) from None
        raise BadInputError(
            f"registered model '{name}' has no version {version}; it has versions {versions}"
        ) from None


def check_tracking_server() -> None:
    """Fail in seconds, not after minutes of retries, when an HTTP tracking server is down."""
    import urllib.error
    import urllib.request

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            return
    except urllib.error.HTTPError:
        return  # it answered: authentication and the rest are checked by the real requests
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"the MLflow tracking server at {uri} is not reachable ({getattr(exc, 'reason', exc)}); "
            "start it or point MLFLOW_TRACKING_URI at a running server"
        ) from None


def resolve(uri: str) -> ResolvedModel:
    """Turn ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/...``, ``models:/m-...`` or a directory into a ``ResolvedModel``."""
    check_tracking_server()
    if not uri or not isinstance(uri, str):
        raise BadInputError("no model URI given; pass models:/NAME/VERSION, models:/NAME@ALIAS, runs:/... or a directory")
    local = Path(uri).expanduser()
    if "://" not in uri and not uri.startswith(("models:", "runs:")):
        if not local.is_dir():
            raise BadInputError(
                f"'{uri}' is neither a model URI nor a model directory; "
                "use models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH or a Hugging Face model directory"
            )
        if not (local / "config.json").is_file():
            raise BadInputError(f"directory '{uri}' is not a Hugging Face model (no config.json in it)")
        resolved_path = str(local.resolve())
        return ResolvedModel(uri=uri, load_uri=resolved_path, canonical_uri=resolved_path)
    match = _REGISTRY_URI.match(uri)
    if match and not uri.startswith("models:/m-"):
        name = match["name"]
        if match["alias"]:
            try:
                mv = client().get_model_version_by_alias(name, match["alias"])
            except MlflowException as exc:
                if not _not_found(exc):
                    raise
                model_version(name, "1")  # says whether the model itself exists
                raise BadInputError(f"registered model '{name}' has no alias '{match['alias']}'") from None
        elif match["version"] == "latest":
            versions = client().search_model_versions(f"name='{name}'")
            if not versions:
                model_version(name, "latest")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            if not match["version"].isdigit():
                raise BadInputError(f"'{uri}': a version must be a number, 'latest', or use @alias")
            mv = model_version(name, match["version"])
        id_match = _LOGGED_MODEL_SOURCE.match(mv.source or "")
        return ResolvedModel(
            uri=uri,
            load_uri=f"models:/{mv.name}/{mv.version}",
            canonical_uri=f"models:/{mv.name}/{mv.version}",
            registered_name=mv.name,
            version=str(mv.version),
            run_id=mv.run_id,
            model_id=getattr(mv, "model_id", None) or (id_match["model_id"] if id_match else None),
            tags=dict(mv.tags or {}),
        )
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/", 1)[0]
        try:
            client().get_run(run_id)
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            raise BadInputError(f"run '{run_id}' does not exist in {mlflow.get_tracking_uri()}") from None
        return ResolvedModel(uri=uri, load_uri=uri, canonical_uri=uri, run_id=run_id)
    id_match = _LOGGED_MODEL_SOURCE.match(uri)
    return ResolvedModel(uri=uri, load_uri=uri, canonical_uri=uri, model_id=id_match["model_id"] if id_match else None)


def download(resolved: ResolvedModel, dst_path: str | None = None) -> Path:
    """The model's files on local disk (a no-op for a local directory)."""
    if Path(resolved.load_uri).is_dir():
        return Path(resolved.load_uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=resolved.load_uri, dst_path=dst_path))
    except MlflowException as exc:
        raise BadInputError(f"cannot download '{resolved.uri}': {exc.message.splitlines()[0]}") from None
    except OSError as exc:
        raise BadInputError(f"cannot download '{resolved.uri}': {exc}") from None


def load_components(resolved: ResolvedModel, *, device: str | None = None, dtype: str | None = None,
                    trust_remote_code: bool = False, local_dir: Path | None = None):
    """``(model, tokenizer)`` for a resolved model, with clear errors for what cannot be pruned."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    path = local_dir or download(resolved)
    model_dir, tokenizer_dir = path, path
    if (path / "MLmodel").is_file():
        from mlflow.models import Model

        flavors = Model.load(str(path / "MLmodel")).flavors
        if "transformers" not in flavors:
            raise BadInputError(
                f"'{resolved.uri}' is not a transformers model (its flavors: {', '.join(sorted(flavors))}); "
                "log it with mlflow.transformers.log_model"
            )
        model_dir = inside(path, flavors["transformers"].get("model_binary", "model"), resolved.uri)
        tokenizer_dir = inside(path, "components/tokenizer", resolved.uri)
        if not (model_dir / "config.json").is_file():
            raise BadInputError(
                f"'{resolved.uri}' holds no saved weights (it was logged with save_pretrained=False); "
                "log the model with its weights"
            )
    elif not (path / "config.json").is_file():
        raise BadInputError(f"'{resolved.uri}' is not a Hugging Face model (no MLmodel or config.json)")
    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.glob("tokenizer*")):
        raise BadInputError(
            f"'{resolved.uri}' has no tokenizer; log the model together with its tokenizer "
            "({'model': ..., 'tokenizer': ...})"
        )
    torch_dtype = _dtype(dtype)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    auto = AutoModelForCausalLM
    if not any(a.endswith(("CausalLM", "LMHeadModel")) for a in (config.architectures or [])) and any(
        a.endswith("MaskedLM") for a in (config.architectures or [])
    ):
        auto = AutoModelForMaskedLM
    kwargs = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        model = auto.from_pretrained(model_dir, **kwargs)
    except ValueError as exc:
        raise BadInputError(f"'{resolved.uri}' cannot be loaded as a language model: {str(exc).splitlines()[0]}") from None
    if device not in (None, "auto"):
        model.to(torch.device(device))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer


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
