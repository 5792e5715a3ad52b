"""Token ids kept on disk between runs, so a rerun on the same data does not tokenize again.

One safetensors file per (tokenizer, dataset): the ids of every document
tokenized for it, keyed by the documents' sha256. It lives in the user cache
directory (``$SELPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlflow-selprune``,
else ``~/.cache/mlflow-selprune``), independent of any MLflow store. The
oldest files go once the directory passes ``$SELPRUNE_CACHE_MAX_BYTES``
(default 1 GiB). ``--no-token-cache`` (or ``SELPRUNE_NO_TOKEN_CACHE=1``)
turns it off. A damaged file is ignored and rewritten, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 30


def user_cache() -> Path:
    """``$XDG_CACHE_HOME/mlflow-selprune``, else ``~/.cache/mlflow-selprune``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlflow-selprune"


def cache_dir() -> Path:
    if os.environ.get("SELPRUNE_CACHE_DIR"):
        return Path(os.environ["SELPRUNE_CACHE_DIR"])
    return user_cache()


def enabled(option: bool = True) -> bool:
    return option and os.environ.get("SELPRUNE_NO_TOKEN_CACHE", "") in ("", "0")


def _path(tokenizer_key: tuple, keys: list[bytes]) -> Path:
    digest = hashlib.sha256(repr(tokenizer_key).encode())
    for key in keys:
        digest.update(key)
    return cache_dir() / "tokens" / f"{digest.hexdigest()[:40]}.safetensors"


def load(tokenizer_key: tuple, keys: list[bytes]) -> dict[bytes, torch.Tensor]:
    """{document sha256: ids} stored for this tokenizer and dataset (empty when none or unreadable)."""
    from safetensors.torch import load_file

    path = _path(tokenizer_key, keys)
    if not path.is_file():
        return {}
    try:
        stored = load_file(str(path))
        offsets = stored["offsets"].tolist()
        doc_keys = [bytes(row.tolist()) for row in stored["keys"]]
        ids = stored["ids"].long()
        os.utime(path)  # recently used: evicted last
        return {k: ids[offsets[i] : offsets[i + 1]] for i, k in enumerate(doc_keys)}
    except Exception:  # noqa: BLE001 - a cache never decides a result; a bad file is rebuilt
        logger.debug("ignoring unreadable token cache %s", path, exc_info=True)
        return {}


def save(tokenizer_key: tuple, keys: list[bytes], entries: dict[bytes, torch.Tensor]) -> None:
    """Store ``entries`` for this tokenizer and dataset, then trim the cache to its size cap."""
    from safetensors.torch import save_file

    if not entries:
        return
    path = _path(tokenizer_key, keys)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc_keys = list(entries)
        lengths = [len(entries[k]) for k in doc_keys]
        offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
        tensors = {
            "ids": torch.cat([entries[k].to(torch.int64) for k in doc_keys]),
            "offsets": offsets,
            "keys": torch.tensor([list(k) for k in doc_keys], dtype=torch.uint8),
        }
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)  # readers never see a half-written file
        _trim(int(os.environ.get("SELPRUNE_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES)))
    except OSError:
        logger.debug("could not write the token cache %s", path, exc_info=True)


def _trim(max_bytes: int) -> None:
    files = sorted((cache_dir() / "tokens").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    while files and total > max_bytes:
        oldest = files.pop(0)
        total -= oldest.stat().st_size
        oldest.unlink(missing_ok=True)
