"""Data: DATA specs (``specs``, cheap checks) to documents (``sources``, ``corpora``) to token batches
(``batching``, ``token_cache``). Names are imported on first use, so a spec check stays light."""
from ..config import DataOptions, SourceOptions

_LAZY = {
    "PreparedData": "batching", "make_batches": "batching", "most_frequent_tokens": "batching",
    "prepare_data": "batching", "split_documents": "batching", "DataError": "sources", "load_documents": "sources",
}

__all__ = ["DataOptions", "SourceOptions", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
