"""Data: DATA specs to documents (``sources``, ``corpora``) to token batches (``batching``)."""
from ..config import DataOptions, SourceOptions
from .batching import PreparedData, make_batches, most_frequent_tokens, prepare_data, split_documents
from .sources import DataError, load_documents

__all__ = ["DataError", "DataOptions", "PreparedData", "SourceOptions", "load_documents", "make_batches",
           "most_frequent_tokens", "prepare_data", "split_documents"]
