"""The runnable examples and the MLproject, run for real (the hub-only paper example is not run: no hub here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlflow_helpers import TINY_NAME, registry_snapshot, jsonl_retain_store

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_tokenizer):
    with jsonl_retain_store(tmp_path_factory.mktemp("examples"), tiny_tokenizer) as s:
        yield s


def _run(command, store, timeout=600):
    env = dict(os.environ, **store["env"])
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=store["root"], timeout=timeout)


def test_python_api_example_registers_a_version(store):
    before = registry_snapshot()
    out = _run(
        [
            sys.executable,
            str(ROOT / "examples" / "python_api.py"),
            "--model-uri",
            f"models:/{TINY_NAME}@base",
            "--forget",
            store["forget"],
            "--retain",
            store["retain"],
            "--ff-frac",
            "0.1",
            "--tokens",
            "1500",
        ],
        store,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "engine only: pruned" in out.stdout and "registered: models:/" in out.stdout
    after = registry_snapshot()
    assert after[TINY_NAME] == before[TINY_NAME]  # the parent's model gets no version from the example
    assert (
        len(after["selprune-api-example"]["versions"])
        == len(before.get("selprune-api-example", {}).get("versions", {})) + 1
    )
    assert "registered: models:/selprune-api-example/" in out.stdout


def test_mlproject_and_examples_are_well_formed():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert {"main", "prune", "evaluate", "gate", "reconcile"} <= set(project["entry_points"])
    assert (ROOT / project["python_env"]).is_file()
    assert "NEEDS THE HUGGING FACE HUB" in (ROOT / "examples" / "paper_experiment.py").read_text()
    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "unlearning-gate.yml").read_text())
    steps = " ".join(step.get("run", "") for step in workflow["jobs"]["unlearn"]["steps"])
    assert "mlflow-selprune gate" in steps and "--set-alias production" in steps
