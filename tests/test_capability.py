"""Selective pruning really removes a capability: a model trained here on two
sources forgets the one it is pruned for and keeps the other.

The model (``trained_model.py``) learns two lookups of the same kind and
difficulty: counting (source A) and reciting a chain of invented words
(source B). Both are equally fragile: a random pruning of the same size hurts
them alike (about +2% loss each for 3 x 5%). So the test runs both ways round,
forget A keep B and forget B keep A: only a pruning that finds the neurons
specific to the forget source can hurt the forget source far more than the
retain source in both directions.

Losses are the model's own mean cross-entropy on held-out documents of each
source (never trained on).
"""
import pytest

from mlflow_selprune import prune
from trained_model import full_batches, lm_loss, top1_accuracy, trained_model

# training the shared model takes ~20 s on two idle cores (once per session)
pytestmark = pytest.mark.slow

FF_FRAC, STEPS = 0.05, 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


@pytest.fixture(scope="module")
def data(trained):
    return {
        "A": trained.blocks(trained.forget_texts)[:32],  # statistics: 32 blocks of 64 tokens each
        "B": trained.blocks(trained.retain_texts)[:32],
        "A_eval": trained.blocks(trained.forget_eval_texts),  # held out
        "B_eval": trained.blocks(trained.retain_eval_texts),
    }


def test_the_trained_model_has_both_capabilities(trained, data):
    model = trained.load()
    # a unigram guess would get a few percent; the model learned both successor lookups
    assert top1_accuracy(model, data["A_eval"]) > 0.7
    assert top1_accuracy(model, data["B_eval"]) > 0.7
    assert lm_loss(model, data["A_eval"]) < 1.0 and lm_loss(model, data["B_eval"]) < 1.0


@pytest.mark.parametrize("forget, retain", [("A", "B"), ("B", "A")], ids=["forget-counting", "forget-words"])
def test_pruning_removes_the_forget_capability_and_keeps_the_other(trained, data, forget, retain, record_property):
    model = trained.load()
    base = {name: lm_loss(model, data[f"{name}_eval"]) for name in ("A", "B")}
    result = prune(model, full_batches(data[forget]), full_batches(data[retain]), ff_frac=FF_FRAC, steps=STEPS,
                   progress=False)
    assert result.ff_pruned == STEPS * round(FF_FRAC * 2 * 512)
    after = {name: lm_loss(model, data[f"{name}_eval"]) for name in ("A", "B")}
    increase = {name: (after[name] - base[name]) / base[name] for name in ("A", "B")}
    record_property("relative_loss_increase", increase)
    print(f"forget {forget}: loss {base} -> {after}; relative increase {increase}")
    # Observed with torch 2.13 on CPU: forget A: A +8.1%, B +1.4%; forget B: B +12.9%, A +0.7%.
    # Models trained with seeds 1 and 2 gave A +19.5% / B -0.0% and B +10.2% / A +1.9%, and
    # A +12.4% / B -0.4% and B +7.5% / A +0.9%. A random pruning of the same size: about +2% on both.
    assert increase[forget] > 0.04, f"the forget source's loss should clearly rise: {increase}"
    assert increase[forget] >= 3 * max(increase[retain], 0.0), f"{retain} was hurt nearly as much: {increase}"
    assert increase[retain] < 0.03, f"the retain source should be nearly untouched: {increase}"
