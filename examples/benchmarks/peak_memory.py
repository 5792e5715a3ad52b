"""Peak memory of a pruning run vs the model's own parameter bytes, at two token budgets.

Each budget runs in a fresh subprocess (so high-water marks do not mix): it
builds the demo model's architecture (GPT-NeoX 4 x 256, intermediate 1024,
vocab 4096, random init), random forget/retain batches of the budget
(16 x 128 tokens, some padding) and eval batches of a quarter of it, and runs
one pruning step phase by phase: collect forget, collect retain, score,
select and zero 2% of the FF neurons, then evaluate forget and retain. It
reports ru_maxrss (peak RSS) before, after the statistics phases and at the
end, and torch.cuda.max_memory_allocated when the run is on CUDA.

If statistics memory is O(neurons), the peak the statistics phases add stays
flat when the budget grows; only the token batches and the per-token metric
arrays (24 bytes per eval token) grow, by design. With glibc's default
(dynamic) mmap threshold the evaluation's large freed temporaries may stay on
the heap, so its peak RSS can creep up with the number of batches;
``--malloc-mmap-threshold 131072`` fixes the threshold to show the difference.

    python examples/benchmarks/peak_memory.py [--budgets 20000 80000] [--threads 1] [--malloc-mmap-threshold 131072]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

MB = 1024 * 1024


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc), or 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def max_rss() -> int:
    """Peak RSS of this process so far, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def worker(tokens: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from common import batches_for_tokens, build_neox, n_positions, n_real_tokens
    from mlflow_selprune import collect_statistics, evaluate_model, find_architecture, score
    from mlflow_selprune.evaluation import next_token_metric
    from mlflow_selprune.engine.selection import select
    from mlflow_selprune.engine.surgery import prune_neurons

    next_token_metric()  # import and load the evaluate module before measuring
    after_imports = max_rss()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_neox().to(device)
    vocab = model.config.vocab_size
    forget = batches_for_tokens(tokens, seed=1, low=2, high=vocab // 2)
    retain = batches_for_tokens(tokens, seed=2, low=vocab // 2, high=vocab)
    forget_eval = batches_for_tokens(tokens // 4, seed=3, low=2, high=vocab // 2)
    retain_eval = batches_for_tokens(tokens // 4, seed=4, low=vocab // 2, high=vocab)
    all_batches = forget + retain + forget_eval + retain_eval
    data_bytes = sum(t.numel() * t.element_size() for b in all_batches for t in b.values())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = max_rss()
    # one pruning step, phase by phase: statistics first, then the metrics
    stats_f = collect_statistics(model, forget, progress=False)
    stats_r = collect_statistics(model, retain, progress=False)
    scores = score(stats_f.ff, stats_r.ff, "abs")
    mask = select(scores, torch.zeros_like(scores, dtype=torch.bool), 0.02)
    prune_neurons(find_architecture(model), "ff", mask)
    after_collect = max_rss()
    cuda_collect = torch.cuda.max_memory_allocated() if device == "cuda" else None
    evaluate_model(model, forget_eval, prefix="forget_", progress=False)
    evaluate_model(model, retain_eval, prefix="retain_", progress=False)
    stats_bytes = sum(v.numel() * v.element_size() for s in (stats_f.ff, stats_f.attn) for v in s.sums.values())
    return {
        "tokens": tokens,
        "collect_tokens": n_real_tokens(forget) + n_real_tokens(retain),
        "eval_tokens": n_real_tokens(forget_eval) + n_real_tokens(retain_eval),
        "positions": n_positions(all_batches),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "data_bytes": data_bytes,
        "stats_bytes_per_dataset": stats_bytes,
        "after_imports": after_imports,
        "before": before,
        "after_collect": after_collect,
        "peak": max_rss(),
        "cuda_collect": cuda_collect,
        "cuda_peak": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "ff_pruned": int(mask.sum()),
        "device": device,
        "threads": torch.get_num_threads(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[20_000, 80_000],
        help="collect tokens per dataset, one fresh process each",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's own)")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the runs: a fixed threshold stops "
        "glibc from keeping large freed blocks on the heap",
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args.worker, args.threads)))
        return

    from common import footer, header, table

    header("peak memory of a pruning run vs parameter bytes", args)
    results = []
    for budget in args.budgets:
        command = [sys.executable, os.path.abspath(__file__), "--worker", str(budget)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        env = dict(os.environ)
        if args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"the worker for {budget} tokens failed (exit {out.returncode})")
        results.append(json.loads(line[len("RESULT ") :]))

    r0 = results[0]
    print(
        f"   model: GPT-NeoX 4x256, intermediate 1024, vocab 4096 on {r0['device']}, "
        f"{r0['param_bytes'] / MB:.1f} MiB of parameters; statistics (default sums) "
        f"{r0['stats_bytes_per_dataset'] / 1024:.0f} KiB per dataset; {r0['threads']} torch thread(s)"
        + (f"; MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else "")
    )
    print("   one pruning step: collect forget + collect retain + score/select/zero 2% FF, then evaluate both")
    rows = []
    for r in results:
        rows.append(
            [
                f"{r['tokens']:,}",
                r["collect_tokens"],
                r["eval_tokens"],
                r["data_bytes"] / MB,
                r["before"] / MB,
                (r["after_collect"] - r["before"]) / MB,
                (r["peak"] - r["after_collect"]) / MB,
                r["peak"] / MB,
                r["peak"] / r["param_bytes"],
            ]
            + ([r["cuda_collect"] / MB, r["cuda_peak"] / MB] if r["cuda_peak"] is not None else [])
        )
    headers = [
        "budget/dataset",
        "collect tok",
        "eval tok",
        "batches MiB",
        "RSS before MiB",
        "+collect MiB",
        "+evaluate MiB",
        "peak RSS MiB",
        "peak/params",
    ]
    table(rows, headers + (["cuda collect MiB", "cuda peak MiB"] if r0["cuda_peak"] is not None else []))
    if len(results) >= 2:
        first, last = results[0], results[-1]
        added = [(r["after_collect"] - r["before"]) / MB for r in (first, last)]
        print(
            f"   collect tokens x{last['collect_tokens'] / first['collect_tokens']:.1f} -> peak RSS added by "
            f"the statistics phases {added[0]:.1f} -> {added[1]:.1f} MiB; whole run peak "
            f"{first['peak'] / MB:.0f} -> {last['peak'] / MB:.0f} MiB (x{last['peak'] / first['peak']:.2f})"
        )
    print(
        "   RSS before = high-water mark after imports, model and batches; the process baseline "
        f"(python + torch + transformers + evaluate) is {r0['after_imports'] / MB:.0f} MiB. +collect / "
        "+evaluate = how far each part raised the high-water mark (0: it stayed below the earlier peak)"
    )
    footer()


if __name__ == "__main__":
    main()
