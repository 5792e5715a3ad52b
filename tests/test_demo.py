"""The demo is decided by seeds and step counts, never by the clock or the machine's load."""
from __future__ import annotations

import dataclasses

import pytest

from mlflow_selprune.demo import RECIPE, DemoRecipe, train_demo_model
from mlflow_selprune.registry.lineage import weights_sha256

# builds the standard-library corpora and trains three tiny models: tens of seconds
pytestmark = pytest.mark.slow

SMALL = dataclasses.replace(RECIPE, vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                            block_len=32, batch_size=4, train_code_chars=40_000,
                            train_prose_chars=40_000)


def test_same_seed_same_weights_digest():
    first, tokenizer = train_demo_model(SMALL, seed=0, steps=3, progress=False)
    second, _ = train_demo_model(SMALL, seed=0, steps=3, progress=False)
    assert weights_sha256(first) == weights_sha256(second)
    other, _ = train_demo_model(SMALL, seed=1, steps=3, progress=False)
    assert weights_sha256(other) != weights_sha256(first)


def test_the_recipe_trains_by_steps():
    assert isinstance(RECIPE.train_steps, int) and RECIPE.train_steps > 0
    assert "seconds" not in " ".join(f.name for f in dataclasses.fields(DemoRecipe))


def test_the_callers_thread_count_does_not_change_the_weights():
    """The demo trains with its own fixed thread count and puts the caller's back afterwards."""
    import torch

    previous = torch.get_num_threads()
    digests = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model, _ = train_demo_model(SMALL, seed=0, steps=2, progress=False)
            assert torch.get_num_threads() == threads
            digests.append(weights_sha256(model))
    finally:
        torch.set_num_threads(previous)
    assert digests[0] == digests[1]
