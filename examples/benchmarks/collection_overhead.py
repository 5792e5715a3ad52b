"""What collecting activation statistics costs over a plain forward pass.

Contenders, run in interleaved rounds over the same batches in one process:

  plain forward (full)   model(input_ids=..., attention_mask=...) under torch.no_grad(), LM head included
  plain forward (body)   model.gpt_neox(input_ids=..., attention_mask=...) under torch.no_grad(), no LM head
  collect (abs)          collect_statistics(model, batches): default sums (n, sum|a|), what abs needs
  collect (all)          collect_statistics(model, batches, sums="all"): every sum

collect_statistics runs the model body only (statistics never need the
logits), so it is compared with both baselines. Issue 7's targets
(<= 1.10 for abs, <= 1.30 for all) are stated against "a plain
torch.no_grad() forward", i.e. the full model; the body ratio is the stricter,
hooks-only view.

    python examples/benchmarks/collection_overhead.py [--batches 2] [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse

import torch

from common import (
    build_neox,
    footer,
    header,
    interleaved,
    make_batches,
    n_positions,
    n_real_tokens,
    plain_forward,
    table,
)
from mlflow_selprune import collect_statistics

TARGETS = {"collect (abs)": 1.10, "collect (all)": 1.30}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2, help="batches per round (each contender runs all of them)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (after one warm-up round)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header("collection overhead: collect_statistics vs a plain torch.no_grad() forward", args)

    model = build_neox(args.layers, args.hidden, args.intermediate, args.heads, args.vocab)
    batches = make_batches(args.batches, args.batch_size, args.seq_len, args.vocab)
    real = n_real_tokens(batches)
    print(
        f"   model: GPT-NeoX {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.heads} heads, vocab {args.vocab}, float32, random init"
    )
    print(
        f"   data per round: {args.batches} batches of {args.batch_size}x{args.seq_len}, "
        f"{real:,} real tokens of {n_positions(batches):,} positions ({1 - real / n_positions(batches):.0%} padding)"
    )

    contenders = {
        "plain forward (full)": plain_forward(model, batches),
        "plain forward (body)": plain_forward(model, batches, body=True),
        "collect (abs)": lambda: collect_statistics(model, batches, progress=False),
        "collect (all)": lambda: collect_statistics(model, batches, sums="all", progress=False),
    }
    t = interleaved(contenders, repeats=args.repeats, warmup=1)

    print(f"\n   median over {args.repeats} interleaved rounds; ratio = median of per-round time ratios")
    rows = []
    for name in contenders:
        rows.append(
            [
                name,
                t.median(name),
                real / t.median(name),
                t.ratio(name, "plain forward (full)"),
                t.ratio(name, "plain forward (body)"),
                t.ratio(name, "plain forward (full)", cpu=True),
                t.ratio(name, "plain forward (body)", cpu=True),
            ]
        )
    table(rows, ["contender", "s/round", "tokens/s", "x full (wall)", "x body (wall)", "x full (cpu)", "x body (cpu)"])

    print("\n   targets (against the plain forward of the full model; body ratio shown for comparison):")
    for name, target in TARGETS.items():
        full, body = t.ratio(name, "plain forward (full)"), t.ratio(name, "plain forward (body)")
        verdict = "met" if full <= target else "NOT met"
        print(
            f"   {name}: {full:.3f}x full forward (target <= {target:.2f}: {verdict}); "
            f"{body:.3f}x body-only forward ({'within' if body <= target else 'over'} {target:.2f})"
        )
    footer()


if __name__ == "__main__":
    main()
