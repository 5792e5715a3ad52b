"""Evaluation: metric modules for ``evaluate`` (``metrics/``), the model passes that feed them, and the
derived numbers (drops, selectivity) with their written definitions."""

from .drops import control_metrics, relative_drop, relative_drops, relearn_recovery, selectivity, summary_metrics
from .model_metrics import evaluate_model
from .next_token import METRIC_NAMES, NEXT_TOKEN_METRIC_PATH, next_token_metric, token_statistics

__all__ = [
    "METRIC_NAMES",
    "NEXT_TOKEN_METRIC_PATH",
    "control_metrics",
    "evaluate_model",
    "next_token_metric",
    "relative_drop",
    "relative_drops",
    "relearn_recovery",
    "selectivity",
    "summary_metrics",
    "token_statistics",
]
