"""Tamper evidence: `lineage --verify` and `lineage --all NAME` name every change made after a version was registered.

A real sqlite store holds the chain tiny-lm v1 (root) -> v2 -> v3, each pruned
through the CLI. Each case edits the registry through the MLflow client, or a
stored file where the store keeps it, and is undone before the next, so every
case must give exactly its own finding line and exit 1.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path
from safetensors.torch import load_file, save_file

from mlflow_selprune.registry import lineage

from mlflow_helpers import TINY_NAME, invoke, recorded_tags, registry_snapshot

SMALL = [
    "--paragraphs",
    "--max-length",
    "64",
    "--batch-size",
    "4",
    "--collect-tokens",
    "2000",
    "--eval-tokens",
    "1000",
    "--no-progress",
]
PRUNE = ["--ff-frac", "0.1", "--attn-frac", "0.05", "--steps", "1", "--no-control"]


def _latest() -> str:
    versions = MlflowClient().search_model_versions(f"name='{TINY_NAME}'")
    return f"models:/{TINY_NAME}/{max(int(v.version) for v in versions)}"


def _prune(store, parent: str, *extra: str) -> str:
    out = invoke(
        "prune", "--model-uri", parent, "--forget", store["forget"], "--retain", store["retain"], *PRUNE, *SMALL, *extra
    )
    assert out.exit_code == 0, out.stderr[-3000:]
    return _latest()


@pytest.fixture(scope="module")
def chain(store):
    """models:/tiny-lm/1 (root) -> 2 -> 3, all stored in full."""
    v2 = _prune(store, store["base"])
    v3 = _prune(store, v2)
    return [store["base"], v2, v3]


@pytest.fixture(scope="module")
def delta(store, chain):
    """A delta of v3 (``--storage delta``), pruned once for the tests that build on one."""
    return _prune(store, chain[2], "--storage", "delta")


def _version(uri: str) -> str:
    return uri.rsplit("/", 1)[1]


def _run_file(uri: str, path: str) -> Path:
    """Where the store keeps an artifact of the run that made version ``uri``."""
    client = MlflowClient()
    run_id = client.get_model_version(TINY_NAME, _version(uri)).run_id
    return Path(local_file_uri_to_path(client.get_run(run_id).info.artifact_uri)) / path


def _weights_file(uri: str) -> Path:
    """Where the store keeps the weights of version ``uri``."""
    location = MlflowClient().get_model_version_download_uri(TINY_NAME, _version(uri))
    return next(Path(local_file_uri_to_path(location)).rglob("model.safetensors"))


def _model_dir(uri: str) -> Path:
    """Where the store keeps the files of version ``uri`` (what its manifest lists)."""
    return Path(local_file_uri_to_path(MlflowClient().get_model_version_download_uri(TINY_NAME, _version(uri))))


def _in_model_dir(uri: str, path: Path) -> str:
    return path.relative_to(_model_dir(uri)).as_posix()


@contextlib.contextmanager
def _file_edited(path: Path):
    """Change one value in a stored safetensors or JSON file; put the original bytes back afterwards."""
    original = path.read_bytes()
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        name = sorted(tensors)[0]
        tensors[name] = ~tensors[name] if tensors[name].dtype == torch.bool else tensors[name] + 1
        save_file(tensors, str(path))
    else:
        record = json.loads(original)
        key = lineage.FORGET_DATA if lineage.FORGET_DATA in record else "stop_reason"
        record[key] = "edited"
        path.write_text(json.dumps(record, sort_keys=True, separators=(",", ":")))
    try:
        yield
    finally:
        path.write_bytes(original)


@contextlib.contextmanager
def _tag_set(uri: str, key: str, value: str | None):
    """Set (or, with None, delete) a version tag; put the original back afterwards."""
    client = MlflowClient()
    version = _version(uri)
    original = client.get_model_version(TINY_NAME, version).tags.get(key)
    if value is None:
        client.delete_model_version_tag(TINY_NAME, version, key)
    else:
        client.set_model_version_tag(TINY_NAME, version, key, value)
    try:
        yield
    finally:
        if original is None:
            client.delete_model_version_tag(TINY_NAME, version, key)
        else:
            client.set_model_version_tag(TINY_NAME, version, key, original)


def _lines(out, prefix: str = "tampered:") -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith(prefix)]


@pytest.mark.slow(seconds=25)
def test_verify_names_each_of_9_tampering_cases(chain):
    root, v2, v3 = chain
    # a gate decision is appended to the version later, by design: not tampering
    assert invoke("gate", "--model-uri", v3, "--max-retain-drop", "1").exit_code == 0
    clean = invoke("lineage", v3, "--verify")
    assert clean.exit_code == 0, clean.output
    assert _lines(clean) == [] and "checks:  parent ok, tags ok, artifacts ok" in clean.stdout
    tags = recorded_tags(TINY_NAME, _version(v3))
    assert lineage.PARENT_WEIGHTS_SHA in tags and tags[lineage.STORAGE] == "full"
    assert set(json.loads(tags[lineage.ARTIFACTS_SHA])) == set(lineage.RECORD_ARTIFACTS)

    removed = lineage.METRIC_PREFIX + "retain_top1_drop"  # one the version shows (the rest are in its record)
    cases = [
        (
            "tag changed",
            _tag_set(v3, lineage.FORGET_DATA, "elsewhere.jsonl"),
            f"{v3}: tag {lineage.FORGET_DATA} changed: recorded",
        ),
        ("tag removed", _tag_set(v3, removed, None), f"{v3}: tag {removed} removed"),
        ("tag added", _tag_set(v3, "selprune.approved", "true"), f"{v3}: tag selprune.approved added"),
        (
            "lineage record changed",
            _file_edited(_run_file(v3, lineage.LINEAGE_RECORD)),
            f"{v3}: the lineage record artifact changed",
        ),
        *[
            (f"{name} changed", _file_edited(_run_file(v3, path)), f"{v3}: artifact {path} of run")
            for name, path in zip(("masks", "scores", "pruning record"), lineage.RECORD_ARTIFACTS)
        ],
        ("parent weights changed", _file_edited(_weights_file(root)), f"{v2}: parent {root} weights changed"),
        # the manifest names the weights file; files that fail it are not loaded, so no second line
        (
            "own weights changed",
            _file_edited(_weights_file(v3)),
            f"{v3}: file {_in_model_dir(v3, _weights_file(v3))} changed",
        ),
    ]
    assert len(cases) == 9
    for i, (case, tampering, expected) in enumerate(cases):
        expected = (expected,) if isinstance(expected, str) else expected
        with tampering:
            out = invoke("lineage", v3, "--verify")
            assert out.exit_code == 1, (case, out.output)
            found = _lines(out)
            assert len(found) == len(expected) and all(sum(e in line for line in found) == 1 for e in expected), (
                case,
                found,
            )
            assert "finding(s)" in out.stderr, case
            if i == 0:  # the JSON holds the same findings, each on the hop it concerns
                as_json = json.loads(invoke("lineage", v3, "--verify", "--json").stdout)
                assert [hop["findings"] for hop in as_json] == [_lines(out), [], []]
                assert as_json[0]["checks"]["tags"] == "CHANGED" and not as_json[0]["verified"]
    assert invoke("lineage", v3, "--verify").exit_code == 0  # every case was undone


@pytest.mark.slow(seconds=15)
def test_lineage_all_tables_root_full_delta_materialized_and_incomplete_versions(chain, delta):
    root, v2, v3 = chain
    v4 = delta
    out = invoke("materialize", v4)
    assert out.exit_code == 0, out.stderr
    v5 = _latest()
    client = MlflowClient()
    materialized_run = client.get_model_version(TINY_NAME, _version(v5)).run_id
    assert lineage.LINEAGE_PARAM in client.get_run(materialized_run).data.params
    assert {f.path for f in client.list_artifacts(materialized_run, "selprune")} >= set(lineage.RECORD_ARTIFACTS)

    out = invoke("lineage", "--all", TINY_NAME)
    assert out.exit_code == 0, out.output
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()}
    assert rows["version"] == [
        "version",
        "kind",
        "storage",
        "weights",
        "parent",
        "tags",
        "artifacts",
        "files",
        "signature",
        "aliases",
    ]
    assert rows["1"] == ["1", "root", "full", "-", "-", "-", "-", "-", "-", "@base"]
    for uri, storage in ((v2, "full"), (v3, "full"), (v4, "delta"), (v5, "full")):
        assert rows[_version(uri)][1:9] == ["unlearned", storage, "ok", "ok", "ok", "ok", "ok", "-"], rows[
            _version(uri)
        ]
    assert _lines(out) == []

    # a tag edited on the materialized version, and an unlearned version that never got its lineage (made, say,
    # by an older plugin that crashed between two requests: its run holds no lineage record)
    source = client.get_model_version(TINY_NAME, "1")
    incomplete = client.create_model_version(TINY_NAME, source.source, tags={lineage.PARENT: root})
    try:
        with _tag_set(v5, lineage.RETAIN_DATA, "elsewhere.txt"):
            out = invoke("lineage", "--all", TINY_NAME)
            assert out.exit_code == 1, out.output
            rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()}
            assert rows[_version(v5)][1:9] == ["unlearned", "full", "ok", "ok", "CHANGED", "ok", "ok", "-"]
            assert rows[str(incomplete.version)][1:9] == ["incomplete", "full", "-", "-", "-", "-", "-", "-"]
            assert any(line.startswith(f"tampered: {v5}: tag {lineage.RETAIN_DATA} changed") for line in _lines(out))
            assert len(_lines(out)) == 1 and _lines(out, f"incomplete: models:/{TINY_NAME}/{incomplete.version}:")
            assert _lines(out, f"note: models:/{TINY_NAME}/{incomplete.version}: its run holds no lineage record")
            as_json = json.loads(invoke("lineage", "--all", TINY_NAME, "--json").stdout)
            assert [row["kind"] for row in as_json][-1] == "incomplete"
    finally:
        client.delete_model_version(TINY_NAME, incomplete.version)

    misspelled = invoke("lineage", "--all", "tiny-ln")
    assert misspelled.exit_code == 2 and "did you mean 'tiny-lm'" in misspelled.stderr, misspelled.output
    for args in ([], [v3, "--all", TINY_NAME]):
        out = invoke("lineage", *args)
        assert out.exit_code == 2, out.output
        assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [
            "error: give either MODEL_URI or --all NAME (exactly one): mlflow-selprune lineage MODEL_URI [--verify] "
            "or mlflow-selprune lineage --all NAME"
        ]


@pytest.mark.slow(seconds=12)
def test_a_resumed_run_keeps_its_evidence_and_refuses_a_different_lineage(store, tmp_path):
    """A job resumed into its run (MLFLOW_RUN_ID) after it recorded its lineage: the same inputs register nothing
    new and leave the run's evidence intact; changed forget data (same path, so the same params) is refused."""
    forget = tmp_path / "forget.jsonl"
    forget.write_text(Path(store["forget"]).read_text())
    with mlflow.start_run(run_name="resumed") as run:
        pass
    run_id = run.info.run_id

    def resume():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_RUN_ID", run_id)  # MLflow unsets it once a run starts
            return invoke(
                "prune",
                "--model-uri",
                store["base"],
                "--forget",
                str(forget),
                "--retain",
                store["retain"],
                "--register-as",
                "resumed-lm",
                *PRUNE,
                *SMALL,
            )

    def logged_models():
        run = MlflowClient().get_run(run_id)
        return {
            m.model_id
            for m in MlflowClient().search_logged_models(
                [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
            )
        }

    assert resume().exit_code == 0
    recorded = MlflowClient().get_run(run_id).data.params[lineage.LINEAGE_PARAM]
    before, models = registry_snapshot(), logged_models()
    assert len(models) == 1
    again = resume()  # its pruning record's timings differ: the files and the model the run recorded are kept
    assert again.exit_code == 0, again.output
    assert registry_snapshot() == before
    assert logged_models() == models, "a resumed run logs no second (orphan) model"
    verified = invoke("lineage", "models:/resumed-lm/1", "--verify")
    assert verified.exit_code == 0 and _lines(verified) == [], verified.output

    rows = [json.loads(line) for line in forget.read_text().splitlines()]
    forget.write_text("".join(json.dumps({"code": row["code"] + "# edited\n"}) + "\n" for row in rows))
    out = resume()
    assert out.exit_code == 2, out.output
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"run {run_id} already recorded a different lineage" in errors[0], errors
    assert "start a new run" in errors[0]
    assert registry_snapshot() == before
    assert MlflowClient().get_run(run_id).data.params[lineage.LINEAGE_PARAM] == recorded


@pytest.mark.slow(seconds=15)
def test_the_gate_verifies_before_it_decides_and_edited_metrics_cannot_promote(chain):
    """Edited metric tags that would pass: the gate refuses (exit 1), names the finding, writes no decision
    and moves no alias. Changed weights are refused the same way. The untouched version passes."""
    _, _, v3 = chain
    client = MlflowClient()
    gate = ["--model-uri", v3, "--max-retain-drop", "0.01", "--min-forget-drop", "0.5", "--set-alias", "production"]
    before = {
        k for k in client.get_model_version(TINY_NAME, _version(v3)).tags if k.startswith(lineage.GATE_RECORD_PREFIX)
    }
    with (
        _tag_set(v3, lineage.METRIC_PREFIX + "retain_top1_drop", "0.0"),
        _tag_set(v3, lineage.METRIC_PREFIX + "forget_top1_drop", "0.9"),
    ):
        out = invoke("gate", *gate)
        assert out.exit_code == 1, out.output
        assert "refused, tampered:" in out.stderr and "forget_top1_drop changed" in out.stderr
    with _file_edited(_weights_file(v3)):
        out = invoke("gate", "--model-uri", v3, "--max-retain-drop", "1", "--set-alias", "production")
        assert out.exit_code == 1 and "model.safetensors changed" in out.stderr, out.output
    after = client.get_model_version(TINY_NAME, _version(v3))
    assert {k for k in after.tags if k.startswith(lineage.GATE_RECORD_PREFIX)} == before  # nothing written
    assert "production" not in (client.get_registered_model(TINY_NAME).aliases or {})
    assert invoke("gate", "--model-uri", v3, "--max-retain-drop", "1", "--dry-run").exit_code == 0


def _all_runs() -> set[str]:
    client = MlflowClient()
    return {
        run.info.run_id
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id], max_results=1000)
    }


