"""Evidence beside a result: the random control and the relearning check.

The random control prunes, from the parent, the same number of neurons per
kind and per layer as the selective run did, chosen at random (seeded) among
the neurons still alive in the parent, and removes them the same way: with
``--attn-mean-offset`` its attention neurons' mean retain activations (in the
parent, as the first selective step measured them) are folded into the bias,
as the selective run folded in its own. A
selective drop far above the control's shows the *selection* did the work,
not the sparsity. The relearning check fine-tunes a copy on forget data for a
few steps: a capability that returns at once was hidden, not removed.

Both work on the pruned model in place and leave it exactly as they found it
(the parent is restored from the pruning run's saved columns, never reloaded).
"""

from __future__ import annotations

import contextlib
import copy
import random

import torch

from ..config import ATTN, FF, KINDS
from .architecture import find_architecture
from .result import PruneResult
from .surgery import capture, prune_neurons


def random_masks_like(
    mask: torch.Tensor, seed: int, dead: torch.Tensor | None = None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """A bool mask with the same number of True per row (layer) as ``mask``, at seeded random positions among
    the neurons not ``dead`` (already pruned in the parent), as the selective run chose among them, and
    ``valid`` (within each layer's width: ``Architecture.valid``)."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(mask, dtype=torch.bool)
    for layer, count in enumerate(mask.sum(1).tolist()):
        if count:
            order = torch.randperm(mask.shape[1], generator=generator)
            if dead is not None:
                order = order[~dead[layer, order]]
            if valid is not None:
                order = order[valid[layer, order]]
            out[layer, order[:count]] = True
    return out


@contextlib.contextmanager
def parent_restored(model, result: PruneResult):
    """Inside: ``model`` holds its parent's weights again. On exit: exactly the pruned weights."""
    with _swapped(model, result, {kind: torch.zeros_like(m) for kind, m in _masks(result).items()}):
        yield model


@contextlib.contextmanager
def randomly_pruned(model, result: PruneResult, seed: int):
    """Inside: the parent with as many random neurons per kind and layer pruned. On exit: the pruned model."""
    arch = find_architecture(model)
    random_masks = {
        kind: random_masks_like(mask, seed * 2 + (kind == ATTN), dead=result.dead_before(kind), valid=arch.valid(kind))
        for kind, mask in _masks(result).items()
    }
    with _swapped(model, result, random_masks):
        yield random_masks


def _masks(result: PruneResult) -> dict:
    return {FF: result.ff_mask, ATTN: result.attn_mask}


@contextlib.contextmanager
def _swapped(model, result: PruneResult, replacement: dict):
    arch = find_architecture(model)
    masks = _masks(result)
    saved = [capture(arch, kind, masks[kind] | replacement[kind]) for kind in KINDS]
    try:
        for undo in reversed(result.parent_undos):
            undo.restore()
        for kind in KINDS:
            if replacement[kind].any():
                offset = result.attn_parent_means if kind == ATTN and result.config.attn_mean_offset else None
                prune_neurons(arch, kind, replacement[kind], mean_offset=offset)
        yield
    finally:
        for state in saved:
            state.restore()


def rebatched(batches: list[dict], batch_size: int) -> list[dict]:
    """The same rows in batches of ``batch_size``: token tensors right-padded with 0 to one width (their
    attention mask is 0 there, so no loss is taken on them), image tensors as they are."""
    keys = list(batches[0])
    width = {k: max(b[k].shape[1] for b in batches) for k in keys if batches[0][k].dim() == 2}
    rows = {
        k: torch.cat(
            [torch.nn.functional.pad(b[k], (0, width[k] - b[k].shape[1])) if k in width else b[k] for b in batches]
        )
        for k in keys
    }
    n = rows[keys[0]].shape[0]
    return [{k: v[start : start + batch_size] for k, v in rows.items()} for start in range(0, n, batch_size)]


def relearn(
    model,
    batches: list[dict],
    *,
    steps: int,
    lr: float,
    seed: int,
    masking=None,
    batch_size: int | None = None,
    measure_at: tuple[int, ...] = (),
    measure=None,
):
    """A copy of ``model`` fine-tuned for ``steps`` AdamW steps on ``batches`` (cycled in a seeded order),
    regrouped into ``batch_size`` rows a step when given (``--relearn-batch-size``). After each step count in
    ``measure_at`` (0: before the first), ``measure(step, tuned)`` sees the copy in eval mode: a curve costs
    no more fine-tuning than its last point.

    The model's own training loss, as its kind defines it (``ModelKind.training_batch``): on ``labels`` for
    classifiers, on seeded masked tokens for a masked LM (``masking``: ``PreparedData.masking``), on the
    non-padding next tokens for a causal LM.
    The original model is untouched.
    """
    from ..data.masking import batch_seed
    from ..kinds import kind_of

    torch.manual_seed(seed)
    if batch_size is not None:
        batches = rebatched(batches, batch_size)
    kind = kind_of(model)
    kind.check_relearn(batches, masking)
    tuned = copy.deepcopy(model)
    tuned.train()
    device = next(tuned.parameters()).device
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    order: list[int] = []
    rng = random.Random(seed)
    for step in range(steps + 1):
        if step in measure_at and measure is not None:
            tuned.eval()
            measure(step, tuned)
            tuned.train()
        if step == steps:
            break
        if not order:
            order = list(range(len(batches)))
            rng.shuffle(order)
        inputs, labels = kind.training_batch(
            batches[order.pop()], masking=masking, seed=batch_seed(step, base=seed + 1)
        )
        inputs = {name: value.to(device) for name, value in inputs.items()}
        loss = tuned(**inputs, labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
        optimizer.step()
    tuned.eval()
    return tuned
