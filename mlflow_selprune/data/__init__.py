"""Data: DATA specs (``specs``, cheap checks) to documents (``sources``, ``corpora``) to token batches
(``batching``, ``token_cache``). Names are imported on first use, so a spec check stays light."""

from .._lazy import lazy_getattr
from ..config import DataOptions, SourceOptions

_LAZY = {
    "PreparedData": "batching",
    "make_batches": "batching",
    "most_frequent_tokens": "batching",
    "prepare_data": "batching",
    "split_documents": "batching",
    "DataError": "sources",
    "load_documents": "sources",
}

__all__ = ["DataOptions", "SourceOptions", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
