"""Forget/retain metrics of any supported model: each kind's own definition, one entry point.

Causal LMs are scored on next-token prediction, masked LMs on seeded masked
positions, image classifiers on their labels; each aggregation is an
``evaluate`` module under ``metrics/``. The result keys are the same shape for
every kind (``{prefix}top1``, ...), so drops, selectivity and the gate apply
unchanged.
"""

from __future__ import annotations

from typing import Sequence

from ..kinds import CAUSAL_LM, IMAGE_CLASSIFIER, MASKED_LM, model_kind


def evaluate_model(
    model,
    batches: Sequence[dict],
    *,
    skip_token_ids: Sequence[int] = (),
    prefix: str = "",
    accelerator=None,
    progress: bool = True,
    masking=None,
) -> dict[str, float]:
    """``{prefix + name: value}`` over all ``batches``, by the metric definition of the model's kind.

    ``masking`` (``PreparedData.masking``): the tokenizer's ids a masked LM's batches are masked with.
    """
    kind = model_kind(model)
    if kind == MASKED_LM:
        from .masked_token import evaluate_masked_model

        return evaluate_masked_model(
            model,
            batches,
            skip_token_ids=skip_token_ids,
            prefix=prefix,
            accelerator=accelerator,
            progress=progress,
            masking=masking,
        )
    if kind == IMAGE_CLASSIFIER:
        from .image_classes import evaluate_image_model as evaluate
    else:
        assert kind == CAUSAL_LM
        from .next_token import evaluate_model as evaluate
    return evaluate(
        model, batches, skip_token_ids=skip_token_ids, prefix=prefix, accelerator=accelerator, progress=progress
    )
