"""Checks on a DATA spec that need neither a model nor a dataset library: answered in milliseconds.

Kept free of heavy imports (no torch, no ``datasets``), so the CLI can refuse a
missing file or an unknown built-in corpus before it loads anything.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import BadInputError

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("stdlib-code", "stdlib-prose")
# Files a directory contributes by default (one document each); pass ``glob`` for others.
TEXT_EXTENSIONS = frozenset(
    ".txt .md .rst .tex .py .pyi .c .h .cc .cpp .hpp .java .js .ts .go .rs .rb .php .cs .kt "
    ".scala .swift .sh .sql .r .jl .lua .pl .html .css .xml .yaml .yml .toml .ini .cfg".split()
)
_STRUCTURED_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_MLFLOW_URI = re.compile(r"^(runs|mlflow-artifacts):/", re.IGNORECASE)


class SpecError(BadInputError):
    """A DATA spec that names nothing usable (``data.DataError`` is the same kind of error, found later)."""


def looks_like_path(spec: str) -> bool:
    """True for specs that cannot be a hub name ``[owner/]name``: ./x, /x, ~/x, a/b/c, x.txt."""
    suffix = Path(spec).suffix.lower()
    return (
        spec.startswith((".", "~"))
        or suffix in TEXT_EXTENSIONS
        or suffix in _STRUCTURED_BUILDERS
        or not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", spec)
    )


def check_spec(spec: str, side: str) -> None:
    """The checks on a DATA spec that need no model: a path that does not exist, an unknown built-in corpus."""
    flag = f"--{side}"
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"{flag} is empty; give a file, a directory, builtin:stdlib-code or a dataset name")
    if spec.startswith(BUILTIN_PREFIX):
        if spec[len(BUILTIN_PREFIX) :] not in BUILTIN_CORPORA:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)
            raise SpecError(f"{flag}: unknown built-in corpus {spec!r}; known: {known}")
        return
    if _MLFLOW_URI.match(spec):
        return
    if not Path(spec).expanduser().exists() and looks_like_path(spec):
        raise SpecError(f"{flag}: no such file or directory: {spec!r}")
