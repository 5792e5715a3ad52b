"""Per-neuron activation statistics, collected with forward pre-hooks.

Only sums are kept (never per-token values), so memory is O(neurons), shards
from several processes merge by addition, and an all-reduce is exact up to
float64 rounding. Each batch's sums are taken by one masked reduction per
projection (padding is excluded by the attention mask) and added into float64
totals: no per-token Python loop and no host sync per batch. The plain and
squared sums are taken in float64 from the start, because ``std`` subtracts
them (E[x^2] - E[x]^2): in float32 that cancellation costs percents of the std
when a neuron's mean is hundreds of times its spread. The other sums are taken
in float32 per batch. Each projection's totals, token weights included, live
on the device its input arrives on, so a model split over devices (a device
map, disk offload) needs no gather until the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import BadInputError, NonFiniteActivationsError
from .architecture import ATTN, FF, KINDS, Architecture, find_architecture

logger = logging.getLogger(__name__)

# The sums a statistic set may hold; n (the token count) is always kept.
SUM_NAMES = ("sum", "sum_sq", "sum_abs", "sum_sqrt", "count_pos")
# The sums ``std`` subtracts from each other: taken in float64 per batch, not only accumulated in it.
WIDE_SUMS = ("sum", "sum_sq")


@dataclass
class NeuronStatistics:
    """Sums over non-padding tokens for every neuron of one kind: [n_layers, n_neurons] float64 each."""

    n_tokens: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def __add__(self, other: "NeuronStatistics") -> "NeuronStatistics":
        if set(self.sums) != set(other.sums):
            raise ValueError(f"cannot merge statistics holding {sorted(self.sums)} and {sorted(other.sums)}")
        return NeuronStatistics(
            self.n_tokens + other.n_tokens,
            {name: self.sums[name] + other.sums[name].to(self.sums[name].device) for name in self.sums},
        )

    def to(self, device) -> "NeuronStatistics":
        return NeuronStatistics(self.n_tokens, {k: v.to(device) for k, v in self.sums.items()})

    def check_finite(self, label: str) -> None:
        """NaN/inf activations (e.g. fp16 overflow) must never turn into a silent ranking."""
        for name, value in self.sums.items():
            bad = ~torch.isfinite(value)
            if bad.any():
                layer = int(bad.nonzero()[0, 0])
                raise NonFiniteActivationsError(
                    f"non-finite {label} activations ({name}) in layer {layer}: the model overflowed or "
                    "produced NaN; load it in float32 or bfloat16 instead of float16"
                )


@dataclass
class ModelStatistics:
    """Statistics of one dataset for feed-forward and attention neurons."""

    ff: NeuronStatistics | None
    attn: NeuronStatistics | None

    def __getitem__(self, kind: str) -> NeuronStatistics | None:
        return self.ff if kind == FF else self.attn

    def __add__(self, other: "ModelStatistics") -> "ModelStatistics":
        def merged(mine: NeuronStatistics | None, theirs: NeuronStatistics | None) -> NeuronStatistics | None:
            return None if mine is None or theirs is None else mine + theirs

        return ModelStatistics(merged(self.ff, other.ff), merged(self.attn, other.attn))


def _resolve_sums(sums: str | Sequence[str]) -> tuple[str, ...]:
    if sums == "all":
        return SUM_NAMES
    if isinstance(sums, str):
        sums = (sums,)
    unknown = sorted(set(sums) - set(SUM_NAMES))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {list(SUM_NAMES)} or 'all'")
    return tuple(name for name in SUM_NAMES if name in sums)


class _Accumulator:
    """Float64 running sums for one kind, filled by pre-hooks on its projections."""

    def __init__(self, arch: Architecture, kind: str, sums: tuple[str, ...]):
        self.sums = sums
        self.projections = arch.projections(kind)
        self.totals = [
            {name: torch.zeros(p.n_neurons, dtype=torch.float64, device=_home(p.weight)) for name in sums}
            for p in self.projections
        ]

    def hook(self, layer: int, state: dict):
        totals = self.totals[layer]
        sums = self.sums

        def pre_hook(module, args):
            x, per_example = _rows(module, args[0], state.get("examples"))
            weights = _weights_on(state, x.device)  # 1.0 for real tokens, 0.0 for padding; None: no padding
            if totals[sums[0]].device != x.device:  # offloaded weights: the totals follow the activations
                for name in sums:
                    totals[name] = totals[name].to(x.device)

            def add(name, values):
                w = weights if weights is None or values.dtype == weights.dtype else weights.to(values.dtype)
                total = values.sum(0) if w is None else w @ values
                totals[name] += total if per_example == 1 else total / per_example

            if any(name in sums for name in WIDE_SUMS):
                wide = x.double()
                if "sum" in sums:
                    add("sum", wide)
                if "sum_sq" in sums:
                    add("sum_sq", wide * wide)
            x = x.float()
            if "sum_abs" in sums or "sum_sqrt" in sums:
                a = x.abs()
                if "sum_abs" in sums:
                    add("sum_abs", a)
                if "sum_sqrt" in sums:
                    add("sum_sqrt", a.sqrt_())
            if "count_pos" in sums:
                add("count_pos", (x > 0).float())

        return pre_hook

    def result(self, n_tokens: int) -> NeuronStatistics:
        """[n_layers, widest layer] per sum; a narrower layer's extra positions hold 0 (``Architecture.valid``)."""
        # with a device map, layers live on different devices: gather the rows on the first one
        if not self.totals:
            return NeuronStatistics(n_tokens, {name: torch.zeros(0, 0, dtype=torch.float64) for name in self.sums})
        device = self.totals[0][self.sums[0]].device
        width = max(t[self.sums[0]].shape[0] for t in self.totals)

        def row(total: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(total.to(device), (0, width - total.shape[0]))

        return NeuronStatistics(
            n_tokens, {name: torch.stack([row(t[name]) for t in self.totals]) for name in self.sums}
        )


def _rows(module, x: torch.Tensor, examples: int | None) -> tuple[torch.Tensor, int]:
    """A projection's input as [rows, neurons], and how many rows one example gives it.

    A feature map (a convolution's input [B, C, H, W], or a ConvNeXt Linear's [B, H, W, C]) counts per image:
    each of its rows weighs 1 / (its rows per image), so every layer's sums are over images (the count
    ``_row_counter`` takes), whatever its resolution or windowing ([B x windows, h, w, C]); a mean is then the
    mean over every position. ``examples``: the batch's image count (None for text: a row is a token)."""
    if isinstance(module, torch.nn.Conv2d):
        x = x.movedim(1, -1)
    feature_map = x.dim() == 4
    x = x.reshape(-1, x.shape[-1])
    return x, (x.shape[0] // examples if feature_map and examples else 1)


def _home(weight: torch.Tensor) -> torch.device:
    """Where a projection's totals start: its weight's device, or the CPU for a weight offloaded to disk (meta)."""
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def _weights_on(state: dict, device: torch.device) -> torch.Tensor | None:
    """This batch's token weights on ``device``: each device of a split model gets its own copy, once per batch."""
    weights = state["weights"]
    if weights is None or weights.device == device:
        return weights
    copies = state.setdefault("copies", {})
    if device not in copies:
        copies[device] = weights.to(device)
    return copies[device]


def _row_counter(state: dict):
    """A pre-hook that records how many activation rows (tokens) one forward pass feeds the first projection."""

    def pre_hook(module, args):
        x, per_example = _rows(module, args[0], state.get("examples"))
        state["rows"] = x.shape[0] // per_example

    return pre_hook


def _feed(body, batch: dict, state: dict, device, dtype):
    """One batch through the model's body, the hooks adding its sums; returns its token count."""
    if "pixel_values" in batch:
        # images: every patch token and the CLS token count (no padding, no attention mask);
        # the token count is the number of activation rows the hooks see
        state["weights"] = None
        state["examples"] = batch["pixel_values"].shape[0]
        body(pixel_values=batch["pixel_values"].to(device=device, dtype=dtype))
        return state.pop("rows")
    input_ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    if mask is None:
        state["weights"] = None
        count = input_ids.numel()
    else:
        mask = mask.to(device)
        # a masked reduction (one matrix-vector product) skips padding without a host sync
        state["weights"] = mask.reshape(-1).float()
        state["copies"] = {}
        count = mask.sum()
    body(input_ids=input_ids, attention_mask=mask, use_cache=False)
    return count


def forward_body(model):
    """The model without its output head: statistics never need the logits."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return body if isinstance(body, torch.nn.Module) else model


def _device(model) -> torch.device:
    """Where inputs go: the first parameter's device (with disk offload, the device its hooks compute on)."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def shard(batches: Sequence, accelerator) -> Sequence:
    """This process's share of ``batches`` (every N-th batch), so uneven counts need no padding."""
    if accelerator is None or accelerator.num_processes == 1:
        return batches
    return batches[accelerator.process_index :: accelerator.num_processes]


def _kinds_of(arch: Architecture, kinds: Sequence[str] | None) -> Sequence[str]:
    """The kinds asked for, or every kind the model has (a CNN: feed-forward only); a kind it lacks is refused."""
    if kinds is None:
        return tuple(kind for kind in KINDS if arch.projections(kind))
    missing = [kind for kind in kinds if not arch.projections(kind)]
    if missing:
        raise BadInputError(f"{arch.model_class} has no {' or '.join(missing)} neurons to collect statistics of")
    return kinds


def collect_statistics(
    model,
    batches: Iterable[dict],
    *,
    sums: str | Sequence[str] = ("sum_abs",),
    kinds: Sequence[str] | None = None,
    accelerator=None,
    progress: bool = True,
    desc: str = "collecting",
) -> ModelStatistics:
    """Per-neuron sums over the non-padding tokens of ``batches``.

    ``batches``: dicts with ``input_ids`` and (optionally) ``attention_mask``,
    as a Hugging Face tokenizer returns them, or (image classifiers) with
    ``pixel_values`` [B, C, H, W]: then every patch token and the CLS token
    count, and the count is the number of activation rows the hooks see
    (for a CNN, the number of images: ``_rows``). ``sums``: which sums to keep —
    the default is what the default importance (abs) needs; ``"all"`` keeps
    every one. With an ``accelerator`` of several processes, each process
    takes every N-th batch and the sums are all-reduced, so every process
    returns identical statistics.
    """
    sums = _resolve_sums(sums)
    arch = find_architecture(model)
    kinds = _kinds_of(arch, kinds)
    if accelerator is not None and accelerator.num_processes > 1:
        batches = shard(list(batches), accelerator)
    accumulators = {kind: _Accumulator(arch, kind, sums) for kind in kinds}
    state: dict = {"weights": None}
    handles = [
        p.module.register_forward_pre_hook(acc.hook(p.layer, state))
        for acc in accumulators.values()
        for p in acc.projections
    ]
    first = arch.projections(kinds[0])[0].module if kinds else None
    if first is not None:
        handles.append(first.register_forward_pre_hook(_row_counter(state)))
    logger.debug("%s: collecting statistics", desc)
    body = forward_body(model)
    device = _device(model)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    n_tokens = torch.zeros((), dtype=torch.int64, device=device)
    n_batches = 0
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, disable=not show, leave=False):
                n_tokens += _feed(body, batch, state, device, dtype)
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if n_batches == 0 and (accelerator is None or accelerator.num_processes == 1):
        raise BadInputError("no batches to collect statistics from: the dataset is empty")
    per_kind = {kind: acc.result(0) for kind, acc in accumulators.items()}
    if accelerator is not None and accelerator.num_processes > 1:
        from .distributed import all_reduce_sum

        n_tokens = all_reduce_sum(accelerator, n_tokens)
        for stats in per_kind.values():
            stats.sums = {name: all_reduce_sum(accelerator, value) for name, value in stats.sums.items()}
    total = int(n_tokens)
    if total == 0:
        raise BadInputError("no non-padding tokens to collect statistics from: check the attention masks")
    for stats in per_kind.values():
        stats.n_tokens = total
    return ModelStatistics(per_kind.get(FF), per_kind.get(ATTN))
