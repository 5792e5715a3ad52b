"""mlflow-selprune: machine unlearning by selective pruning, as an MLflow plugin.

Public Python API (stable names):
- ``collect_statistics(model, batches)``: per-neuron activation sums
- ``prune(model, forget_batches, retain_batches, ...)``: prune in place, get masks and records
- ``find_architecture(model)``: the projections whose inputs are the neurons
- ``evaluate_model(model, batches, ...)``: next-token metrics (``evaluate`` module)
- ``prepare_data(DATA, tokenizer, ...)``: forget/retain DATA to disjoint collect/eval batches
- ``log_model`` / ``save_model`` / ``load_model``: the ``selprune`` MLflow flavor
"""
__version__ = "0.1.0"

from .architecture import (  # noqa: E402
    Architecture,
    UnsupportedArchitectureError,
    find_architecture,
)
from .data import DataError, PreparedData, prepare_data  # noqa: E402
from .evaluation import evaluate_model  # noqa: E402
from .flavor import load_model, log_model, save_model  # noqa: E402
from .pruning import PruneConfig, PruneResult, prune  # noqa: E402
from .scoring import SCORINGS, importance, score  # noqa: E402
from .selection import select  # noqa: E402
from .statistics import ModelStatistics, NeuronStatistics, collect_statistics  # noqa: E402
from .surgery import prune_neurons  # noqa: E402

__all__ = [
    "Architecture",
    "ModelStatistics",
    "NeuronStatistics",
    "PruneConfig",
    "PruneResult",
    "SCORINGS",
    "UnsupportedArchitectureError",
    "DataError",
    "PreparedData",
    "collect_statistics",
    "evaluate_model",
    "load_model",
    "log_model",
    "prepare_data",
    "save_model",
    "find_architecture",
    "importance",
    "prune",
    "prune_neurons",
    "score",
    "select",
]
