"""mlflow-selprune: machine unlearning by selective pruning, as an MLflow plugin.

Public Python API (stable names, imported on first use so that ``import
mlflow_selprune`` and the CLI's ``--help`` stay fast):
- ``collect_statistics(model, batches)``: per-neuron activation sums
- ``prune(model, forget_batches, retain_batches, PruneConfig(...))``: prune in place, get masks and records
- ``find_architecture(model)``: the projections whose inputs are the neurons
- ``evaluate_model(model, batches, ...)``: forget/retain metrics by model kind (``evaluate`` modules)
- ``prepare_data(DATA, tokenizer, DataOptions(...))``: forget/retain DATA to disjoint collect/eval batches
- ``log_model`` / ``save_model`` / ``load_model``: the ``selprune`` MLflow flavor
- ``run_prune(model_uri, forget, retain, ...)``: the whole registry round trip
"""

from ._lazy import lazy_getattr
from ._version import __version__
from .config import DataOptions, EvidenceOptions, PruneConfig, SourceOptions
from .errors import BadInputError, ConfigError

_LAZY = {
    "Architecture": "engine.architecture",
    "UnsupportedArchitectureError": "engine.architecture",
    "find_architecture": "engine.architecture",
    "ModelStatistics": "engine.statistics",
    "NeuronStatistics": "engine.statistics",
    "collect_statistics": "engine.statistics",
    "PruneResult": "engine.result",
    "prune": "engine.loop",
    "SCORINGS": "engine.scoring",
    "importance": "engine.scoring",
    "score": "engine.scoring",
    "select": "engine.selection",
    "prune_neurons": "engine.surgery",
    "DataError": "data.sources",
    "PreparedData": "data.batching",
    "prepare_data": "data.batching",
    "evaluate_model": "evaluation.model_metrics",
    "load_model": "registry.flavor",
    "log_model": "registry.flavor",
    "save_model": "registry.flavor",
    "run_prune": "unlearn",
    "run_evaluate": "unlearn",
}

__all__ = [
    "BadInputError",
    "ConfigError",
    "DataOptions",
    "EvidenceOptions",
    "PruneConfig",
    "SourceOptions",
    "__version__",
    *_LAZY,
]


__getattr__ = lazy_getattr(__name__, _LAZY)
