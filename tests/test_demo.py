"""The demo is decided by seeds and step counts, never by the clock or the machine's load."""

from __future__ import annotations

import dataclasses

import pytest

from mlflow_selprune.demo_tiny import RECIPE, DemoRecipe, train_demo_model
from mlflow_selprune.registry.lineage import weights_sha256

# builds the standard-library corpora and trains three tiny models: tens of seconds
pytestmark = pytest.mark.slow

SMALL = dataclasses.replace(
    RECIPE,
    vocab_size=512,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    block_len=32,
    batch_size=4,
    train_code_chars=40_000,
    train_prose_chars=40_000,
)


def test_same_seed_same_weights_digest():
    first, tokenizer = train_demo_model(SMALL, seed=0, steps=3, progress=False)
    second, _ = train_demo_model(SMALL, seed=0, steps=3, progress=False)
    assert weights_sha256(first) == weights_sha256(second)
    other, _ = train_demo_model(SMALL, seed=1, steps=3, progress=False)
    assert weights_sha256(other) != weights_sha256(first)


def test_the_recipe_trains_by_steps():
    assert isinstance(RECIPE.train_steps, int) and RECIPE.train_steps > 0
    assert "seconds" not in " ".join(f.name for f in dataclasses.fields(DemoRecipe))


def test_the_callers_thread_count_does_not_change_the_weights():
    """The demo trains with its own fixed thread count and puts the caller's back afterwards."""
    import torch

    previous = torch.get_num_threads()
    digests = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model, _ = train_demo_model(SMALL, seed=0, steps=2, progress=False)
            assert torch.get_num_threads() == threads
            digests.append(weights_sha256(model))
    finally:
        torch.set_num_threads(previous)
    assert digests[0] == digests[1]


def test_the_mlproject_runs_the_real_model_demo_by_default():
    from pathlib import Path

    import yaml

    main = yaml.safe_load((Path(__file__).resolve().parents[1] / "MLproject").read_text())["entry_points"]["main"]
    assert main["parameters"]["demo"]["default"] == "real"
    # empty budgets and steps: the recipe's own
    assert all(main["parameters"][p]["default"] == "" for p in ("train_steps", "collect_tokens", "eval_tokens", "arch"))


@pytest.mark.parametrize(
    "params,expected",
    [
        ({}, "demo --seed 0 --no-progress"),
        (
            {"code_tasks": "false", "collect_tokens": "256", "eval_tokens": "256"},
            "demo --seed 0 --no-code-tasks --collect-tokens 256 --eval-tokens 256 --no-progress",
        ),
        ({"demo": "tiny", "train_steps": "4"}, "demo --tiny --seed 0 --train-steps 4 --no-progress"),
        ({"demo": "vision", "arch": "resnet"}, "demo --vision --seed 0 --arch resnet --no-progress"),
    ],
    ids=["default", "budgets", "tiny", "vision-resnet"],
)
def test_the_mlproject_main_entry_point_expands_to_the_demo_command(params, expected, tmp_path):
    """`mlflow run . --env-manager local` (docs/demo.md) runs `mlflow-selprune demo`: the command MLflow makes
    from the MLproject (its own substitution) and the shell expands, with `mlflow-selprune` a shell function that
    prints what it was given. The demo command itself is run in test_real_model.py, the whole `mlflow run` of
    the tiny demo below."""
    import subprocess
    from pathlib import Path

    from mlflow.projects._project_spec import load_project

    command = (
        load_project(Path(__file__).resolve().parents[1]).get_entry_point("main").compute_command(params, str(tmp_path))
    )
    shown = subprocess.run(
        ["bash", "-c", 'mlflow-selprune() { echo "$@"; }\n' + command],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert shown.stdout.split() == expected.split(), shown.stdout


def _demo_env(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.mark.slow(seconds=100)
def test_mlflow_run_runs_the_tiny_demo(tmp_path):
    """`mlflow run . --env-manager local -P demo=tiny` with -P train_steps and token budgets cut so it fits in
    a test: it runs `mlflow-selprune demo --tiny`, which trains, registers, unlearns and gates (runs nested
    under the project's run, no param clash). The gate may fail on a model this briefly trained: the flow is
    what is checked here. The real-model default's expansion is checked above, its demo command run in
    test_real_model.py."""
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(_demo_env(tmp_path), MLFLOW_TRACKING_URI=uri)
    root = Path(__file__).resolve().parents[1]
    project = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(root),
            "--env-manager",
            "local",
            "-P",
            "demo=tiny",
            "-P",
            "train_steps=4",
            "-P",
            "collect_tokens=4000",
            "-P",
            "eval_tokens=2000",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "Changing param values is not allowed" not in project.stderr
    assert "training the demo model (4 steps, seed 0)" in project.stdout + project.stderr, project.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    project_runs = [r for r in client.search_runs(["0"]) if r.data.tags.get("mlflow.project.entryPoint") == "main"]
    assert len(project_runs) == 1
    children = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{project_runs[0].info.run_id}'")
    assert {r.data.tags.get("selprune.kind") for r in children} == {"register", "prune"}

    versions = client.search_model_versions("name='selprune-tiny-demo'")
    assert len(versions) == 2  # base + unlearned
    (unlearned,) = [v for v in versions if v.tags.get("selprune.parent_model_uri")]
    from mlflow_helpers import recorded

    assert "selprune.metric.control_forget_top1_drop" in recorded(unlearned, uri).tags
    assert "gate (forget top-1 drop" in project.stdout + project.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tiny", "--train-steps", "0"], "--train-steps must be an integer >= 1"),
        (["--eval-tokens", "0"], "--eval-tokens must be an integer >= 1"),
        (["--tiny", "--eval-tokens", "0"], "--eval-tokens must be an integer >= 1"),
        (["--seed", "-1"], "--seed must be an integer >= 0"),
        (["--train-steps", "10"], "apply to --tiny and --vision"),
        (["--tiny", "--vision"], "choose one"),
        (["--vision", "--train-steps", "-3"], "--train-steps must be an integer >= 1"),
        (["--vision", "--collect-tokens", "5"], "apply to the text demo"),
        (["--tiny", "--no-code-tasks"], "apply to the real-model demo"),
        (["--vision", "--code-tasks"], "apply to the real-model demo"),
        (["--tiny", "--relearn"], "--relearn apply to the real-model demo"),
    ],
)
def test_bad_demo_options_exit_2_before_anything_is_written(tmp_path, monkeypatch, args, message):
    from mlflow_helpers import invoke

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = invoke("demo", *args)
    assert out.exit_code == 2, out.output
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert list(tmp_path.iterdir()) == []  # no store, no data, no model


def test_the_demo_without_bubblewrap_says_how_to_install_it_or_skip_its_python_tasks(tmp_path, monkeypatch):
    from mlflow_helpers import invoke

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SELPRUNE_BWRAP", "/nonexistent/bwrap")  # as on a machine without bubblewrap
    out = invoke("demo")
    assert out.exit_code == 2, out.output
    (line,) = out.stderr.strip().splitlines()
    assert "the demo's Python tasks" in line and "apt-get install bubblewrap" in line and "--no-code-tasks" in line
    assert list(tmp_path.iterdir()) == []  # nothing fetched, registered or written
