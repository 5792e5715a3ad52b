"""Masked-token metrics of a masked LM (BERT, RoBERTa) on prepared eval batches.

Next-token prediction means nothing for an encoder, so a masked LM is scored
where it is trained to predict: on a seeded 15% of each chunk's non-special
tokens, masked as ``data.masking`` says. The forward pass and per-position
ranks happen here; the ``masked_token`` ``evaluate`` module in ``metrics/``
aggregates them into the same metric names as for causal LMs, so drops,
selectivity and the gate apply unchanged.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..data.masking import IGNORE_INDEX, batch_seed, mask_batch
from .next_token import METRIC_NAMES, score_batches, target_ranks
from .packaged import packaged_metric

logger = logging.getLogger(__name__)


def masked_token_metric():
    """The packaged ``masked_token`` evaluate module."""
    return packaged_metric("masked_token")


def masked_token_statistics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rank, log-probability and id of the original token at every chosen position (``labels`` != -100)."""
    chosen = labels != IGNORE_INDEX
    return target_ranks(logits[chosen], labels[chosen])


def mask_batches(batches: Sequence[dict], masking) -> list[dict]:
    """Each batch masked with its own seed (its index): the same masks for every model and process."""
    if all("labels" in batch for batch in batches):
        return list(batches)
    if masking is None:
        from ..errors import BadInputError

        raise BadInputError(
            "a masked LM is evaluated on masked tokens, but its tokenizer has no mask token; "
            "log the model with the tokenizer it was trained with"
        )
    return [mask_batch(batch, masking, seed=batch_seed(i)) for i, batch in enumerate(batches)]


def _masked_batch(model, batch: dict, device) -> dict[str, torch.Tensor]:
    labels = batch["labels"].to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return masked_token_statistics(logits, labels)


def evaluate_masked_model(
    model,
    batches: Sequence[dict],
    *,
    skip_token_ids: Sequence[int] = (),
    prefix: str = "",
    accelerator=None,
    progress: bool = True,
    masking=None,
) -> dict[str, float]:
    """``{prefix + name: value}`` for METRIC_NAMES and ``n_tokens`` (masked positions) over all ``batches``.

    ``batches`` either carry ``labels`` (masked already) or are masked here
    with ``masking`` (``PreparedData.masking``), seeded by their index.
    """
    if not batches:
        raise ValueError("evaluate_masked_model needs at least one batch of eval tokens")
    arrays = score_batches(
        model,
        mask_batches(batches, masking),
        _masked_batch,
        accelerator=accelerator,
        progress=progress,
        desc=f"evaluating {prefix.rstrip('_') or 'model'} (masked)",
    )
    result = masked_token_metric().compute(
        masked_rank=arrays["target_rank"],
        masked_logprob=arrays["target_logprob"],
        masked_id=arrays["target_id"],
        skip_token_ids=[int(i) for i in skip_token_ids],
    )
    logger.debug("masked-token metrics %s: %s", prefix or "(no prefix)", result)
    return {prefix + name: result[name] for name in (*METRIC_NAMES, "n_tokens")}
