"""Next-token metrics of a causal LM on prepared eval batches, and drops versus a parent.

The forward pass and the per-token reductions (rank and log-probability of
each target) happen here, vectorized in torch; aggregation is done by the
``next_token`` ``evaluate`` module shipped in ``mlflow_selprune/metrics``, so
the numbers logged to MLflow come from one documented, reusable definition.
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

METRIC_NAMES = ("top1", "top10", "skip50_top1", "loss", "perplexity")
TOKEN_STATISTICS = ("target_rank", "target_logprob", "target_id")
NEXT_TOKEN_METRIC_PATH = Path(__file__).parent / "metrics" / "next_token"

# Rows of logits reduced at a time: bounds the float32 copy to rows x vocab.
_ROWS_PER_CHUNK = 4096


@functools.lru_cache(maxsize=1)
def next_token_metric():
    """The packaged ``next_token`` evaluate module, loaded from disk (no hub access) once."""
    import evaluate  # slow to import; only needed once metrics are computed

    return evaluate.load(str(NEXT_TOKEN_METRIC_PATH), keep_in_memory=True)


def token_statistics(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-target-token rank, log-probability and id, for the metric module.

    Position t predicts token t+1; a pair counts only when both the input and
    the target are real (non-padding) tokens. Ranks and log-probabilities are
    computed in float32 whatever the model dtype; rank = number of vocabulary
    entries with a strictly greater logit than the target (0 = top-1).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    valid = real[:, :-1] & real[:, 1:]
    targets = input_ids[:, 1:][valid]
    scores = logits[:, :-1][valid]
    ranks, logprobs = [], []
    for start in range(0, targets.shape[0], _ROWS_PER_CHUNK):
        rows = scores[start:start + _ROWS_PER_CHUNK].float()
        target_logit = rows.gather(1, targets[start:start + _ROWS_PER_CHUNK, None])
        ranks.append((rows > target_logit).sum(-1))
        logprobs.append(target_logit.squeeze(1) - torch.logsumexp(rows, dim=-1))
    empty = scores.new_zeros(0, dtype=torch.float32)
    return {
        "target_rank": torch.cat(ranks).long() if ranks else empty.long(),
        "target_logprob": torch.cat(logprobs).double() if logprobs else empty.double(),
        "target_id": targets.long(),
    }


def evaluate_model(
    model,
    batches: Sequence[dict],
    *,
    skip_token_ids: Sequence[int] = (),
    prefix: str = "",
    accelerator=None,
    progress: bool = True,
) -> dict[str, float]:
    """``{prefix + name: value}`` for METRIC_NAMES and ``n_tokens``, over all ``batches``.

    With an ``accelerator`` of several processes, ``batches`` is the full list
    on every process: each takes every num_processes-th batch, the per-token
    arrays are gathered to all processes, and all return the same result.
    The model is put in eval mode for the pass and restored afterwards.
    """
    if not batches:
        raise ValueError("evaluate_model needs at least one batch of eval tokens")
    distributed = accelerator is not None and accelerator.num_processes > 1
    if distributed:
        batches = batches[accelerator.process_index::accelerator.num_processes]
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    device = next(model.parameters()).device
    parts = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=f"evaluating {prefix.rstrip('_') or 'model'}",
                              disable=not show, leave=False):
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch["attention_mask"].to(device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                stats = token_statistics(logits, input_ids, attention_mask)
                parts.append({name: t.cpu().numpy() for name, t in stats.items()})
    finally:
        model.train(was_training)
    if distributed:
        from accelerate.utils import gather_object

        parts = gather_object(parts)  # every process receives every process's arrays
    arrays = {name: np.concatenate([p[name] for p in parts]) for name in TOKEN_STATISTICS}
    result = next_token_metric().compute(**arrays, skip_token_ids=[int(i) for i in skip_token_ids])
    logger.debug("next-token metrics %s: %s", prefix or "(no prefix)", result)
    return {prefix + name: result[name] for name in (*METRIC_NAMES, "n_tokens")}
