"""What a user meets on the paths around the core job: `mlflow run`, start-up, run status, gate what-ifs,
store discovery, typos, flag names in errors, serving, and a quiet terminal.

Everything runs for real: a sqlite MLflow store with a tiny registered model, the console entry point in
fresh processes (``cli``) or in this one (``invoke``), ``mlflow run`` and ``mlflow models serve``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_selprune.registry import lineage
from mlflow_selprune.registry.tracking import FAILURE_TAG

from mlflow_helpers import (
    SMALL_DATA,
    TINY_NAME,
    cli,
    invoke,
    jsonl_retain_store,
    post_json,
    recorded,
    registry_snapshot,
    served_model,
)

ROOT = Path(__file__).resolve().parents[1]
# the same budget as MLproject parameters
SMALL_PARAMS = ["-P", "max_length=64", "-P", "batch_size=8", "-P", "collect_tokens=3000", "-P", "eval_tokens=1500"]
HEAVY = ("torch", "transformers", "mlflow")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_tokenizer):
    with jsonl_retain_store(tmp_path_factory.mktemp("user_paths"), tiny_tokenizer) as s:
        yield s


def _versions() -> set[str]:
    return set(registry_snapshot().get(TINY_NAME, {}).get("versions", {}))


def _all_runs() -> dict:
    client = MlflowClient()
    runs = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            runs[run.info.run_id] = run
    return runs


@pytest.fixture(scope="module")
def pruned(store):
    """One `mlflow-selprune prune` (2 steps) through the CLI in this process: the new version, its run, and
    what it printed (a fresh process's output is checked by the `mlflow run` tests)."""
    before = _versions()
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
        "--attn-frac",
        "0.05",
        "--steps",
        "2",
        *SMALL_DATA,
    )
    assert out.exit_code == 0, out.stderr[-3000:]
    (version,) = _versions() - before
    mv = MlflowClient().get_model_version(TINY_NAME, version)
    return {"version": version, "uri": f"models:/{TINY_NAME}/{version}", "run_id": mv.run_id, "out": out}


# ----------------------------------------------------------------------------- 1. mlflow run: no param collision


def _mlflow_run(store, entry_point, *params):
    env = dict(os.environ, **store["env"])
    return subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry_point, "--env-manager", "local", *params],
        capture_output=True,
        text=True,
        env=env,
        cwd=store["root"],
        timeout=900,
    )


