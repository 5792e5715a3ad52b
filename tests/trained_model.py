"""A tiny causal LM trained by the tests themselves on two distinguishable text sources.

Source A ("counting") is lines counting up from a random start, such as
``17 18 19 20 21``; source B ("words") is lines reciting a fixed chain of 120
invented words (``kuvi lago mesa ...``) from a random place. In both, every
token after a line's first is determined by the one before it, so predicting
it is a lookup (item -> successor) that the MLPs learn, and both capabilities
are about equally fragile: a random pruning hurts them alike, so only
selective pruning can remove one and spare the other. They share no tokens
but spaces and newlines, and the MLP uses ReLU (as OPT does), so neurons
specialise and are silent on the other source.

Everything is generated from fixed seeds and trained offline on the CPU for a
fixed number of steps (deterministic, one thread; about 20 s), once per
test session: ``trained_model(tmp_path_factory)`` trains on first use and
returns the cached result afterwards, so every test file can share it, and
each test loads a fresh copy with ``TrainedModel.load()`` (``from_pretrained``).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as T

from mlflow_selprune.training import pack_token_blocks, train_bpe_tokenizer, train_causal_lm

BLOCK_LEN = 64
TRAIN_STEPS = 400

_SYLLABLES = ["ba", "de", "fi", "go", "ku", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "wo", "zu"]
# an invented vocabulary of 120 words in a fixed order: source B recites stretches of it
WORD_CHAIN = random.Random("word-chain").sample([a + b for a in _SYLLABLES for b in _SYLLABLES if a != b], 120)


def counting_text(rng: random.Random, n_lines: int) -> str:
    """Source A: lines counting up from a random start, such as ``17 18 19 20 21 22``."""
    lines = []
    for _ in range(n_lines):
        start = rng.randrange(0, 120)
        lines.append(" ".join(str(n) for n in range(start, start + rng.randrange(10, 18))))
    return "\n".join(lines)


def word_chain_text(rng: random.Random, n_lines: int) -> str:
    """Source B: lines reciting the word chain from a random place, such as ``kuvi lago mesa ...``."""
    lines = []
    for _ in range(n_lines):
        start = rng.randrange(0, len(WORD_CHAIN) - 17)
        lines.append(" ".join(WORD_CHAIN[start : start + rng.randrange(10, 18)]))
    return "\n".join(lines)


def make_documents(seed: int, n_docs: int, kind: str) -> list[str]:
    """``n_docs`` documents of ``kind`` ("counting" or "words"), each 8 to 13 lines."""
    rng = random.Random(f"{kind}-{seed}")
    make = {"counting": counting_text, "words": word_chain_text}[kind]
    return [make(rng, rng.randrange(8, 14)) for _ in range(n_docs)]


@dataclass
class TrainedModel:
    """Where the trained model lives and the text it was trained / evaluated on."""

    path: Path  # save_pretrained directory (model + tokenizer)
    tokenizer: T.PreTrainedTokenizerFast
    forget_texts: list[str]  # source A (counting) documents, trained on; use them for statistics
    retain_texts: list[str]  # source B (word chain) documents, trained on; use them for statistics
    forget_eval_texts: list[str]  # held-out source A documents (never trained on)
    retain_eval_texts: list[str]  # held-out source B documents (never trained on)
    train_seconds: float
    train_loss: float

    def load(self) -> T.PreTrainedModel:
        """A fresh copy of the trained model (float32, eval mode)."""
        return T.AutoModelForCausalLM.from_pretrained(self.path).eval()

    def blocks(self, texts: list[str], block_len: int = BLOCK_LEN) -> torch.Tensor:
        return pack_token_blocks(self.tokenizer, texts, block_len, seed=0)


def model_config(vocab_size: int, pad_token_id: int) -> T.GPTNeoXConfig:
    return T.GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        hidden_act="relu",
        max_position_embeddings=BLOCK_LEN,
        pad_token_id=pad_token_id,
        eos_token_id=0,
        bos_token_id=0,
        tie_word_embeddings=True,
    )


def train_tiny_model(directory: Path, *, steps: int = TRAIN_STEPS, seed: int = 0) -> TrainedModel:
    """Train the two-source model and save it (model + tokenizer) into ``directory``."""
    forget_train = make_documents(seed, 160, "counting")
    retain_train = make_documents(seed, 160, "words")
    forget_eval = make_documents(seed + 1000, 24, "counting")
    retain_eval = make_documents(seed + 1000, 24, "words")
    tokenizer = train_bpe_tokenizer(forget_train + retain_train, vocab_size=640)
    blocks = torch.cat(
        [
            pack_token_blocks(tokenizer, forget_train, BLOCK_LEN, seed=seed),
            pack_token_blocks(tokenizer, retain_train, BLOCK_LEN, seed=seed),
        ]
    )
    torch.manual_seed(seed)
    model = T.GPTNeoXForCausalLM(model_config(len(tokenizer), tokenizer.pad_token_id))
    # One thread, restored afterwards: a 64-wide model gains little from more, a busy machine
    # (other test runs on the same cores) slows two spinning threads down many times over, and
    # the trained weights then do not depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        loss = train_causal_lm(model, blocks, steps=steps, batch_size=16, lr=3e-3, seed=seed, progress=False)
    finally:
        torch.set_num_threads(threads)
    seconds = time.monotonic() - start
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return TrainedModel(directory, tokenizer, forget_train, retain_train, forget_eval, retain_eval, seconds, loss)


def lm_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over ``blocks`` (every row full length, no padding)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            rows = blocks[start : start + batch_size]
            out = model(input_ids=rows, labels=rows)
            count = rows.shape[0] * (rows.shape[1] - 1)
            total += float(out.loss) * count
            n += count
    return total / n


_CACHE: dict[str, TrainedModel] = {}


def trained_model(tmp_path_factory) -> TrainedModel:
    """The test run's trained two-source model: trained once per run, cached in each process after. Under
    pytest-xdist the first worker to ask trains it into the run's shared temporary directory under a file lock
    and saves what it made; the others wait for the lock and load that copy instead of training it again."""
    if "model" in _CACHE:
        return _CACHE["model"]
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        _CACHE["model"] = train_tiny_model(tmp_path_factory.mktemp("trained-counting-vs-words"))
        return _CACHE["model"]
    import pickle

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "trained-counting-vs-words"  # one per run, for all workers
    saved = shared / "trained.pickle"
    with FileLock(f"{shared}.lock"):
        if saved.exists():
            _CACHE["model"] = pickle.loads(saved.read_bytes())
        else:
            _CACHE["model"] = train_tiny_model(shared)
            saved.write_bytes(pickle.dumps(_CACHE["model"]))
    return _CACHE["model"]


def full_batches(blocks: torch.Tensor, batch_size: int = 16) -> list[dict]:
    """Rows of ``blocks`` as tokenizer-style batches (no padding)."""
    return [{"input_ids": rows, "attention_mask": torch.ones_like(rows)} for rows in blocks.split(batch_size)]


def top1_accuracy(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Share of next-token predictions (argmax) that hit the true next token."""
    hits, n = 0, 0
    with torch.no_grad():
        for rows in blocks.split(batch_size):
            logits = model(input_ids=rows).logits[:, :-1]
            hits += int((logits.argmax(-1) == rows[:, 1:]).sum())
            n += rows[:, 1:].numel()
    return hits / n
