"""The selective-pruning engine: find neurons, collect statistics, score, select, zero, loop.

Pure torch and transformers: nothing here imports MLflow.
"""

from .architecture import Architecture, UnsupportedArchitectureError, find_architecture
from .control import parent_restored, randomly_pruned, relearn
from .loop import prune
from .result import PruneResult
from .scoring import importance, score
from .selection import select
from .statistics import ModelStatistics, NeuronStatistics, collect_statistics
from .surgery import prune_neurons

__all__ = [
    "Architecture",
    "ModelStatistics",
    "NeuronStatistics",
    "PruneResult",
    "UnsupportedArchitectureError",
    "collect_statistics",
    "find_architecture",
    "importance",
    "parent_restored",
    "prune",
    "prune_neurons",
    "randomly_pruned",
    "relearn",
    "score",
    "select",
]
