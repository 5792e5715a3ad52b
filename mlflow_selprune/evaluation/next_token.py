"""Next-token metrics of a causal LM on prepared eval batches, and the scoring loop every LM kind shares.

The forward pass and the per-token reductions (rank and log-probability of
each target) happen here, vectorized in torch; aggregation is done by the
``next_token`` ``evaluate`` module shipped in ``mlflow_selprune/metrics``, so
the numbers logged to MLflow come from one documented, reusable definition.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .packaged import METRICS_DIR, packaged_metric

logger = logging.getLogger(__name__)

METRIC_NAMES = ("top1", "top10", "skip50_top1", "loss", "perplexity")
TOKEN_STATISTICS = ("target_rank", "target_logprob", "target_id")
NEXT_TOKEN_METRIC_PATH = METRICS_DIR / "next_token"

# Rows of logits reduced at a time: bounds the float32 copy to rows x vocab.
_ROWS_PER_CHUNK = 4096


def next_token_metric():
    """The packaged ``next_token`` evaluate module."""
    return packaged_metric("next_token")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rank, log-probability and id of each target under its row of ``scores`` ([n, vocab] logits).

    In float32 whatever the model dtype, ``_ROWS_PER_CHUNK`` rows at a time;
    rank = number of vocabulary entries with a strictly greater logit than the
    target (0 = top-1).
    """
    ranks, logprobs = [], []
    for start in range(0, targets.shape[0], _ROWS_PER_CHUNK):
        rows = scores[start : start + _ROWS_PER_CHUNK].float()
        target_logit = rows.gather(1, targets[start : start + _ROWS_PER_CHUNK, None])
        ranks.append((rows > target_logit).sum(-1))
        logprobs.append(target_logit.squeeze(1) - torch.logsumexp(rows, dim=-1))
    empty = scores.new_zeros(0, dtype=torch.float32)
    return {
        "target_rank": torch.cat(ranks).long() if ranks else empty.long(),
        "target_logprob": torch.cat(logprobs).double() if logprobs else empty.double(),
        "target_id": targets.long(),
    }


def token_statistics(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-target-token rank, log-probability and id, for the metric module.

    Position t predicts token t+1; a pair counts only when both the input and
    the target are real (non-padding) tokens.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    valid = real[:, :-1] & real[:, 1:]
    # the same figures as target_ranks on the valid rows, computed on views of the logits a few sequences at a
    # time (no copy of the whole [rows, vocab] block: about a fifth less time), then the valid positions kept
    scores, targets = logits[:, :-1], input_ids[:, 1:]
    step = max(1, _ROWS_PER_CHUNK // max(1, scores.shape[1]))
    ranks, logprobs = [], []
    for start in range(0, scores.shape[0], step):
        rows = scores[start : start + step].float()
        target_logit = rows.gather(-1, targets[start : start + step, :, None])
        ranks.append((rows > target_logit).sum(-1))
        logprobs.append(target_logit.squeeze(-1) - torch.logsumexp(rows, dim=-1))
    if not ranks:
        return target_ranks(scores.reshape(-1, scores.shape[-1])[:0], targets.reshape(-1)[:0])
    return {
        "target_rank": torch.cat(ranks)[valid].long(),
        "target_logprob": torch.cat(logprobs)[valid].double(),
        "target_id": targets[valid].long(),
    }


def score_batches(
    model,
    batches: Sequence[dict],
    batch_statistics,
    *,
    accelerator=None,
    progress: bool = True,
    desc: str = "evaluating",
) -> dict[str, np.ndarray]:
    """Per-target arrays over all ``batches``: ``batch_statistics(model, batch, device)`` on each, concatenated.

    With an ``accelerator`` of several processes, ``batches`` is the full list
    on every process: each takes every num_processes-th batch, the per-target
    arrays are gathered to all processes, and all return the same arrays.
    The model is put in eval mode for the pass and restored afterwards.
    """
    if not batches:
        raise ValueError("evaluation needs at least one batch")
    distributed = accelerator is not None and accelerator.num_processes > 1
    if distributed:
        batches = batches[accelerator.process_index :: accelerator.num_processes]
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    device = next(model.parameters()).device
    parts = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, disable=not show, leave=False):
                stats = batch_statistics(model, batch, device)
                parts.append({name: t.cpu().numpy() for name, t in stats.items()})
    finally:
        model.train(was_training)
    if distributed:
        from accelerate.utils import gather_object

        parts = gather_object(parts)  # every process receives every process's arrays
    return {name: np.concatenate([p[name] for p in parts]) for name in TOKEN_STATISTICS}


def _next_token_batch(model, batch: dict, device) -> dict[str, torch.Tensor]:
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_statistics(logits, input_ids, attention_mask)


def evaluate_model(
    model,
    batches: Sequence[dict],
    *,
    skip_token_ids: Sequence[int] = (),
    prefix: str = "",
    accelerator=None,
    progress: bool = True,
) -> dict[str, float]:
    """``{prefix + name: value}`` for METRIC_NAMES and ``n_tokens`` of a causal LM, over all ``batches``.

    Distributed as ``score_batches`` says: every process returns the same result.
    """
    if not batches:
        raise ValueError("evaluate_model needs at least one batch of eval tokens")
    arrays = score_batches(
        model,
        batches,
        _next_token_batch,
        accelerator=accelerator,
        progress=progress,
        desc=f"evaluating {prefix.rstrip('_') or 'model'}",
    )
    result = next_token_metric().compute(**arrays, skip_token_ids=[int(i) for i in skip_token_ids])
    logger.debug("next-token metrics %s: %s", prefix or "(no prefix)", result)
    return {prefix + name: result[name] for name in (*METRIC_NAMES, "n_tokens")}
