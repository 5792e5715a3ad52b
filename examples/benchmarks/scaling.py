"""How statistics collection scales with tokens and with processes.

1. Tokens: collect_statistics on 10k / 20k / 40k positions (16 x 128 batches,
   some padding) in this process, interleaved repeats; seconds per 1k real
   tokens should stay flat (linear cost).
2. Processes: the same collection launched through torchrun on CPU with 1
   and with 2 processes (``python -m torch.distributed.run --standalone
   --nproc_per_node N scaling.py --worker ...``), each process using
   ``accelerate.Accelerator(cpu=True)`` (gloo): every process takes every
   N-th batch and the float64 sums are all-reduced. The time is taken inside
   the workers, from a barrier after a warm-up to the all-reduced result, so
   process start-up is not counted (it is printed separately).

Fairness: torch uses ``--threads`` (default 1) threads per process in every
case, so 2 processes use 2 cores where 1 process uses 1. On a 2-core machine
shared with other jobs the 2-process speedup can only be what idle cores allow.

    python examples/benchmarks/scaling.py [--tokens 10000 20000 40000] [--process-tokens 20000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from common import batches_for_tokens, build_neox, n_real_tokens
    from mlflow_selprune import collect_statistics

    accelerator = Accelerator(cpu=True)
    model = build_neox()
    batches = batches_for_tokens(args.worker)
    collect_statistics(model, batches[: accelerator.num_processes], accelerator=accelerator, progress=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        stats = collect_statistics(model, batches, accelerator=accelerator, progress=False)
        times.append(time.perf_counter() - start)
    if accelerator.is_main_process:
        if stats.ff.n_tokens != n_real_tokens(batches):
            print(f"warning: counted {stats.ff.n_tokens} tokens, expected {n_real_tokens(batches)}")
        print(
            "RESULT "
            + json.dumps(
                {
                    "processes": accelerator.num_processes,
                    "times": times,
                    "tokens": n_real_tokens(batches),
                    "threads": torch.get_num_threads(),
                }
            )
        )


def launch(n_processes: int, args) -> dict:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n_processes}",
        os.path.abspath(__file__),
        "--worker",
        str(args.process_tokens),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        print(out.stdout[-2000:], out.stderr[-4000:])
        raise SystemExit(f"torchrun with {n_processes} process(es) failed (exit {out.returncode})")
    result = json.loads(line[len("RESULT ") :])
    result["launch_wall"] = wall
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[10_000, 20_000, 40_000],
        help="token counts (positions) for the in-process sweep",
    )
    parser.add_argument("--sweep-repeats", type=int, default=3, help="interleaved rounds of the sweep")
    parser.add_argument("--process-tokens", type=int, default=20_000, help="tokens for the 1- vs 2-process runs")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--launches", type=int, default=2, help="launches per process count, alternated")
    parser.add_argument("--repeats", type=int, default=2, help="timed collections inside each launch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process, in every case")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    from common import batches_for_tokens, build_neox, footer, header, interleaved, n_real_tokens, table
    from mlflow_selprune import collect_statistics

    header("scaling of statistics collection with tokens and processes", args)
    model = build_neox()
    print(
        f"   model: GPT-NeoX 4 layers, hidden 256, intermediate 1024, vocab 4096, random init; "
        f"collect_statistics with default sums; {args.threads} torch thread(s) per process"
    )

    # ---- tokens
    data = {n: batches_for_tokens(n) for n in args.tokens}
    t = interleaved(
        {n: (lambda b=b: collect_statistics(model, b, progress=False)) for n, b in data.items()},
        repeats=args.sweep_repeats,
        warmup=1,
    )
    base = None
    rows = []
    for n, batches in data.items():
        real = n_real_tokens(batches)
        seconds = t.median(n)
        per_1k = seconds / real * 1000
        base = base or per_1k
        rows.append([f"{n:,}", real, seconds, per_1k, real / seconds, per_1k / base])
    print(f"\n   1) tokens, in this process, median of {args.sweep_repeats} interleaved rounds")
    table(rows, ["positions", "real tokens", "seconds", "s per 1k tokens", "tokens/s", "per-token cost vs first"])

    # ---- processes
    results = {n: [] for n in args.processes}
    for _ in range(args.launches):
        for n in args.processes:
            results[n].append(launch(n, args))
    rows = []
    base = None
    for n in args.processes:
        times = [x for r in results[n] for x in r["times"]]
        seconds = statistics.median(times)
        base = base or seconds
        tokens = results[n][0]["tokens"]
        rows.append(
            [
                n,
                tokens,
                seconds,
                tokens / seconds,
                base / seconds,
                statistics.median(r["launch_wall"] for r in results[n]),
            ]
        )
    print(
        f"\n   2) processes through torchrun (gloo, Accelerator(cpu=True)), {args.threads} thread(s) each; "
        f"median of {args.launches} launches x {args.repeats} collections"
    )
    table(rows, ["processes", "real tokens", "seconds", "tokens/s", "speedup", "launch wall s"])
    print(
        f"   {os.cpu_count()} logical cores on this machine; load average now {os.getloadavg()[0]:.2f}: "
        "the 2-process speedup is bounded by the cores other jobs leave free"
    )
    footer()


if __name__ == "__main__":
    main()
