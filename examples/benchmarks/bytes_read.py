"""Bytes of model files each command reads: downloaded, hashed, loaded, uploaded; counted, not timed.

    python examples/benchmarks/bytes_read.py [--model smollm2-135m | --model DIR] [--before OLD_CHECKOUT]

Registers the model (default: SmolLM2-135M, ``model_sources.prepare``; offline once it is in the model cache)
in a sqlite store in a fresh directory, then runs, each in a fresh process: ``prune`` (full) and ``prune
--storage delta`` from it (one small step), ``lineage --verify`` and ``gate --dry-run`` of both versions, and
``materialize`` of the delta. Each process counts the bytes of the files its own read paths take in, by
wrapping (the real functions still run):

- downloaded: ``mlflow.artifacts.download_artifacts`` of a model URI (the files of the copy it returns);
- hashed: ``lineage.file_sha256`` (the manifests, the evidence files);
- loaded: the weight files (``*.safetensors``, ``*.bin``) in the directory ``from_pretrained`` reads;
- uploaded: the directory ``MlflowClient.log_model_artifacts`` stores.

The counts depend on the files and the code path only, never on timing or the page cache. ``--before DIR``
runs every command a second time with ``DIR`` (a checkout of older code, e.g. ``git worktree add /tmp/old
HEAD~1``) first on ``PYTHONPATH``, in its own store, and prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

NAME = "counted"
TOKENS = ["--max-length", "64", "--batch-size", "4", "--collect-tokens", "256", "--eval-tokens", "256"]
PRUNE = ["--forget", "builtin:stdlib-code", "--retain", "builtin:stdlib-prose", *TOKENS]
PRUNE += ["--ff-frac", "0.02", "--attn-frac", "0.02", "--steps", "1", "--no-control", "--no-progress"]
GATE = ["--max-retain-drop", "1", "--dry-run"]
COUNTS = ("downloaded", "hashed", "loaded", "uploaded")


def _size(path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _count(counts: dict) -> None:
    """Wrap the read paths (each wrapper runs the real function, then adds what it read to ``counts``)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import PreTrainedModel

    from mlflow_selprune.registry import lineage

    download, file_sha256 = mlflow.artifacts.download_artifacts, lineage.file_sha256
    from_pretrained, log_model_artifacts = PreTrainedModel.from_pretrained.__func__, MlflowClient.log_model_artifacts

    def downloaded(*args, **kwargs):
        local = download(*args, **kwargs)
        if str(kwargs.get("artifact_uri", "")).startswith("models:/"):
            counts["downloaded"] += _size(local)
        return local

    def hashed(path):
        counts["hashed"] += _size(path)
        return file_sha256(path)

    def loaded(cls, directory, *args, **kwargs):
        weights = [f for f in Path(directory).iterdir() if f.suffix in (".safetensors", ".bin")]
        counts["loaded"] += sum(f.stat().st_size for f in weights)
        return from_pretrained(cls, directory, *args, **kwargs)

    def uploaded(self, model_id, local_dir, *args, **kwargs):
        counts["uploaded"] += _size(local_dir)
        return log_model_artifacts(self, model_id, local_dir, *args, **kwargs)

    mlflow.artifacts.download_artifacts, lineage.file_sha256 = downloaded, hashed
    PreTrainedModel.from_pretrained = classmethod(loaded)  # type: ignore[method-assign]
    MlflowClient.log_model_artifacts = uploaded  # type: ignore[method-assign]


def _child(command: list[str]) -> dict:
    """Run one CLI command in this process with the read paths counted; its exit code and the counts."""
    from mlflow_selprune.cli import main

    counts = dict.fromkeys(COUNTS, 0)
    _count(counts)
    try:
        main(command, standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return {"exit": code, **counts}


def _run(workdir: Path, command: list[str], before: str | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    if before:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (before, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(command)], capture_output=True, text=True, cwd=workdir, env=env
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["exit"] != 0:
        sys.exit(f"{' '.join(command)} exited {result['exit']}:\n{proc.stderr[-4000:]}")
    return result


def measure(model_dir: Path, before: str | None) -> dict[str, dict]:
    """Every command in a fresh store; ``{label: counts}``."""
    workdir = Path(tempfile.mkdtemp(prefix="selprune-bytes-"))
    full, delta = f"models:/{NAME}/2", f"models:/{NAME}/3"
    commands = {
        "register": ["register", str(model_dir), "--name", NAME],
        "prune (full)": ["prune", "--model-uri", f"models:/{NAME}/1", *PRUNE],
        "prune --storage delta": ["prune", "--model-uri", f"models:/{NAME}/1", *PRUNE, "--storage", "delta"],
        "lineage --verify (full)": ["lineage", full, "--verify"],
        "lineage --verify (delta)": ["lineage", delta, "--verify"],
        "gate --dry-run (full)": ["gate", "--model-uri", full, *GATE],
        "gate --dry-run (delta)": ["gate", "--model-uri", delta, *GATE],
        "materialize (delta)": ["materialize", delta],
    }
    return {label: _run(workdir, command, before) for label, command in commands.items()}


def _cells(counts: dict, unit: int) -> str:
    total = sum(counts[k] for k in COUNTS)
    return " ".join(f"{counts[k] / unit:6.2f}" for k in COUNTS) + f" {total / unit:6.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a packaged model name or a model directory")
    parser.add_argument("--before", default=None, help="a checkout of older code to measure beside this one")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    from mlflow_selprune.registry.model_sources import prepare

    model_dir = prepare(args.model).directory
    weights = sum(f.stat().st_size for f in model_dir.iterdir() if f.suffix in (".safetensors", ".bin"))
    print(f"model: {args.model} ({model_dir}), weight files {weights / 2**20:,.1f} MiB; figures in multiples of them")
    runs = {"after": measure(model_dir, None)}
    if args.before:
        runs["before"] = measure(model_dir, args.before)
    heading = " ".join(f"{k[:6]:>6}" for k in COUNTS) + f" {'total':>6}"
    print(f"{'command':<26}" + "   ".join(f"{name}: {heading}" for name in runs))
    for label in runs["after"]:
        print(f"{label:<26}" + "   ".join(f"{name}: {_cells(run[label], weights)}" for name, run in runs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
