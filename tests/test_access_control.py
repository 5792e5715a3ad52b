"""Access control as teams run the registry: a basic-auth `mlflow server`, its tracking store and its own user
database on sqlite and on PostgreSQL, and four users with the permissions teams hand out.

What MLflow's basic-auth app requires (mlflow/server/auth/__init__.py): EDIT on the registered model to create a
version, move an alias or tag a version; READ to read one; MANAGE on the experiment to delete a run or a logged
model. Whatever a user may not do is refused in one permission line (exit 2) before anything is written; a
registration refused all the same (driven here past that check) deletes its run, or names what it leaves. No
password is written anywhere.

One test per backend: under pytest-xdist's load scheduling, tests sharing a module fixture may land on both
workers, and each would start its own server and run its own prunes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from mlflow_selprune.registry import lineage

from mlflow_helpers import (
    SMALL,
    TINY_NAME,
    MlflowServer,
    assert_complete_or_absent,
    invoke,
    register_tiny,
    registry_snapshot,
    write_data_files,
)
from pg_cluster import BACKENDS, backend_store_uri

ADMIN_PASSWORD = "admin-Pa55word-for-tests"
# user: (password, permission on the Default experiment, permission on tiny-lm)
USERS = {
    "reader": ("reader-Pa55word", "EDIT", "READ"),  # may log runs, may not publish
    "editor": ("editor-Pa55word", "EDIT", "EDIT"),  # may publish
    "cleaner": ("cleaner-Pa55word", "MANAGE", "READ"),  # may delete runs, may not publish
    # may not even read the model: this MLflow refuses a NO_PERMISSIONS grant on a resource ("Resource-level grants
    # accept only: DENY, EDIT, MANAGE, READ, USE"); DENY is its explicit "no access" (can_read false, as NO_PERMISSIONS)
    "outsider": ("outsider-Pa55word", None, "DENY"),
    # may read the model's versions but not the experiment that holds their runs and files
    "modelonly": ("modelonly-Pa55word", "DENY", "READ"),
}


def _cheap_hashes(auth_db: str, passwords: dict[str, str]) -> None:
    """Replace the stored hashes of ``passwords``' accounts with 1-iteration pbkdf2 ones (see ``auth_server``)."""
    import sqlalchemy
    from werkzeug.security import generate_password_hash

    engine = sqlalchemy.create_engine(auth_db)
    try:
        with engine.begin() as connection:
            for user, password in passwords.items():
                updated = connection.execute(
                    sqlalchemy.text("UPDATE users SET password_hash = :hash WHERE username = :user"),
                    {"hash": generate_password_hash(password, method="pbkdf2:sha256:1"), "user": user},
                )
                assert updated.rowcount == 1, user
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=BACKENDS)
def auth_server(request, tmp_path_factory, tiny_tokenizer):
    """A basic-auth `mlflow server` (tracking store and user database on ``request.param``) holding tiny-lm v1,
    the four ``USERS`` with their grants, and forget/retain files; this process acts as the admin.

    The server checks the password on every request, unchanged. Its hash is what makes that slow: MLflow stores
    scrypt hashes (werkzeug's default), whose check costs 0.15 s of CPU alone and 0.45 s on two busy cores,
    against 0.02 s for a whole request with a cheap hash (measured on this 2-core machine); a prune makes about
    100 requests, so the hashes cost the old single-backend test most of its two minutes. So the accounts are
    created through the real API, and then the stored hashes of these test accounts (the admin's too) are
    replaced in the user database by 1-iteration pbkdf2 ones: the same check, at no cost. Which requests are
    refused does not depend on the hash; in production the hashes stay what MLflow makes.
    """
    backend = request.param
    root = tmp_path_factory.mktemp(f"auth-{backend}")
    tracking_db = backend_store_uri(request, backend)  # first: the cluster migrates its template on the first one
    auth_db = (
        f"sqlite:///{root / 'auth.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres").empty_database("auth")
    )
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {auth_db}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
    }
    with MlflowServer(root, app_name="basic-auth", extra_env=env, backend_uri=tracking_db) as srv:
        _cheap_hashes(auth_db, {"admin": ADMIN_PASSWORD})
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            mp.setenv("MLFLOW_TRACKING_URI", srv.uri)
            mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            mlflow.set_tracking_uri(srv.uri)
            register_tiny(tiny_tokenizer)
            forget, retain = write_data_files(root / "data")
            from mlflow.server import get_app_client

            auth = get_app_client("basic-auth", tracking_uri=srv.uri)
            experiment_id = MlflowClient().get_experiment_by_name("Default").experiment_id
            for user, (password, on_experiment, on_model) in USERS.items():
                auth.create_user(user, password)
                if on_experiment:
                    auth.grant_user_permission(user, "experiment", experiment_id, on_experiment)
                auth.grant_user_permission(user, "registered_model", TINY_NAME, on_model)
            _cheap_hashes(auth_db, {user: password for user, (password, _, _) in USERS.items()})
            yield {
                "srv": srv,
                "root": root,
                "forget": str(forget),
                "retain": str(retain),
                "experiment_id": experiment_id,
            }
            mlflow.set_tracking_uri(None)


