"""Train small tokenizers, causal language models and image classifiers, fully offline.

The offline demo and the tests need a model with a real capability to remove,
and the Hugging Face hub is not always reachable, so both are trained here from
plain strings in seconds to minutes on a CPU.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with EOS and PAD tokens set.

    Byte-level means every input string is encodable, whatever it holds.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        padding_side="right",
    )


def pack_token_blocks(tokenizer, texts: Sequence[str], block_len: int, seed: int = 0) -> torch.Tensor:
    """All texts tokenized, joined with EOS and cut into [n_blocks, block_len] rows, shuffled."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // block_len
    if n_blocks == 0:
        raise ValueError(f"only {len(ids)} tokens of training text; need at least {block_len}")
    blocks = torch.tensor(ids[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    return blocks[order]


def train_causal_lm(
    model,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
):
    """Train ``model`` in place for exactly ``steps`` AdamW steps on rows of ``blocks``.

    Cosine schedule with a short warm-up. The step count and the seed decide
    the result, never the clock: a busy machine trains slower, not less.
    Returns the final training loss.
    """
    rng = random.Random(seed)

    def batch_for(step: int) -> dict:
        batch = blocks[[rng.randrange(blocks.shape[0]) for _ in range(batch_size)]]
        return {"input_ids": batch, "labels": batch}

    return _train_steps(model, batch_for, steps=steps, lr=lr, seed=seed, progress=progress)


def _train_steps(model, batch_for, *, steps: int, lr: float, seed: int, progress: bool) -> float:
    """``steps`` AdamW steps on ``batch_for(step)`` (model keyword arguments), cosine schedule with a
    short warm-up, clipped gradients; the model is left in eval mode. Returns the final training loss."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))

    loss_value = float("nan")
    logger.info("training: %d steps (seed %d)", steps, seed)
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(**batch_for(step))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = out.loss.detach().item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value


def train_image_classifier(
    model,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
):
    """Train an image classifier in place for exactly ``steps`` AdamW steps on seeded random minibatches.

    ``pixel_values`` [N, C, H, W] (already preprocessed), ``labels`` [N]. Same schedule as
    ``train_causal_lm``: the step count and the seed decide the result, never the clock.
    Returns the final training loss.
    """
    generator = torch.Generator().manual_seed(seed)

    def batch_for(step: int) -> dict:
        rows = torch.randint(0, pixel_values.shape[0], (batch_size,), generator=generator)
        return {"pixel_values": pixel_values[rows], "labels": labels[rows]}

    return _train_steps(model, batch_for, steps=steps, lr=lr, seed=seed, progress=progress)
