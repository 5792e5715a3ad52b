"""Deployment gate: check a version's recorded unlearning metrics against thresholds.

The verdict uses MLflow's own ``validate_evaluation_results`` with
``MetricThreshold``s, is written to the version's tags whether it passes or
not, and moves an alias only on a pass.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

from mlflow.models import MetricThreshold
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import ModelValidationFailedException

from . import lineage
from .registry import BadInputError, client, resolve

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
         min_selectivity: float | None = None, metric: str = "top1", set_alias: str | None = None) -> GateResult:
    """Pass if ``retain_<metric>_drop <= max_retain_drop``, ``forget_<metric>_drop >= min_forget_drop``
    and ``selectivity >= min_selectivity`` (each only when given)."""
    _check_fraction("max_retain_drop", max_retain_drop)
    _check_fraction("min_forget_drop", min_forget_drop)
    if min_selectivity is not None and (math.isnan(min_selectivity) or min_selectivity < 0):
        raise BadInputError(f"min_selectivity must be >= 0 (forget drop / retain drop), got {min_selectivity}")
    if max_retain_drop is None and min_forget_drop is None and min_selectivity is None:
        raise BadInputError("give at least one threshold: --max-retain-drop, --min-forget-drop or --min-selectivity")
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
        wanted["selectivity"] = MetricThreshold(threshold=min_selectivity, greater_is_better=True)
    missing = [name for name in wanted if name not in metrics]
    if missing:
        raise BadInputError(
            f"{resolved.canonical_uri} has no recorded {', '.join(missing)}; "
            "gate a version registered by `mlflow-selprune prune`"
        )
    failures: list[str] = []
    try:
        mlflow_validate(wanted, metrics)
    except ModelValidationFailedException as exc:
        failures = [line.strip() for line in str(exc).splitlines() if line.strip()]
    thresholds = {"max_retain_drop": max_retain_drop, "min_forget_drop": min_forget_drop,
                  "min_selectivity": min_selectivity, "metric": metric}
    passed = not failures
    c = client()
    name, version = resolved.registered_name, resolved.version
    c.set_model_version_tag(name, version, lineage.GATE_THRESHOLDS, json.dumps(thresholds, sort_keys=True))
    c.set_model_version_tag(name, version, lineage.GATE_FAILED, "; ".join(failures)[:4000] or "none")
    c.set_model_version_tag(name, version, lineage.PREFIX + "gate.time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    c.set_model_version_tag(name, version, lineage.GATE_VERDICT, "pass" if passed else "fail")
    alias_set = None
    if passed and set_alias:
        c.set_registered_model_alias(name, set_alias, version)
        alias_set = set_alias
    return GateResult(passed, resolved.canonical_uri, thresholds,
                      {k: metrics[k] for k in wanted}, failures, alias_set)


def mlflow_validate(thresholds: dict[str, MetricThreshold], metrics: dict) -> None:
    """MLflow's validation against absolute thresholds on a hand-built result (raises on failure)."""
    import mlflow

    candidate = EvaluationResult(metrics={k: metrics[k] for k in thresholds}, artifacts={})
    mlflow.validate_evaluation_results(thresholds, candidate)
