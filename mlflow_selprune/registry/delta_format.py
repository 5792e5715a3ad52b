"""The delta format: what a delta version stores and how masks and biases turn a parent into the version.

Shared by the flavor that writes delta versions (``registry.delta``) and the
loader that rebuilds them (``registry.loading``), so neither imports the other.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import KINDS
from ..errors import BadInputError

FLAVOR_NAME = "selprune"
DELTA_DIR = "delta"
MASKS_FILE = "masks.safetensors"
BIASES_FILE = "biases.safetensors"
MAX_CHAIN = 50


class DeltaError(BadInputError):
    """A delta version cannot be rebuilt exactly: a link is missing or a digest does not match."""


def pack_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bool masks to bit-packed uint8 tensors (1 bit per neuron) plus their shapes."""
    out = {}
    for kind, mask in masks.items():
        bits = np.packbits(mask.to(torch.bool).cpu().numpy().reshape(-1))
        out[f"{kind}_bits"] = torch.from_numpy(bits.copy())
        out[f"{kind}_shape"] = torch.tensor(list(mask.shape), dtype=torch.int64)
    return out


def unpack_masks(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    masks = {}
    for kind in KINDS:
        shape = tuple(stored[f"{kind}_shape"].tolist())
        count = int(np.prod(shape))
        bits = np.unpackbits(stored[f"{kind}_bits"].numpy())[:count]
        masks[kind] = torch.from_numpy(bits.astype(bool).reshape(shape))
    return masks


def is_delta(flavors: dict) -> bool:
    return flavors.get(FLAVOR_NAME, {}).get("storage") == "delta"


def apply_delta(model, masks: dict[str, torch.Tensor], biases: dict[str, torch.Tensor]) -> None:
    """Zero the masked neurons' columns and put back the stored biases: the parent becomes the pruned model."""
    from ..engine.architecture import find_architecture
    from ..engine.surgery import prune_neurons

    arch = find_architecture(model)
    for kind in KINDS:
        if masks[kind].any():
            prune_neurons(arch, kind, masks[kind])
    with torch.no_grad():
        for projection in arch.attn:
            bias = projection.bias
            if projection.name in biases and bias is not None:
                bias.copy_(biases[projection.name].to(bias.device))
