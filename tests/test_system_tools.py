"""A contributor without a system tool gets its tests skipped with one line naming the install command; CI fails."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _browser_tests_without_chromium(ci: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PATH=str(Path(sys.executable).parent), CI=ci)  # the venv's tools only: no chromium on PATH
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "tests/test_browser.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow(seconds=20)
def test_a_missing_tool_is_a_skip_with_its_install_line_and_a_failure_under_ci():
    out = _browser_tests_without_chromium(ci="")
    assert out.returncode == 0, out.stdout[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("skipped, not failed:")]
    assert lines == ["skipped, not failed: tests that need Chromium; install it with `apt-get install chromium`"]
    out = _browser_tests_without_chromium(ci="true")
    assert out.returncode == 1, out.stdout[-2000:]
    assert "CI needs it" in out.stdout
