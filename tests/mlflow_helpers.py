"""A real MLflow store (sqlite, or a real `mlflow server` on 127.0.0.1) with a tiny registered LM.

Nothing is mocked: the model is a real transformers model built from a config,
logged with the transformers flavor and registered like a user would.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mlflow_selprune.registry.flavor import default_pip_requirements

TINY_NAME = "tiny-lm"


def tiny_llama_config(tokenizer):
    """A tiny Llama (the family of SmolLM2) whose rows GGUF's 32-weight blocks divide: width 64, 2 layers, GQA,
    tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_neox_config(tokenizer, **extra) -> GPTNeoXConfig:
    """The tiny GPT-NeoX every registry test builds (2 layers, width 32), for any head."""
    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_neox_config(tokenizer, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return GPTNeoXForCausalLM(config).eval()


def register_tiny(tokenizer, name: str = TINY_NAME, alias: str | None = "base") -> str:
    """Log and register a tiny GPT-NeoX; returns ``models:/NAME/VERSION``."""
    return register_text_model(tiny_model(tokenizer), tokenizer, name, alias)


def register_text_model(model, tokenizer, name: str, alias: str | None = None) -> str:
    """Log a text-generation model with the transformers flavor (as a user would) and register it as a version
    of ``name``; returns ``models:/NAME/VERSION``."""
    with mlflow.start_run(run_name=f"register {name}"):
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=default_pip_requirements(),
        )
    mv = mlflow.register_model(info.model_uri, name)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, mv.version)
    return f"models:/{name}/{mv.version}"


def write_data_files(directory: Path) -> tuple[Path, Path]:
    """Code to forget (jsonl, one function per row) and prose to keep (.txt, one paragraph per block)."""
    import argparse
    import json as json_module
    import textwrap

    code, prose = [], []
    for module in (json_module, textwrap, argparse, inspect):
        for _, obj in inspect.getmembers(module, inspect.isfunction):
            if obj.__module__ != module.__name__:
                continue
            try:
                source = inspect.getsource(obj)
            except (OSError, TypeError):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                prose.append(" ".join(doc.split()))
                source = source.replace(obj.__doc__, "")
            code.append(source)
    directory.mkdir(parents=True, exist_ok=True)
    forget = directory / "forget.jsonl"
    forget.write_text("".join(json.dumps({"code": c}) + "\n" for c in code))
    retain = directory / "retain.txt"
    retain.write_text("\n\n".join(prose) + "\n")
    return forget, retain


@contextlib.contextmanager
def sqlite_store(root: Path, tokenizer):
    """A sqlite tracking/registry store in ``root`` holding tiny-lm v1 (alias base) and forget/retain files.

    The working directory moves to ``root`` (artifacts go to ./mlruns beside the database) and
    MLFLOW_TRACKING_URI points at it, for this process and the CLI processes it starts.
    """
    import pytest

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            base = register_tiny(tokenizer)
            forget, retain = write_data_files(root / "data")
            yield {
                "root": root,
                "uri": uri,
                "base": base,
                "forget": str(forget),
                "retain": str(retain),
                "env": {"MLFLOW_TRACKING_URI": uri},
            }
        finally:
            mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def server_store(srv, tokenizer, **extra):
    """A running ``MlflowServer`` as this process's store, holding tiny-lm v1 (alias base) and forget/retain files
    in its root (the working directory meanwhile); yields what the tests need, plus ``extra``."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(srv.root)
        mp.setenv("MLFLOW_TRACKING_URI", srv.uri)
        mlflow.set_tracking_uri(srv.uri)
        try:
            register_tiny(tokenizer)
            forget, retain = write_data_files(srv.root / "data")
            yield {
                "srv": srv,
                "root": srv.root,
                "forget": str(forget),
                "retain": str(retain),
                "env": {"MLFLOW_TRACKING_URI": srv.uri},
                **extra,
            }
        finally:
            mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def jsonl_retain_store(root: Path, tokenizer):
    """``sqlite_store`` with retain as jsonl (one paragraph per row), so no --paragraphs option is needed."""
    import json

    with sqlite_store(root, tokenizer) as s:
        paragraphs = Path(s["retain"]).read_text().split("\n\n")
        retain = s["root"] / "data" / "retain.jsonl"
        retain.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs if p.strip()))
        s["retain"] = str(retain)
        yield s


def registry_snapshot() -> dict:
    """Every registered model's versions, their tags, and aliases: to prove a failed command wrote nothing."""
    client = MlflowClient()
    snapshot = {}
    for rm in client.search_registered_models():
        versions = {
            str(mv.version): dict(sorted((mv.tags or {}).items()))
            for mv in client.search_model_versions(f"name='{rm.name}'")
        }
        snapshot[rm.name] = {
            "versions": versions,
            "aliases": {k: str(v) for k, v in sorted((rm.aliases or {}).items())},
        }
    return snapshot


