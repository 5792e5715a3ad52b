"""Image-classification metrics of an image classifier on prepared eval batches.

The forward pass and the per-image reductions (rank and log-probability of the
true class, the same reduction as a token's target) happen here; aggregation is done by the
``image_classes`` ``evaluate`` module shipped in ``metrics/``, so the numbers
logged to MLflow come from one documented, reusable definition. Result keys
have the same shape as the language models' (``{prefix}top1``, ``{prefix}loss``),
so drops, selectivity, the random control and the gate apply unchanged.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from .next_token import score_batches, target_ranks
from .packaged import packaged_metric

logger = logging.getLogger(__name__)

METRIC_NAMES = ("top1", "top5", "loss")
# Per-class top-1 (``class_<id>_top1``) is reported for every class of a side that holds at most this many
# classes: the forgotten classes always (a forget side holds only those), the retained ones when few.
MAX_CLASSES_REPORTED = 20


def image_classes_metric():
    """The packaged ``image_classes`` evaluate module."""
    return packaged_metric("image_classes")


def image_statistics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image rank and log-probability of the true class (``target_id``), as for a token's target.

    rank = number of classes with a strictly greater logit than the true class (0 = top-1).
    """
    return target_ranks(logits, labels.long())


def _image_batch(model, batch: dict, device) -> dict[str, torch.Tensor]:
    dtype = next(model.parameters()).dtype
    logits = model(pixel_values=batch["pixel_values"].to(device=device, dtype=dtype)).logits
    return image_statistics(logits, batch["labels"].to(device))


def evaluate_image_model(
    model,
    batches: Sequence[dict],
    *,
    skip_token_ids: Sequence[int] = (),
    prefix: str = "",
    accelerator=None,
    progress: bool = True,
) -> dict[str, float]:
    """``{prefix + name: value}`` for top1, top5, loss, ``n_images`` and per-class top-1, over all ``batches``.

    ``batches``: dicts with ``pixel_values`` and ``labels``. ``skip_token_ids``
    is accepted for the common signature and ignored (images have no frequent
    tokens). Distributed as ``next_token.score_batches`` says: every process
    returns the same result.
    """
    if not batches:
        raise ValueError("evaluate_image_model needs at least one batch of eval images")
    return evaluate_classes(
        model, batches, _image_batch, prefix=prefix, accelerator=accelerator, progress=progress, count_name="n_images"
    )


def evaluate_classes(
    model,
    batches: Sequence[dict],
    batch_statistics,
    *,
    prefix: str = "",
    accelerator=None,
    progress: bool = True,
    count_name: str = "n_images",
) -> dict[str, float]:
    """A classifier's metrics (top1, top5, loss, the example count as ``count_name``, per-class top-1) from
    ``batch_statistics(model, batch, device)``'s per-example rank and log-probability of the true class: the
    ``image_classes`` module's definition, for image and text classifiers alike."""
    if not batches:
        raise ValueError("evaluation needs at least one batch of labelled examples")
    arrays = score_batches(
        model,
        batches,
        batch_statistics,
        accelerator=accelerator,
        progress=progress,
        desc=f"evaluating {prefix.rstrip('_') or 'model'}",
    )
    present = sorted(int(c) for c in np.unique(arrays["target_id"]))
    classes = present if len(present) <= MAX_CLASSES_REPORTED else []
    result = image_classes_metric().compute(
        target_rank=arrays["target_rank"],
        target_logprob=arrays["target_logprob"],
        label=arrays["target_id"],
        classes=classes,
    )
    logger.debug("image metrics %s: %s", prefix or "(no prefix)", result)
    names = (*METRIC_NAMES, *(f"class_{c}_top1" for c in classes))
    return {**{prefix + name: result[name] for name in names}, prefix + count_name: result["n_images"]}
