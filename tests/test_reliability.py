"""Reliability: bad input, killed jobs and concurrent jobs.

The registry must never hold a half-made version, a lost or duplicated one,
or a moved alias after a failure. Checked against a real sqlite store (bad
input) and a real `mlflow server` on 127.0.0.1 with proxied artifacts, backed
by sqlite and by PostgreSQL (kills, concurrency). Server faults are in
test_server_faults.py, access control in test_access_control.py, tampering
in test_tamper.py.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mlflow_selprune.registry import lineage

import cli_processes
from mlflow_helpers import (
    SMALL,
    TINY_NAME,
    MlflowServer,
    assert_complete_or_absent,
    free_port,
    invoke,
    recorded,
    registry_snapshot,
    server_store,
    sqlite_store,
    tiny_model,
)
from pg_cluster import BACKENDS, backend_store_uri


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

        MambaForCausalLM(
            MambaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, state_size=4, expand=2)
        ).save_pretrained(root / "mamba")
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
        "unknown registered model": (
            ["prune", "--model-uri", "models:/nope/1", "--forget", forget, "--retain", retain],
            "does not exist",
        ),
        "unknown version": ([*prune, "--model-uri", f"models:/{TINY_NAME}/42"], "has no version 42"),
        "unknown alias": ([*prune, "--model-uri", f"models:/{TINY_NAME}@nope"], "has no alias"),
        "run without a model": (
            [*prune, "--model-uri", f"runs:/{store['empty_run']}/model", "--register-as", "x"],
            "cannot download",
        ),
        "not a transformers model": ([*prune, "--model-uri", "models:/not-transformers/1"], "not a transformers model"),
        "unsupported architecture": ([*prune, "--model-uri", str(root / "mamba"), "--no-register"], "MambaForCausalLM"),
        "model without tokenizer": (
            [*prune, "--model-uri", str(root / "no-tokenizer"), "--no-register"],
            "no tokenizer",
        ),
        "non-finite activations": ([*prune, "--model-uri", str(root / "overflow"), "--no-register"], "non-finite"),
        "forget equals retain": (["prune", "--model-uri", base, "--forget", forget, "--retain", forget], "same data"),
        "empty data": (
            ["prune", "--model-uri", base, "--forget", str(root / "data/empty.txt"), "--retain", retain],
            "empty",
        ),
        "unreadable data": (
            ["prune", "--model-uri", base, "--forget", str(root / "nothing.csv"), "--retain", retain],
            "nothing.csv",
        ),
        "missing text column": (
            [*prune, "--model-uri", base, "--forget", str(root / "data/columns.jsonl"), "--text-column", "content"],
            "content",
        ),
        "fewer tokens than one batch": (
            ["prune", "--model-uri", base, "--forget", str(root / "data/short.txt"), "--retain", retain],
            "fewer than",
        ),
        "fraction out of range": (
            [*prune, "--model-uri", base, "--attn-frac", "-0.1"],
            "--attn-frac must be in [0, 1)",
        ),
        "fractions summing to nothing": ([*prune, "--model-uri", base, "--ff-frac", "0"], "both 0"),
        "steps below one": ([*prune, "--model-uri", base, "--steps", "0"], "steps must be"),
        "budget that cannot be met": (
            [
                *prune,
                "--model-uri",
                base,
                "--target-forget-drop",
                "0.99",
                "--max-retain-drop",
                "0.5",
                "--max-steps",
                "1",
            ],
            "budget cannot be met",
        ),
        "steps and budget": ([*prune, "--model-uri", base, "--steps", "2", "--max-retain-drop", "0.1"], "not both"),
        "gate without recorded metrics": (
            ["gate", "--model-uri", f"models:/{TINY_NAME}/1", "--min-forget-drop", "0.1"],
            "no recorded",
        ),
        "gate threshold out of range": (
            ["gate", "--model-uri", f"models:/{TINY_NAME}/1", "--max-retain-drop", "2"],
            "[-1, 1]",
        ),
        "tracking server down": (
            ["prune", "--model-uri", base, "--forget", forget, "--retain", retain],
            "not reachable",
        ),
    }


BAD_INPUT_CASES = [
    "unknown registered model",
    "unknown version",
    "unknown alias",
    "run without a model",
    "not a transformers model",
    "unsupported architecture",
    "model without tokenizer",
    "non-finite activations",
    "forget equals retain",
    "empty data",
    "unreadable data",
    "missing text column",
    "fewer tokens than one batch",
    "fraction out of range",
    "fractions summing to nothing",
    "steps below one",
    "budget that cannot be met",
    "steps and budget",
    "gate without recorded metrics",
    "gate threshold out of range",
    "tracking server down",
]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_each_of_21_bad_inputs_gives_one_line_exit_2_registry_unchanged(store, case):
    assert len(BAD_INPUT_CASES) == 21
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
    out = invoke(
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        "--no-register",
        *SMALL,
    )
    assert out.exit_code == 0, out.stderr
    run = client.search_runs(
        [client.get_experiment_by_name("Default").experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )[0]
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
    with (
        MlflowServer(root, backend_uri=backend_store_uri(request, request.param)) as srv,
        server_store(srv, tiny_tokenizer, backend=request.param) as store,
    ):
        yield store


def _prune_process(server, *extra):
    """A prune in its own process (forked from a preloaded server: cli_processes.py), logging verbosely."""
    args = [
        "-v",
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        server["forget"],
        "--retain",
        server["retain"],
        "--ff-frac",
        "0.1",
        "--steps",
        "2",
        "--no-control",
        *CONCURRENT,
        *extra,
    ]
    log = server["root"] / f"prune-{time.monotonic_ns()}.log"
    return cli_processes.start(args, env=server["env"], cwd=server["root"], log_path=log)


@pytest.mark.slow
@pytest.mark.parametrize(
    "phase,marker",
    [
        ("collection", "collecting statistics"),
        ("evaluation", "evaluating forget and retain metrics"),
        ("logging", "logging the unlearned model"),
        ("registration", "registering a new version"),
    ],
)
def test_sigkill_in_4_phases_leaves_no_version_or_a_complete_one(server, phase, marker):
    before = registry_snapshot()
    process = _prune_process(server)
    killed = False
    for line in process.lines(timeout=240):
        if marker in line:
            process.kill()
            killed = True
            break
    returncode = process.wait(timeout=60)
    assert killed, f"never reached the {phase} phase:\n{process.output[-3000:]}"
    assert returncode == -signal.SIGKILL
    assert_complete_or_absent(before)


@pytest.mark.slow
def test_rerun_after_a_kill_succeeds(server):
    before = registry_snapshot()
    out = invoke(
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        server["forget"],
        "--retain",
        server["retain"],
        "--ff-frac",
        "0.1",
        "--steps",
        "1",
        *SMALL,
    )
    assert out.exit_code == 0, out.stderr[-3000:]
    assert len(assert_complete_or_absent(before)) == 1


def _job(server, i: int) -> cli_processes.CliProcess:
    """One team's job, in its own process: prune, then gate the new version. Job i%4: 0 passes its gate and
    asks for an alias, 1 fails its gate and asks for one, 2 passes without one, 3 fails without one."""
    passing = i % 4 in (0, 2)
    # a relative drop is at most 1, and selectivity = forget drop / max(retain drop, 1%) at most 100: the first
    # gate always passes, the second never does
    thresholds = ["--metric", "top10", *(["--max-retain-drop", "1"] if passing else ["--min-selectivity", "1000"])]
    alias = ["--set-alias", f"job{i}"] if i % 4 in (0, 1) else []
    prune = [
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        server["forget"],
        "--retain",
        server["retain"],
        "--ff-frac",
        str(0.05 * (1 + i % 4)),
        "--steps",
        "1",
        "--seed",
        str(i),
        "--no-control",
        *CONCURRENT,
    ]
    gate = ["gate", "--model-uri", "{registered}", *thresholds, *alias]
    return cli_processes.start(
        prune, gate, env=server["env"], cwd=server["root"], log_path=server["root"] / f"job{i}.log"
    )


# Smaller still than SMALL: jobs share two cores, and the point is the registry, not the compute.
CONCURRENT = [
    "--paragraphs",
    "--max-length",
    "64",
    "--batch-size",
    "4",
    "--collect-tokens",
    "600",
    "--eval-tokens",
    "300",
    "--no-progress",
]


# Eight jobs where concurrency bites (PostgreSQL); four on sqlite, which serializes its writers anyway.
JOBS = {"postgresql": 8, "sqlite": 4}


@pytest.mark.slow(seconds=50)
def test_concurrent_jobs_8_on_postgresql_4_on_sqlite_get_complete_versions_and_aliases_only_where_gates_passed(server):
    count = JOBS[server["backend"]]
    before = registry_snapshot()
    jobs = [_job(server, i) for i in range(count)]
    codes = [job.wait(timeout=900) for job in jobs]
    outputs = [job.output for job in jobs]
    for i, (code, output) in enumerate(zip(codes, outputs)):
        assert code == (0 if i % 4 in (0, 2) else 1), f"job {i}:\n{output[-3000:]}"
    new = assert_complete_or_absent(before, aliases_unchanged=False)
    # no version lost or duplicated: one new version per job, numbered without gaps
    assert len(new) == count and [int(v) for v in new] == list(range(int(new[0]), int(new[0]) + count))
    job_versions = [re.search(rf"registered: models:/{TINY_NAME}/(\d+)", out).group(1) for i, out in enumerate(outputs)]
    assert sorted(job_versions, key=int) == new
    client = MlflowClient()
    versions = {v: recorded(client.get_model_version(TINY_NAME, v)) for v in new}
    assert len({mv.run_id for mv in versions.values()}) == count
    for mv in versions.values():
        assert mv.tags[lineage.PARENT] == f"models:/{TINY_NAME}/1" and mv.tags[lineage.RUN_ID] == mv.run_id
    aliases = {alias: str(version) for alias, version in client.get_registered_model(TINY_NAME).aliases.items()}
    expected = {f"job{i}": job_versions[i] for i in range(count) if i % 4 == 0}
    assert {a: v for a, v in aliases.items() if a.startswith("job")} == expected
    assert {a: v for a, v in aliases.items() if not a.startswith("job")} == before[TINY_NAME]["aliases"]
    for i, version in enumerate(job_versions):
        decisions = lineage.gate_records(versions[version].tags)
        assert [d["verdict"] for d in decisions] == ["pass" if i % 4 in (0, 2) else "fail"]
        assert decisions[0]["alias_moved"] == (f"job{i}" if i % 4 == 0 else None)
