"""Resolve a model URI (registry, run, logged model or local directory) to what it names.

Everything here only reads: nothing is written to the registry, so a bad URI
fails before any run or version exists. The same holds for the permission
checks at the end (a user who may not register or move an alias is refused
first), which ask the server with a request that changes nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    tags: dict = field(default_factory=dict)  # a registered version's: every lineage tag, from its anchored record
    version_tags: dict | None = None  # the tags on the registered version itself (``lineage.SHOWN`` and records)
    # its files on local disk once fetched (``loading.fetch``; a ``manifest.Copy``): every later load reads this
    # copy, never a second download; ``verified``: its recorded evidence was checked in it (``fetch_verified``)
    fetched: Any = field(default=None, repr=False, compare=False)
    verified: bool = field(default=False, compare=False)

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
        raise BadInputError(f"registered model '{name}' has no version {version}; it has versions {versions}") from None


def _missing_alias(name: str, alias: str) -> BadInputError:
    """Why ``models:/name@alias`` resolves to nothing: no such model (with a guess), or no such alias."""
    try:
        model = client().get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        return BadInputError(
            f"registered model '{name}' does not exist in {mlflow.get_registry_uri()}"
            f"{did_you_mean(name)}; check the name or register it first"
        )
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


def on_tracking_server(uri: str | None = None) -> bool:
    """Whether the store (``uri``, default the tracking URI) is an HTTP tracking server, not a local store."""
    return (uri or mlflow.get_tracking_uri()).startswith(("http://", "https://"))


def _health_check(uri: str, timeout: float) -> None:
    """Ask the server's ``/health``; any HTTP answer (authentication is checked by the real requests) returns,
    no answer raises ``OSError``/``ValueError``."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return


def tracking_server_answers(timeout: float = 5) -> bool:
    """Whether the HTTP tracking server answers at all (False for a local store)."""
    uri = mlflow.get_tracking_uri()
    if not on_tracking_server(uri):
        return False
    try:
        _health_check(uri, timeout)
        return True
    except (OSError, ValueError):
        return False


def check_tracking_server() -> None:
    """Fail in seconds, not after minutes of retries, when an HTTP tracking server is down."""
    uri = mlflow.get_tracking_uri()
    if not on_tracking_server(uri):
        return
    try:
        _health_check(uri, timeout=10)
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"the MLflow tracking server at {uri} is not reachable ({getattr(exc, 'reason', exc)}); "
            "start it or point MLFLOW_TRACKING_URI at a running server"
        ) from None


def resolve(uri: str) -> ResolvedModel:
    """Turn ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/...``, ``models:/m-...`` or a directory into
    a ``ResolvedModel``."""
    check_tracking_server()
    if not uri or not isinstance(uri, str):
        raise BadInputError(
            "no model URI given; pass models:/NAME/VERSION, models:/NAME@ALIAS, runs:/... or a directory"
        )
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
        from .anchor import recorded_tags

        return ResolvedModel(
            uri=uri,
            load_uri=f"models:/{mv.name}/{mv.version}",
            canonical_uri=f"models:/{mv.name}/{mv.version}",
            registered_name=mv.name,
            version=str(mv.version),
            run_id=mv.run_id,
            model_id=getattr(mv, "model_id", None) or (id_match["model_id"] if id_match else None),
            tags=recorded_tags(mv.run_id, dict(mv.tags or {})),
            version_tags=dict(mv.tags or {}),
        )
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/") :].split("/", 1)[0]
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
        raise BadInputError(
            f"{flag} {alias!r} cannot be used: {exc.message.splitlines()[0]} "
            "Choose another alias name, e.g. 'candidate'"
        ) from None


def check_registered_name(name: str | None, flag: str = "--register-as") -> None:
    """Refuse a registered-model name MLflow would refuse, before anything is written."""
    if name is None:
        return
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise BadInputError(f"{flag} {name!r} cannot be used: {exc.message.splitlines()[0]}") from None


# ----------------------------------------------------------------------------- permissions
# What MLflow's basic-auth app requires (mlflow/server/auth/__init__.py, its validators per request type), for
# the requests a READ user is refused: creating a version (CreateModelVersion), moving an alias
# (SetRegisteredModelAlias), tagging a version (SetModelVersionTag) and deleting a registered-model tag
# (DeleteRegisteredModelTag) each need EDIT on the registered model; deleting a version tag, an alias, a run
# (DeleteRun) or a logged model (DeleteLoggedModel) needs MANAGE (on the model, or on the run's experiment).

PERMISSION_CHECK_KEY = "selprune.permission_check."