def _env(auth_server, user: str) -> dict:
    return {
        "MLFLOW_TRACKING_URI": auth_server["srv"].uri,
        "MLFLOW_TRACKING_USERNAME": user,
        "MLFLOW_TRACKING_PASSWORD": USERS[user][0],
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }


@contextlib.contextmanager
def _as(auth_server, user: str):
    """This process's MLflow requests (the CLI run in-process) as ``user``; the admin again after."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _env(auth_server, user).items():
            mp.setenv(key, value)
        yield


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _refused_registration(auth_server, user: str) -> tuple[str, str, str]:
    """The second line alone, against the real server: a job's run with a logged model whose registration (for
    lack of EDIT on tiny-lm) is refused. Returns (the error message, the run's ID, the logged model's ID)."""
    from types import SimpleNamespace

    from mlflow_selprune.errors import BadInputError
    from mlflow_selprune.registry import tracking

    with _as(auth_server, user), pytest.raises(BadInputError) as refused:
        with tracking.job_run(None, "prune") as run:
            model = MlflowClient().create_logged_model(
                auth_server["experiment_id"], name="model", source_run_id=run.info.run_id
            )
            tags = {lineage.PARENT: f"models:/{TINY_NAME}/1", lineage.RUN_ID: run.info.run_id}
            tracking.register(
                SimpleNamespace(model_uri=f"models:/{model.model_id}", model_id=model.model_id),
                TINY_NAME,
                run.info.run_id,
                tags,
                alias=None,
            )
    assert mlflow.active_run() is None
    return str(refused.value), run.info.run_id, model.model_id


def _every_run(experiment_id: str) -> dict:
    return {
        run.info.run_id: run
        for run in MlflowClient().search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    }


def _assert_no_password_written(auth_server, outputs: list[str], tmp: Path) -> None:
    """No password in any command's output, the server's log, any run (params, tags, inputs), any version or
    registered model, or any artifact file of any run or logged model (downloaded)."""
    client = MlflowClient()
    passwords = [ADMIN_PASSWORD] + [password for password, _, _ in USERS.values()]
    written = list(outputs) + [(auth_server["root"] / "server.log").read_text(errors="replace")]
    runs = _every_run(auth_server["experiment_id"])
    for run_id, run in runs.items():  # deleted ones too: their artifacts stay until `mlflow gc`
        written.append(json.dumps(run.to_dictionary(), default=str))
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="", dst_path=str(tmp / run_id))
    for model in client.search_logged_models([auth_server["experiment_id"]]):
        written.append(json.dumps({"params": model.params, "tags": model.tags}, default=str))
        if client.list_logged_model_artifacts(model.model_id):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model.model_id}", dst_path=str(tmp / model.model_id)
            )
    for rm in client.search_registered_models():
        written.append(json.dumps({"tags": rm.tags, "description": rm.description}))
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            written.append(json.dumps({"tags": mv.tags, "description": mv.description, "source": mv.source}))
    files = [path for path in tmp.rglob("*") if path.is_file()]
    assert len(files) > 10, files  # the downloads happened
    written += [path.read_bytes().decode("latin-1") for path in files]
    for password in passwords:
        assert not any(password in text for text in written), "a password was written"


@pytest.mark.slow(seconds=35)
def test_4_users_refused_in_1_line_before_writing_editor_publishes_1_version_no_password_written(auth_server, tmp_path):
    s = auth_server
    client = MlflowClient()
    outputs = []
    before = registry_snapshot()
    runs_before = set(_every_run(s["experiment_id"]))
    models_before = {m.model_id for m in client.search_logged_models([s["experiment_id"]])}
    tags_before = client.get_registered_model(TINY_NAME).tags

    # 1. reader (READ on tiny-lm) and editor (EDIT) prune at once: the reader is refused before any run exists
    args = [
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}/1",
        "--forget",
        s["forget"],
        "--retain",
        s["retain"],
        "--ff-frac",
        "0.1",
        "--steps",
        "1",
        *SMALL,
    ]
    procs = {
        user: subprocess.Popen(
            [sys.executable, "-m", "mlflow_selprune", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=s["root"],
            env=dict(os.environ, **_env(s, user)),
        )
        for user in ("reader", "editor")
    }
    # 2. meanwhile, in this process, the second line: a registration refused all the same deletes the job's run and
    #    logged model where the user may delete runs (cleaner), and names them where not (reader)
    refused = {user: _refused_registration(s, user) for user in ("cleaner", "reader")}
    results = {}
    for user, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[user] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    outputs += [out for result in results.values() for out in (result.stdout, result.stderr)]
    outputs += [message for message, _, _ in refused.values()]

    reader, editor = results["reader"], results["editor"]
    assert reader.returncode == 2, reader.stderr[-3000:]
    errors = _error_lines(reader.stderr)
    assert len(errors) == 1, reader.stderr[-3000:]
    assert f"user 'reader' may not add versions to registered model '{TINY_NAME}'" in errors[0]
    assert "MLflow needs EDIT on it" in errors[0] and "nothing was written" in errors[0], errors
    assert editor.returncode == 0, editor.stderr[-3000:]
    new = assert_complete_or_absent(before)
    assert len(new) == 1  # the editor's
    editor_version = client.get_model_version(TINY_NAME, new[0])
    assert editor_version.run_id in editor.stdout

    for user, (message, _, _) in refused.items():
        assert message.startswith(
            f"permission denied: user '{user}' may not add versions to registered model "
            f"'{TINY_NAME}': MLflow needs EDIT on it"
        ), message
    cleaned, cleaned_run, cleaned_model = refused["cleaner"]
    assert cleaned.endswith("the job's run and logged model were deleted"), cleaned
    left, left_run, left_model = refused["reader"]
    assert (
        f"left behind in experiment {s['experiment_id']}: logged model {left_model} and FAILED run {left_run}; "
        "deleting them needs MANAGE on the experiment" in left
    ), left

    runs = _every_run(s["experiment_id"])
    new_runs = {run_id: run for run_id, run in runs.items() if run_id not in runs_before}
    # the editor's and the two refused ones; none by the reader's `prune`
    assert set(new_runs) == {editor_version.run_id, cleaned_run, left_run}, new_runs.keys()
    assert (new_runs[cleaned_run].info.status, new_runs[cleaned_run].info.lifecycle_stage) == ("FAILED", "deleted")
    assert (new_runs[left_run].info.status, new_runs[left_run].info.lifecycle_stage) == ("FAILED", "active")
    new_models = {m.model_id for m in client.search_logged_models([s["experiment_id"]])} - models_before
    editor_model = editor_version.model_id or editor_version.source.removeprefix("models:/")
    assert new_models == {editor_model, left_model}, new_models  # the cleaner's is deleted
    assert client.get_registered_model(TINY_NAME).tags == tags_before  # the permission check wrote nothing

    # 3. gate --set-alias: READ is refused before the decision record, with or without an alias; EDIT moves it
    gate = ["gate", "--model-uri", f"models:/{TINY_NAME}/{new[0]}", "--min-forget-drop", "-1", "--max-retain-drop", "1"]
    before = registry_snapshot()
    for extra in (["--set-alias", "promoted"], []):
        with _as(s, "reader"):
            out = invoke(*gate, *extra)
        outputs += [out.stdout, out.stderr]
        assert out.exit_code == 2, out.stderr
        errors = _error_lines(out.stderr)
        assert len(errors) == 1 and "permission denied: user 'reader'" in errors[0] and "EDIT" in errors[0], errors
        assert "nothing was written" in errors[0], errors
        assert registry_snapshot() == before  # no record, no alias
    with _as(s, "editor"):
        out = invoke(*gate, "--set-alias", "promoted")
    outputs += [out.stdout, out.stderr]
    assert out.exit_code == 0, out.stderr
    after = registry_snapshot()
    assert after[TINY_NAME]["aliases"] == {**before[TINY_NAME]["aliases"], "promoted": new[0]}
    records = lineage.gate_records(after[TINY_NAME]["versions"][new[0]])
    assert [(r["verdict"], r["user"], r["alias_moved"]) for r in records] == [("pass", "editor", "promoted")]
    # the move refused after the record is written: the admin really revokes the editor's EDIT just after the
    # record lands (the server's own 403 follows), and the record is corrected
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=s["srv"].uri)
    write_tag = MlflowClient.set_model_version_tag

    def record_then_revoke(self, *args, **kwargs):
        write_tag(self, *args, **kwargs)
        with pytest.MonkeyPatch.context() as admin:
            admin.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            admin.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            auth.revoke_user_permission("editor", "registered_model", TINY_NAME)  # the default, READ, is left

    with _as(s, "editor"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(MlflowClient, "set_model_version_tag", record_then_revoke)
        out = invoke(*gate, "--set-alias", "canary")
    auth.grant_user_permission("editor", "registered_model", TINY_NAME, "EDIT")
    outputs += [out.stdout, out.stderr]
    assert out.exit_code == 2, out.stderr
    errors = _error_lines(out.stderr)
    assert len(errors) == 1 and "may not move alias 'canary'" in errors[0] and "without the move" in errors[0], errors
    now = registry_snapshot()[TINY_NAME]
    assert now["aliases"] == after[TINY_NAME]["aliases"]
    last = lineage.gate_records(now["versions"][new[0]])[-1]
    # the editor lost EDIT, so not even the reason could be added: the record written before the move says
    # the alias was requested and did not move, which stays true
    assert (last["verdict"], last["alias_requested"], last["alias_moved"]) == ("pass", "canary", None)
    assert last.get("alias_not_moved") in (None, "canary: permission denied")

    # 4. outsider (DENY on tiny-lm: no permission at all) cannot read its lineage
    with _as(s, "outsider"):
        out = invoke("lineage", f"models:/{TINY_NAME}/1")
    outputs += [out.stdout, out.stderr]
    assert out.exit_code == 2, out.stderr
    errors = _error_lines(out.stderr)
    assert len(errors) == 1 and "permission denied" in errors[0] and "user 'outsider'" in errors[0], errors
    assert "READ" in errors[0], errors

    # 5. modelonly (READ on tiny-lm, DENY on the experiment of its runs and files): reading a version's run or files
    #    is one permission line (exit 2), never a "missing file" finding nor an unexpected error
    for args in (
        ["lineage", f"models:/{TINY_NAME}/{new[0]}", "--verify"],
        ["evaluate", "--model-uri", f"models:/{TINY_NAME}/1", "--forget", s["forget"], "--retain", s["retain"], *SMALL],
    ):
        with _as(s, "modelonly"):
            out = invoke(*args)
        outputs += [out.stdout, out.stderr]
        assert out.exit_code == 2, (args[0], out.output)
        errors = _error_lines(out.stderr)
        assert len(errors) == 1 and "permission denied" in errors[0] and "user 'modelonly'" in errors[0], errors
        assert not [line for line in out.stdout.splitlines() if line.startswith("tampered:")]

    # 6. no password anywhere written
    _assert_no_password_written(s, outputs, tmp_path / "downloaded")
