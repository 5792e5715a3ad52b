"""The runnable examples and the MLproject, run for real (the hub-only paper example is not run: no hub here)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mlflow_selprune.registry import lineage

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
    out = _run([sys.executable, str(ROOT / "examples" / "python_api.py"), "--model-uri", f"models:/{TINY_NAME}@base",
                "--forget", store["forget"], "--retain", store["retain"], "--ff-frac", "0.1", "--tokens", "1500"], store)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "engine only: pruned" in out.stdout and "registered: models:/" in out.stdout
    after = registry_snapshot()
    assert len(after[TINY_NAME]["versions"]) == len(before[TINY_NAME]["versions"]) + 1


def test_mlflow_run_prune_entry_point(store):
    before = registry_snapshot()
    out = _run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "prune", "--env-manager", "local",
                "-P", f"model_uri=models:/{TINY_NAME}/1", "-P", f"forget={store['forget']}",
                "-P", f"retain={store['retain']}", "-P", "ff_frac=0.1", "-P", "steps=1",
                "-P", "max_length=64", "-P", "batch_size=4", "-P", "collect_tokens=1500",
                "-P", "eval_tokens=800", "-P", "alias=from-project"], store)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    after = registry_snapshot()
    new = set(after[TINY_NAME]["versions"]) - set(before[TINY_NAME]["versions"])
    assert len(new) == 1
    version = new.pop()
    assert str(after[TINY_NAME]["aliases"]["from-project"]) == version
    mv = MlflowClient().get_model_version(TINY_NAME, version)
    # the project's run is the run that produced the version
    assert mv.tags[lineage.RUN_ID] == mv.run_id
    assert MlflowClient().get_run(mv.run_id).data.tags.get("mlflow.project.entryPoint") == "prune"


def test_mlproject_and_examples_are_well_formed():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert {"main", "prune", "evaluate", "gate"} <= set(project["entry_points"])
    assert (ROOT / project["python_env"]).is_file()
    assert "NEEDS THE HUGGING FACE HUB" in (ROOT / "examples" / "paper_experiment.py").read_text()
    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "unlearning-gate.yml").read_text())
    steps = " ".join(step.get("run", "") for step in workflow["jobs"]["unlearn"]["steps"])
    assert "mlflow-selprune gate" in steps and "--set-alias production" in steps
