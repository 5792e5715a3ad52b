"""System tools some tests need (PostgreSQL, Chromium, bubblewrap), from Debian's packages.

A contributor without one gets those tests skipped, never failed, and one line per missing tool at the end
of the run with the command that installs it (``conftest.pytest_terminal_summary``). CI (``CI=true``) needs
every one of them: there a missing tool fails the test, since ``.ci/run`` installs them all.
"""

from __future__ import annotations

import os

import pytest

MISSING = "missing system tool"
INSTALL = {
    "PostgreSQL": "apt-get install postgresql",
    "Chromium": "apt-get install chromium",
    "bubblewrap": "apt-get install bubblewrap",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(tool: str, why: str) -> None:
    """Skip (fail under CI) the calling test: ``tool`` is not usable here, for ``why``."""
    reason = f"{MISSING}: {tool} ({why}); install it with `{INSTALL[tool]}`"
    if in_ci():
        pytest.fail(reason + " (CI needs it: .ci/run installs it)", pytrace=False)
    pytest.skip(reason)


def missing_tool_lines(skip_reasons) -> list[str]:
    """One line per missing tool, from the skip reasons of a run, in a stable order."""
    lines = {}
    for reason in skip_reasons:
        text = str(reason)
        start = text.find(MISSING)
        if start < 0:
            continue
        text = text[start:]
        tool = text.removeprefix(MISSING + ": ").split(" ", 1)[0]
        lines.setdefault(tool, f"skipped, not failed: tests that need {tool}; install it with `{INSTALL[tool]}`")
    return [lines[tool] for tool in sorted(lines)]