@pytest.mark.slow(seconds=30)
def test_every_command_that_builds_on_a_version_verifies_it_first(store, chain, delta):
    """Tags edited before `materialize`, `prune` from an unlearned parent, `evaluate`, and a delta's rebuild:
    each refuses with exit 1 and the finding, and writes nothing (no run, no version). Untouched, each works."""
    _, v2, v3 = chain
    edited = lineage.FORGET_DATA
    commands = {
        "materialize": ["materialize", delta],
        "prune": ["prune", "--model-uri", v3, "--forget", store["forget"], "--retain", store["retain"], *PRUNE, *SMALL],
        "evaluate": ["evaluate", "--model-uri", v3, "--forget", store["forget"], "--retain", store["retain"], *SMALL],
        "rebuild a delta to prune it": [
            "prune",
            "--model-uri",
            delta,
            "--forget",
            store["forget"],
            "--retain",
            store["retain"],
            *PRUNE,
            *SMALL,
            "--register-as",
            "elsewhere",
        ],
    }
    for label, args in commands.items():
        target = delta if args[1] == delta or delta in args else v3
        with _tag_set(target, edited, "not-what-was-forgotten.txt"):
            before_registry, before_runs = registry_snapshot(), _all_runs()
            out = invoke(*args)
            assert out.exit_code == 1, (label, out.output)
            assert "does not verify" in out.stderr and f"tag {edited} changed" in out.stderr, (label, out.stderr)
            assert registry_snapshot() == before_registry, label
            assert _all_runs() == before_runs, f"{label}: a refused command opened a run"
    out = invoke("materialize", delta)
    assert out.exit_code == 0, out.stderr
    with _tag_set(v2, lineage.WEIGHTS_SHA, "0" * 64):  # the tag check names the edit before any weight loads
        out = invoke(*commands["prune"][:2], v2, *commands["prune"][3:])
        assert out.exit_code == 1 and f"tag {lineage.WEIGHTS_SHA} changed" in out.stderr, out.output


