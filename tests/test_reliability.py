"""Reliability and security: bad input, crashes, concurrency and access control.

The registry must never hold a half-made version, a moved alias after a
failure, or a version published by a user without permission. Checked against
a real sqlite store (bad input) and a real `mlflow server` on 127.0.0.1
(kills, concurrency, basic auth).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mlflow_selprune.registry import lineage

from mlflow_helpers import (
    TINY_NAME, MlflowServer, cli, free_port, invoke, register_tiny, registry_snapshot, sqlite_store, tiny_model,
    write_data_files,
)
from pg_cluster import BACKENDS, backend_store_uri

SMALL = ["--paragraphs", "--max-length", "64", "--batch-size", "4", "--collect-tokens", "2000",
         "--eval-tokens", "1000", "--no-progress"]
LINEAGE_TAGS = (lineage.PARENT, lineage.ROOT, lineage.RUN_ID, lineage.FORGET_DATA, lineage.FORGET_DIGEST,
                lineage.RETAIN_DATA, lineage.RETAIN_DIGEST, lineage.CONFIG_SHA, lineage.WEIGHTS_SHA,
                lineage.FF_PRUNED, lineage.ATTN_PRUNED, lineage.COMPLETE, lineage.METRIC_PREFIX + "forget_top1_drop")



# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("reliability")
    with sqlite_store(root, tiny_tokenizer) as s:
        client = MlflowClient()
        # a run without a model
        with mlflow.start_run() as run:
            mlflow.log_param("nothing", "here")
        s["empty_run"] = run.info.run_id
        # a registered model that is not a transformers model
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=_Echo(), pip_requirements=["mlflow"])
        mlflow.register_model(info.model_uri, "not-transformers")
        # local model directories: unsupported architecture, no tokenizer, non-finite weights
        from transformers import MambaConfig, MambaForCausalLM

        MambaForCausalLM(MambaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2,
                                     state_size=4, expand=2)).save_pretrained(root / "mamba")
        tiny_tokenizer.save_pretrained(root / "mamba")
        tiny_model(tiny_tokenizer).save_pretrained(root / "no-tokenizer")
        broken = tiny_model(tiny_tokenizer)
        with torch.no_grad():
            broken.gpt_neox.layers[0].mlp.dense_h_to_4h.weight[0, 0] = float("inf")
        broken.save_pretrained(root / "overflow")
        tiny_tokenizer.save_pretrained(root / "overflow")
        data = root / "data"
        (data / "empty.txt").write_text("")
        (data / "columns.jsonl").write_text(json.dumps({"title": "a", "body_text": "b"}) + "\n")
        (data / "short.txt").write_text("one short line\n\nanother short line\n")
        client.set_registered_model_alias(TINY_NAME, "prod", "1")
        yield s


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def _cases(store):
    root, forget, retain = store["root"], store["forget"], store["retain"]
    base = f"models:/{TINY_NAME}@base"
    prune = ["prune", "--forget", forget, "--retain", retain]
    return {
        "unknown registered model": (["prune", "--model-uri", "models:/nope/1", "--forget", forget, "--retain", retain], "does not exist"),
        "unknown version": ([*prune, "--model-uri", f"models:/{TINY_NAME}/42"], "has no version 42"),
        "unknown alias": ([*prune, "--model-uri", f"models:/{TINY_NAME}@nope"], "has no alias"),
        "run without a model": ([*prune, "--model-uri", f"runs:/{store['empty_run']}/model", "--register-as", "x"], "cannot download"),
        "not a transformers model": ([*prune, "--model-uri", "models:/not-transformers/1"], "not a transformers model"),
        "unsupported architecture": ([*prune, "--model-uri", str(root / "mamba"), "--no-register"], "MambaForCausalLM"),
        "model without tokenizer": ([*prune, "--model-uri", str(root / "no-tokenizer"), "--no-register"], "no tokenizer"),
        "non-finite activations": ([*prune, "--model-uri", str(root / "overflow"), "--no-register"], "non-finite"),
        "forget equals retain": (["prune", "--model-uri", base, "--forget", forget, "--retain", forget], "same data"),
        "empty data": (["prune", "--model-uri", base, "--forget", str(root / "data/empty.txt"), "--retain", retain], "empty"),
        "unreadable data": (["prune", "--model-uri", base, "--forget", str(root / "nothing.csv"), "--retain", retain], "nothing.csv"),
        "missing text column": ([*prune, "--model-uri", base, "--forget", str(root / "data/columns.jsonl"),
                                 "--text-column", "content"], "content"),
        "fewer tokens than one batch": (["prune", "--model-uri", base, "--forget", str(root / "data/short.txt"),
                                         "--retain", retain], "fewer than"),
        "fraction out of range": ([*prune, "--model-uri", base, "--attn-frac", "-0.1"], "--attn-frac must be in [0, 1)"),
        "fractions summing to nothing": ([*prune, "--model-uri", base, "--ff-frac", "0"], "both 0"),
        "steps below one": ([*prune, "--model-uri", base, "--steps", "0"], "steps must be"),
        "budget that cannot be met": ([*prune, "--model-uri", base, "--target-forget-drop", "0.99",
                                       "--max-retain-drop", "0.5", "--max-steps", "1"], "budget cannot be met"),
        "steps and budget": ([*prune, "--model-uri", base, "--steps", "2", "--max-retain-drop", "0.1"], "not both"),
        "gate without recorded metrics": (["gate", "--model-uri", f"models:/{TINY_NAME}/1", "--min-forget-drop", "0.1"], "no recorded"),
        "gate threshold out of range": (["gate", "--model-uri", f"models:/{TINY_NAME}/1", "--max-retain-drop", "2"], "[-1, 1]"),
        "tracking server down": (["prune", "--model-uri", base, "--forget", forget, "--retain", retain], "not reachable"),
    }


BAD_INPUT_CASES = [
    "unknown registered model", "unknown version", "unknown alias", "run without a model", "not a transformers model",
    "unsupported architecture", "model without tokenizer", "non-finite activations", "forget equals retain",
    "empty data", "unreadable data", "missing text column", "fewer tokens than one batch", "fraction out of range",
    "fractions summing to nothing", "steps below one", "budget that cannot be met", "steps and budget",
    "gate without recorded metrics", "gate threshold out of range", "tracking server down",
]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_one_line_exit_2_registry_unchanged(store, case):
    args, message = _cases(store)[case]
    extra = SMALL if args[0] == "prune" else []
    before = registry_snapshot()
    start = time.monotonic()
    if case == "tracking server down":
        mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        out = invoke(*args, *extra)
    finally:
        mlflow.set_tracking_uri(store["uri"])
    assert out.exit_code == 2, (out.stdout, out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert message in errors[0], errors[0]
    assert time.monotonic() - start < 120
    assert registry_snapshot() == before


def test_nothing_we_write_is_pickle(store):
    """Masks, scores and records are safetensors and JSON: loadable without pickle."""
    from safetensors.torch import load_file

    client = MlflowClient()
    out = invoke("prune", "--model-uri", f"models:/{TINY_NAME}@base", "--forget", store["forget"],
                 "--retain", store["retain"], "--no-register", *SMALL)
    assert out.exit_code == 0, out.stderr
    run = client.search_runs([client.get_experiment_by_name("Default").experiment_id],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="selprune"))
    for path in local.iterdir():
        head = path.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x05", f"{path.name} looks like a pickle"
    load_file(str(local / "masks.safetensors"))
    json.loads((local / "pruning_record.json").read_text())


# ---------------------------------------------------------------- a real server

@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp(f"server-{request.param}")
    with MlflowServer(root, backend_uri=backend_store_uri(request, request.param)) as srv:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            mp.setenv("MLFLOW_TRACKING_URI", srv.uri)
            mlflow.set_tracking_uri(srv.uri)
            register_tiny(tiny_tokenizer)
            forget, retain = write_data_files(root / "data")
            yield {"srv": srv, "root": root, "forget": str(forget), "retain": str(retain),
                   "env": {"MLFLOW_TRACKING_URI": srv.uri}}
            mlflow.set_tracking_uri(None)


def _assert_complete_or_absent(before: dict, name: str = TINY_NAME) -> list[str]:
    """Every version that was not there before is complete; returns the new versions."""
    after = registry_snapshot()
    new = sorted(set(after[name]["versions"]) - set(before[name]["versions"]), key=int)
    for version in new:
        tags = after[name]["versions"][version]
        missing = [t for t in LINEAGE_TAGS if not tags.get(t)]
        assert not missing, f"version {version} lacks {missing}"
        run_id = tags[lineage.RUN_ID]
        artifacts = {f.path for f in MlflowClient().list_artifacts(run_id, "selprune")}
        assert "selprune/masks.safetensors" in artifacts and "selprune/pruning_record.json" in artifacts
    assert after[name]["aliases"] == before[name]["aliases"]
    return new


def _prune_process(server, *extra):
    env = dict(os.environ, **server["env"], PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow_selprune", "-v", "prune", "--model-uri", f"models:/{TINY_NAME}@base",
         "--forget", server["forget"], "--retain", server["retain"], "--ff-frac", "0.1", "--steps", "2", *SMALL, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=server["root"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("phase,marker", [
    ("collection", "collecting statistics"),
    ("evaluation", "evaluating forget and retain metrics"),
    ("logging", "logging the unlearned model"),
    ("registration", "registering a new version"),
])
def test_sigkill_leaves_no_version_or_a_complete_one(server, phase, marker):
    before = registry_snapshot()
    process = _prune_process(server)
    seen = []
    deadline = time.monotonic() + 240
    killed = False
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            process.send_signal(signal.SIGKILL)
            killed = True
            break
        if time.monotonic() > deadline:
            break
    process.wait(timeout=60)
    assert killed, f"never reached the {phase} phase:\n{''.join(seen[-30:])}"
    assert process.returncode == -signal.SIGKILL
    _assert_complete_or_absent(before)


@pytest.mark.slow
def test_rerun_after_a_kill_succeeds(server):
    before = registry_snapshot()
    out = cli("prune", "--model-uri", f"models:/{TINY_NAME}@base", "--forget", server["forget"],
              "--retain", server["retain"], "--ff-frac", "0.1", "--steps", "1", *SMALL, env=server["env"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_assert_complete_or_absent(before)) == 1


@pytest.mark.slow(seconds=30)
def test_four_concurrent_prunes_get_four_versions_and_only_passing_gates_move_aliases(server):
    before = registry_snapshot()
    fracs = ["0.05", "0.1", "0.15", "0.2"]
    jobs = [_prune_process(server, "--ff-frac", frac, "--steps", "1", "--seed", str(i)) for i, frac in enumerate(fracs)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output[-3000:]
    new = _assert_complete_or_absent(before)
    assert len(new) == 4
    client = MlflowClient()
    versions = {v: client.get_model_version(TINY_NAME, v) for v in new}
    assert len({mv.tags[lineage.RUN_ID] for mv in versions.values()}) == 4
    assert len({mv.tags[lineage.WEIGHTS_SHA] for mv in versions.values()}) == 4
    pruned_counts = sorted(int(mv.tags[lineage.FF_PRUNED]) for mv in versions.values())
    assert pruned_counts == sorted(round(float(f) * 2 * 64) for f in fracs)
    for mv in versions.values():
        assert mv.tags[lineage.PARENT] == f"models:/{TINY_NAME}/1"
    # lenient thresholds pass, impossible ones fail (the real CLI, in this process)
    gates = []
    for i, version in enumerate(new):
        passing = i % 2 == 0
        thresholds = ["--min-forget-drop", "-1", "--max-retain-drop", "1"] if passing else \
                     ["--min-forget-drop", "1", "--max-retain-drop", "0"]
        out = invoke("gate", "--model-uri", f"models:/{TINY_NAME}/{version}", *thresholds, "--set-alias", f"job{i}")
        assert out.exit_code == (0 if passing else 1), out.stderr
        gates.append((version, passing, out))
    aliases = client.get_registered_model(TINY_NAME).aliases
    for i, (version, passing, _) in enumerate(gates):
        if passing:
            assert str(aliases[f"job{i}"]) == version
        else:
            assert f"job{i}" not in aliases
        decisions = lineage.gate_records(client.get_model_version(TINY_NAME, version).tags)
        assert [d["verdict"] for d in decisions] == ["pass" if passing else "fail"]


# ---------------------------------------------------------------- access control

ADMIN_PASSWORD = "admin-Pa55word-for-tests"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("auth")
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key"}
    with MlflowServer(root, app_name="basic-auth", extra_env=env) as srv:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            mp.setenv("MLFLOW_TRACKING_URI", srv.uri)
            mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            mlflow.set_tracking_uri(srv.uri)
            register_tiny(tiny_tokenizer)
            forget, retain = write_data_files(root / "data")
            from mlflow.server import get_app_client

            auth = get_app_client("basic-auth", tracking_uri=srv.uri)
            experiment_id = MlflowClient().get_experiment_by_name("Default").experiment_id
            users = {"reader": "reader-Pa55word", "editor": "editor-Pa55word"}
            for user, password in users.items():
                auth.create_user(user, password)
                auth.grant_user_permission(user, "experiment", experiment_id, "EDIT")  # both may log runs
            auth.grant_user_permission("reader", "registered_model", TINY_NAME, "READ")
            auth.grant_user_permission("editor", "registered_model", TINY_NAME, "EDIT")
            yield {"srv": srv, "root": root, "forget": str(forget), "retain": str(retain), "users": users}
            mlflow.set_tracking_uri(None)


def _as_user(auth_server, user):
    return {"MLFLOW_TRACKING_URI": auth_server["srv"].uri, "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": auth_server["users"][user], "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


@pytest.mark.slow(seconds=130)
def test_read_only_user_cannot_register_and_editor_can(auth_server):
    args = ["prune", "--model-uri", f"models:/{TINY_NAME}/1", "--forget", auth_server["forget"],
            "--retain", auth_server["retain"], "--ff-frac", "0.1", *SMALL]
    before = registry_snapshot()
    # both at once (the server checks a password hash on every request, so one after the other is slow)
    procs = {user: subprocess.Popen([sys.executable, "-m", "mlflow_selprune", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=auth_server["root"],
                                    env=dict(os.environ, **_as_user(auth_server, user)))
             for user in ("reader", "editor")}
    outputs = {user: proc.communicate(timeout=600) for user, proc in procs.items()}
    reader = subprocess.CompletedProcess([], procs["reader"].returncode, *outputs["reader"])
    editor = subprocess.CompletedProcess([], procs["editor"].returncode, *outputs["editor"])
    assert reader.returncode == 2, reader.stderr[-3000:]
    errors = [line for line in reader.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "permission" in errors[0].lower(), reader.stderr[-2000:]
    assert editor.returncode == 0, editor.stderr[-3000:]
    new = _assert_complete_or_absent(before)
    assert len(new) == 1  # the editor's: the reader registered nothing
    assert MlflowClient().get_model_version(TINY_NAME, new[0]).run_id in editor.stdout
    for out in (reader, editor):  # credentials come from the environment and are never echoed
        for password in auth_server["users"].values():
            assert password not in out.stdout + out.stderr
    run = MlflowClient().get_run(MlflowClient().get_model_version(TINY_NAME, new[0]).run_id)
    assert not any(p in json.dumps(run.data.params) + json.dumps(run.data.tags) for p in auth_server["users"].values())
