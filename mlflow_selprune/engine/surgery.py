"""Weight surgery: prune neurons by zeroing their input columns in the output projections.

The change lives in the weights themselves, so a pruned model is a plain
Hugging Face model: ``save_pretrained``/``from_pretrained`` carry it anywhere,
no hooks or masks needed at inference time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BadInputError
from .architecture import Architecture


@dataclass
class Undo:
    """What one surgery overwrote, so a step can be rolled back exactly."""

    entries: list  # (projection, column indices, saved columns, saved bias or None)

    def restore(self) -> None:
        with torch.no_grad():
            for projection, index, columns, bias in self.entries:
                projection.columns()[:, index.to(columns.device)] = columns
                if bias is not None:
                    projection.module.bias.copy_(bias)


def prune_neurons(
    arch: Architecture,
    kind: str,
    mask: torch.Tensor,
    *,
    mean_offset: torch.Tensor | None = None,
) -> Undo:
    """Zero the input columns of ``mask``'s neurons (bool [n_layers, n_neurons]).

    With ``mean_offset`` (float [n_layers, n_neurons], the neurons' mean
    activations), the pruned neurons' average contribution ``W[:, i] * mean_i``
    is folded into the projection bias, so they output a constant instead of
    nothing. That needs a bias: projections without one raise ``ValueError``
    before any weight is touched.
    """
    projections = arch.projections(kind)
    if mask.shape != arch.shape(kind):
        raise ValueError(f"{kind} mask has shape {tuple(mask.shape)}, expected {arch.shape(kind)}")
    if mean_offset is not None:
        missing = [p.name for p, m in zip(projections, mask) if m.any() and p.module.bias is None]
        if missing:
            raise BadInputError(
                f"the mean offset folds into the projection bias, but {missing[0]} has none; "
                "prune without the attention mean offset for this model"
            )
    _refuse_offloaded([p for p, m in zip(projections, mask) if m.any()])
    _refuse_past_width(arch, kind, mask)
    entries = []
    with torch.no_grad():
        for projection, layer_mask in zip(projections, mask):
            index = layer_mask.nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            columns = projection.columns()
            index = index.to(columns.device)
            saved_bias = None
            if mean_offset is not None:
                bias = projection.bias
                assert bias is not None  # checked above, before any weight was touched
                saved_bias = bias.detach().clone()
                means = mean_offset[projection.layer, index.cpu()].to(columns.device, torch.float64)
                bias += (columns[:, index].double() @ means).to(bias.dtype)
            entries.append((projection, index, columns[:, index].clone(), saved_bias))
            columns[:, index] = 0
    return Undo(entries)


def _refuse_past_width(arch: Architecture, kind: str, mask: torch.Tensor) -> None:
    """A mask naming a position past a layer's width (a narrower CNN stage) names no neuron: refused."""
    if (mask.cpu() & ~arch.valid(kind)).any():
        raise ValueError(f"{kind} mask selects positions past a layer's width {arch.widths(kind)}")


def _refuse_offloaded(projections) -> None:
    """Weights offloaded to disk (on the meta device) can be read by a forward pass, never edited in place."""
    offloaded = [p.name for p in projections if p.module.weight.device.type == "meta"]
    if offloaded:
        raise BadInputError(
            f"{offloaded[0]} is offloaded to disk (its weight is not in memory), so its columns cannot be read or "
            "zeroed; load the model without disk offload (more memory, or --device cpu)"
        )


def pruned_columns(arch: Architecture, kind: str) -> torch.Tensor:
    """Bool ``arch.shape(kind)``: which neurons' columns are all zero in the weights now (False past a layer's
    width)."""
    _refuse_offloaded(arch.projections(kind))
    dead = torch.zeros(arch.shape(kind), dtype=torch.bool)
    for layer, projection in enumerate(arch.projections(kind)):
        dead[layer, : projection.n_neurons] = projection.zero_inputs().cpu()
    return dead


def capture(arch: Architecture, kind: str, mask: torch.Tensor) -> Undo:
    """The current columns of ``mask``'s neurons (and their projections' biases), to put back later."""
    entries = []
    with torch.no_grad():
        for projection, layer_mask in zip(arch.projections(kind), mask):
            index = layer_mask.nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            columns = projection.columns()
            index = index.to(columns.device)
            bias = projection.bias
            entries.append(
                (projection, index, columns[:, index].clone(), None if bias is None else bias.detach().clone())
            )
    return Undo(entries)