# A refused request's endpoint → what it does and the permission it needs (first match wins).
_NEEDS = (
    ("/model-versions/create", "create a model version", "EDIT on the registered model"),
    ("/model-versions/set-tag", "tag a model version", "EDIT on the registered model"),
    ("/model-versions/delete-tag", "delete a model-version tag", "MANAGE on the registered model"),
    ("/registered-models/delete-tag", "change a registered model", "EDIT on it"),
    ("/registered-models/alias", "read or move an alias", "READ on the registered model to read, EDIT to move"),
    ("/model-versions/", "read a model version", "READ on its registered model"),
    ("/registered-models/", "read a registered model", "READ on it"),
    ("/runs/delete", "delete a run", "MANAGE on its experiment"),
    ("/logged-models", "read or write a logged model", "READ on its experiment to read, EDIT to write"),
    ("/runs/", "read or write a run", "READ on its experiment to read, EDIT to write"),
    ("/mlflow-artifacts/", "read or write artifacts", "READ on the experiment to read, EDIT to write"),
    ("/experiments/", "use an experiment", "READ on it to read, EDIT to log runs"),
)


def acting_user() -> str:
    """Who decided: the tracking user when the server authenticates, else the OS user."""
    import getpass
    import os

    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def tracking_user() -> str:
    """The user the server sees (MLflow's own environment variable), for messages; never the password."""
    import os

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    return f"user '{user}'" if user else "this client (no MLFLOW_TRACKING_USERNAME)"


def permission_denied(exc: BaseException) -> bool:
    """The server knew the user and refused the request (HTTP 403), as opposed to any other failure."""
    return isinstance(exc, MlflowException) and (
        exc.error_code == "PERMISSION_DENIED" or exc.get_http_status_code() == 403
    )


def access_refused_message(exc: BaseException) -> str | None:
    """One line for a request the server refused: unknown credentials (401), or a permission the user lacks
    (403, naming the request's permission); None for any other failure."""
    text = str(exc)
    code = exc.get_http_status_code() if isinstance(exc, MlflowException) else None
    status = re.search(r"failed with error code (40[13])\b|\b(40[13]) Client Error", text)  # MLflow's, requests'
    if code not in (401, 403):
        code = int(status.group(1) or status.group(2)) if status else None
    if code is None and "PERMISSION_DENIED" in text:
        code = 403
    if code is None:
        return None
    uri = mlflow.get_tracking_uri()
    if code == 401:
        return (
            f"the MLflow server at {uri} did not accept the credentials of {tracking_user()} (401 Unauthorized); "
            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    # MLflow's client names the endpoint; requests (the artifact proxy's refusals) names the URL
    named = re.search(r"endpoint (\S+)|for url: \S*?(/api/[^\s?]+)", text)
    endpoint = (named.group(1) or named.group(2)) if named else ""
    need = next(((what, needs) for fragment, what, needs in _NEEDS if fragment in endpoint), None)
    asked = f" ({endpoint}: to {need[0]} MLflow needs {need[1]})" if need else f" ({text.splitlines()[0][:200]})"
    return (
        f"permission denied: the MLflow server at {uri} refused {tracking_user()} a request{asked}; "
        "ask an admin, or a user with MANAGE on the resource, to grant the permission"
    )


def registered_model(name: str, flag: str = "--model"):
    """The registered model ``name``, or one line naming ``flag`` and what exists (exit 2)."""
    try:
        return client().get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise
        raise BadInputError(f"{flag}: registered model '{name}' does not exist{did_you_mean(name)}") from None


def all_pages(search, **arguments) -> list:
    """Every item a paged MLflow search (``search_runs``, ``search_experiments``, ...) finds, page after page."""
    found: list = []
    token = None
    while True:
        page = search(**arguments, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def registered_model_exists(name: str) -> bool:
    try:
        client().get_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def check_edit_permission(name: str, action: str, remedy: str) -> None:
    """Refuse in one line, before anything is written, a user without EDIT on registered model ``name``.

    The request asked, deleting a registered-model tag (DeleteRegisteredModelTag), needs EDIT on the model,
    the permission that creating a version or moving an alias needs, and writes nothing: the key is new each
    time and MLflow's stores delete a tag only if it exists. Only a tracking server checks permissions;
    other stores (sqlite, files) are not asked.
    """
    if not on_tracking_server(mlflow.get_registry_uri()):
        return
    import uuid

    try:
        client().delete_registered_model_tag(name, PERMISSION_CHECK_KEY + uuid.uuid4().hex)
    except MlflowException as exc:
        if permission_denied(exc):
            raise BadInputError(
                f"permission denied: {tracking_user()} may not {action} registered model '{name}': MLflow needs "
                f"EDIT on it and the user does not have it; nothing was written; {remedy}"
            ) from None
        if not _not_found(exc):
            raise


def check_can_add_versions(name: str) -> None:
    """Before any run exists: refuse a job whose version the server would refuse (EDIT on an existing
    registered model). A new model is not asked about: whoever may create it gets MANAGE on it."""
    if on_tracking_server(mlflow.get_registry_uri()) and registered_model_exists(name):
        check_edit_permission(
            name,
            "add versions to",
            "ask an admin, or a user with MANAGE on the model, to grant EDIT, or register under "
            "a model you may edit (--register-as NAME)",
        )
