"""Shared fixtures: offline environment, a tiny tokenizer, tiny models from configs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Tiny models gain nothing from threads, and the tests start servers and CLI processes
# beside this one: one thread each keeps 2 cores from being oversubscribed (7-10x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The on-disk token cache of this test session: fresh, never the user's.
import tempfile  # noqa: E402

os.environ["SELPRUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="selprune-cache-")

import inspect  # noqa: E402
import json  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mlflow_selprune.training import train_bpe_tokenizer  # noqa: E402

torch.set_num_threads(1)


def tokenizer_training_texts():
    """A mix of code and prose from modules every Python ships."""
    texts = []
    for module in (json, textwrap, inspect):
        source = inspect.getsource(module)
        texts.append(source)
        texts.extend(block for block in source.split('"""')[1::2])
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) with EOS and PAD set, trained offline."""
    return train_bpe_tokenizer(tokenizer_training_texts(), vocab_size=512)
