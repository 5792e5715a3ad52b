"""Choose which neurons to prune this step: the top-k scores among those not yet pruned."""

from __future__ import annotations

import torch

from ..config import SELECTIONS  # noqa: F401 - re-exported
from ..errors import ConfigError, NonFiniteActivationsError


def _top_k(scores: torch.Tensor, available: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k best available scores; ties go to the lower flat index."""
    k = min(k, int(available.sum()))
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    masked = torch.where(available, scores, torch.full_like(scores, -torch.inf))
    # a stable sort keeps equal scores in index order
    order = torch.sort(masked, descending=True, stable=True).indices
    return order[:k]


def select(
    scores: torch.Tensor,
    pruned: torch.Tensor,
    frac: float,
    *,
    selection: str = "global",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """A bool mask [n_layers, n_neurons] of the neurons to prune now.

    ``k = round(frac * all neurons)`` across all layers (global), or
    ``round(frac * the layer's neurons)`` in each layer (per-layer); already-pruned
    neurons are never chosen again. ``valid`` (``Architecture.valid``): which positions are neurons, in a model
    whose layers differ in width; the others are never chosen or counted.
    """
    if selection not in SELECTIONS:
        raise ConfigError(f"unknown --selection '{selection}'; choose 'global' or 'per-layer'")
    if torch.isnan(scores).any():
        raise NonFiniteActivationsError("some scores are NaN: the activation statistics are not finite")
    scores = scores.detach().to("cpu", torch.float64)
    pruned = pruned.to("cpu")
    valid = torch.ones_like(pruned) if valid is None else valid.to("cpu")
    available = valid & ~pruned
    chosen = torch.zeros_like(pruned)
    if selection == "global":
        k = round(frac * int(valid.sum()))
        chosen.view(-1)[_top_k(scores.reshape(-1), available.reshape(-1), k)] = True
    else:
        for layer in range(scores.shape[0]):
            k = round(frac * int(valid[layer].sum()))
            chosen[layer, _top_k(scores[layer], available[layer], k)] = True
    return chosen
