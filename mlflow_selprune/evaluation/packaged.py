"""The ``evaluate`` metric modules shipped in ``metrics/``, loaded from disk (never the hub), once each."""

from __future__ import annotations

import functools
from pathlib import Path

METRICS_DIR = Path(__file__).parent / "metrics"


@functools.lru_cache(maxsize=None)
def packaged_metric(name: str):
    """``evaluate.load`` of the module ``metrics/<name>`` (``next_token``, ``masked_token``, ``image_classes``)."""
    import evaluate  # slow to import; only needed once metrics are computed

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)
