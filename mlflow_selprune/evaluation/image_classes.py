"""Image-classification metrics of an image classifier on prepared eval batches.

The forward pass and the per-image reductions (rank and log-probability of the
true class) happen here, vectorized in torch; aggregation is done by the
``image_classes`` ``evaluate`` module shipped in ``metrics/``, so the numbers
logged to MLflow come from one documented, reusable definition. Result keys
have the same shape as the language models' (``{prefix}top1``, ``{prefix}loss``),
so drops, selectivity, the random control and the gate apply unchanged.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

METRIC_NAMES = ("top1", "top5", "loss")
IMAGE_STATISTICS = ("target_rank", "target_logprob", "label")
IMAGE_CLASSES_METRIC_PATH = Path(__file__).parent / "metrics" / "image_classes"
# Per-class top-1 (``class_<id>_top1``) is reported for every class of a side that holds at most this many
# classes: the forgotten classes always (a forget side holds only those), the retained ones when few.
MAX_CLASSES_REPORTED = 20


@functools.lru_cache(maxsize=1)
def image_classes_metric():
    """The packaged ``image_classes`` evaluate module, loaded from disk (no hub access) once."""
    import evaluate  # slow to import; only needed once metrics are computed

    return evaluate.load(str(IMAGE_CLASSES_METRIC_PATH), keep_in_memory=True)


def image_statistics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image rank and log-probability of the true class, in float32 whatever the model dtype.

    rank = number of classes with a strictly greater logit than the true class (0 = top-1).
    """
    rows = logits.float()
    labels = labels.long()
    target = rows.gather(1, labels[:, None])
    return {
        "target_rank": (rows > target).sum(-1).long(),
        "target_logprob": (target.squeeze(1) - torch.logsumexp(rows, dim=-1)).double(),
        "label": labels,
    }


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
    tokens). With an ``accelerator`` of several processes each takes every
    num_processes-th batch and the per-image arrays are gathered, so all
    return the same result. The model is put in eval mode for the pass and
    restored afterwards.
    """
    if not batches:
        raise ValueError("evaluate_image_model needs at least one batch of eval images")
    distributed = accelerator is not None and accelerator.num_processes > 1
    if distributed:
        batches = batches[accelerator.process_index::accelerator.num_processes]
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    parameter = next(model.parameters())
    parts = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=f"evaluating {prefix.rstrip('_') or 'model'}",
                              disable=not show, leave=False):
                pixel_values = batch["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
                logits = model(pixel_values=pixel_values).logits
                stats = image_statistics(logits, batch["labels"].to(logits.device))
                parts.append({name: t.cpu().numpy() for name, t in stats.items()})
    finally:
        model.train(was_training)
    if distributed:
        from accelerate.utils import gather_object

        parts = gather_object(parts)
    arrays = {name: np.concatenate([p[name] for p in parts]) for name in IMAGE_STATISTICS}
    present = sorted(int(c) for c in np.unique(arrays["label"]))
    classes = present if len(present) <= MAX_CLASSES_REPORTED else []
    result = image_classes_metric().compute(**arrays, classes=classes)
    logger.debug("image metrics %s: %s", prefix or "(no prefix)", result)
    names = (*METRIC_NAMES, "n_images", *(f"class_{c}_top1" for c in classes))
    return {prefix + name: result[name] for name in names}
