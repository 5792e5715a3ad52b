"""Deployment gate: check a version's recorded unlearning metrics against thresholds.

The verdict uses MLflow's own ``validate_evaluation_results`` with
``MetricThreshold``s, is appended to the version's tags whether it passes or
not (never overwriting an earlier decision), and moves an alias only on a pass.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import uuid
from dataclasses import dataclass

from mlflow.models import MetricThreshold
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import ModelValidationFailedException

from . import lineage
from ..errors import BadInputError
from .resolve import check_alias, client, resolve

logger = logging.getLogger(__name__)


@dataclass
class GateResult:
    passed: bool
    model_uri: str
    thresholds: dict
    metrics: dict
    failures: list[str]
    alias_set: str | None = None


def _check_fraction(name: str, value: float | None) -> None:
    if value is not None and (not isinstance(value, (int, float)) or math.isnan(value) or not -1 <= value <= 1):
        raise BadInputError(f"{name} must be a relative change in [-1, 1] (e.g. 0.05 for 5%), got {value}")


def gate(model_uri: str, *, max_retain_drop: float | None = None, min_forget_drop: float | None = None,
         min_selectivity: float | None = None, max_relearn_recovery: float | None = None, metric: str = "top1",
         set_alias: str | None = None, dry_run: bool = False) -> GateResult:
    """Pass if ``retain_<metric>_drop <= max_retain_drop``, ``forget_<metric>_drop >= min_forget_drop``,
    the selectivity *of that metric* ``>= min_selectivity`` and ``relearn_recovery <= max_relearn_recovery``
    (each only when given).

    Every decision is appended to the version as its own tag (time, thresholds,
    verdict, failures, user, alias moved); none is ever overwritten, so a
    stricter what-if gate cannot rewrite the record of the one that promoted
    it. ``dry_run`` decides without writing anything.
    """
    from ..evaluation.drops import selectivity_key

    _check_fraction("--max-retain-drop", max_retain_drop)
    _check_fraction("--min-forget-drop", min_forget_drop)
    if min_selectivity is not None and (math.isnan(min_selectivity) or min_selectivity < 0):
        raise BadInputError(f"--min-selectivity must be >= 0 (forget drop / retain drop), got {min_selectivity}")
    if max_relearn_recovery is not None and (math.isnan(max_relearn_recovery) or max_relearn_recovery < 0):
        raise BadInputError(f"--max-relearn-recovery must be >= 0 (e.g. 0.5), got {max_relearn_recovery}")
    if all(t is None for t in (max_retain_drop, min_forget_drop, min_selectivity, max_relearn_recovery)):
        raise BadInputError("give at least one threshold: --max-retain-drop, --min-forget-drop, --min-selectivity "
                            "or --max-relearn-recovery")
    check_alias(set_alias, "--set-alias")
    resolved = resolve(model_uri)
    if not resolved.is_registered:
        raise BadInputError(f"'{model_uri}' is not a registered model version; gate works on models:/NAME/VERSION")
    tags = resolved.tags
    if lineage.PARENT in tags and tags.get(lineage.COMPLETE) != "true":
        raise BadInputError(f"{resolved.canonical_uri} is an incomplete unlearned version; it cannot pass a gate")
    metrics = lineage.metrics_from_tags(tags)
    wanted = {}
    if max_retain_drop is not None:
        wanted[f"retain_{metric}_drop"] = MetricThreshold(threshold=max_retain_drop, greater_is_better=False)
    if min_forget_drop is not None:
        wanted[f"forget_{metric}_drop"] = MetricThreshold(threshold=min_forget_drop, greater_is_better=True)
    if min_selectivity is not None:
        wanted[selectivity_key(metric)] = MetricThreshold(threshold=min_selectivity, greater_is_better=True)
    if max_relearn_recovery is not None:
        wanted["relearn_recovery"] = MetricThreshold(threshold=max_relearn_recovery, greater_is_better=False)
    missing = [name for name in wanted if name not in metrics]
    if missing:
        raise BadInputError(
            f"{resolved.canonical_uri} has no recorded {', '.join(missing)} (not measured, or not meaningful: "
            "a relative change of a value under 0.01); gate a version registered by `mlflow-selprune prune`"
            + (" with --relearn-steps" if "relearn_recovery" in missing else "")
        )
    failures: list[str] = []
    try:
        mlflow_validate(wanted, metrics)
    except ModelValidationFailedException as exc:
        failures = [line.strip() for line in str(exc).splitlines() if line.strip()]
    thresholds = {"max_retain_drop": max_retain_drop, "min_forget_drop": min_forget_drop,
                  "min_selectivity": min_selectivity, "max_relearn_recovery": max_relearn_recovery, "metric": metric}
    passed = not failures
    alias_set = set_alias if passed and set_alias and not dry_run else None
    if not dry_run:
        name, version = resolved.registered_name, resolved.version
        # microseconds in the key: two decisions within one second still sort in the order they were made
        now = datetime.datetime.now(datetime.timezone.utc)
        record = {"time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "verdict": "pass" if passed else "fail",
                  "thresholds": thresholds, "failures": failures, "user": _user(), "alias_moved": alias_set}
        key = f"{lineage.GATE_RECORD_PREFIX}{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:8]}"
        client().set_model_version_tag(name, version, key, json.dumps(record, sort_keys=True)[:4900])
        if alias_set:
            client().set_registered_model_alias(name, alias_set, version)
    return GateResult(passed, resolved.canonical_uri, thresholds,
                      {k: metrics[k] for k in wanted}, failures, alias_set)


def _user() -> str:
    """Who decided: the tracking user when the server authenticates, else the OS user."""
    import getpass
    import os

    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def mlflow_validate(thresholds: dict[str, MetricThreshold], metrics: dict) -> None:
    """MLflow's validation against absolute thresholds on a hand-built result (raises on failure)."""
    import mlflow

    candidate = EvaluationResult(metrics={k: metrics[k] for k in thresholds}, artifacts={})
    mlflow.validate_evaluation_results(thresholds, candidate)
