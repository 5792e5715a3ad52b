"""Resolve a model URI (registry, run, logged model or local directory) to what it names.

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

from ..errors import BadInputError

logger = logging.getLogger(__name__)

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))/?$")
_LOGGED_MODEL_SOURCE = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)")




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
                f"registered model '{name}' does not exist in {mlflow.get_registry_uri()}{did_you_mean(name)}; "
                "check the name or register it first"
            ) from None
        raise BadInputError(
            f"registered model '{name}' has no version {version}; it has versions {versions}"
        ) from None


def _missing_alias(name: str, alias: str) -> BadInputError:
    """Why ``models:/name@alias`` resolves to nothing: no such model (with a guess), or no such alias."""
    try:
        model = client().get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        return BadInputError(f"registered model '{name}' does not exist in {mlflow.get_registry_uri()}"
                             f"{did_you_mean(name)}; check the name or register it first")
    aliases = sorted(getattr(model, "aliases", {}) or {})
    known = f"; its aliases: {', '.join(aliases)}" if aliases else "; it has no aliases"
    return BadInputError(f"registered model '{name}' has no alias '{alias}'{known}")


def did_you_mean(name: str) -> str:
    """`` (did you mean 'x'?)`` for the closest registered model name, or an empty string."""
    import difflib

    try:
        names = [m.name for m in client().search_registered_models(max_results=1000)]
    except MlflowException:
        return ""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
                raise _missing_alias(name, match["alias"]) from None
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


def check_alias(alias: str | None, flag: str = "--alias") -> None:
    """Refuse an alias MLflow would refuse (``latest``, ``v<N>``, bad characters) before anything is written."""
    if alias is None:
        return
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as exc:
        raise BadInputError(f"{flag} {alias!r} cannot be used: {exc.message.splitlines()[0]} "
                            "Choose another alias name, e.g. 'candidate'") from None


def check_registered_name(name: str | None, flag: str = "--register-as") -> None:
    """Refuse a registered-model name MLflow would refuse, before anything is written."""
    if name is None:
        return
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise BadInputError(f"{flag} {name!r} cannot be used: {exc.message.splitlines()[0]}") from None
