"""The engine on the real pretrained model (SmolLM2-135M, 30 layers): what each phase costs.

  collect (abs)        collect_statistics on real token batches, against a plain body forward (no LM head)
  evaluate             evaluate_model (next-token metrics), against a plain full forward (LM head included)
  one pruning step     prune(..., steps=1) without evaluation: forget + retain statistics, scoring, surgery
  peak RSS             this process's peak resident memory, against the model's bytes

Contenders run in interleaved rounds over the same batches (see common.interleaved).

    python examples/benchmarks/real_model.py [--tokens 4096] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from common import footer, header, interleaved, n_real_tokens, plain_forward, table  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per side and per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    header("the engine on SmolLM2-135M: collection, evaluation, one pruning step, memory", args)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_selprune import PruneConfig, collect_statistics, evaluate_model, prepare_data, prune
    from mlflow_selprune.demo import RECIPE
    from mlflow_selprune.registry.model_sources import prepare

    directory = prepare(RECIPE.source).directory
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    # unique storage: the tied input and output embeddings are one tensor
    model_bytes = sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())
    data = dataclasses.replace(RECIPE.data, collect_tokens=args.tokens, eval_tokens=args.tokens)
    forget = prepare_data(RECIPE.forget, tokenizer, data)
    retain = prepare_data(RECIPE.retain, tokenizer, data)
    collect_batches, eval_batches = forget.collect_batches, forget.eval_batches
    print(
        f"   model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{model_bytes / 2**20:.0f} MiB float32"
    )
    print(
        f"   data: {n_real_tokens(collect_batches):,} collect and {n_real_tokens(eval_batches):,} eval tokens of "
        f"{RECIPE.forget} (the demo's data options: batches of 16, one chunk of up to 128 tokens per document)"
    )

    contenders = {
        "plain forward (body)": plain_forward(model, collect_batches, body=True),
        "collect (abs)": lambda: collect_statistics(model, collect_batches, progress=False),
        "plain forward (full)": plain_forward(model, eval_batches),
        "evaluate": lambda: evaluate_model(model, eval_batches, skip_token_ids=forget.skip_token_ids, progress=False),
    }
    t = interleaved(contenders, repeats=args.repeats, warmup=1)
    rows = []
    for name, baseline, batches in (
        ("collect (abs)", "plain forward (body)", collect_batches),
        ("evaluate", "plain forward (full)", eval_batches),
    ):
        real = n_real_tokens(batches)
        rows.append([name, real / t.median(name), real / t.median(baseline), t.ratio(name, baseline), baseline])
    table(rows, ["phase", "tokens/s", "baseline tokens/s", "x baseline", "baseline"])

    start = time.perf_counter()
    prune(
        model,
        forget.collect_batches,
        retain.collect_batches,
        PruneConfig(ff_frac=RECIPE.prune.ff_frac, attn_frac=RECIPE.prune.attn_frac, steps=1),
        progress=False,
    )
    step_seconds = time.perf_counter() - start
    collected = n_real_tokens(forget.collect_batches) + n_real_tokens(retain.collect_batches)
    print(f"\n   one pruning step (statistics on {collected:,} tokens, scoring, surgery): {step_seconds:.1f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"   peak RSS: {peak / 2**20:,.0f} MiB = {peak / model_bytes:.2f}x the model's bytes")
    footer()


if __name__ == "__main__":
    main()
