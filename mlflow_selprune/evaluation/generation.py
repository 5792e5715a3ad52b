"""Greedy generation for the task checks: batches of prompts, left-padded, each row stopping on its own test.

Three-shot prompts repeat the same solved examples before every task; most of each prompt is that shared
beginning. With ``shared=True`` it is read once: the model's keys and values for the tokens every prompt
starts with are computed on their own and reused by every row (a copy per batch), and only each row's own
tokens are read after them, padded between the two (the attention mask skips the padding, and positions
count real tokens only). The tokens are those of tokenizing each whole prompt, so the model sees exactly the
sequence it would see without the cache; only the order of float additions differs.
"""

from __future__ import annotations

import contextlib
import copy

BATCH_SIZE = 20
# A shared beginning shorter than this is not worth a cache of its own.
MIN_SHARED_TOKENS = 32


def greedy(
    model, tokenizer, texts: list[str], max_new_tokens: int, stop, special_tokens: bool = True, shared: bool = False
) -> list[str]:
    """Greedy continuations of ``texts``, in batches, each row stopping once ``stop(its text)`` holds;
    ``shared``: read the tokens all ``texts`` begin with once (module docstring)."""
    device = next(model.parameters()).device
    out: list[str] = []
    with _left_padding(tokenizer):
        rows = [tokenizer(t, add_special_tokens=special_tokens)["input_ids"] for t in texts] if shared else []
        prefix = _common_prefix(rows)
        cache = _prefix_cache(model, prefix, device) if len(prefix) >= MIN_SHARED_TOKENS else None
        if cache is not None and not hasattr(cache[1], "batch_repeat_interleave"):
            cache = None  # a cache that cannot be copied per row (a legacy tuple): every prompt read whole
        for begin in range(0, len(texts), BATCH_SIZE):
            chunk = rows[begin : begin + BATCH_SIZE]
            if cache is None:
                batch = tokenizer(
                    texts[begin : begin + BATCH_SIZE],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=special_tokens,
                ).to(device)
                past = {}
            else:
                batch = _after_prefix(tokenizer, prefix, chunk, device)
                past = {cache[0]: copy.deepcopy(cache[1])}
                past[cache[0]].batch_repeat_interleave(len(chunk))
            out += _continued(model, tokenizer, batch, past, max_new_tokens, stop)
    return out


def _continued(model, tokenizer, batch, past: dict, max_new_tokens: int, stop) -> list[str]:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    start = batch["input_ids"].shape[1]

    class _Done(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([stop(t) for t in texts], device=input_ids.device)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        generated = model.generate(
            **batch,
            **past,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([_Done()]) if stop is not None else None,
        )
    return tokenizer.batch_decode(generated[:, start:], skip_special_tokens=True)


def _common_prefix(rows: list[list[int]]) -> list[int]:
    """The tokens every row begins with, leaving each row at least one token of its own."""
    if len(rows) < 2:
        return []
    length = min(len(row) for row in rows) - 1
    for i in range(length):
        if any(row[i] != rows[0][i] for row in rows):
            return rows[0][:i]
    return rows[0][: max(length, 0)]


def _prefix_cache(model, prefix: list[int], device):
    import torch

    with torch.inference_mode():
        ids = torch.tensor([prefix], device=device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    # transformers 5 names the cache `cache` (in the output and in generate's keywords); 4.x `past_key_values`
    return ("cache", out["cache"]) if "cache" in out else ("past_key_values", out["past_key_values"])


def _after_prefix(tokenizer, prefix: list[int], chunk: list[list[int]], device) -> dict:
    """``input_ids``/``attention_mask`` of whole rows: the shared prefix, padding, then each row's own tokens."""
    import torch

    own = [row[len(prefix) :] for row in chunk]
    width = max(len(tokens) for tokens in own)
    pad = tokenizer.pad_token_id
    ids = [prefix + [pad] * (width - len(tokens)) + tokens for tokens in own]
    mask = [[1] * len(prefix) + [0] * (width - len(tokens)) + [1] * len(tokens) for tokens in own]
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device)}


@contextlib.contextmanager
def _left_padding(tokenizer):
    """Pad on the left (generation continues every row from its last real token), with a pad token; the
    tokenizer is logged with the model afterwards, so both are restored."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = pad
