"""Shared fixtures: offline environment, a tiny tokenizer, tiny models from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Tiny models gain nothing from threads, and the tests start servers and CLI processes
# beside this one: one thread each keeps 2 cores from being oversubscribed (7-10x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A process that does use two threads (the self-trained demos fix their count so their results do not depend
# on the machine) lets its idle OpenMP threads sleep instead of spin while the other worker holds a core: the
# same arithmetic, without the spinning that made it 2-3x slower here. Nothing computed depends on it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The on-disk token cache of this test session: fresh, never the user's.
import tempfile  # noqa: E402

os.environ["SELPRUNE_CACHE_DIR"] = _CACHE_DIR = tempfile.mkdtemp(prefix="selprune-cache-")


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


import inspect  # noqa: E402
import json  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mlflow_selprune.training import train_bpe_tokenizer  # noqa: E402

torch.set_num_threads(1)


def tokenizer_training_texts():
    """A mix of code and prose from modules every Python ships."""
    texts = []
    for module in (json, textwrap, inspect):
        source = inspect.getsource(module)
        texts.append(source)
        texts.extend(block for block in source.split('"""')[1::2])
    return texts


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_tokenizer):
    """A fresh sqlite MLflow store per test module: tiny-lm v1 (alias base) and forget/retain files.

    Modules that need more in it define their own ``store``."""
    from mlflow_helpers import sqlite_store

    with sqlite_store(tmp_path_factory.mktemp("store"), tiny_tokenizer) as s:
        yield s


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster for this test process (pg_cluster.py); stopped by PID at the end.

    Under CI a cluster that cannot start fails the test; elsewhere the test skips with the reason."""
    from pg_cluster import start_or_report

    cluster = start_or_report()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) with EOS and PAD set, trained offline."""
    return train_bpe_tokenizer(tokenizer_training_texts(), vocab_size=512)


# ----------------------------------------------------------------------------- two lanes, one command
# Tests not marked slow run first (the fast lane: a failure there shows within minutes); the slow
# ones after. With pytest-xdist the order is kept per worker. The summary prints both durations.
import time  # noqa: E402

_LANES = {"start": None, "fast_end": None, "fast": 0, "slow": 0}


# Tests that share a module fixture's costly setup (a tracking server, a pruned chain) run on one worker, so
# the setup is paid once, not once per worker. xdist's own grouping marks nodeids, which pytest 9 no longer
# lets it do; so the scheduler below groups by node id: module, and the backend a test is parametrized with.
SHARED_SETUP_MODULES = {
    "tests/test_reliability.py": ("sqlite", "postgresql"),
    "tests/test_server_faults.py": (),
    "tests/test_tamper.py": (),
    "tests/test_real_model.py": (),  # one real-model demo, read by several tests
}


def shared_setup_group(nodeid: str) -> str | None:
    path = nodeid.split("::")[0]
    if path not in SHARED_SETUP_MODULES:
        return None
    backends = SHARED_SETUP_MODULES[path]
    if not backends:
        return path
    return next((f"{path}[{b}]" for b in backends if f"[{b}" in nodeid), None)


def pytest_xdist_make_scheduler(config, log):
    """xdist's load-scope scheduler, in collection order, with one scope per shared setup and one per other test."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedSetupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return shared_setup_group(nodeid) or nodeid

    config.option.loadscopereorder = False  # keep the fast lane first and the long tests early
    return SharedSetupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The fast lane first; in the slow lane, the longest tests first (``@pytest.mark.slow(seconds=N)``),
    so that two workers end together instead of one waiting on a long test started last."""

    def order(item):
        slow = item.get_closest_marker("slow")
        return (slow is not None, -(slow.kwargs.get("seconds", 0) if slow else 0))

    items.sort(key=order)


def pytest_sessionstart(session):
    _LANES["start"] = time.monotonic()


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.skipped):
        return
    slow = "slow" in report.keywords
    _LANES["slow" if slow else "fast"] += 1
    if not slow:
        _LANES["fast_end"] = time.monotonic()


def pytest_terminal_summary(terminalreporter):
    from system_tools import missing_tool_lines

    skipped = terminalreporter.stats.get("skipped", [])
    for line in missing_tool_lines(getattr(r, "longrepr", "") for r in skipped):
        terminalreporter.write_line(line)
    if _LANES["start"] is None:
        return
    now = time.monotonic()
    fast = f"{_LANES['fast_end'] - _LANES['start']:.0f} s" if _LANES["fast_end"] else "-"
    terminalreporter.write_line(
        f"lanes: fast (not slow) {_LANES['fast']} tests done after {fast}; "
        f"slow {_LANES['slow']} tests; whole run {now - _LANES['start']:.0f} s"
    )
