"""Forget/retain metrics of any supported model: each kind's own definition, one entry point.

Causal LMs are scored on next-token prediction, masked LMs on seeded masked
positions, classifiers (images, texts) on their labels, each by its kind
(``kinds``); each aggregation is an
``evaluate`` module under ``metrics/``. The result keys are the same shape for
every kind (``{prefix}top1``, ...), so drops, selectivity and the gate apply
unchanged.
"""

from __future__ import annotations

from typing import Sequence

from ..kinds import kind_of


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
    return kind_of(model).evaluate(
        model,
        batches,
        skip_token_ids=skip_token_ids,
        prefix=prefix,
        accelerator=accelerator,
        progress=progress,
        masking=masking,
    )