@pytest.mark.slow(seconds=30)
def test_a_bfloat16_delta_loads_and_verifies(store, chain):
    """The parent digest of a --dtype bfloat16 prune is of bf16 weights: the delta records the dtype and loads
    its parent in it, so it rebuilds, verifies, and materializes."""
    from mlflow_selprune.registry.loading import load_components
    from mlflow_selprune.registry.resolve import resolve

    _, _, v3 = chain
    delta = _prune(store, v3, "--storage", "delta", "--dtype", "bfloat16")
    model, _ = load_components(resolve(delta))
    assert model.dtype == torch.bfloat16
    assert lineage.weights_sha256(model) == recorded_tags(TINY_NAME, _version(delta))[lineage.WEIGHTS_SHA]
    out = invoke("lineage", delta, "--verify")
    assert out.exit_code == 0, out.output
    assert invoke("materialize", delta).exit_code == 0


@pytest.mark.slow(seconds=20)
def test_gate_records_never_vanish(chain):
    """A record too long for a tag is kept whole in an artifact with its digest in the tag; a record that does
    not parse, or whose artifact changed, is a finding (it used to be cut at 4,900 characters, or skipped)."""
    from mlflow_selprune.registry import gate as gate_module
    from mlflow_selprune.registry.resolve import resolve

    _, _, v3 = chain
    client = MlflowClient()
    resolved = resolve(v3)
    record = {
        "time": "2026-12-01T00:00:00.000000Z",
        "verdict": "fail",
        "user": "auditor",
        "alias_moved": None,
        "failures": [f"threshold {i} failed" * 20 for i in range(40)],
    }
    key = lineage.GATE_RECORD_PREFIX + "20261201T000000.000000Z-longlong"
    value = gate_module._tag_value(resolved, key, record)
    assert len(json.dumps(record)) > gate_module.TAG_VALUE_LIMIT >= len(value)
    stored = json.loads(value)
    whole = client.download_artifacts(resolved.run_id, stored["record_artifact"])
    assert json.loads(Path(whole).read_text()) == record  # nothing cut
    client.set_model_version_tag(TINY_NAME, _version(v3), key, value)
    try:
        assert invoke("lineage", v3, "--verify").exit_code == 0
        with _file_edited(_run_file(v3, stored["record_artifact"])):
            out = invoke("lineage", v3, "--verify")
            assert out.exit_code == 1 and any("its full record" in line and "changed" in line for line in _lines(out))
        with _tag_set(v3, key, '{"verdict": "pass", "alias_mo'):
            out = invoke("lineage", v3, "--verify")
            assert out.exit_code == 1, out.output
            assert any(f"gate record {key} is not a JSON record" in line for line in _lines(out))
            gated = invoke("gate", "--model-uri", v3, "--max-retain-drop", "1", "--dry-run")
            assert gated.exit_code == 1 and "is not a JSON record" in gated.stderr
    finally:
        client.delete_model_version_tag(TINY_NAME, _version(v3), key)


