"""Promises the code makes about itself: inputs checked before anything is written, only our own errors
mean bad input, evaluators evaluate everything, honest alias errors, gates compare like with like,
audits see trust_remote_code, and each setting is written down once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_selprune.config import DataOptions, EvidenceOptions, PruneConfig, SourceOptions
from mlflow_selprune.registry import lineage

from mlflow_helpers import TINY_NAME, invoke, recorded_version, register_tiny, registry_snapshot

SMALL = [
    "--paragraphs",
    "--max-length",
    "64",
    "--batch-size",
    "8",
    "--collect-tokens",
    "1500",
    "--eval-tokens",
    "800",
    "--no-progress",
]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pruned(store):
    """One prune through the CLI (tiny-lm@base -> version 2), control on."""
    out = invoke(
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        "--ff-frac",
        "0.1",
        "--steps",
        "1",
        *SMALL,
    )
    assert out.exit_code == 0, out.stderr
    client = MlflowClient()
    latest = max(int(v.version) for v in client.search_model_versions(f"name='{TINY_NAME}'"))
    return recorded_version(TINY_NAME, latest)


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v1", "V12", "bad alias!"])
def test_reserved_or_invalid_alias_is_refused_before_any_version(store, alias):
    before = registry_snapshot()
    out = invoke(
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        "--alias",
        alias,
        *SMALL,
    )
    assert out.exit_code == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--alias" in errors[0], out.stderr
    assert registry_snapshot() == before


def test_gate_refuses_a_reserved_alias_without_recording_anything(store, pruned):
    before = registry_snapshot()
    out = invoke(
        "gate", "--model-uri", f"models:/{TINY_NAME}/{pruned.version}", "--max-retain-drop", "1", "--set-alias", "v3"
    )
    assert out.exit_code == 2 and "--set-alias" in out.stderr
    assert registry_snapshot() == before


def test_a_bug_is_not_reported_as_bad_input(store, monkeypatch):
    """A ValueError from inside the library is a bug: exit 3 with a --debug hint, not exit 2."""
    import mlflow_selprune.unlearn as unlearn

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(unlearn, "load_datasets", broken)
    out = invoke(
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        *SMALL,
    )
    assert out.exit_code == 3, out.stderr
    assert "unexpected ValueError" in out.stderr and "--debug" in out.stderr


def test_missing_alias_error_does_not_probe_version_1(store, tiny_tokenizer):
    register_tiny(tiny_tokenizer, name="gappy", alias=None)
    register_tiny(tiny_tokenizer, name="gappy", alias="keep")
    MlflowClient().delete_model_version("gappy", "1")
    out = invoke(
        "prune", "--model-uri", "models:/gappy@nope", "--forget", store["forget"], "--retain", store["retain"], *SMALL
    )
    assert out.exit_code == 2
    assert "has no alias 'nope'" in out.stderr and "keep" in out.stderr
    assert "version 1" not in out.stderr


def test_gate_compares_the_selectivity_of_the_chosen_metric(store, pruned):
    from mlflow_selprune.registry.gate import gate

    uri = f"models:/{TINY_NAME}/{pruned.version}"
    top10 = gate(uri, min_selectivity=0.0, metric="top10", dry_run=True)
    assert set(top10.metrics) == {"top10_selectivity"}
    recorded = lineage.metrics_from_tags(pruned.tags)
    assert top10.metrics["top10_selectivity"] == pytest.approx(recorded["top10_selectivity"])
    top1 = gate(uri, min_selectivity=0.0, dry_run=True)
    assert set(top1.metrics) == {"selectivity"}


def test_trust_remote_code_is_recorded_for_audits(store, pruned):
    assert pruned.tags[lineage.TRUST_REMOTE_CODE] == "false"
    params = MlflowClient().get_run(pruned.run_id).data.params
    assert params["trust_remote_code"] == "False"
    assert params["model_version_uri"] == f"models:/{TINY_NAME}/1"  # the alias as resolved
    assert params["model_uri"] == f"models:/{TINY_NAME}@base"  # the alias as typed


def test_every_version_carries_the_random_control(store, pruned):
    metrics = lineage.metrics_from_tags(pruned.tags)
    for name in ("control_forget_top1_drop", "control_retain_top1_drop", "control_selectivity"):
        assert name in metrics, name


def test_evaluator_evaluates_every_row(store, tiny_tokenizer):
    """All rows count: the tokens evaluated are all the tokens of the rows (no hidden 'collect' half)."""
    import mlflow
    import pandas as pd

    forget_docs = [json.loads(line)["code"] for line in Path(store["forget"]).read_text().splitlines()][:6]
    retain_docs = Path(store["retain"]).read_text().split("\n\n")[:6]
    frame = pd.DataFrame(
        {"text": forget_docs + retain_docs, "role": ["forget"] * len(forget_docs) + ["retain"] * len(retain_docs)}
    )
    with mlflow.start_run():
        result = mlflow.models.evaluate(
            f"models:/{TINY_NAME}/1",
            data=frame,
            model_type="selprune",
            evaluators=["selprune"],
            evaluator_config={"selprune": {"max_length": 64, "eval_tokens": 100_000}},
        )
    for side, docs in (("forget", forget_docs), ("retain", retain_docs)):
        pairs = 0
        for doc in docs:
            ids = tiny_tokenizer(doc, add_special_tokens=False)["input_ids"]
            pairs += sum(max(0, len(ids[i : i + 64]) - 1) for i in range(0, len(ids), 64))
        assert result.metrics[f"{side}_n_tokens"] == pairs, side


def test_every_config_field_is_a_cli_option():
    from click.testing import CliRunner

    from mlflow_selprune.cli import main

    text = CliRunner().invoke(main, ["prune", "--help"], terminal_width=200).output
    for cls in (PruneConfig, DataOptions, EvidenceOptions, SourceOptions):
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                flag = (f.metadata.get("flag") or "--" + f.name.replace("_", "-")).split("/")[0]
                assert flag in text, flag
    assert "--forget-text-column" in text and "--retain-split" in text


def test_per_side_source_options_fall_back_to_the_shared_ones():
    data = DataOptions(
        source=SourceOptions(text_column="body", split="train"), retain_source=SourceOptions(text_column="content")
    )
    assert data.source_for("forget") == SourceOptions(text_column="body", split="train")
    assert data.source_for("retain") == SourceOptions(text_column="content", split="train")


def test_engine_imports_no_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, mlflow_selprune.engine, mlflow_selprune.data, mlflow_selprune.evaluation; "
        "print(sorted(m for m in sys.modules if m == 'mlflow' or m.startswith('mlflow.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
