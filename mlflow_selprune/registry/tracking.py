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
import logging
import math
import signal
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelInput

from . import lineage
from .resolve import client

logger = logging.getLogger(__name__)

FAILURE_TAG = lineage.PREFIX + "failure"


def finite(metrics: dict) -> dict:
    """Only finite numbers: MLflow metrics cannot hold NaN meaningfully, and not-meaningful values are NaN."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


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
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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
        dataset = mlflow.data.from_huggingface(data.documents, name=data.spec, digest=data.digest[:32])
        mlflow.log_input(dataset, context=context, tags={lineage.PREFIX + "digest": data.digest})
    if parent.model_id:
        mlflow.log_input(model=LoggedModelInput(model_id=parent.model_id))
    warnings = forget.warnings + retain.warnings
    if warnings:
        mlflow.set_tag(lineage.PREFIX + "data_warnings", " | ".join(warnings)[:4000])


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


def log_step(record: dict) -> None:
    """One kept pruning step's metrics, at its step number."""
    metrics = {"ff_pruned_total": record["ff_pruned_total"], "attn_pruned_total": record["attn_pruned_total"]}
    metrics.update(record.get("metrics", {}))
    mlflow.log_metrics(finite(metrics), step=record["step"])


def log_unlearned_model(model, tokenizer, result, metrics: dict, extra_record: dict, delta: dict | None = None):
    """Masks, scores, record and plot under ``selprune/``, then the model: full (transformers + selprune
    flavor) or, with ``delta`` (parent URI and digests), only what pruning changed."""
    from ..report import plot_forget_vs_retain

    with tempfile.TemporaryDirectory() as tmp:
        files = result.save(tmp, extra_record=extra_record)
        files["plot"] = plot_forget_vs_retain(result.baseline_metrics, result.steps, Path(tmp) / "forget_vs_retain.png")
        for path in files.values():
            mlflow.log_artifact(str(path), artifact_path="selprune")
        pruning_files = {k: str(v) for k, v in files.items() if k != "plot"}
        if delta is None:
            from .flavor import components, log_model

            model_info = log_model(components(model, tokenizer), name="model", pruning_files=pruning_files)
        else:
            from . import delta as delta_flavor

            masks = {"ff": result.ff_mask, "attn": result.attn_mask}
            model_info = delta_flavor.log_model(name="model", masks=masks,
                                                biases=delta_flavor.changed_biases(model, masks),
                                                pruning_files=pruning_files, **delta)
    kept = [record for record in result.steps if record["kept"]]
    # the per-step values are in the history already (logged live); add what only the summary has
    logged = set(kept[-1].get("metrics", {})) if kept else set()
    final = {k: v for k, v in metrics.items() if not k.startswith("parent_") and k not in logged}
    mlflow.log_metrics(finite(final), step=kept[-1]["step"] if kept else 0, model_id=model_info.model_id)
    return model_info


def existing_version(name: str, run_id: str):
    """A version this run already registered (a retried job must not register twice)."""
    for mv in client().search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if mv.tags.get(lineage.COMPLETE) == "true" and mv.tags.get(lineage.RUN_ID) == run_id:
            return mv
    return None


def register(model_info, name: str, run_id: str, tags: dict, alias: str | None) -> str:
    """Create the version with all of its tags in one request (or find this run's), then move the alias."""
    mv = existing_version(name, run_id)
    if mv is None:
        logger.info("registering a new version of '%s' with its lineage tags", name)
        mv = mlflow.register_model(model_info.model_uri, name, tags=tags)
    else:
        logger.info("run %s already registered %s version %s; not registering again", run_id, name, mv.version)
    model_uri = f"models:/{mv.name}/{mv.version}"
    mlflow.set_tag(lineage.PREFIX + "registered_model_uri", model_uri)
    if alias:
        client().set_registered_model_alias(mv.name, alias, mv.version)
    return model_uri
