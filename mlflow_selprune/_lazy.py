"""Names imported on first use (PEP 562), so importing a package stays cheap."""

from __future__ import annotations

import importlib


def lazy_getattr(package: str, table: dict[str, str]):
    """A module ``__getattr__`` that imports ``table[name]`` (a submodule of ``package``) when ``name`` is asked for."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{table[name]}", package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
