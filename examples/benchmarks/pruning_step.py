"""One full pruning step at the paper's token budgets, timed phase by phase.

The demo model's architecture (GPT-NeoX, 4 layers, hidden 256, intermediate
1024, 4 heads, its own 4096-token BPE tokenizer) from
``mlflow_selprune.demo_tiny.train_demo_model``, untrained by default (the timing
does not depend on the weights; ``--no-untrained --train-seconds S`` trains it
first). Data: ``builtin:stdlib-code`` (forget) and ``builtin:stdlib-prose``
(retain) through ``prepare_data`` with 100,000 collect and 100,000 eval
tokens each (the paper's budgets; the stdlib prose has fewer eval tokens than
that, which the table shows).

Phases: data prep (prepare_data, both datasets: the standard-library scan,
the split by document, tokenization and batching, with no cache), collect forget, collect retain (collect_statistics,
default sums), score + select + zero weights (2% of FF neurons), evaluate
forget, evaluate retain (evaluate_model, full model with LM head and the
next-token metrics).

    python examples/benchmarks/pruning_step.py [--tokens 100000] [--eval-tokens N] [--no-untrained --train-seconds 20]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from common import footer, header, table
from mlflow_selprune import collect_statistics, corpora, evaluate_model, find_architecture, score
from mlflow_selprune.data import prepare_data
from mlflow_selprune.demo_tiny import FORGET, RETAIN, train_demo_model
from mlflow_selprune.evaluation import next_token_metric
from mlflow_selprune.engine.selection import select
from mlflow_selprune.engine.surgery import prune_neurons


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="collect tokens per dataset (paper: 100,000)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="eval tokens per dataset (default: --tokens)")
    parser.add_argument(
        "--untrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random-init demo model (default); --no-untrained trains it for --train-steps first",
    )
    parser.add_argument("--train-steps", type=int, default=20, help="training steps with --no-untrained")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_tokens = args.eval_tokens or args.tokens
    logging.getLogger("mlflow_selprune").setLevel(logging.ERROR)  # data warnings are printed below
    header("one pruning step at the paper's budgets, by phase", args)

    start = time.perf_counter()
    model, tokenizer = train_demo_model(steps=0 if args.untrained else args.train_steps, progress=False)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"   model: demo GPT-NeoX ({n_params / 1e6:.1f}M parameters), "
        f"{'untrained' if args.untrained else f'trained ({args.train_steps} steps)'}; "
        f"setup (tokenizer{'' if args.untrained else ' + training'}) {time.perf_counter() - start:.1f} s, not counted"
    )
    next_token_metric()  # load the packaged evaluate module once, outside the timed phases

    phases = []

    def phase(name, tokens, fn):
        begin = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - begin
        phases.append([name, tokens, seconds, tokens / seconds if tokens else ""])
        return out

    def prep():
        return (
            prepare_data(FORGET, tokenizer, collect_tokens=args.tokens, eval_tokens=eval_tokens),
            prepare_data(RETAIN, tokenizer, collect_tokens=args.tokens, eval_tokens=eval_tokens),
        )

    # the stdlib scan behind builtin:* was cached while training the tokenizer: drop it, so the
    # data prep phase measures what a fresh run pays (scan, split, tokenize, batch)
    getattr(corpora, "_stdlib_corpora", None) and corpora._stdlib_corpora.cache_clear()
    begin = time.perf_counter()
    forget, retain = prep()
    prep_seconds = time.perf_counter() - begin
    data_tokens = forget.collect_tokens + forget.eval_tokens + retain.collect_tokens + retain.eval_tokens
    phases.append(["data prep (both datasets)", data_tokens, prep_seconds, data_tokens / prep_seconds])

    stats_f = phase(
        "collect forget",
        forget.collect_tokens,
        lambda: collect_statistics(model, forget.collect_batches, progress=False),
    )
    stats_r = phase(
        "collect retain",
        retain.collect_tokens,
        lambda: collect_statistics(model, retain.collect_batches, progress=False),
    )

    def surgery():
        arch = find_architecture(model)
        scores = score(stats_f.ff, stats_r.ff, "abs")
        mask = select(scores, torch.zeros_like(scores, dtype=torch.bool), 0.02)
        prune_neurons(arch, "ff", mask)
        return int(mask.sum())

    n_pruned = phase("score + select + zero weights", 0, surgery)
    metrics = phase(
        "evaluate forget",
        forget.eval_tokens,
        lambda: evaluate_model(
            model, forget.eval_batches, skip_token_ids=forget.skip_token_ids, prefix="forget_", progress=False
        ),
    )
    metrics.update(
        phase(
            "evaluate retain",
            retain.eval_tokens,
            lambda: evaluate_model(
                model, retain.eval_batches, skip_token_ids=retain.skip_token_ids, prefix="retain_", progress=False
            ),
        )
    )

    total = sum(row[2] for row in phases)
    step = sum(row[2] for row in phases[1:])
    print(
        f"   forget {FORGET}: {forget.collect_tokens:,} collect / {forget.eval_tokens:,} eval tokens; "
        f"retain {RETAIN}: {retain.collect_tokens:,} collect / {retain.eval_tokens:,} eval tokens"
    )
    for warning in forget.warnings + retain.warnings:
        print(f"   note: {warning}")
    print(f"   pruned {n_pruned} FF neurons (2%)\n")
    for row in phases:
        row.append(f"{row[2] / total:.1%}")
    table(phases + [["total", data_tokens, total, "", "100%"]], ["phase", "tokens", "seconds", "tokens/s", "share"])
    print(
        f"   one step without data prep: {step:.1f} s; forget top1 {metrics['forget_top1']:.4f}, "
        f"retain top1 {metrics['retain_top1']:.4f}" + (" (untrained model: not meaningful)" if args.untrained else "")
    )
    footer()


if __name__ == "__main__":
    main()
