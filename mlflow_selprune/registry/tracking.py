"""The MLflow run of an unlearning job: opened once the inputs are checked, filled live, closed honestly.

The run is visible from the first step: params and datasets go in at the
start, each step's metrics as it finishes (the UI's charts fill while the
job works), and the status at the end is FINISHED, FAILED (with the one-line
reason in ``selprune.failure``) or KILLED. A run is not a version: the
registry guarantees (no version without complete lineage) are kept by
``register``, which creates the version with every tag in one request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelInput

from ..errors import BadInputError, ServerFailure, causes
from . import lineage
from .resolve import client, permission_denied, tracking_server_answers, tracking_user

logger = logging.getLogger(__name__)

FAILURE_TAG = lineage.PREFIX + "failure"


def finite(metrics: dict) -> dict:
    """Only finite numbers: MLflow metrics cannot hold NaN meaningfully, and not-meaningful values are NaN."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


@contextlib.contextmanager
def job_run(run_name: str | None, kind: str, enabled: bool = True):
    """An MLflow run around a job (None when ``enabled`` is false: non-main processes log nothing).

    Nested under an active run (e.g. the demo's, or ``mlflow run``'s) when there is one.
    """
    if not enabled:
        yield None
        return
    import os

    nested = mlflow.active_run() is not None
    if not nested and os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()  # the run `mlflow run` (or a retried job) made: keep its name
    else:
        run = mlflow.start_run(run_name=run_name, nested=nested)
    mlflow.set_tag(lineage.PREFIX + "kind", kind)
    previous = _sigterm_as_interrupt()
    try:
        yield run
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            mlflow.end_run("FINISHED")
            raise
        _end_failed(run, "interrupted", "KILLED")
        raise
    except BaseException as exc:
        _end_failed(run, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "FAILED")
        if not isinstance(exc, ServerFailure) and server_lost(exc):
            raise ServerFailure(
                f"the MLflow tracking server at {mlflow.get_tracking_uri()} stopped answering during run "
                f"{run.info.run_id}; once it is back, rerun with MLFLOW_RUN_ID={run.info.run_id} to finish this "
                "run (it registers at most one version)"
            ) from exc
        if isinstance(exc, RegistrationRefused):
            resumed = not nested and bool(os.environ.get("MLFLOW_RUN_ID"))  # `mlflow run`'s, not this job's
            raise BadInputError(f"{exc}; {_discard(run, exc.model_id, keep_run=resumed)}") from exc
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# What requests/urllib3 say when nothing answers at the server's address (refused, reset, cut mid-request).
_UNREACHABLE = (
    "Connection refused",
    "Failed to establish a new connection",
    "RemoteDisconnected",
    "Connection aborted",
    "Connection reset",
    "Remote end closed connection",
    "ConnectionResetError",
)


def server_unreachable(exc: BaseException) -> bool:
    """The tracking server went away (or was never there): as opposed to an answer that refuses the request."""
    return any(marker in str(cause) for cause in causes(exc) for marker in _UNREACHABLE)


def server_lost(exc: BaseException) -> bool:
    """The connection failed *and* the server does not answer its health check: gone, not just refusing one
    request (a server that cuts an upload it cannot store also resets the connection)."""
    return server_unreachable(exc) and not tracking_server_answers()


