"""Find the neurons selective pruning works on: per block, the MLP output
projection and the attention output projection.

A *feed-forward neuron* is an input feature of a block's MLP output projection
(the post-activation hidden unit); an *attention neuron* is an input feature of
the attention output projection (one dimension of one head, before W_O).

Discovery is generic, so families we never named work unchanged:
- the blocks are the ``nn.ModuleList`` with ``config.num_hidden_layers``
  entries (or the longest one);
- in each block, Linear-like modules (``nn.Linear`` or GPT-2's ``Conv1D``)
  under a child whose name mentions attention belong to attention; the last of
  those mapping onto the model width is its output projection (q/k/v come
  first in every family we know);
- outside attention, the module mapping a different width back onto the model
  width is the MLP output projection.
``ARCHITECTURE_OVERRIDES`` pins the two paths for a family whose modules defy
that rule. Convolutional families (ResNet, ConvNeXt, RegNet) are found by
their block classes instead (``engine/convolutional.py``): they have
feed-forward neurons only, and layers of different widths.

Each kind's neurons are addressed as [n_layers, widest layer]; in a model whose
layers differ in width, the positions past a layer's own width are not neurons
(``Architecture.valid``) and are never scored into a choice, pruned or counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from typing import cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import ATTN, FF, KINDS  # noqa: F401 - re-exported for the engine
from ..errors import BadInputError
from .convolutional import conv_projections, is_convolutional, supported_families


# model_type -> (MLP output path, attention output path), relative to a block.
ARCHITECTURE_OVERRIDES: dict[str, tuple[str, str]] = {}

_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)


class UnsupportedArchitectureError(BadInputError):
    """The model's blocks do not have the two projections selective pruning needs."""


@dataclass(frozen=True)
class Projection:
    """One output projection whose input features are the neurons of one layer."""

    layer: int
    kind: str
    name: str  # dotted path from the model root
    module: nn.Module

    @property
    def transposed(self) -> bool:
        """Conv1D stores its weight as [in, out], nn.Linear as [out, in] (nn.Conv2d as [out, in, kh, kw])."""
        return isinstance(self.module, Conv1D)

    @property
    def n_neurons(self) -> int:
        return _in_out(self.module)[0]

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.module.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return cast("torch.Tensor | None", self.module.bias)

    def columns(self) -> torch.Tensor:
        """The weight viewed as [out, in, ...], so ``columns()[:, i]`` is everything neuron i feeds (a
        convolution's input channel: every output and kernel position)."""
        return self.weight.t() if self.transposed else self.weight

    def zero_inputs(self) -> torch.Tensor:
        """Bool [n_neurons]: the neurons whose columns are all zero."""
        columns = self.columns()
        return (columns.transpose(0, 1).reshape(columns.shape[1], -1) == 0).all(dim=1)


@dataclass(frozen=True)
class Architecture:
    """The prunable projections of a model, per kind and layer (a CNN has no attention projections)."""

    model_class: str
    blocks_path: str
    ff: tuple[Projection, ...]
    attn: tuple[Projection, ...]
    n_heads: int | None

    @property
    def n_layers(self) -> int:
        return len(self.ff)

    def projections(self, kind: str) -> tuple[Projection, ...]:
        return self.ff if kind == FF else self.attn

    def widths(self, kind: str) -> list[int]:
        """Each layer's neuron count."""
        return [p.n_neurons for p in self.projections(kind)]

    def shape(self, kind: str) -> tuple[int, int]:
        """[n_layers, widest layer]: the shape of this kind's masks, statistics and scores."""
        widths = self.widths(kind)
        return (len(widths), max(widths, default=0))

    def valid(self, kind: str) -> torch.Tensor:
        """Bool ``shape(kind)``: True where a position is a neuron (all of them, when every layer is as wide)."""
        rows, width = self.shape(kind)
        return torch.arange(width).expand(rows, width) < torch.tensor(self.widths(kind)).reshape(rows, 1)

    def n_neurons(self, kind: str) -> int:
        """The widest layer's neuron count of ``kind`` (every layer's, in a transformer)."""
        return self.shape(kind)[1]

    @property
    def d_mlp(self) -> int:
        return self.n_neurons(FF)

    @property
    def d_attn(self) -> int:
        return self.n_neurons(ATTN)

    def describe(self) -> dict:
        widths = {kind: self.widths(kind) for kind in KINDS}
        return {
            "model_class": self.model_class,
            "blocks": self.blocks_path,
            "n_layers": self.n_layers,
            # one width when every layer has it (transformers), else each layer's (a CNN's stages)
            "d_mlp": _one_or_each(widths[FF]),
            "d_attn": _one_or_each(widths[ATTN]),  # None: no attention (a CNN)
            "n_heads": self.n_heads,
            "ff_projection": self.ff[0].name,
            "attn_projection": self.attn[0].name if self.attn else None,
        }


def _one_or_each(widths: list[int]) -> int | list[int] | None:
    if not widths:
        return None
    return widths[0] if len(set(widths)) == 1 else widths


