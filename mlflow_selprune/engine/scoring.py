"""Importance functions and the forget/retain score.

A neuron's importance on a dataset summarises its activations there; its score
is how much more important it is on the forget data than on the retain data:
``I(forget) / (I(retain) + eps)``. The ``mean`` scoring is the exception: it
scores the absolute difference of the two mean activations.
"""

from __future__ import annotations

import torch

from ..config import DEFAULT_EPS, SCORINGS, canonical_scoring  # noqa: F401 - re-exported
from ..errors import ConfigError
from .statistics import NeuronStatistics

# importance name -> the sums it needs
REQUIRED_SUMS: dict[str, tuple[str, ...]] = {
    "abs": ("sum_abs",),
    "freq": ("count_pos",),
    "rms": ("sum_sq",),
    "std": ("sum", "sum_sq"),
    "sqrt": ("sum_sqrt",),
    "mean": ("sum",),
    "random": (),
}
assert tuple(REQUIRED_SUMS) == SCORINGS


def check_scoring(name: str) -> str:
    """The canonical name of a known scoring (``rand`` is ``random``), or a ``ConfigError``."""
    canonical = canonical_scoring(name)
    if canonical is None or canonical not in REQUIRED_SUMS:
        raise ConfigError(f"unknown scoring '{name}'; choose one of {', '.join(SCORINGS)}")
    return canonical


def required_sums(*names: str) -> tuple[str, ...]:
    """The union of sums the given scorings need (at least one, so token counts are taken)."""
    needed = {s for name in names for s in REQUIRED_SUMS[check_scoring(name)]}
    return tuple(sorted(needed)) or ("sum_abs",)


def importance(stats: NeuronStatistics, name: str) -> torch.Tensor:
    """I(D, neuron) for every neuron, float64 [n_layers, n_neurons]."""
    name = check_scoring(name)
    n = float(stats.n_tokens)
    s = stats.sums
    if name == "abs":
        return s["sum_abs"] / n
    if name == "freq":
        return s["count_pos"] / n
    if name == "rms":
        return torch.sqrt(s["sum_sq"] / n)
    if name == "std":
        mean = s["sum"] / n
        return torch.sqrt((s["sum_sq"] / n - mean * mean).clamp_min(0.0))
    if name == "sqrt":
        return s["sum_sqrt"] / n
    if name == "mean":
        return s["sum"] / n
    raise ValueError(f"scoring '{name}' has no importance function; choose one of {', '.join(SCORINGS)}")


def score(
    forget: NeuronStatistics,
    retain: NeuronStatistics,
    name: str = "abs",
    *,
    eps: float = 1e-3,
    seed: int = 0,
) -> torch.Tensor:
    """Score every neuron for pruning (higher: more specific to the forget data)."""
    name = check_scoring(name)
    if name == "random":
        shape = next(iter(forget.sums.values())).shape
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(shape, generator=generator, dtype=torch.float64)
    forget.check_finite("forget")
    retain.check_finite("retain")
    i_forget = importance(forget, name)
    i_retain = importance(retain, name).to(i_forget.device)
    if name == "mean":
        return (i_forget - i_retain).abs()
    return i_forget / (i_retain + eps)
