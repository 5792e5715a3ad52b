"""The scripts behind docs/robustness.md's tables stay runnable: each runs here, end to end, on a tiny Llama saved
where ``--model-dir`` points (the documented runs use SmolLM2-135M), with small budgets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from mlflow_helpers import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--collect-tokens", "1500", "--eval-tokens", "800", "--threads", "1"]
pytestmark = pytest.mark.slow(seconds=40)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = tiny_llama_config(tiny_tokenizer)
    T.LlamaForCausalLM(config).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def _run(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}")
    command = [sys.executable, str(ROOT / "examples" / "benchmarks" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def test_the_baseline_comparison_logs_both_methods_and_plots_their_curves(tiny_llama, tmp_path):
    """Selective pruning and gradient difference, each measured alike, each a run of the experiment."""
    import mlflow

    done = _run(
        "robustness.py", "--model-dir", str(tiny_llama), *SMALL, "--baseline-lr", "1e-3", "--max-steps", "4",
        "--every", "2", "--relearn-steps", "2", "--relearn-curve", "0,1,2", "--relearn-lr", "1e-3",
        "--plot", str(tmp_path / "curves.png"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("0 | ")]
    assert [row.split(" | ")[1] for row in rows] == ["selective pruning", "gradient difference"], done.stdout
    assert (tmp_path / "curves.png").stat().st_size > 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        runs = client.search_runs([client.get_experiment_by_name("selprune-robustness").experiment_id])
        assert sorted(run.data.params["method"] for run in runs) == ["gradient difference", "selective pruning"]
        for run in runs:
            assert [p.step for p in client.get_metric_history(run.info.run_id, "relearn_curve_forget_top1")] == [
                0,
                1,
                2,
            ]
            for key in ("forget_top1_drop", "quantized_int4_forget_top1_drop", "forget_code_pass_rate_3shot"):
                assert key in run.data.metrics, key
    finally:
        mlflow.set_tracking_uri(None)


def test_the_learning_rate_sweep_prints_the_three_curves_per_setting(tiny_llama, tmp_path):
    done = _run(
        "relearning_sweep.py", "--model-dir", str(tiny_llama), *SMALL, "--lr", "1e-3", "3e-3", "--curve", "0,1,2",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    points = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("0 | ") and "check" not in line]
    assert [(p[1], p[3]) for p in points] == [(lr, step) for lr in ("0.001", "0.003") for step in ("0", "1", "2")]
    assert all(len(p) == 10 for p in points)
