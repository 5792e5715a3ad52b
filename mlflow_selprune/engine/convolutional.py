"""Neurons of convolutional image classifiers, in the engine's own terms.

A *neuron* is still an input feature of a block's output projection, so the
statistics, scoring, selection, surgery and the random control need nothing
new:

- **ConvNeXt** (v1 and v2): each block is depthwise conv → norm → pointwise
  Linear (4×) → GELU → pointwise Linear. A neuron is an input feature of the
  second pointwise Linear (``pwconv2``): the feed-forward neuron exactly.
- **ResNet** (basic and bottleneck blocks) and **RegNet** (X and Y): a neuron
  is an input channel of the block's last convolution. Pruning it zeroes that
  input channel of the convolution's weight (every output, every kernel
  position), so the change lives in the weights as for a Linear.

A CNN has no attention neurons, and its blocks differ in width from stage to
stage: the engine keeps each kind's neurons as [n_layers, widest layer] with
the narrower layers' extra positions marked invalid (``Architecture.valid``).

One entry in ``CONV_FAMILIES`` adds a family whose blocks fit this definition
(docs/model-kinds.md): the ``model_type`` of its config, the class names of its
blocks, and the path from a block to the projection (``-1``: a block's last
child, for a family whose blocks are sequences of conv layers).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ConvFamily:
    """Where one family's neurons are: its blocks (by class name) and the projection inside each."""

    blocks: tuple[str, ...]
    projection: str  # dotted path from a block; "-1" is the block's (or a child's) last child


CONV_FAMILIES: dict[str, ConvFamily] = {
    "convnext": ConvFamily(("ConvNextLayer",), "pwconv2"),
    "convnextv2": ConvFamily(("ConvNextV2Layer",), "pwconv2"),
    "resnet": ConvFamily(("ResNetBasicLayer", "ResNetBottleNeckLayer"), "layer.-1.convolution"),
    "regnet": ConvFamily(("RegNetXLayer", "RegNetYLayer"), "layer.-1.convolution"),
}


def is_convolutional(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", "") in CONV_FAMILIES


def supported_families() -> str:
    return ", ".join(sorted(CONV_FAMILIES))


def _child(module: nn.Module, name: str) -> nn.Module:
    if name == "-1":
        children = list(module.children())
        if not children:
            raise LookupError(f"{type(module).__name__} has no children")
        return children[-1]
    return module.get_submodule(name)


def conv_projections(model) -> list[tuple[str, str, nn.Module]]:
    """``(block name, projection's name in the block, module)`` for every block, in forward order.

    Raises ``LookupError`` (naming what was looked for) when the family's blocks or projections are missing, or
    when a convolution is grouped (a grouped convolution's input channel feeds only its own group)."""
    family = CONV_FAMILIES[model.config.model_type]
    found: list[tuple[str, str, nn.Module]] = []
    for name, block in model.named_modules():
        if type(block).__name__ not in family.blocks:
            continue
        module = block
        for part in family.projection.split("."):
            module = _child(module, part)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise LookupError(f"{name}.{family.projection} is a {type(module).__name__}, not a Linear or Conv2d")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise LookupError(f"{name}.{family.projection} is a grouped convolution (groups={module.groups})")
        found.append((name, _name_of(block, module), module))
    if not found:
        raise LookupError(f"no blocks of class {' or '.join(family.blocks)}")
    return found


def _name_of(block: nn.Module, target: nn.Module) -> str:
    for name, module in block.named_modules():
        if module is target:
            return name
    raise LookupError("projection not found in its block")
