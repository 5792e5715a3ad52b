"""How fast the CLI answers when there is no real work: --help, a bad option, a missing data file.

Each case is a fresh ``python`` process (the console script's code path, ``python -m mlflow_selprune``)
timed from start to exit; the cases are interleaved in rounds and the median of N rounds is reported,
so a busy machine's slow spells hit all of them alike. A bare ``python -c pass`` is the floor. Every
case runs in an empty temporary directory with MLFLOW_TRACKING_URI unset, so nothing can be written
anywhere (the script checks that the directory stays empty and that each case exits as expected).

    python examples/benchmarks/startup_time.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = [
    # (label, argv after the interpreter, expected exit code)
    ("python -c pass (floor)", ["-c", "pass"], 0),
    ("import mlflow_selprune", ["-c", "import mlflow_selprune"], 0),
    ("mlflow-selprune --help", ["-m", "mlflow_selprune", "--help"], 0),
    ("prune --help", ["-m", "mlflow_selprune", "prune", "--help"], 0),
    ("prune --ff-frac abc (bad option)", ["-m", "mlflow_selprune", "prune", "--ff-frac", "abc"], 2),
    (
        "prune --forget ./nope.txt (missing data)",
        [
            "-m",
            "mlflow_selprune",
            "prune",
            "--model-uri",
            "models:/some-model/1",
            "--forget",
            "./nope.txt",
            "--retain",
            "builtin:stdlib-prose",
        ],
        2,
    ),
    ("lineage, no store here (refusal)", ["-m", "mlflow_selprune", "lineage", "models:/some-model/1"], 2),
]


def load_average() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="runs of each case (median reported)")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    times: dict[str, list[float]] = {label: [] for label, _, _ in CASES}
    print(f"== CLI start-up: median of {args.rounds} fresh processes per case, interleaved")
    print(
        f"   python {sys.version.split()[0]}, {os.cpu_count()} logical cores, load average at start: {load_average()}"
    )
    with tempfile.TemporaryDirectory() as empty:
        for _ in range(args.rounds):
            for label, argv, expected in CASES:
                start = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, *argv], capture_output=True, text=True, env=env, cwd=empty, timeout=600
                )
                times[label].append(time.perf_counter() - start)
                if out.returncode != expected:
                    print(f"unexpected exit {out.returncode} (wanted {expected}) for {label}: {out.stderr[-500:]}")
                    return 1
        left = os.listdir(empty)
    if left:
        print(f"a case wrote into the working directory: {left}")
        return 1
    width = max(len(label) for label in times)
    print(f"   {'case':<{width}}  {'median s':>9}  {'min s':>7}  {'max s':>7}")
    for label, values in times.items():
        print(f"   {label:<{width}}  {statistics.median(values):>9.2f}  {min(values):>7.2f}  {max(values):>7.2f}")
    print(f"   load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
