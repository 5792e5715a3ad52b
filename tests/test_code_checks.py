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


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside a function alike."""
    import ast

    package = ROOT / "mlflow_selprune"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_the_package_has_no_import_cycle():
    """Arrows run one way (registry: resolve -> loading -> evidence -> verify, ...), lazy imports included."""
    graph = _import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# A function reads on one screen: ~60 lines of body. Counted here with its docstring and the formatter's one
# argument per line, the longest (a job's plan, an evaluation run, image preparation) stay under this.
MAX_FUNCTION_LINES = 70


def test_no_function_in_the_package_runs_past_one_screen():
    import ast

    long = []
    for path in sorted((ROOT / "mlflow_selprune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert not long, "split these: " + ", ".join(long)
