"""The CLI in separate processes without paying its imports each time: forked from a preloaded fork server.

Registry tests start many concurrent CLI processes (eight jobs at once, jobs
killed mid-phase). Each is a real process with its own PID, memory and
connections, which can be SIGKILLed; but a fresh interpreter spends ~8 s of a
2-core machine importing torch, transformers and mlflow. A
``multiprocessing`` fork server imports them once, and every process is
forked from it. Tests of start-up itself (``--help``, the console script,
``mlflow run``) use fresh interpreters instead.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

PRELOAD = [
    "mlflow_selprune.cli",
    "mlflow_selprune.unlearn",
    "mlflow_selprune.registry.tracking",
    "mlflow_selprune.registry.gate",
    "mlflow_selprune.registry.loading",
    "mlflow_selprune.engine",
    "mlflow_selprune.data.batching",
    "mlflow_selprune.evaluation.model_metrics",
    "mlflow_selprune.report",
    "mlflow_selprune.registry.flavor",
    "transformers",
    "datasets",
    "evaluate",
]

_context = None


def _fork_server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(commands: list[list[str]], env: dict, cwd: str, log_path: str) -> None:
    """Run ``commands`` (CLI argument lists) one after the other, like ``a && b``; exit with the first failure's
    code. Output goes to ``log_path``, line by line, so a test can follow it."""
    os.chdir(cwd)
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))
    from mlflow_selprune.cli import main

    for args in commands:
        args = [_expand(a) for a in args]
        try:
            main.main(args=args, prog_name="mlflow-selprune", standalone_mode=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if code != 0:
                sys.exit(code)
        _remember_registered(log_path)
    sys.exit(0)


def _remember_registered(log_path: str) -> None:
    """``{registered}`` in a later command is the model URI the prune before it printed."""
    for line in Path(log_path).read_text().splitlines():
        if line.startswith("registered: "):
            os.environ["SELPRUNE_TEST_REGISTERED"] = line.split()[1]


def _expand(arg: str) -> str:
    return arg.replace("{registered}", os.environ.get("SELPRUNE_TEST_REGISTERED", "{registered}"))


class CliProcess:
    """One forked CLI process: ``lines()`` follows its output, ``kill()`` SIGKILLs it, ``wait()`` gives its code."""

    def __init__(self, commands: list[list[str]], env: dict, cwd: Path, log_path: Path):
        self.log_path = Path(log_path)
        self.log_path.write_text("")
        self.process = _fork_server().Process(target=_child, args=(commands, env, str(cwd), str(self.log_path)))
        self.process.start()
        self.pid = self.process.pid

    def lines(self, timeout: float = 600):
        """Each output line as it is written, until the process ends (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        with open(self.log_path) as log:
            pending = ""
            while time.monotonic() < deadline:
                chunk = log.read()
                if chunk:
                    pending += chunk
                    *complete, pending = pending.split("\n")
                    yield from (line + "\n" for line in complete)
                elif not self.process.is_alive():
                    if pending:
                        yield pending
                    return
                else:
                    time.sleep(0.05)

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float = 600) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"CLI process {self.pid} still running after {timeout} s")
        return self.process.exitcode

    @property
    def output(self) -> str:
        return self.log_path.read_text()


def start(*commands: list[str], env: dict | None = None, cwd: Path, log_path: Path) -> CliProcess:
    """``start(["prune", ...], ["gate", "--model-uri", "{registered}", ...], env=..., cwd=..., log_path=...)``"""
    return CliProcess(list(commands), dict(env or {}), cwd, log_path)
