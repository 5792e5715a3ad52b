"""The demo on a busy machine: same result, only slower.

Starts two CPU-bound busy loops (one per core on a 2-core machine), runs
`mlflow-selprune demo` (the real-model demo; `--tiny`: the self-trained one, retrained) in a fresh
directory (its own sqlite store), stops the loops, and prints the demo's gate verdict, the unlearned
version's weights digest and drops, and the wall time. Run it once on a quiet machine (`--busy 0`) and
once busy (default): the digests and the metrics must be the same, the times not.

    python examples/benchmarks/demo_under_load.py [--busy 2] [--seed 0] [--tiny] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time


def _spin(stop):
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="CPU-bound busy loops to run beside the demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the self-trained demo (trained anew), not the real model")
    parser.add_argument("--workdir", default=None, help="where the demo's mlflow.db goes (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="selprune-demo-")
    stop = multiprocessing.Event()
    loops = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for loop in loops:
        loop.start()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.monotonic()
    try:
        demo = ["demo", "--tiny", "--retrain"] if args.tiny else ["demo"]
        out = subprocess.run(
            [sys.executable, "-m", "mlflow_selprune", *demo, "--no-progress", "--seed", str(args.seed)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        stop.set()
        for loop in loops:
            loop.join(timeout=10)
            if loop.is_alive():
                loop.terminate()
    seconds = time.monotonic() - start
    print(out.stdout)
    if out.returncode not in (0, 1):
        print(out.stderr[-3000:], file=sys.stderr)
    from mlflow.tracking import MlflowClient

    name = "selprune-tiny-demo" if args.tiny else "selprune-demo"
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    (latest,) = [
        v
        for v in client.search_model_versions(f"name='{name}'")
        if v.version == str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
    ]
    tags = latest.tags
    print(
        f"busy loops: {args.busy}; seed {args.seed}; exit code {out.returncode} "
        f"({'gate passed' if out.returncode == 0 else 'gate FAILED' if out.returncode == 1 else 'error'}); "
        f"unlearned weights sha256 {tags.get('selprune.weights_sha256', '')[:16]}; forget top-1 drop "
        f"{tags.get('selprune.metric.forget_top1_drop')}, "
        f"retain top-1 drop {tags.get('selprune.metric.retain_top1_drop')}; "
        f"wall time {seconds:.0f} s"
    )
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
