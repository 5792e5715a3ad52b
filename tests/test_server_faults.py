"""Server faults on a PostgreSQL-backed tracking server with proxied artifacts.

The tracking server is killed (SIGKILL) in three phases of a prune, its
database is restarted under it, and its artifact destination fills up or
turns read-only. Whatever happens, the registry never holds a version
without its whole lineage, a failed job says so in one line, and rerunning
the same run (``MLFLOW_RUN_ID``) once the server is back ends with exactly
one version. The phase a fault hits is decided by the job's own requests
(a proxy in front of the server, fault_proxy.py) or its own log lines, never
by a timer.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import cli_processes
from fault_proxy import FaultProxy
from mlflow_helpers import (
    SMALL,
    TINY_NAME,
    MlflowServer,
    assert_complete_or_absent,
    invoke,
    register_tiny,
    registry_snapshot,
    server_store,
    write_data_files,
)

# A dead server is reported in a second instead of after MLflow's default minutes of retries; one retry
# still replaces a pooled connection the server closed after refusing an upload.
FEW_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
PRUNE = ["--ff-frac", "0.1", "--steps", "1", "--no-control", *SMALL]


@pytest.fixture(scope="module")
def pg_server(postgres, tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("faults")
    with (
        MlflowServer(root, backend_uri=postgres.new_database()) as srv,
        server_store(srv, tiny_tokenizer, postgres=postgres) as store,
    ):
        yield store


def _prune_args(server, *extra):
    return [
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        server["forget"],
        "--retain",
        server["retain"],
        *PRUNE,
        *extra,
    ]


def _prune_process(server, tracking_uri):
    """A prune in its own process (forked from a preloaded server: cli_processes.py), logging verbosely."""
    env = dict(MLFLOW_TRACKING_URI=tracking_uri, **FEW_RETRIES)
    log = server["root"] / f"prune-{time.monotonic_ns()}.log"
    return cli_processes.start(["-v", *_prune_args(server)], env=env, cwd=server["root"], log_path=log)


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- the server killed mid-job

# phase -> (request line that triggers the kill, which matching request), or None: killed on a log line
KILL_POINTS = {
    "collection": None,
    "artifact upload": (r"^PUT /api/2\.0/mlflow-artifacts/artifacts/", 3),
    "between upload and registration": (r"^POST /api/2\.0/mlflow/model-versions/create", 1),
}


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("phase", list(KILL_POINTS))
def test_server_killed_in_3_phases_fails_in_one_line_and_the_rerun_registers_exactly_one_version(pg_server, phase):
    srv = pg_server["srv"]
    before = registry_snapshot()
    point = KILL_POINTS[phase]
    proxy = FaultProxy(srv.port, point[0], srv.kill, nth=point[1]) if point else None
    try:
        process = _prune_process(pg_server, proxy.uri if proxy else srv.uri)
        for line in process.lines(timeout=300):
            if proxy is None and "collecting statistics" in line and srv.process.poll() is None:
                srv.kill()
        returncode = process.wait(timeout=60)
    finally:
        if proxy:
            proxy.close()
    output = process.output
    assert srv.process.poll() is not None, f"the server was never killed in {phase}:\n{output[-3000:]}"
    assert returncode not in (0, -signal.SIGKILL), output[-3000:]
    errors = _error_lines(output)
    assert len(errors) == 1, output[-3000:]
    assert "stopped answering" in errors[0] and "MLFLOW_RUN_ID=" in errors[0], errors[0]
    run_id = re.search(r"MLFLOW_RUN_ID=(\w+)", errors[0]).group(1)

    srv.start()
    assert assert_complete_or_absent(before) == []  # nothing half-registered once the server is back
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_RUN_ID", run_id)
        out = invoke(*_prune_args(pg_server))
    assert out.exit_code == 0, out.stderr[-3000:]
    new = assert_complete_or_absent(before)
    assert len(new) == 1
    version = MlflowClient().get_model_version(TINY_NAME, new[0])
    assert version.run_id == run_id
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------- the database restarted


@pytest.mark.slow(seconds=20)
def test_database_restarted_2_times_under_the_server_a_later_prune_and_one_in_flight_both_register(pg_server):
    srv, postgres = pg_server["srv"], pg_server["postgres"]
    if srv.process.poll() is not None:
        srv.start()
    before = registry_snapshot()
    postgres.restart()  # every pooled connection of the server is cut
    out = invoke(*_prune_args(pg_server))
    assert out.exit_code == 0, out.stderr[-3000:]
    assert len(assert_complete_or_absent(before)) == 1

    # restarted again while a prune is in flight, just before it registers
    before = registry_snapshot()
    with (
        FaultProxy(
            srv.port, r"^POST /api/2\.0/mlflow/model-versions/create", postgres.restart, close_after=False
        ) as proxy,
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv("MLFLOW_TRACKING_URI", proxy.uri)
        mlflow.set_tracking_uri(proxy.uri)
        try:
            out = invoke(*_prune_args(pg_server))
        finally:
            mlflow.set_tracking_uri(srv.uri)
        assert proxy.fired.is_set()
    new = assert_complete_or_absent(before)
    # the server reconnects (pre-ping) and MLflow's client retries: the job goes through; were it to fail,
    # it must fail in one line with nothing registered
    if out.exit_code == 0:
        assert len(new) == 1
    else:
        assert len(_error_lines(out.stderr)) == 1 and new == [], out.stderr[-3000:]
        pytest.fail(f"the in-flight prune failed (cleanly): {_error_lines(out.stderr)[0]}")


# ---------------------------------------------------------------- the artifact destination full or read-only


def _mount_tmpfs(path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if out.returncode != 0:
        reason = f"cannot mount a small tmpfs for the artifact destination: {out.stderr.strip()}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.slow(seconds=30)
def test_artifact_destination_full_or_read_only_2_states_give_one_error_line_and_no_version(
    postgres, tmp_path_factory, tiny_tokenizer
):
    root = tmp_path_factory.mktemp("artifacts-fault")
    destination = root / "artifacts"
    _mount_tmpfs(destination, "8m")
    try:
        with (
            MlflowServer(root, backend_uri=postgres.new_database(), artifacts=destination) as srv,
            pytest.MonkeyPatch.context() as mp,
        ):
            mp.chdir(root)
            mp.setenv("MLFLOW_TRACKING_URI", srv.uri)
            for key, value in FEW_RETRIES.items():
                mp.setenv(key, value)
            mlflow.set_tracking_uri(srv.uri)
            try:
                register_tiny(tiny_tokenizer)
                forget, retain = write_data_files(root / "data")
                server = {"forget": str(forget), "retain": str(retain)}
                # full: what is left of the 8 MiB is too little for the pruned model's weights
                free = os.statvfs(destination).f_bavail * os.statvfs(destination).f_frsize
                with open(destination / "filler", "wb") as filler:
                    filler.write(b"\0" * max(free - 64 * 1024, 0))
                _assert_fails_cleanly(server, "full")
                (destination / "filler").unlink()
                subprocess.run(["mount", "-o", "remount,ro", str(destination)], check=True)
                _assert_fails_cleanly(server, "read-only")
            finally:
                mlflow.set_tracking_uri(None)
    finally:
        subprocess.run(["umount", "-l", str(destination)], check=False)


def _assert_fails_cleanly(server, state):
    before = registry_snapshot()
    out = invoke(*_prune_args(server))
    assert out.exit_code not in (0, 2), (state, out.stdout[-3000:], out.stderr[-3000:])
    errors = _error_lines(out.stderr)
    assert len(errors) == 1, (state, out.stderr[-3000:])
    assert "artifact" in errors[0] and "nothing was registered" in errors[0], errors[0]
    assert registry_snapshot() == before, state
