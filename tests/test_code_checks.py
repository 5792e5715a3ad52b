"""The checks engineers expect, in the fast lane: lint, format and types, configured in pyproject.toml.

Each runs the tool exactly as a developer would from the repository root, so a failure here is the line the
tool prints. The versions are pinned in the test extra: another formatter version may format differently.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_check_passes():
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff_format_check_passes():
    out = _run("ruff", "format", "--check", ".")
    assert out.returncode == 0, "run `ruff format .`:\n" + out.stdout[-4000:] + out.stderr[-2000:]


def test_mypy_passes_on_the_package():
    out = _run("mypy", "mlflow_selprune")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
