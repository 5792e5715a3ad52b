"""Data parallel through Accelerate on CPU: torchrun with 2 processes (gloo) equals 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from mlflow_helpers import TINY_NAME, cli, invoke, registry_snapshot

WORKER = Path(__file__).parent / "distributed_worker.py"
# Sums are float64 all-reduced in a different order than one process adds them: equal to ~1e-12.
SUM_RTOL = 1e-10
METRIC_TOL = 1e-9

pytestmark = pytest.mark.slow


def torchrun(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load(out: Path):
    return load_file(str(out / "result.safetensors")), json.loads((out / "result.json").read_text())


def test_two_processes_equal_one_with_uneven_shards(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    import distributed_worker

    distributed_worker.main(str(tmp_path / "one"))
    out = torchrun(str(tmp_path / "two"))
    assert out.returncode == 0, out.stderr[-3000:]
    one_tensors, one = load(tmp_path / "one")
    two_tensors, two = load(tmp_path / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["n_tokens"] == two["n_tokens"]  # 5 batches over 2 ranks: nothing dropped or counted twice
    for name in ("ff_mask", "attn_mask"):
        assert torch.equal(one_tensors[name], two_tensors[name]), name
        assert one_tensors[name].any()
    for name in one_tensors:
        if name.startswith("ff_sum") or name == "ff_count_pos":
            torch.testing.assert_close(two_tensors[name], one_tensors[name], rtol=SUM_RTOL, atol=0)
    for key, value in one["final_metrics"].items():
        assert two["final_metrics"][key] == pytest.approx(value, rel=METRIC_TOL, abs=METRIC_TOL), key


def test_a_failing_rank_ends_the_whole_launch_with_its_message(tmp_path):
    start = time.monotonic()
    out = torchrun(str(tmp_path / "fail"), "--fail-rank", "1", timeout=180)
    assert out.returncode != 0
    assert "rank 1 was told to fail" in out.stderr
    assert time.monotonic() - start < 120, "the surviving rank must not hang"
    assert not (tmp_path / "fail" / "result.json").exists()


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
    "--ff-frac",
    "0.1",
    "--attn-frac",
    "0.05",
    "--steps",
    "2",
    "--no-progress",
]


def _prune_args(store) -> list[str]:
    return [
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        *SMALL,
    ]


def _run_ids(client) -> set[str]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id for r in client.search_runs(experiments)}


@pytest.fixture(scope="module")
def one_process_run(store) -> str:
    """The run id of the one-process reference both launches are compared with: the same ``prune`` with
    ``--no-register``, made once per module through the CLI's own code in this process (click's runner; what is
    tested is the launches, not this run's process). The environment is put back afterwards: ``--no-progress``
    sets progress variables that processes started later would otherwise inherit."""
    client = MlflowClient()
    runs_before = _run_ids(client)
    with mock.patch.dict(os.environ):
        one = invoke(*_prune_args(store), "--no-register")
    assert one.exit_code == 0, one.output[-3000:]
    (run_id,) = _run_ids(client) - runs_before
    return run_id


@pytest.mark.slow(seconds=35)
def test_cli_with_two_processes_registers_one_version_equal_to_one_process(store, one_process_run):
    client = MlflowClient()
    before = set(registry_snapshot()[TINY_NAME]["versions"])
    two = cli(*_prune_args(store), "--num-processes", "2", env=store["env"])
    assert two.returncode == 0, two.stderr[-3000:]
    after = set(registry_snapshot()[TINY_NAME]["versions"])
    assert len(after - before) == 1, "exactly one version from a 2-process prune"
    version = (after - before).pop()
    mv = client.get_model_version(TINY_NAME, version)
    one_run = client.get_run(one_process_run)
    assert one_run.info.run_id != mv.run_id and one_run.data.params.get("forget") == store["forget"]
    masks = {}
    for label, run_id in (("one", one_run.info.run_id), ("two", mv.run_id)):
        path = client.download_artifacts(run_id, "selprune/masks.safetensors", str(store["root"] / label))
        masks[label] = load_file(path)
    for name in ("ff_mask", "attn_mask"):
        assert torch.equal(masks["one"][name], masks["two"][name]), name
    one_metrics, two_metrics = one_run.data.metrics, client.get_run(mv.run_id).data.metrics
    for key in ("forget_top1", "retain_top1", "forget_loss", "retain_loss"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], rel=METRIC_TOL, abs=METRIC_TOL)


def _nodes(command: list[str], env: dict, cwd: Path, timeout: float) -> list[tuple[int, str, str]]:
    """Two torchrun agents ("nodes") of 1 process each, on loopback with a c10d rendezvous: the multi-node
    command of docs/multi-gpu.md, with 127.0.0.1 as the first machine's address. Returns (code, stdout, stderr)
    per node. On a timeout or any failure every process they started is killed by its PID: the agents and the
    workers (which torchrun starts in sessions of their own, so a process-group kill would miss them)."""
    import psutil

    from mlflow_selprune.launch import _free_port

    endpoint, rdzv_id = f"127.0.0.1:{_free_port()}", f"selprune-{os.getpid()}-{time.monotonic_ns()}"
    full_env = {**os.environ, **env}
    logs, agents, seen = [], [], {}
    try:
        for rank in (0, 1):
            out, err = open(cwd / f"node{rank}.out", "w+"), open(cwd / f"node{rank}.err", "w+")
            logs.append((out, err))
            agents.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--nnodes",
                        "2",
                        "--nproc-per-node",
                        "1",
                        "--node-rank",
                        str(rank),
                        "--rdzv-backend",
                        "c10d",
                        "--rdzv-endpoint",
                        endpoint,
                        "--rdzv-id",
                        rdzv_id,
                        "--rdzv-conf",
                        f"is_host={1 - rank}",
                        "--local-addr",
                        "127.0.0.1",
                        "--max-restarts",
                        "0",
                        "--monitor-interval",
                        "0.1",
                        "-m",
                        "mlflow_selprune",
                        *command,
                    ],
                    stdout=out,
                    stderr=err,
                    env=full_env,
                    cwd=cwd,
                )
            )
        deadline = time.monotonic() + timeout
        while any(a.poll() is None for a in agents):
            for agent in agents:  # every descendant, so that a hang leaves no orphan behind
                try:
                    seen.update({c.pid: c for c in psutil.Process(agent.pid).children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"2-node prune still running after {timeout} s")
            time.sleep(0.2)
        results = []
        for agent, (out, err) in zip(agents, logs):
            out.seek(0)
            err.seek(0)
            results.append((agent.returncode, out.read(), err.read()))
        return results
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.terminate()  # the agent stops its workers on SIGTERM
        for agent in agents:
            try:
                agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        for proc in seen.values():
            try:
                if proc.is_running():
                    proc.kill()
            except psutil.NoSuchProcess:
                pass
        for out, err in logs:
            out.close()
            err.close()


@pytest.mark.slow(seconds=40)
def test_cli_on_two_nodes_registers_one_version_equal_to_one_process(store, one_process_run):
    """The same ``prune`` on 2 "nodes" x 1 process (two torchrun agents, c10d rendezvous on 127.0.0.1, one
    sqlite store and the same data paths) gives the masks and metrics of one process and ONE registered version:
    only global rank 0 writes to MLflow, whichever node it lands on."""
    client = MlflowClient()
    one_run_id = one_process_run
    before, runs_before = set(registry_snapshot()[TINY_NAME]["versions"]), _run_ids(client)
    nodes = _nodes(_prune_args(store), store["env"], store["root"], timeout=240)
    for rank, (code, _, err) in enumerate(nodes):
        assert code == 0, f"node {rank}: {err[-3000:]}"
    after = set(registry_snapshot()[TINY_NAME]["versions"])
    assert len(after - before) == 1, "exactly one version from a 2-node prune"
    version = (after - before).pop()
    mv = client.get_model_version(TINY_NAME, version)
    assert _run_ids(client) - runs_before == {mv.run_id}, "one run: the second node logged nothing"
    printed = [out for _, out, _ in nodes if f"registered: models:/{TINY_NAME}/{version}" in out]
    assert len(printed) == 1, "the summary comes from global rank 0 only"
    masks = {}
    for label, run_id in (("one", one_run_id), ("two", mv.run_id)):
        path = client.download_artifacts(run_id, "selprune/masks.safetensors", str(store["root"] / f"nodes-{label}"))
        masks[label] = load_file(path)
    for name in ("ff_mask", "attn_mask"):
        assert torch.equal(masks["one"][name], masks["two"][name]), name
        assert masks["one"][name].any(), name
    one_metrics, two_metrics = client.get_run(one_run_id).data.metrics, client.get_run(mv.run_id).data.metrics
    for key in ("forget_top1", "retain_top1", "forget_loss", "retain_loss"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], rel=METRIC_TOL, abs=METRIC_TOL), key


def test_bad_input_under_the_launcher_keeps_exit_code_2(store):
    before = registry_snapshot()
    out = cli(
        "prune",
        "--model-uri",
        f"models:/{TINY_NAME}@base",
        "--forget",
        "./no-such.jsonl",
        "--retain",
        store["retain"],
        "--num-processes",
        "2",
        *SMALL,
        env=store["env"],
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "no-such.jsonl" in out.stderr
    assert registry_snapshot() == before


def test_bfloat16_with_a_device_map_prunes_and_keeps_float64_statistics(store):
    """--dtype bfloat16 --device auto: Accelerate's big-model loading path (all on CPU here)."""
    from mlflow_selprune import collect_statistics
    from mlflow_selprune.config import PruneConfig
    from mlflow_selprune.registry.loading import load_components
    from mlflow_selprune.registry.resolve import resolve
    from mlflow_selprune.config import DataOptions, SourceOptions
    from mlflow_selprune.unlearn import run_prune

    model, _ = load_components(resolve(f"models:/{TINY_NAME}/1"), device="auto", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    batch = {"input_ids": torch.randint(2, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    stats = collect_statistics(model, [batch], sums="all", progress=False)
    assert all(v.dtype == torch.float64 for v in stats.ff.sums.values())
    result = run_prune(
        f"models:/{TINY_NAME}/1",
        store["forget"],
        store["retain"],
        register=False,
        config=PruneConfig(ff_frac=0.1, steps=1),
        device="auto",
        dtype="bfloat16",
        data=DataOptions(
            max_length=64, batch_size=4, collect_tokens=1000, eval_tokens=500, source=SourceOptions(paragraphs=True)
        ),
        progress=False,
    )
    assert result.pruning.ff_pruned == round(0.1 * 2 * 64)
    assert result.model_uri is None and 0 <= result.metrics["forget_top1"] <= 1