def check_kinds(arch: Architecture, config) -> None:
    """Refuse pruning a kind of neuron the model does not have (attention neurons in a CNN), before any run."""
    if config.attn_frac > 0 and not arch.attn:
        raise BadInputError(
            f"--attn-frac {config.attn_frac}: {arch.model_class} has no attention neurons (a convolutional network "
            "prunes feed-forward neurons only); leave --attn-frac at 0"
        )


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Conv2d):
        return int(module.in_channels), int(module.out_channels)
    return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]  # nn.Linear's ints


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _config_value(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n_layers = _config_value(model.config, "num_hidden_layers", "n_layer", "num_layers")
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    matching = [item for item in lists if n_layers is not None and len(item[1]) == n_layers]
    pool = matching or lists
    if not pool:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: found no list of transformer blocks (an nn.ModuleList); "
            "selective pruning needs a stack of blocks"
        )
    # Prefer the shallowest (the main stack), then the longest.
    return min(pool, key=lambda item: (item[0].count("."), -len(item[1])))


def _d_model(model: nn.Module) -> int | None:
    return _config_value(model.config, "hidden_size", "n_embd", "d_model", "dim")


def _find_in_block(block: nn.Module, d_model: int, model_type: str) -> tuple[str, str]:
    if model_type in ARCHITECTURE_OVERRIDES:
        return ARCHITECTURE_OVERRIDES[model_type]
    attn_candidates, mlp_candidates = [], []
    for name, module in block.named_modules():
        if not name or not _is_projection(module):
            continue
        in_f, out_f = _in_out(module)
        if out_f != d_model:
            continue
        if _ATTENTION_NAME.search(name):
            attn_candidates.append(name)
        else:
            mlp_candidates.append((name, in_f))
    wider = [name for name, in_f in mlp_candidates if in_f != d_model]
    mlp = wider or [name for name, _ in mlp_candidates]
    if len(mlp) != 1 or not attn_candidates:
        raise LookupError(
            f"MLP output projections found: {mlp or 'none'}; "
            f"attention projections onto width {d_model} found: {attn_candidates or 'none'}"
        )
    return mlp[0], attn_candidates[-1]


def find_architecture(model: nn.Module) -> Architecture:
    """Locate every block's MLP and attention output projections.

    Raises ``UnsupportedArchitectureError`` naming the model class and what
    was looked for when they cannot be found.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"expected a transformers PreTrainedModel, got {type(model).__name__}; "
            "load the model with transformers (AutoModelFor...) first"
        )
    cls = type(model).__name__
    if is_convolutional(model):
        return _convolutional(model)
    d_model = _d_model(model)
    if d_model is None:
        raise UnsupportedArchitectureError(
            f"{cls}: its config names no model width (hidden_size, n_embd or d_model) and it is not a "
            f"convolutional family known here ({supported_families()}), so no neurons could be found; "
            "selective pruning needs a transformer (e.g. ViT or DeiT for images) or one of those CNNs"
        )
    blocks_path, blocks = _find_blocks(model)
    model_type = getattr(model.config, "model_type", "")
    ff, attn = [], []
    for layer, block in enumerate(blocks):
        try:
            mlp_name, attn_name = _find_in_block(block, d_model, model_type)
            mlp_module = block.get_submodule(mlp_name)
            attn_module = block.get_submodule(attn_name)
        except (LookupError, AttributeError) as exc:
            raise UnsupportedArchitectureError(
                f"{cls}: block {blocks_path}.{layer} has no single MLP output projection (a Linear/Conv1D "
                f"mapping the MLP width back to {d_model}) and attention output projection ({exc}); "
                "add an entry to mlflow_selprune.architecture.ARCHITECTURE_OVERRIDES for this family"
            ) from None
        ff.append(Projection(layer, FF, f"{blocks_path}.{layer}.{mlp_name}", mlp_module))
        attn.append(Projection(layer, ATTN, f"{blocks_path}.{layer}.{attn_name}", attn_module))
    n_heads = _config_value(model.config, "num_attention_heads", "n_head", "num_heads")
    return Architecture(cls, blocks_path, tuple(ff), tuple(attn), n_heads)


def _convolutional(model: nn.Module) -> Architecture:
    """A CNN's blocks (``engine/convolutional.py``): feed-forward neurons only, one layer per block."""
    cls = type(model).__name__
    try:
        found = conv_projections(model)
    except LookupError as exc:
        raise UnsupportedArchitectureError(
            f"{cls}: its blocks do not have the output projection selective pruning needs ({exc}); "
            "fix the entry for its model_type in mlflow_selprune.engine.convolutional.CONV_FAMILIES"
        ) from None
    ff = tuple(Projection(layer, FF, f"{block}.{inner}", module) for layer, (block, inner, module) in enumerate(found))
    # the blocks' path with their stage and block numbers as "*": "resnet.encoder.stages.*.layers.*"
    blocks = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", found[0][0])
    return Architecture(cls, blocks, ff, (), None)
