"""Seeded masking of token batches for masked language models (BERT, RoBERTa).

A masked LM is measured on positions it cannot see, as in its pre-training
and in the reference implementation: of each chunk's non-special tokens,
``int(15%)`` (at least one) are chosen at random; 80% of those become the mask
token, 10% a random non-special token, 10% stay as they are, the counts
apportioned by largest remainder (ties to the mask), so a lone chosen position
is always masked and a short chunk never shows the model most of its answers.
The model is scored on every chosen position (``labels``; -100 elsewhere).

The choice is seeded by the batch's position in its list, so a parent and its
pruned child are scored on exactly the same masked inputs, on every machine,
process count and run.
"""

from __future__ import annotations

import torch

MASK_FRACTION = 0.15
MASKED_SHARE = 0.8  # of the chosen positions: replaced by the mask token
RANDOM_SHARE = 0.1  # replaced by a random token; the rest stay unchanged
IGNORE_INDEX = -100


def mask_batch(batch: dict, tokenizer_or_ids, *, seed: int) -> dict:
    """``{"input_ids", "attention_mask", "labels"}``: ``batch`` with a seeded 15% of its tokens chosen.

    ``tokenizer_or_ids``: the model's tokenizer, or a ``MaskingIds`` from ``masking_ids``.
    """
    ids = tokenizer_or_ids if isinstance(tokenizer_or_ids, MaskingIds) else masking_ids(tokenizer_or_ids)
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    generator = torch.Generator().manual_seed(seed)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, ids.special)
    masked_ids = input_ids.clone()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row in range(input_ids.shape[0]):
        positions = eligible[row].nonzero().squeeze(1)
        if positions.numel() == 0:
            continue
        n_chosen = max(1, int(positions.numel() * MASK_FRACTION))
        chosen = positions[torch.randperm(positions.numel(), generator=generator)[:n_chosen]]
        n_masked, n_random = shares(n_chosen)
        labels[row, chosen] = input_ids[row, chosen]
        masked_ids[row, chosen[:n_masked]] = ids.mask
        replacements = ids.ordinary[torch.randint(len(ids.ordinary), (n_random,), generator=generator)]
        masked_ids[row, chosen[n_masked : n_masked + n_random]] = replacements
    return {"input_ids": masked_ids, "attention_mask": attention_mask, "labels": labels}


def shares(n_chosen: int) -> tuple[int, int]:
    """(masked, random) of ``n_chosen`` positions: 80% / 10% / 10% (the rest unchanged) by largest remainder,
    ties to the mask, then to the random token."""
    exact = (n_chosen * MASKED_SHARE, n_chosen * RANDOM_SHARE, n_chosen * (1 - MASKED_SHARE - RANDOM_SHARE))
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n_chosen - sum(counts)]:
        counts[i] += 1
    return counts[0], counts[1]


class MaskingIds:
    """The mask token id, the special ids never chosen, and the ordinary ids random replacements come from."""

    def __init__(self, mask: int, special: torch.Tensor, ordinary: torch.Tensor):
        self.mask, self.special, self.ordinary = mask, special, ordinary


def masking_ids(tokenizer) -> MaskingIds:
    """The ids masking needs from a tokenizer; one clear error when it has no mask token."""
    from ..errors import BadInputError

    if tokenizer.mask_token_id is None:
        raise BadInputError(
            f"the tokenizer ({type(tokenizer).__name__}) has no mask token, so a masked LM cannot "
            "be evaluated; log the model with the tokenizer it was trained with"
        )
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    vocab = torch.arange(len(tokenizer), dtype=torch.long)
    return MaskingIds(int(tokenizer.mask_token_id), special, vocab[~torch.isin(vocab, special)])


def batch_seed(index: int, base: int = 0) -> int:
    """The masking seed of the ``index``-th batch of a list."""
    return base * 1_000_003 + index
