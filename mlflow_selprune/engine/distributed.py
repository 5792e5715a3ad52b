"""Multi-process helpers on top of Accelerate: one place for the collectives we use."""

from __future__ import annotations

import torch


def all_reduce_sum(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (every process gets the total)."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.contiguous(), reduction="sum")