@contextlib.contextmanager
def _file_replaced(path: Path, content: bytes | None):
    """Write ``content`` to ``path`` (None: remove it); put back what was there (or nothing) afterwards."""
    original = path.read_bytes() if path.exists() else None
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    try:
        yield
    finally:
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(original)


@pytest.mark.slow(seconds=25)
def test_every_file_of_the_model_directory_is_covered_by_the_manifest(chain):
    """config.json (hidden_act gelu -> relu changes what the model computes, and the weights digest cannot see
    it), a tokenizer file, MLmodel, the record's copy inside the model directory, a file added, a file removed:
    each is named by `lineage --verify`, and `gate` refuses the version."""
    _, _, v3 = chain
    root = _model_dir(v3)
    config_path = next(root.rglob("config.json"))
    config = json.loads(config_path.read_text())
    relu = json.dumps({**config, "hidden_act": "relu"}).encode()
    tokenizer_path = next(root.rglob("tokenizer.json"))
    record_copy = next(p for p in root.rglob("pruning_record.json"))
    cases = [
        (
            "config.json: hidden_act gelu -> relu",
            _file_replaced(config_path, relu),
            f"file {_in_model_dir(v3, config_path)} changed",
        ),
        (
            "tokenizer edited",
            _file_replaced(tokenizer_path, tokenizer_path.read_bytes() + b" "),
            f"file {_in_model_dir(v3, tokenizer_path)} changed",
        ),
        (
            "MLmodel edited",
            _file_replaced(root / "MLmodel", (root / "MLmodel").read_bytes() + b"# edited\n"),
            "file MLmodel changed",
        ),
        ("record copy edited", _file_edited(record_copy), f"file {_in_model_dir(v3, record_copy)} changed"),
        (
            "file added",
            _file_replaced(config_path.parent / "extra.py", b"import os\n"),
            f"file {_in_model_dir(v3, config_path.parent / 'extra.py')} added",
        ),
        ("file removed", _file_replaced(tokenizer_path, None), f"file {_in_model_dir(v3, tokenizer_path)} removed"),
    ]
    assert config["hidden_act"] != "relu"
    for case, tampering, expected in cases:
        with tampering:
            out = invoke("lineage", v3, "--verify")
            assert out.exit_code == 1, (case, out.output)
            assert any(expected in line for line in _lines(out)), (case, _lines(out))
            if case.startswith("config.json"):
                assert not any("weights changed" in line for line in _lines(out))  # only the manifest sees it
                gated = invoke("gate", "--model-uri", v3, "--max-retain-drop", "1", "--dry-run")
                assert gated.exit_code == 1 and expected in gated.stderr, gated.output
    assert invoke("lineage", v3, "--verify").exit_code == 0