def _sigterm_as_interrupt():
    """SIGTERM (a cancelled CI job, ``kill``) ends the run as KILLED instead of leaving it RUNNING."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt("terminated")

    return signal.signal(signal.SIGTERM, handler)


def _end_failed(run, reason: str, status: str) -> None:
    try:
        client().set_tag(run.info.run_id, FAILURE_TAG, reason[:500])
        mlflow.end_run(status)
    except Exception:  # noqa: BLE001 - the server may be what failed; the original error matters more
        logger.debug("could not mark run %s as %s", run.info.run_id, status, exc_info=True)


def log_inputs(*, parent, forget, retain, params: dict) -> None:
    """Params (``None`` as the string), the datasets as inputs with their digests, the parent as model input."""
    mlflow.log_params(_new_params({k: ("None" if v is None else v) for k, v in params.items()}))
    for data, context in ((forget, "forget"), (retain, "retain")):
        dataset = mlflow.data.from_huggingface(  # type: ignore[attr-defined]  # mlflow.data's lazy attribute
            data.documents, name=data.spec, digest=data.digest[:32]
        )
        _retry_on_duplicate(
            lambda dataset=dataset, context=context, data=data: mlflow.log_input(
                dataset, context=context, tags={lineage.PREFIX + "digest": data.digest}
            )
        )
    if parent.model_id:
        mlflow.log_input(model=LoggedModelInput(model_id=parent.model_id))
    warnings = forget.warnings + retain.warnings
    if warnings:
        mlflow.set_tag(lineage.PREFIX + "data_warnings", " | ".join(warnings)[:4000])


# How a database refuses the second of two concurrent inserts of one row (PostgreSQL, sqlite, MySQL).
_DUPLICATE = ("UniqueViolation", "duplicate key value", "UNIQUE constraint failed", "Duplicate entry")


def _retry_on_duplicate(request, attempts: int = 5):
    """Concurrent jobs logging the same dataset race to insert its row; the loser's retry finds it there.

    MLflow's SQL store checks for the dataset, then inserts it: two jobs that check at once both insert,
    and the database refuses one with a unique-key error. Retried a few times, then the error stands.
    """
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return request()
        except MlflowException as exc:
            if attempt == attempts - 1 or not any(marker in str(exc) for marker in _DUPLICATE):
                raise
            logger.debug("a concurrent job inserted the same row; retrying (%s)", str(exc).splitlines()[0])
            time.sleep(0.2 * (attempt + 1))


def _same_value(logged: str, value) -> bool:
    """The same setting spelled two ways: '0.10' as typed to `mlflow run` and 0.1 as parsed, '01' and 1."""
    if logged == str(value):
        return True
    try:
        return not isinstance(value, bool) and float(logged) == float(value)
    except (TypeError, ValueError):
        return False


def _new_params(params: dict) -> dict:
    """The params the active run does not hold yet.

    `mlflow run` logs each entry-point parameter to the run as typed before the job starts; the job
    resumes that run (MLFLOW_RUN_ID) and must not log the same value again in another spelling (MLflow
    refuses to change a param). A genuinely different value is kept, so MLflow still refuses it.
    """
    run = mlflow.active_run()
    logged = client().get_run(run.info.run_id).data.params if run is not None else {}
    return {k: v for k, v in params.items() if k not in logged or not _same_value(logged[k], v)}


def log_step(record: dict, prefix: str = "") -> None:
    """One kept pruning step's metrics, at its step number (``prefix="select_"``: a budget run's, measured on
    the select split, kept apart from the reported metrics of the same name)."""
    metrics = {"ff_pruned_total": record["ff_pruned_total"], "attn_pruned_total": record["attn_pruned_total"]}
    metrics.update({prefix + name: value for name, value in record.get("metrics", {}).items()})
    mlflow.log_metrics(finite(metrics), step=record["step"])


def log_relearn_curve(curve: dict) -> None:
    """The relearning curve as step metrics: ``relearn_curve_*``, one point per measured step."""
    from ..evaluation.relearning import curve_history

    for step, metrics in curve_history(curve):
        mlflow.log_metrics(finite(metrics), step=step)


def log_unlearned_model(model, tokenizer, result, metrics: dict, extra_record: dict, delta: dict | None = None):
    """Masks, scores, record and plot under ``selprune/``, then the model: full (transformers + selprune
    flavor) or, with ``delta`` (parent URI and digests), only what pruning changed.

    Returns ``(model_info, artifact digests)``: the sha256 of the masks, scores and record as written, for the
    version's ``selprune.artifacts_sha256`` tag. A resumed run that already anchored its lineage keeps the
    files it recorded (this attempt's record differs in its timings only) and returns their recorded digests."""
    from ..report import plot_pruning

    active = mlflow.active_run()
    assert active is not None, "log_unlearned_model runs inside the job's run"
    anchored = recorded_lineage(active.info.run_id)
    with tempfile.TemporaryDirectory() as tmp, _artifact_store_failures():
        files = result.save(tmp, extra_record=extra_record)
        files["plot"] = plot_pruning(result, metrics, Path(tmp) / "forget_vs_retain.png")
        pruning_files = {k: str(v) for k, v in files.items() if k != "plot"}
        if anchored is None:
            for path in files.values():
                mlflow.log_artifact(str(path), artifact_path="selprune")
            digests = lineage.artifact_digests(pruning_files)
        else:
            digests = json.loads(anchored.get(lineage.ARTIFACTS_SHA, "{}"))
        model_info = _anchored_model(active, anchored) if anchored is not None else None
        if model_info is not None:
            logger.info(
                "run %s already logged this model (%s); reusing it",
                active.info.run_id,
                model_info.model_id,
            )
        elif delta is None:
            from .flavor import components, log_model

            model_info = log_model(components(model, tokenizer), name="model", pruning_files=pruning_files)
        else:
            from . import delta as delta_flavor

            masks = {"ff": result.ff_mask, "attn": result.attn_mask}
            model_info = delta_flavor.log_model(
                name="model",
                masks=masks,
                biases=delta_flavor.changed_biases(model, masks),
                pruning_files=pruning_files,
                **delta,
            )
    kept = [record for record in result.steps if record["kept"]]
    # the per-step values are in the history already (logged live); add what only the summary has (everything,
    # for a budget run, whose steps were logged as select_*)
    logged = set(kept[-1].get("metrics", {})) if kept and result.select_metrics is None else set()
    final = {k: v for k, v in metrics.items() if not k.startswith("parent_") and k not in logged}
    mlflow.log_metrics(finite(final), step=kept[-1]["step"] if kept else 0, model_id=model_info.model_id)
    # the parent is step 0 of every metric's history: add what step 0 did not log (the --code-tasks numbers)
    at_start = set(result.steps[0].get("metrics", {})) if result.steps else set()
    parent = {k[len("parent_") :]: v for k, v in metrics.items() if k.startswith("parent_")}
    mlflow.log_metrics(finite({k: v for k, v in parent.items() if k not in at_start}), step=0)
    return model_info, digests


def _anchored_model(run, anchored: dict):
    """The model a resumed run logged before it anchored its lineage: the one whose files have the anchored
    manifest digest. Reused, so a retry logs no second (orphan) model; None when there is none."""
    import types

    from . import manifest

    wanted = anchored.get(lineage.MANIFEST_SHA)
    if wanted is None:
        return None
    found = client().search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    for logged in found:
        uri = f"models:/{logged.model_id}"
        if manifest.digest(manifest.of_artifacts(uri)) == wanted:
            return types.SimpleNamespace(model_uri=uri, model_id=logged.model_id)
    return None


@contextlib.contextmanager
def _artifact_store_failures():
    """A server that answers but cannot store the artifacts (its destination full or read-only, its store
    down) fails the job in one line that says where to look; nothing is registered after it."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - narrowed below: only the store's failures are reworded
        from mlflow.exceptions import MlflowException
        from requests import RequestException

        if server_lost(exc) or not isinstance(exc, (MlflowException, RequestException)):
            raise
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ServerFailure(
            f"the MLflow server could not store the run's artifacts under {mlflow.get_artifact_uri()} ({reason}); "
            "check the server's artifact destination (full? read-only?) and its log; nothing was registered"
        ) from exc


class RegistrationRefused(BadInputError):
    """The server refused to create the version for lack of permission (checked before the run too, see
    ``resolve.check_can_add_versions``; this is the second line): ``job_run`` deletes the run's logged model and
    the run, and says what it could not delete."""

    def __init__(self, name: str, model_id: str | None):
        self.model_id = model_id
        super().__init__(
            f"permission denied: {tracking_user()} may not add versions to registered model '{name}': "
            "MLflow needs EDIT on it (and READ on the run) and the user does not have it; no version "
            "was registered; ask an admin, or a user with MANAGE on the model, to grant EDIT"
        )


def _discard(run, model_id: str | None, keep_run: bool = False) -> str:
    """Delete the logged model and the run of a refused job (MLflow's deletion: ``mlflow gc`` purges them); what
    the server refuses to delete too (DeleteRun and DeleteLoggedModel need MANAGE on the experiment) is named."""
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    targets = [(f"logged model {model_id}", lambda: client().delete_logged_model(model_id))] if model_id else []
    if not keep_run:
        targets.append((f"FAILED run {run_id}", lambda: client().delete_run(run_id)))
    left = [f"FAILED run {run_id} (resumed from MLFLOW_RUN_ID: not this job's to delete)"] if keep_run else []
    for what, delete in targets:
        try:
            delete()
        except Exception:  # noqa: BLE001 - refused or failed, either way it is left behind and said so
            logger.debug("could not delete %s", what, exc_info=True)
            left.append(what)
    if not left:
        return "the job's run and logged model were deleted"
    return (
        f"left behind in experiment {experiment_id}: {' and '.join(left)}; deleting them needs MANAGE on the "
        "experiment: ask its owner or an admin"
    )


def existing_version(name: str, run_id: str):
    """A version this run already registered (a retried job must not register twice)."""
    for mv in client().search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if mv.run_id == run_id and lineage.recorded_tags(run_id, dict(mv.tags)).get(lineage.COMPLETE) == "true":
            return mv
    return None


def recorded_lineage(run_id: str) -> dict | None:
    """The tags a run already anchored (``selprune/lineage.json`` under its param), or None: a fresh run."""
    if lineage.anchored_digest(run_id) is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:  # a record that cannot be fetched fails the job, as it should
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=lineage.LINEAGE_RECORD, dst_path=tmp)
        return json.loads(Path(path).read_text())


def record_lineage(run_id: str, tags: dict) -> None:
    """Anchor the version's tags before it exists: ``selprune/lineage.json`` in the run, its sha256 as the run
    param ``selprune.lineage_sha256``. A param cannot be changed or deleted, so a later tag edit shows.

    A job resumed into the same run recomputes the same tags (the pipeline is deterministic) and finds the
    param already there; a different one means different inputs, refused before anything is registered.
    """
    record = lineage.lineage_record(tags)
    digest = hashlib.sha256(record).hexdigest()
    logged = lineage.anchored_digest(run_id)
    if logged == digest:
        return
    if logged is not None:
        raise BadInputError(
            f"run {run_id} already recorded a different lineage (sha256 {logged[:12]}, this job's "
            f"{digest[:12]}): its inputs or settings changed; start a new run (unset MLFLOW_RUN_ID)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(lineage.LINEAGE_RECORD).name
        path.write_bytes(record)
        client().log_artifact(run_id, str(path), artifact_path=str(Path(lineage.LINEAGE_RECORD).parent))
    client().log_param(run_id, lineage.LINEAGE_PARAM, digest)


def register_version(model_uri: str, name: str, tags: dict, description: str | None = None):
    """Create a version of ``name`` from ``model_uri`` with all of its tags and its description in one request.

    What ``mlflow.register_model`` does, with the description it cannot take and without its own lines on
    stderr ("Successfully registered model", "Created version"): the command says what it registers and
    prints the new version itself. Linking the logged model to the new version comes after it exists: a
    failure there is a warning naming the version."""
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        client().create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    logged = model_uri.removeprefix("models:/")
    model_id = logged if model_uri.startswith("models:/m-") and "/" not in logged else None
    # the version shows a few tags; the rest are in the record its run anchored (record_lineage, before this)
    mv = client().create_model_version(
        name, model_uri, tags=lineage.shown(tags), description=description, model_id=model_id
    )
    if model_id is not None:

        def link():
            linked = json.loads(client().get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
            versions = linked + [{"name": mv.name, "version": mv.version}]
            client().set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})

        after_registration(f"models:/{mv.name}/{mv.version}", f"link logged model {model_id} to it", link)
    return mv


def after_registration(model_uri: str, what: str, action) -> bool:
    """Run ``action``, a step after the version exists: the version is complete without it, so a failure is a
    warning naming the version (the job still succeeds), never an error that would hide it."""
    try:
        action()
        return True
    except Exception as exc:  # noqa: BLE001 - the version stands; say what is missing and go on
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        logger.warning("%s is registered and complete, but could not %s: %s", model_uri, what, reason)
        return False


def register(model_info, name: str, run_id: str, tags: dict, alias: str | None, description: str | None = None) -> str:
    """Record the lineage in the run, create the version with all of its tags and its description in one
    request (or find this run's), then move the alias: from there on a failure is a warning naming the version."""
    record_lineage(run_id, tags)
    mv = existing_version(name, run_id)
    if mv is None:
        logger.info("registering a new version of '%s' with its lineage tags", name)
        try:
            mv = register_version(model_info.model_uri, name, tags, description)
        except mlflow.exceptions.MlflowException as exc:
            if not permission_denied(exc):
                raise
            raise RegistrationRefused(name, getattr(model_info, "model_id", None)) from exc
    else:
        logger.info("run %s already registered %s version %s; not registering again", run_id, name, mv.version)
    model_uri = f"models:/{mv.name}/{mv.version}"
    after_registration(
        model_uri,
        f"tag run {run_id} with it",
        lambda: mlflow.set_tag(lineage.PREFIX + "registered_model_uri", model_uri),
    )
    if alias:
        after_registration(
            model_uri,
            f"move @{alias} to it (move it with MlflowClient().set_registered_model_alias)",
            lambda: client().set_registered_model_alias(mv.name, alias, mv.version),
        )
    return model_uri
