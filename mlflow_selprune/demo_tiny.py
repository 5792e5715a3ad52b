"""The self-trained demo (``mlflow-selprune demo --tiny``): nothing but Python's standard library.

Kept for quick looks and for the tests, which check mechanics on it; the evidence the project leads
with comes from the real pretrained model (``demo``). Its model is trained here, so another CPU's float
rounding trains a slightly different one: its gate carries wide margins.

1. Train a small GPT-NeoX language model (with its own BPE tokenizer) on
   Python standard-library code and English prose for a fixed number of
   seeded steps, register it as ``selprune-tiny-demo`` with alias ``base`` (reused
   on later runs).
2. Unlearn Python code (``builtin:stdlib-code``) while keeping the prose
   (``builtin:stdlib-prose``), with the random control beside it, and
   register the result as a new version.
3. Gate it on its recorded metrics and point alias ``unlearned`` at it on a pass.

Everything is decided by step counts, seeds and a fixed torch thread count:
a busy machine makes the demo slower, never different.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field

from .config import DataOptions, PruneConfig
from .demo import (
    BASE_ALIAS,
    _existing_base,
    _nothing,
    checked_train_steps,
    say_reused,
    ensure_tracking_uri,
    register_base_model,
    summarize_and_gate,
)

logger = logging.getLogger(__name__)

DEMO_MODEL = "selprune-tiny-demo"
FORGET = "builtin:stdlib-code"
RETAIN = "builtin:stdlib-prose"
TORCH_THREADS = 2  # fixed, so that results do not depend on the machine's core count


@dataclass(frozen=True)
class DemoRecipe:
    """The demo model, its training and its pruning, chosen by measurement (the README's frontier).

    Attention neurons specialise far more than FF ones in a model this small
    (FF-only pruning moved forget and retain nearly alike); the prose is plain
    English only, so the two capabilities share little.
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    block_len: int = 128
    train_steps: int = 360
    batch_size: int = 16
    lr: float = 3e-3
    train_code_chars: int = 1_200_000
    train_prose_chars: int = 2_500_000  # all of the plain-English prose there is (about 0.8M characters)
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(ff_frac=0.0, attn_frac=0.08, steps=6))
    data: DataOptions = field(
        default_factory=lambda: DataOptions(max_length=128, batch_size=32, collect_tokens=20_000, eval_tokens=10_000)
    )


RECIPE = DemoRecipe()

# The gate the demo must pass: a minimum at most 1/2 of the worst measured value, a maximum at least 2x it
# (docs/demo.md). Worst of four runs on two machines (seeds 0, 1, 2 here; seed 0 on a newcomer's machine):
# forget top-1 drop 0.146, retain top-1 drop 0.038. Its selectivity is not gated: with retain drops of
# 1.5-3.8% it swings from 3.9 to 13 between machines, more than any fixed margin covers.
MIN_FORGET_DROP = 0.07
MAX_RETAIN_DROP = 0.08
MIN_SELECTIVITY = None


def _training_texts(code_chars: int, prose_chars: int, seed: int = 0) -> list[str]:
    """Code and prose from the built-in corpora, up to the given number of characters each."""
    from .data.corpora import builtin_documents

    texts = []
    for name, max_chars in ((FORGET, code_chars), (RETAIN, prose_chars)):
        docs = list(builtin_documents(name))
        random.Random(seed).shuffle(docs)
        total = 0
        for doc in docs:
            texts.append(doc[:8000])
            total += len(texts[-1])
            if total >= max_chars:
                break
    return texts


def train_demo_model(recipe: DemoRecipe = RECIPE, seed: int = 0, steps: int | None = None, progress: bool = True):
    """The demo's GPT-NeoX and its tokenizer, trained for a fixed number of seeded steps."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from .training import pack_token_blocks, train_bpe_tokenizer, train_causal_lm

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        texts = _training_texts(recipe.train_code_chars, recipe.train_prose_chars, seed=seed)
        tokenizer = train_bpe_tokenizer(texts, vocab_size=recipe.vocab_size)
        blocks = pack_token_blocks(tokenizer, texts, block_len=recipe.block_len, seed=seed)
        torch.manual_seed(seed)
        config = GPTNeoXConfig(  # type: ignore[call-arg]  # the config's own keyword arguments
            vocab_size=len(tokenizer),
            hidden_size=recipe.hidden_size,
            num_hidden_layers=recipe.num_layers,
            num_attention_heads=recipe.num_heads,
            intermediate_size=recipe.intermediate_size,
            max_position_embeddings=max(512, recipe.block_len),
            rotary_pct=0.25,
            hidden_act=recipe.hidden_act,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPTNeoXForCausalLM(config)
        loss = train_causal_lm(
            model,
            blocks,
            steps=recipe.train_steps if steps is None else steps,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            seed=seed,
            progress=progress,
        )
    finally:
        torch.set_num_threads(previous_threads)
    logger.info("demo model trained: final loss %.3f", loss)
    return model, tokenizer


def run_demo(
    train_steps: int | None = None,
    seed: int = 0,
    retrain: bool = False,
    progress: bool = True,
    recipe: DemoRecipe = RECIPE,
    collect_tokens: int | None = None,
    eval_tokens: int | None = None,
) -> int:
    """Run the demo; returns the exit code (0 when the gate passed). ``collect_tokens``/``eval_tokens``
    shrink the recipe's token budgets for a quick look (the measured numbers are for the recipe's)."""
    import dataclasses

    # every input checked before anything is trained or written
    steps = checked_train_steps(train_steps, recipe.train_steps)
    data = dataclasses.replace(
        recipe.data,
        collect_tokens=recipe.data.collect_tokens if collect_tokens is None else collect_tokens,
        eval_tokens=recipe.data.eval_tokens if eval_tokens is None else eval_tokens,
    ).validate()

    import torch

    from .registry.tracking import job_run
    from .unlearn import run_prune

    torch.set_num_threads(TORCH_THREADS)
    start = time.monotonic()
    uri = ensure_tracking_uri()
    print(f"tracking and registry: {uri}")
    # Under `mlflow run`, the project's run is the parent of the demo's runs.
    with job_run("selprune-tiny-demo", "demo") if os.environ.get("MLFLOW_RUN_ID") else _nothing():
        base = None if retrain else _existing_base(DEMO_MODEL)
        if base:
            say_reused(base, DEMO_MODEL, train_steps)
        else:
            print(f"training the demo model ({steps} steps, seed {seed})...")
            trained_at = time.monotonic()
            model, tokenizer = train_demo_model(recipe, seed=seed, steps=steps, progress=progress)
            base = register_base_model(
                model,
                tokenizer,
                seed,
                steps,
                name=DEMO_MODEL,
                extra_metrics={"training_seconds": round(time.monotonic() - trained_at, 1)},
            )
            print(f"registered {base} as {DEMO_MODEL}@{BASE_ALIAS}")
        print(f"unlearning {FORGET} while keeping {RETAIN}...")
        result = run_prune(
            f"models:/{DEMO_MODEL}@{BASE_ALIAS}",
            FORGET,
            RETAIN,
            config=dataclasses.replace(recipe.prune, seed=seed),
            data=data,
            progress=progress,
        )
        return summarize_and_gate(
            result,
            DEMO_MODEL,
            min_forget_drop=MIN_FORGET_DROP,
            max_retain_drop=MAX_RETAIN_DROP,
            min_selectivity=MIN_SELECTIVITY,
            start=start,
        )