# Small token budgets: the registry tests are about the registry, not the compute.
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
# One small step, no control: for tests about the registry's evidence, not the pruning
ONE_STEP = [*SMALL, "--ff-frac", "0.1", "--attn-frac", "0.05", "--steps", "1", "--no-control"]
# A larger budget, for tests that compare numbers
SMALL_DATA = [
    "--max-length",
    "64",
    "--batch-size",
    "8",
    "--collect-tokens",
    "3000",
    "--eval-tokens",
    "1500",
    "--no-progress",
]


def recorded(mv, tracking_uri: str | None = None):
    """``mv`` (a registry ModelVersion) with its tags as its run's anchored record holds them: what the plugin reads
    (the version itself shows ``lineage.SHOWN`` and its decision records). ``tracking_uri``: the store ``mv`` came
    from, when it is not this process's."""
    from mlflow_selprune.registry import lineage

    previous = mlflow.get_tracking_uri()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        mv._tags = lineage.recorded_tags(mv.run_id, dict(mv.tags or {}))
    finally:
        if tracking_uri:
            mlflow.set_tracking_uri(previous)
    return mv


def recorded_version(name: str, version):
    """The registered version ``name``/``version`` with its tags as its anchored record holds them (``recorded``)."""
    return recorded(MlflowClient().get_model_version(name, str(version)))


def recorded_tags(name: str, version) -> dict:
    """A version's lineage as its run's anchored record holds it."""
    return recorded_version(name, version).tags


def lineage_tags() -> tuple[str, ...]:
    """The tags every complete unlearned version carries."""
    from mlflow_selprune.registry import lineage

    return (
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
        lineage.METRIC_PREFIX + "forget_top1_drop",
    )


def assert_complete_or_absent(before: dict, name: str = TINY_NAME, aliases_unchanged: bool = True) -> list[str]:
    """Every version that was not there ``before`` (a ``registry_snapshot``) has its whole lineage and its
    masks and record artifacts; returns the new versions, oldest first."""
    after = registry_snapshot()
    new = sorted(set(after[name]["versions"]) - set(before.get(name, {"versions": {}})["versions"]), key=int)
    for version in new:
        tags = recorded_tags(name, version)
        missing = [t for t in lineage_tags() if not tags.get(t)]
        assert not missing, f"version {version} lacks {missing}"
        run_id = tags[lineage_tags()[2]]
        artifacts = {f.path for f in MlflowClient().list_artifacts(run_id, "selprune")}
        assert "selprune/masks.safetensors" in artifacts and "selprune/pruning_record.json" in artifacts
    if aliases_unchanged:
        assert after[name]["aliases"] == before[name]["aliases"]
    return new


@contextlib.contextmanager
def current_store(store: dict):
    """``store`` as this process's tracking store, its root the working directory, until the block ends. A store
    built once per process (a session fixture) is made current again this way by each module fixture that uses
    it: under xdist a worker can leave a module and come back, which sets its module fixtures up again."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(store["root"])
        mp.setenv("MLFLOW_TRACKING_URI", store["uri"])
        mlflow.set_tracking_uri(store["uri"])
        try:
            yield store
        finally:
            mlflow.set_tracking_uri(None)


def cli(*args, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mlflow_selprune", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def invoke(*args):
    """The real CLI in this process (click's runner): the console script's code path without its start-up cost."""
    from click.testing import CliRunner

    from mlflow_selprune.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 serving artifacts (``--serve-artifacts``), stopped on exit.

    The backend is sqlite in ``root`` unless ``backend_uri`` names another (PostgreSQL: see pg_cluster.py).
    ``kill()`` and ``start()`` again, on the same port and stores, are the faults a server can suffer.
    """

    def __init__(
        self,
        root: Path,
        app_name: str | None = None,
        extra_env: dict | None = None,
        backend_uri: str | None = None,
        artifacts: Path | None = None,
    ):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.app_name = app_name
        self.extra_env = extra_env or {}
        self.backend_uri = backend_uri or f"sqlite:///{root / 'server.db'}"
        self.artifacts = artifacts or root / "artifacts"
        self.process = None
        self.log = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        if self.app_name:
            command += ["--app-name", self.app_name]
        # The server's background job runner (three huey consumers) is not used here and costs CPU on 2 cores.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **self.extra_env)
        if self.log is None:
            self.log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        import urllib.request

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the server and every process it started (its workers): no shutdown, no goodbye."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def __exit__(self, *exc):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        if self.log is not None:
            self.log.close()


def post_json(url: str, payload: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def served_model(model_uri: str, store: dict):
    """``mlflow models serve`` of ``model_uri`` on a free 127.0.0.1 port: yields (invocations URL, log path)."""
    import urllib.request

    port = free_port()
    log_path = Path(store["root"]) / f"serve-{port}.log"
    env = dict(os.environ, **store["env"])
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-p",
        str(port),
        "-h",
        "127.0.0.1",
        "-w",
        "1",
    ]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=store["root"])
        try:
            deadline = time.monotonic() + 300  # a hang guard: the real model answers in ~30 s on a quiet machine
            while True:
                assert server.poll() is None, log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, (
                    "server did not answer /ping in 300 s: " + log_path.read_text()[-3000:]
                )
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/invocations", log_path
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