@pytest.mark.slow(seconds=35)
@pytest.mark.parametrize("entry_point", ["main", "prune"])
def test_mlflow_run_logs_params_once_and_registers_one_version(store, entry_point):
    """`mlflow run` logs every entry-point param to the run the job then fills; values spelled differently
    from the job's own (0.10 vs 0.1, 01 vs 1) must not trip "Changing param values is not allowed"."""
    before = _versions()
    out = _mlflow_run(
        store,
        entry_point,
        "-P",
        f"model_uri=models:/{TINY_NAME}/1",
        "-P",
        f"forget={store['forget']}",
        "-P",
        f"retain={store['retain']}",
        "-P",
        "ff_frac=0.10",
        "-P",
        "steps=01",
        *SMALL_PARAMS,
        *(["-P", "alias=from-project"] if entry_point == "prune" else []),
    )
    assert out.returncode == 0, [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert "Changing param values is not allowed" not in out.stderr
    # the job's own output, in its own process: it names the store, and no hub model-card/license noise
    assert f"tracking: {store['uri']}" in out.stderr.splitlines()
    for noise in ("model card could not be retrieved", "Unable to find license information", "Traceback"):
        assert noise not in out.stderr, out.stderr[-3000:]
    new = _versions() - before
    assert len(new) == 1, new
    mv = recorded(MlflowClient().get_model_version(TINY_NAME, new.pop()))
    run = MlflowClient().get_run(mv.run_id)
    assert run.data.tags.get("mlflow.project.entryPoint") == entry_point  # the project's run made it
    assert mv.tags[lineage.RUN_ID] == mv.run_id
    if entry_point == "prune":
        assert str(MlflowClient().get_registered_model(TINY_NAME).aliases["from-project"]) == str(mv.version)
    assert run.info.status == "FINISHED"
    assert run.data.params["ff_frac"] == "0.10"  # as the project logged it, not overwritten
    assert run.data.params["data_max_length"] == "64"  # and the job's own params beside them
    assert "data_collect_images" not in run.data.params  # an image budget does not apply to a language model


def test_mlproject_defaults_are_the_cli_defaults():
    """Every MLproject parameter that maps to a config field has that field's default (written once)."""
    import dataclasses

    import yaml

    from mlflow_selprune.config import DataOptions, PruneConfig

    defaults = {f.name: f.default for cls in (PruneConfig, DataOptions) for f in dataclasses.fields(cls)}
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    checked = 0
    for name in ("main", "prune", "evaluate"):  # gate's thresholds are the gate's, not the budget's
        for param, spec in project["entry_points"][name]["parameters"].items():
            if param not in defaults or not isinstance(spec, dict) or "default" not in spec:
                continue
            if name == "main" and spec["default"] == "":  # the demo's recipe decides; the prune branch says so
                continue
            if param == "steps":  # None in the config means "1 unless a budget is given"
                assert int(spec["default"]) == PruneConfig().n_steps, (name, spec["default"])
                continue
            assert (
                float(spec["default"]) == float(defaults[param])
                if isinstance(defaults[param], (int, float))
                else spec["default"] == defaults[param]
            ), (name, param, spec["default"], defaults[param])
            checked += 1
    assert checked >= 10
    main = project["entry_points"]["main"]["parameters"]
    assert {"max_length", "batch_size", "collect_tokens", "eval_tokens"} <= set(main)


# ----------------------------------------------------------------------------- 2. start-up


def _python(code: str, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


_RUN_CLI_AND_REPORT_MODULES = """
    import json, sys
    from mlflow_selprune.cli import main
    code = 0
    try:
        main({argv!r}, standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:  # click's own usage errors with standalone_mode=False
        code = getattr(exc, "exit_code", repr(exc))
    print(json.dumps({{"code": code, "modules": sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})}}))
"""


def _modules_after(argv, env=None):
    out = _python(_RUN_CLI_AND_REPORT_MODULES.format(argv=list(argv), heavy=HEAVY), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out


@pytest.mark.parametrize(
    "argv", [["--help"], ["prune", "--help"], ["prune", "--ff-frac", "abc"], ["gate", "--max-retain-drop", "x"]]
)
def test_help_and_option_errors_import_no_heavy_library(argv):
    report, _ = _modules_after(argv)
    assert report["modules"] == [], report["modules"][:20]


def test_option_error_from_the_console_names_the_flag():
    out = cli("prune", "--ff-frac", "abc")
    assert out.returncode == 2
    assert "--ff-frac" in out.stderr and "abc" in out.stderr


@pytest.mark.slow
def test_missing_data_file_is_reported_before_the_model_is_loaded(store):
    before = registry_snapshot(), set(_all_runs())
    argv = ["prune", "--model-uri", f"models:/{TINY_NAME}@base", "--forget", "./nope.txt", "--retain", store["retain"]]
    report, out = _modules_after(argv, env=store["env"])
    assert report["code"] == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--forget" in errors[0] and "nope.txt" in errors[0], out.stderr
    # the model was never loaded: no transformers model code was even imported
    loaded = [m for m in report["modules"] if m.startswith(("transformers.models", "transformers.modeling_utils"))]
    assert loaded == []
    assert (registry_snapshot(), set(_all_runs())) == before  # no version, no run


# ----------------------------------------------------------------------------- 3. live, honest runs


def test_successful_prune_run_is_finished_with_per_step_history(store, pruned):
    client = MlflowClient()
    run = client.get_run(pruned["run_id"])
    assert run.info.status == "FINISHED"
    assert FAILURE_TAG not in run.data.tags
    assert sorted(m.step for m in client.get_metric_history(pruned["run_id"], "forget_top1")) == [0, 1, 2]
    assert sorted(m.step for m in client.get_metric_history(pruned["run_id"], "ff_pruned_total")) == [0, 1, 2]


def test_budget_that_cannot_be_met_leaves_a_failed_run_and_no_version(store, pruned):
    before_versions, before_runs = registry_snapshot(), set(_all_runs())
    out = invoke(
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        "--target-forget-drop",
        "0.99",
        "--max-retain-drop",
        "0.0",
        "--max-steps",
        "1",
        *SMALL_DATA,
    )
    assert out.exit_code == 2, (out.stdout, out.stderr)
    assert "budget cannot be met" in out.stderr
    assert registry_snapshot() == before_versions
    runs = _all_runs()
    (new,) = set(runs) - before_runs
    run = runs[new]
    assert run.info.status == "FAILED"
    reason = run.data.tags[FAILURE_TAG]
    assert "budget cannot be met" in reason and "\n" not in reason
    assert run.data.tags.get(lineage.PREFIX + "registered_model_uri") is None


# ----------------------------------------------------------------------------- 4. gate what-ifs


def test_gate_dry_run_writes_nothing(store, pruned):
    before = registry_snapshot()
    out = invoke(
        "gate",
        "--model-uri",
        pruned["uri"],
        "--max-retain-drop",
        "1",
        "--min-forget-drop",
        "-1",
        "--set-alias",
        "dry",
        "--dry-run",
    )
    assert out.exit_code == 0, out.stderr
    assert "dry run: nothing written" in out.stdout
    assert registry_snapshot() == before


def test_stricter_what_if_gate_keeps_the_decision_that_moved_the_alias(store, pruned):
    client = MlflowClient()
    version = pruned["version"]
    passing = invoke(
        "gate",
        "--model-uri",
        pruned["uri"],
        "--max-retain-drop",
        "1",
        "--min-forget-drop",
        "-1",
        "--set-alias",
        "production",
    )
    assert passing.exit_code == 0, passing.stderr
    strict = invoke("gate", "--model-uri", pruned["uri"], "--max-retain-drop", "0", "--min-forget-drop", "0.99")
    assert strict.exit_code == 1, strict.stderr
    decisions = lineage.gate_records(client.get_model_version(TINY_NAME, version).tags)
    assert [d["verdict"] for d in decisions][-2:] == ["pass", "fail"]
    assert decisions[-2]["alias_moved"] == "production" and decisions[-1]["alias_moved"] is None
    assert str(client.get_registered_model(TINY_NAME).aliases["production"]) == version
    shown = invoke("lineage", pruned["uri"])
    assert shown.exit_code == 0, shown.stderr
    gate_line = next(line for line in shown.stdout.splitlines() if line.strip().startswith("gate:"))
    assert "pass" in gate_line and "@production" in gate_line and decisions[-2]["time"] in gate_line, shown.stdout


# ----------------------------------------------------------------------------- 5. which store


def _no_store_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


@pytest.mark.parametrize(
    "argv,store_uri",
    [
        (["lineage", "models:/x/1"], None),  # MLflow's default: ./mlflow.db
        (["gate", "--model-uri", "models:/x/1", "--max-retain-drop", "0.1"], None),
        (["lineage", "models:/x/1"], "file"),  # a file store that is not there
    ],
)
def test_gate_and_lineage_refuse_to_create_a_store(tmp_path, argv, store_uri):
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = _no_store_env()
    if store_uri == "file":
        env["MLFLOW_TRACKING_URI"] = (empty / "mlruns").as_uri()
    out = subprocess.run(
        [sys.executable, "-m", "mlflow_selprune", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=empty,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    said, line = out.stderr.splitlines()  # the store it would use, then why it is not used
    assert said.startswith("tracking: ")
    assert line.startswith("error: no MLflow store") and "MLFLOW_TRACKING_URI" in line
    assert list(empty.iterdir()) == []  # no mlflow.db, no mlruns


def test_mlflow_default_tracking_uri_is_the_sqlite_file_the_check_looks_for(tmp_path):
    """The refusal above depends on MLflow's default store: a ./mlflow.db sqlite file (file store if ./mlruns
    already holds experiments)."""
    out = subprocess.run(
        [sys.executable, "-c", "import mlflow; print(mlflow.get_tracking_uri())"],
        capture_output=True,
        text=True,
        env=_no_store_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert out.stdout.strip() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


@pytest.mark.slow
def test_gate_and_lineage_work_where_the_default_store_exists(store, pruned):
    """The other side of the refusal: with MLFLOW_TRACKING_URI unset, the store in the working directory is used."""
    out = subprocess.run(
        [sys.executable, "-m", "mlflow_selprune", "lineage", pruned["uri"]],
        capture_output=True,
        text=True,
        env=_no_store_env(),
        cwd=store["root"],
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines()[0] == f"tracking: sqlite:///{Path(store['root']).resolve() / 'mlflow.db'}"


def test_first_stderr_line_names_the_store(store, pruned):
    expected = f"tracking: {store['uri']}"
    assert pruned["out"].stderr.splitlines()[0] == expected  # prune
    for argv in (
        ["gate", "--model-uri", pruned["uri"], "--max-retain-drop", "1", "--dry-run"],
        ["lineage", pruned["uri"]],
        [
            "evaluate",
            "--model-uri",
            pruned["uri"],
            "--forget",
            store["forget"],
            "--retain",
            store["retain"],
            *SMALL_DATA,
        ],
    ):
        out = invoke(*argv)
        assert out.exit_code == 0, (argv[0], out.stderr)
        assert out.stderr.splitlines()[0] == expected, (argv[0], out.stderr)


def test_no_progress_means_quiet_but_each_slow_phase_says_one_line(store, pruned):
    """With --no-progress: no bar (ours or a library's), no library INFO line, none of MLflow's registration
    chatter; what the command says itself (one line as each slow phase starts) remains. The same for lineage
    and gate in a fresh process: stderr is the store line and nothing else."""
    err = pruned["out"].stderr
    for noise in ("it/s]", "%|", " INFO mlflow", "Successfully registered", "Created version", "Downloading"):
        assert noise not in err, (noise, err[-2000:])
    for said in ("loading models:/", "measuring the parent", "step 1 of 2: ", "step 2 of 2: ", "the random control:"):
        assert said in err, (said, err[-2000:])
    for argv in (
        ["lineage", pruned["uri"], "--verify", "--no-progress"],
        ["gate", "--model-uri", pruned["uri"], "--max-retain-drop", "1", "--dry-run", "--no-progress"],
    ):
        out = cli(*argv, env=store["env"], cwd=store["root"])
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stderr.splitlines() == [f"tracking: {store['uri']}"], (argv[0], out.stderr[-2000:])


# ----------------------------------------------------------------------------- 6-7. messages


@pytest.mark.parametrize("uri", ["models:/tiny-ln/1", "models:/tiny-lmm@base"])
def test_misspelled_model_name_gets_a_suggestion(store, uri):
    before = registry_snapshot()
    out = invoke("prune", "--model-uri", uri, "--forget", store["forget"], "--retain", store["retain"], *SMALL_DATA)
    assert out.exit_code == 2, out.stderr
    assert f"did you mean '{TINY_NAME}'?" in out.stderr
    assert registry_snapshot() == before


def test_lineage_of_a_misspelled_name_gets_a_suggestion(store):
    out = invoke("lineage", "models:/tiny-ln/1")
    assert out.exit_code == 2, out.stderr
    assert f"did you mean '{TINY_NAME}'?" in out.stderr


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--ff-frac", "1.5"], "--ff-frac"),
        (["--attn-frac", "-0.5"], "--attn-frac"),
        (["--max-length", "1"], "--max-length"),
        (["--batch-size", "0"], "--batch-size"),
        (["--steps", "0"], "--steps"),
        (["--samples", "-1"], "--samples"),
        (["--sample-tokens", "0"], "--sample-tokens"),
    ],
)
def test_errors_name_the_flag_the_user_typed(store, args, flag):
    before = registry_snapshot()
    out = invoke(
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        *SMALL_DATA,
        *args,
    )
    assert out.exit_code == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and flag in errors[0], out.stderr
    assert registry_snapshot() == before


# ----------------------------------------------------------------------------- 8. serving


def test_logged_model_signature_has_generation_params(store, pruned):
    import mlflow

    info = mlflow.models.get_model_info(pruned["uri"])
    params = {p.name: p.default for p in info.signature.params.params}
    assert params == {"max_new_tokens": 20, "do_sample": False, "temperature": 1.0}


@pytest.mark.slow
def test_served_model_is_greedy_and_honours_request_params(store, pruned):
    with served_model(pruned["uri"], store) as (url, log_path):
        request = {"inputs": ["def "], "params": {"max_new_tokens": 5}}
        first, second = post_json(url, request), post_json(url, request)
        assert first == second, (first, second)  # greedy by default: the same request, the same answer
        (answer,) = first["predictions"]
        assert isinstance(answer, str)
        # the params are used, not ignored: sampling from an untrained model differs from greedy
        sampled = [
            post_json(url, {"inputs": ["def "], "params": {"max_new_tokens": 5, "do_sample": True}}) for _ in range(3)
        ]
        assert any(s != first for s in sampled), sampled
    text = log_path.read_text()
    assert "Ignoring provided params" not in text and "are ignored for inference" not in text, text[-3000:]


# 9. quiet output: checked on the real prune processes of test_mlflow_run_logs_params_once_and_registers_one_version


def test_a_budget_run_stops_on_one_split_and_reports_on_another(store):
    """The budget reads the select split; what is logged and gated is measured on eval documents it never saw."""
    from mlflow_selprune.config import DataOptions, PruneConfig
    from mlflow_selprune.evaluation.model_metrics import evaluate_model
    from mlflow_selprune.registry.loading import load_components
    from mlflow_selprune.registry.resolve import resolve
    from mlflow_selprune.unlearn import load_datasets, run_prune

    uri = f"models:/{TINY_NAME}@base"
    data = DataOptions(max_length=64, batch_size=8, collect_tokens=3000, eval_tokens=1500)
    result = run_prune(
        uri,
        store["forget"],
        store["retain"],
        register=False,
        data=data,
        progress=False,
        config=PruneConfig(ff_frac=0.1, max_retain_drop=0.99, max_steps=2),
    )
    assert result.model_uri is None and result.run_id
    parent, tokenizer = load_components(resolve(uri))
    forget, retain = load_datasets(tokenizer, store["forget"], store["retain"], data, model=parent, select_part=True)
    for side, prepared in (("forget", forget), ("retain", retain)):
        reported = evaluate_model(
            parent, prepared.eval_batches, skip_token_ids=prepared.skip_token_ids, prefix=f"{side}_", progress=False
        )
        stopped_on = evaluate_model(
            parent, prepared.select_batches, skip_token_ids=prepared.skip_token_ids, prefix=f"{side}_", progress=False
        )
        assert result.metrics[f"parent_{side}_top1"] == pytest.approx(reported[f"{side}_top1"], abs=1e-12)
        assert result.pruning.select_metrics["baseline"][f"{side}_top1"] == pytest.approx(
            stopped_on[f"{side}_top1"], abs=1e-12
        )
        assert reported[f"{side}_top1"] != stopped_on[f"{side}_top1"], "two splits, two measurements"
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.metrics["forget_top1"] == pytest.approx(result.metrics["forget_top1"], abs=1e-12)
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "select_forget_top1")) == [0, 1, 2]
    record = json.loads(
        Path(client.download_artifacts(result.run_id, "selprune/pruning_record.json", str(store["root"]))).read_text()
    )
    assert record["splits"]["steps"] == "select" and record["splits"]["final_metrics"] == "eval"


def test_the_plan_stage_refuses_bad_input_without_loading_a_model_or_writing(store, monkeypatch):
    """plan_prune holds every check: each bad input is refused there, with the model never loaded and the
    registry untouched (the CLI's bad-input tests go through it)."""
    import mlflow_selprune.registry.loading as loading
    from mlflow_selprune.config import DataOptions, PruneConfig
    from mlflow_selprune.errors import BadInputError
    from mlflow_selprune.unlearn import plan_prune

    def never(*args, **kwargs):
        raise AssertionError("the plan stage loaded a model")

    monkeypatch.setattr(loading, "load_components", never)
    base, forget, retain = f"models:/{TINY_NAME}@base", store["forget"], store["retain"]
    cases = {
        "unknown model": dict(model_uri=f"models:/{TINY_NAME}/99", forget=forget, retain=retain),
        "missing data": dict(model_uri=base, forget="./nope.jsonl", retain=retain),
        "reserved alias": dict(model_uri=base, forget=forget, retain=retain, alias="latest"),
        "fraction out of range": dict(model_uri=base, forget=forget, retain=retain, config=PruneConfig(ff_frac=1.5)),
        "bad storage": dict(model_uri=base, forget=forget, retain=retain, storage="zip"),
        "no retain": dict(model_uri=base, forget=forget, retain=None),
        "bad token budget": dict(model_uri=base, forget=forget, retain=retain, data=DataOptions(eval_tokens=0)),
    }
    before = registry_snapshot()
    for label, kwargs in cases.items():
        with pytest.raises(BadInputError):
            plan_prune(**kwargs)
        assert registry_snapshot() == before, label
    plan = plan_prune(base, forget, retain)
    assert plan.target_name == TINY_NAME and plan.parent.version == "1"


def test_the_version_page_explains_itself_and_each_gate_decision_adds_one_line(store, pruned):
    """The description says in plain words what was removed from which parent, with the six headline numbers
    as the run recorded them, and how to verify it; the run carries the same text; each gate adds one line."""
    from mlflow_selprune.registry import describe

    client = MlflowClient()
    mv = recorded(client.get_model_version(TINY_NAME, pruned["version"]))
    text = mv.description
    tags, metrics = mv.tags, client.get_run(pruned["run_id"]).data.metrics
    assert f"From `models:/{TINY_NAME}/1`" in text and f"`{store['forget']}` (forget data, digest " in text
    assert tags[lineage.FORGET_DIGEST][:12] in text and tags[lineage.RETAIN_DIGEST][:12] in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    assert len(rows) == 6
    forget_row = next(line for line in rows if line.startswith("| forget top-1 |"))
    cells = [cell.strip() for cell in forget_row.strip("|").split("|")]
    assert cells[2] == f"{metrics['forget_top1']:.4f}"
    assert cells[3] == f"{-metrics['forget_top1_drop']:+.1%}"
    loss_row = next(line for line in rows if line.startswith("| forget loss |"))
    assert [cell.strip() for cell in loss_row.strip("|").split("|")][3] == f"{metrics['forget_loss_increase']:+.1%}"
    assert f"mlflow-selprune lineage {pruned['uri']} --verify" in text
    note = client.get_run(pruned["run_id"]).data.tags["mlflow.note.content"]
    assert note.split(describe.GATE_HEADING)[0] == text.split(describe.GATE_HEADING)[0]  # gates add to the version
    for i in range(describe.MAX_GATE_LINES + 2):
        assert invoke("gate", "--model-uri", pruned["uri"], "--max-retain-drop", str(0.5 + i / 100)).exit_code == 0
    after = client.get_model_version(TINY_NAME, pruned["version"]).description
    decisions = [line for line in after.split(describe.GATE_HEADING)[1].splitlines() if line.startswith("- ")]
    assert len(decisions) == describe.MAX_GATE_LINES  # bounded; the full records stay in the tags
    assert "**pass** (max retain drop 0.71" in decisions[-1] and after.startswith(text.split(describe.GATE_HEADING)[0])


def test_the_run_shows_what_the_parent_the_unlearned_model_and_the_control_answer(store, pruned):
    """selprune/samples.json: 8 eval prompts a side; the parent column is what the registered parent really
    generates from each prompt, greedily."""
    import torch

    from mlflow_selprune.registry.loading import load_components
    from mlflow_selprune.registry.resolve import resolve

    client = MlflowClient()
    path = client.download_artifacts(pruned["run_id"], "selprune/samples.json", str(store["root"] / "samples"))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["side"] for r in rows] == ["forget"] * 8 + ["retain"] * 8
    assert all(r["prompt"] and r["control"] != "(no control)" for r in rows)
    parent, tokenizer = load_components(resolve(f"models:/{TINY_NAME}/1"))
    for row in rows[:3] + rows[8:11]:
        ids = tokenizer(row["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = parent.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=32,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == row["parent"]


def test_a_run_is_named_after_what_it_did(store, pruned):
    """Not one name for every run: the parent, the new version and the data, so a list of runs reads."""
    name = MlflowClient().get_run(pruned["run_id"]).info.run_name
    assert name == f"unlearn {TINY_NAME} v1→v{pruned['version']} forget.jsonl/retain.jsonl", name


def test_a_refused_option_still_follows_the_store_line_and_gate_checks_options_before_the_store(store, tmp_path):
    """The first stderr line names the store even when an option is refused; gate refuses a bad threshold
    before it looks for a store (an empty directory: the option's line, not a missing store)."""
    base = f"models:/{TINY_NAME}@base"
    for argv in (
        ["prune", "--model-uri", base, "--forget", "./nope.txt", "--retain", store["retain"]],
        ["prune", "--model-uri", base, "--forget", store["forget"], "--retain", store["retain"], "--alias", "latest"],
    ):
        out = cli(*argv, env=store["env"], cwd=store["root"])
        assert out.returncode == 2, out.stderr
        lines = out.stderr.splitlines()
        assert lines[0] == f"tracking: {store['uri']}" and lines[1].startswith("error:"), lines
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "mlflow_selprune", "gate", "--model-uri", base, "--max-retain-drop", "5"],
        capture_output=True,
        text=True,
        env=_no_store_env(),
        cwd=empty,
        timeout=300,
    )
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert lines[0].startswith("tracking: ") and "--max-retain-drop must be a relative change" in lines[1], lines
    assert not list(empty.iterdir()), "no store was created"
