"""The product as users meet it: registry in, unlearned version out, gate, lineage, flavor, evaluator.

Against a real sqlite MLflow store (tracking + registry) in a temporary
directory, with a real tiny transformers model registered the way users do.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from mlflow_selprune.registry import lineage
from mlflow_selprune.engine.architecture import find_architecture
from mlflow_selprune.config import PruneConfig
from mlflow_selprune.config import DataOptions, SourceOptions
from mlflow_selprune.unlearn import run_prune

from mlflow_helpers import SMALL_DATA as DATA_BUDGET
from mlflow_helpers import TINY_NAME, cli, invoke, recorded, recorded_tags, registry_snapshot


SMALL_DATA = ["--paragraphs", *DATA_BUDGET]


@pytest.fixture(scope="module")
def pruned(store):
    """One prune through the Python API: tiny-lm@base -> a new version."""
    result = run_prune(
        f"models:/{TINY_NAME}@base",
        store["forget"],
        store["retain"],
        config=PruneConfig(ff_frac=0.1, attn_frac=0.05, steps=2),
        data=DataOptions(
            max_length=64, batch_size=8, collect_tokens=3000, eval_tokens=1500, source=SourceOptions(paragraphs=True)
        ),
        progress=False,
    )
    return result


def test_prune_registers_a_complete_version(store, pruned):
    client = MlflowClient()
    assert pruned.model_uri == f"models:/{TINY_NAME}/2"
    mv = client.get_model_version(TINY_NAME, "2")
    shown = {k for k in mv.tags if k.startswith(lineage.PREFIX) and not k.startswith(lineage.GATE_RECORD_PREFIX)}
    assert shown <= set(lineage.SHOWN) and len(shown) <= 6  # what the UI lists; the rest is in the record
    tags = recorded(mv).tags
    for key in (
        lineage.PARENT,
        lineage.ROOT,
        lineage.RUN_ID,
        lineage.FORGET_DATA,
        lineage.FORGET_DIGEST,
        lineage.RETAIN_DATA,
        lineage.RETAIN_DIGEST,
        lineage.CONFIG_SHA,
        lineage.WEIGHTS_SHA,
        lineage.FF_PRUNED,
        lineage.ATTN_PRUNED,
        lineage.COMPLETE,
    ):
        assert tags.get(key), key
    assert tags[lineage.PARENT] == f"models:/{TINY_NAME}/1"  # the alias is resolved to a version
    assert tags[lineage.ROOT] == f"models:/{TINY_NAME}/1"
    assert tags[lineage.RUN_ID] == pruned.run_id == mv.run_id
    assert tags[lineage.FORGET_DATA] == store["forget"]
    assert int(tags[lineage.FF_PRUNED]) == pruned.pruning.ff_pruned == 2 * round(0.1 * 2 * 64)
    assert int(tags[lineage.ATTN_PRUNED]) == pruned.pruning.attn_pruned == 2 * round(0.05 * 2 * 32)
    metrics = lineage.metrics_from_tags(tags)
    for name in ("forget_top1", "retain_top1", "forget_top1_drop", "retain_top1_drop", "selectivity"):
        assert name in metrics
        assert metrics[name] == pytest.approx(pruned.metrics[name])


def test_run_records_inputs_params_metrics_and_artifacts(store, pruned):
    client = MlflowClient()
    run = client.get_run(pruned.run_id)
    contexts = {}
    for ds_input in run.inputs.dataset_inputs:
        tag = {t.key: t.value for t in ds_input.tags}
        contexts[tag["mlflow.data.context"]] = ds_input.dataset
    assert set(contexts) == {"forget", "retain"}
    assert contexts["forget"].name == store["forget"]
    assert [m.model_id for m in run.inputs.model_inputs], "the parent model is a model input"
    assert run.data.params["ff_frac"] == "0.1"
    assert run.data.tags["selprune.plugin_version"]  # the run-context provider plugin
    history = client.get_metric_history(pruned.run_id, "forget_top1")
    assert sorted(m.step for m in history) == [0, 1, 2]
    names = {f.path for f in client.list_artifacts(pruned.run_id, "selprune")}
    assert names == {
        "selprune/masks.safetensors",
        "selprune/scores.safetensors",
        "selprune/pruning_record.json",
        "selprune/forget_vs_retain.png",
        "selprune/lineage.json",
        "selprune/manifest.json",
        "selprune/samples.json",
        "selprune/report.html",
    }
    local = Path(mlflow.artifacts.download_artifacts(run_id=pruned.run_id, artifact_path="selprune"))
    masks = load_file(str(local / "masks.safetensors"))
    assert torch.equal(masks["ff_mask"], pruned.pruning.ff_mask)
    record = json.loads((local / "pruning_record.json").read_text())
    assert len(record["steps"]) == 2 and record["ff_pruned"] == pruned.pruning.ff_pruned


def test_transformers_flavor_loads_the_pruned_weights(store, pruned):
    components = mlflow.transformers.load_model(pruned.model_uri, return_type="components")
    model = components["model"]
    arch = find_architecture(model)
    for projection, row in zip(arch.ff, pruned.pruning.ff_mask):
        assert torch.all(projection.columns()[:, row] == 0)
        assert torch.any(projection.columns()[:, ~row] != 0)
    assert lineage.weights_sha256(model) == pruned.tags[lineage.WEIGHTS_SHA]
    from mlflow_selprune.registry.flavor import load_model

    loaded = load_model(pruned.model_uri)
    assert loaded["record"]["ff_pruned"] == pruned.pruning.ff_pruned
    info = mlflow.models.get_model_info(pruned.model_uri)
    assert {"transformers", "python_function", "selprune"} <= set(info.flavors)


def test_retried_run_does_not_register_twice(store, pruned, monkeypatch):
    before = registry_snapshot()
    monkeypatch.setenv("MLFLOW_RUN_ID", pruned.run_id)
    again = run_prune(
        f"models:/{TINY_NAME}@base",
        store["forget"],
        store["retain"],
        config=PruneConfig(ff_frac=0.1, attn_frac=0.05, steps=2),
        data=DataOptions(
            max_length=64, batch_size=8, collect_tokens=3000, eval_tokens=1500, source=SourceOptions(paragraphs=True)
        ),
        progress=False,
    )
    assert again.model_uri == pruned.model_uri
    assert registry_snapshot()[TINY_NAME]["versions"].keys() == before[TINY_NAME]["versions"].keys()


def test_cli_gate_pass_and_fail(store, pruned):
    uri = pruned.model_uri
    fail = invoke(
        "gate", "--model-uri", uri, "--min-forget-drop", "0.99", "--max-retain-drop", "0.0", "--set-alias", "prod"
    )
    assert fail.exit_code == 1, fail.output
    client = MlflowClient()
    decisions = lineage.gate_records(client.get_model_version(TINY_NAME, "2").tags)
    assert [d["verdict"] for d in decisions] == ["fail"] and decisions[0]["alias_moved"] is None
    assert "prod" not in client.get_registered_model(TINY_NAME).aliases
    passing = invoke(
        "gate", "--model-uri", uri, "--min-forget-drop", "-1", "--max-retain-drop", "1", "--set-alias", "prod"
    )
    assert passing.exit_code == 0, passing.output
    decisions = lineage.gate_records(client.get_model_version(TINY_NAME, "2").tags)
    assert [d["verdict"] for d in decisions] == ["fail", "pass"]  # appended, never overwritten
    assert decisions[1]["thresholds"]["max_retain_drop"] == 1 and decisions[1]["alias_moved"] == "prod"
    assert str(client.get_registered_model(TINY_NAME).aliases["prod"]) == "2"


@pytest.mark.slow(seconds=30)  # a CLI prune subprocess
def test_cli_two_hop_lineage_and_verify(store, pruned):
    out = cli(
        "prune",
        "--model-uri",
        pruned.model_uri,
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        "--ff-frac",
        "0.05",
        "--steps",
        "1",
        *SMALL_DATA,
        env=store["env"],
    )
    assert out.returncode == 0, out.stderr
    assert "forget_top1" in out.stdout  # the summary table
    client = MlflowClient()
    latest = max(int(v.version) for v in client.search_model_versions(f"name='{TINY_NAME}'"))
    uri = f"models:/{TINY_NAME}/{latest}"
    tags = recorded_tags(TINY_NAME, latest)
    assert tags[lineage.PARENT] == pruned.model_uri
    assert tags[lineage.ROOT] == f"models:/{TINY_NAME}/1"

    chain = invoke("lineage", uri, "--json", "--verify")
    assert chain.exit_code == 0, chain.output
    hops = json.loads(chain.stdout)
    assert [h["model_uri"] for h in hops] == [uri, pruned.model_uri, f"models:/{TINY_NAME}/1"]
    assert hops[0]["verified"] and hops[1]["verified"] and not hops[2]["unlearned"]
    assert isinstance(hops[1]["gate_decisions"], list)

    client.set_model_version_tag(TINY_NAME, "2", lineage.WEIGHTS_SHA, "0" * 64)
    try:
        tampered = invoke("lineage", uri, "--verify")
        assert tampered.exit_code == 1
        # the weights are checked against the anchored digest, and the edited tag is named
        assert f"tag {lineage.WEIGHTS_SHA} changed" in tampered.stdout, tampered.stdout
    finally:
        client.set_model_version_tag(TINY_NAME, "2", lineage.WEIGHTS_SHA, pruned.tags[lineage.WEIGHTS_SHA])


def test_evaluator_plugin_through_mlflow_evaluate(store, pruned):
    import pandas as pd

    forget_docs = [json.loads(line)["code"] for line in Path(store["forget"]).read_text().splitlines()]
    retain_docs = Path(store["retain"]).read_text().split("\n\n")
    frame = pd.DataFrame(
        {"text": forget_docs + retain_docs, "role": ["forget"] * len(forget_docs) + ["retain"] * len(retain_docs)}
    )
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(
            pruned.model_uri,
            data=frame,
            model_type="selprune",
            evaluators=["selprune"],
            evaluator_config={
                "selprune": {
                    "max_length": 64,
                    "eval_tokens": 1500,
                    "collect_tokens": 1500,
                    "parent_model_uri": f"models:/{TINY_NAME}/1",
                }
            },
        )
    for name in ("forget_top1", "retain_top1", "forget_loss", "forget_top1_drop", "selectivity"):
        assert name in result.metrics
    assert 0 <= result.metrics["forget_top1"] <= 1
    logged = MlflowClient().get_run(run.info.run_id).data.metrics
    assert logged["forget_loss"] == pytest.approx(result.metrics["forget_loss"])


def test_cli_evaluate_logs_a_run(store):
    out = invoke(
        "evaluate",
        "--model-uri",
        f"models:/{TINY_NAME}/1",
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        *SMALL_DATA,
    )
    assert out.exit_code == 0, out.output
    run_id = out.stdout.strip().splitlines()[-1].split()[-1]
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert 0 <= metrics["forget_top1"] <= 1 and metrics["retain_loss"] > 0


BAD_INPUTS = [
    ("unknown registered model", ["--model-uri", "models:/no-such-model/1"], "does not exist"),
    ("unknown version", ["--model-uri", f"models:/{TINY_NAME}/99"], "has no version 99"),
    ("unknown alias", ["--model-uri", f"models:/{TINY_NAME}@nope"], "has no alias"),
    ("unknown run", ["--model-uri", "runs:/0123456789abcdef/model"], "does not exist"),
    ("not a model directory", ["--model-uri", "./nowhere"], "neither a model URI nor a model directory"),
    ("fraction out of range", ["--ff-frac", "1.5"], "--ff-frac must be in [0, 1)"),
    ("nothing to prune", ["--ff-frac", "0", "--attn-frac", "0"], "both 0"),
    ("steps and budget", ["--steps", "2", "--target-forget-drop", "0.3"], "not both"),
    ("unknown scoring", ["--scoring", "magic"], "unknown --scoring"),
    ("missing data", ["--forget", "./missing.jsonl"], "missing.jsonl"),
    ("same data twice", ["--retain", "@forget"], "same data"),
]


@pytest.mark.parametrize("case,args,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_no_registry_change(store, pruned, case, args, message):
    base = {"--model-uri": f"models:/{TINY_NAME}@base", "--forget": store["forget"], "--retain": store["retain"]}
    overrides = dict(zip(args[::2], args[1::2]))
    if overrides.get("--retain") == "@forget":
        overrides["--retain"] = store["forget"]
    base.update(overrides)
    argv = [item for pair in base.items() for item in pair]
    before = registry_snapshot()
    out = invoke("prune", *argv, *SMALL_DATA)
    assert out.exit_code == 2, (out.stdout, out.stderr)
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], out.stderr
    assert registry_snapshot() == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-retain-drop", "7"], "must be a relative change"),
        ([], "at least one threshold"),
        (["--model-uri", f"models:/{TINY_NAME}/1", "--max-retain-drop", "0.1"], "no recorded retain_top1_drop"),
    ],
)
def test_gate_bad_input(store, pruned, args, message):
    argv = args if "--model-uri" in args else ["--model-uri", pruned.model_uri, *args]
    before = registry_snapshot()
    out = invoke("gate", *argv)
    assert out.exit_code == 2, out.stderr
    assert message in out.stderr
    assert registry_snapshot() == before
