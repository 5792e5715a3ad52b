"""The offline end-to-end demo: nothing but Python's own standard library as data.

1. Train a small GPT-NeoX language model (with its own BPE tokenizer) on
   Python standard-library code and English prose, register it as
   ``selprune-demo`` with alias ``base`` (reused on later runs).
2. Unlearn Python code (``builtin:stdlib-code``) while keeping the prose
   (``builtin:stdlib-prose``) and register the result as a new version.
3. Gate it on its recorded metrics and point alias ``unlearned`` at it on a pass.
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import mlflow

from .registry import client

logger = logging.getLogger(__name__)

DEMO_MODEL = "selprune-demo"
BASE_ALIAS = "base"
UNLEARNED_ALIAS = "unlearned"
FORGET = "builtin:stdlib-code"
RETAIN = "builtin:stdlib-prose"
# The gate the demo must pass: code forgotten, prose kept, and selectively so.
MIN_FORGET_DROP = 0.05
MAX_RETAIN_DROP = 0.04
MIN_SELECTIVITY = 3.0


def ensure_tracking_uri() -> str:
    """An embedded sqlite store in the working directory unless a tracking URI is configured."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(f"sqlite:///{Path('mlflow.db').resolve()}")
    return mlflow.get_tracking_uri()


def _training_texts(max_chars: int, seed: int = 0) -> list[str]:
    """Equal shares of code and prose from the built-in corpora."""
    from .corpora import builtin_documents

    texts = []
    for name in (FORGET, RETAIN):
        docs = list(builtin_documents(name))
        random.Random(seed).shuffle(docs)
        total = 0
        for doc in docs:
            texts.append(doc[:8000])
            total += len(texts[-1])
            if total >= max_chars:
                break
    return texts


def train_demo_model(train_seconds: float = 180, max_steps: int = 400, seed: int = 0, progress: bool = True):
    """A ~5M-parameter GPT-NeoX and its tokenizer, trained on stdlib code + prose."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from .training import pack_token_blocks, train_bpe_tokenizer, train_causal_lm

    texts = _training_texts(max_chars=2_500_000, seed=seed)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=4096)
    blocks = pack_token_blocks(tokenizer, texts, block_len=128, seed=seed)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=512, rotary_pct=0.25,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPTNeoXForCausalLM(config)
    loss = train_causal_lm(model, blocks, steps=max_steps, batch_size=32, lr=3e-3, seed=seed,
                           max_seconds=train_seconds, progress=progress)
    logger.info("demo model trained: final loss %.3f", loss)
    return model, tokenizer


def register_base_model(model, tokenizer) -> str:
    """Log the freshly trained model with the transformers flavor, register it, alias it ``base``."""
    from .flavor import default_pip_requirements

    with mlflow.start_run(run_name="selprune-demo-base") as run:
        mlflow.set_tag("selprune.kind", "demo-base")
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
            pip_requirements=default_pip_requirements(),
        )
    mv = mlflow.register_model(info.model_uri, DEMO_MODEL, tags={"selprune.demo": "base", "source_run": run.info.run_id})
    client().set_registered_model_alias(DEMO_MODEL, BASE_ALIAS, mv.version)
    return f"models:/{DEMO_MODEL}/{mv.version}"


def _existing_base() -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client().get_model_version_by_alias(DEMO_MODEL, BASE_ALIAS)
    except MlflowException:
        return None
    return f"models:/{DEMO_MODEL}/{mv.version}"


def run_demo(train_seconds: float = 180, retrain: bool = False, progress: bool = True) -> int:
    """Run the demo; returns the exit code (0 when the gate passed)."""
    from .gate import gate
    from .pruning import PruneConfig
    from .unlearn import DataOptions, format_summary, run_prune

    start = time.monotonic()
    uri = ensure_tracking_uri()
    print(f"tracking and registry: {uri}")
    base = None if retrain else _existing_base()
    if base:
        print(f"reusing the registered base model {base} ({DEMO_MODEL}@{BASE_ALIAS})")
    else:
        print(f"training the demo model (up to {train_seconds:.0f}s on this machine)...")
        model, tokenizer = train_demo_model(train_seconds=train_seconds, progress=progress)
        base = register_base_model(model, tokenizer)
        print(f"registered {base} as {DEMO_MODEL}@{BASE_ALIAS}")
    print(f"unlearning {FORGET} while keeping {RETAIN}...")
    result = run_prune(
        f"models:/{DEMO_MODEL}@{BASE_ALIAS}", FORGET, RETAIN,
        # attention neurons specialise more than FF ones in a model this small and briefly trained
        config=PruneConfig(ff_frac=0.03, attn_frac=0.05, steps=6),
        data=DataOptions(max_length=128, batch_size=32, collect_tokens=20_000, eval_tokens=10_000),
        run_name="selprune-demo-unlearn", progress=progress,
    )
    print(format_summary(result))
    verdict = gate(result.model_uri, max_retain_drop=MAX_RETAIN_DROP, min_forget_drop=MIN_FORGET_DROP,
                   min_selectivity=MIN_SELECTIVITY, set_alias=UNLEARNED_ALIAS)
    outcome = (f"PASSED: {DEMO_MODEL}@{UNLEARNED_ALIAS} -> {result.model_uri}" if verdict.passed
               else f"FAILED ({'; '.join(verdict.failures)}); alias '{UNLEARNED_ALIAS}' not moved")
    print(f"gate (forget top1 drop >= {MIN_FORGET_DROP}, retain top1 drop <= {MAX_RETAIN_DROP}, "
          f"selectivity >= {MIN_SELECTIVITY}): {outcome}")
    print(f"lineage:  mlflow-selprune lineage {result.model_uri}")
    print(f"browse:   mlflow ui --backend-store-uri {uri}")
    print(f"demo finished in {time.monotonic() - start:.0f}s")
    return 0 if verdict.passed else 1
