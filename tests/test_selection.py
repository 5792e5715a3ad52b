"""Selection: exact counts, exclusion of pruned neurons, tie-breaking, determinism."""

import copy

import pytest
import torch

from mlflow_selprune import prune, select
from model_zoo import FAMILIES


def random_scores(shape, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def no_pruned(shape) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.bool)


@pytest.mark.parametrize(
    "shape, frac, k",
    [
        ((3, 40), 0.1, 12),
        ((3, 40), 0.07, 8),  # 8.4 rounds down
        ((3, 40), 0.08, 10),  # 9.6 rounds up
        ((4, 25), 0.29, 29),  # 0.29 * 100 = 28.999999999999996: rounding, not truncation
        ((2, 64), 0.02, 3),  # the paper default on a tiny model: 2.56 -> 3
        ((2, 64), 0.001, 0),  # fewer than half a neuron: nothing
    ],
)
def test_global_selection_takes_exactly_k_best(shape, frac, k):
    scores = random_scores(shape)
    chosen = select(scores, no_pruned(shape), frac)
    assert chosen.dtype == torch.bool and chosen.shape == shape
    assert int(chosen.sum()) == k == round(frac * shape[0] * shape[1])
    if k:
        assert scores[chosen].min() > scores[~chosen].max()


@pytest.mark.parametrize("shape, frac, k", [((3, 40), 0.1, 4), ((3, 40), 0.07, 3), ((4, 25), 0.29, 7)])
def test_per_layer_selection_takes_k_in_each_layer(shape, frac, k):
    # make layer 0 dominate, so a global pick would differ from a per-layer one
    scores = random_scores(shape, seed=1)
    scores[0] += 10
    chosen = select(scores, no_pruned(shape), frac, selection="per-layer")
    assert chosen.sum(1).tolist() == [k] * shape[0]
    for layer in range(shape[0]):
        assert scores[layer][chosen[layer]].min() > scores[layer][~chosen[layer]].max()
    global_chosen = select(scores, no_pruned(shape), frac)
    k_global = round(frac * shape[0] * shape[1])
    assert int(global_chosen[0].sum()) == min(k_global, shape[1]) and not torch.equal(chosen, global_chosen)


@pytest.mark.parametrize("selection", ["global", "per-layer"])
def test_already_pruned_are_never_chosen_again(selection):
    shape = (2, 50)
    scores = random_scores(shape, seed=2)
    pruned = no_pruned(shape)
    frac = 0.1  # 0.1 * 100 = 10 globally, 0.1 * 50 = 5 in each of the 2 layers
    history = []
    for _ in range(10):
        chosen = select(scores, pruned, frac, selection=selection)
        assert not (chosen & pruned).any()
        history.append(int(chosen.sum()))
        pruned = pruned | chosen
    assert history == [10] * 10
    assert pruned.all()
    assert select(scores, pruned, frac, selection=selection).sum() == 0


def test_the_best_scores_are_skipped_when_pruned():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [5.0, 4.0, 3.0, 2.0]], dtype=torch.float64)
    pruned = torch.tensor([[True, False, True, False], [False, False, False, False]])
    chosen = select(scores, pruned, 0.25)  # k = 2
    assert chosen.nonzero().tolist() == [[0, 1], [0, 3]]
    assert pruned.sum() == 2, "select must not modify the pruned mask"


def test_fewer_available_than_k_takes_the_rest():
    scores = random_scores((1, 10))
    pruned = torch.ones(1, 10, dtype=torch.bool)
    pruned[0, [2, 7]] = False
    chosen = select(scores, pruned, 0.5)
    assert chosen.nonzero().tolist() == [[0, 2], [0, 7]]


def test_ties_go_to_the_lower_flat_index():
    scores = torch.zeros(3, 4, dtype=torch.float64)
    assert select(scores, no_pruned((3, 4)), 5 / 12).view(-1).nonzero().view(-1).tolist() == [0, 1, 2, 3, 4]
    # equal scores straddling the cut: the lower flat index wins, in any layer
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.5], [0.5, 0.9, 0.5, 0.0]], dtype=torch.float64)
    chosen = select(scores, no_pruned((2, 4)), 3 / 8)  # k = 3: 0.9 then two of the four 0.5s
    assert chosen.view(-1).nonzero().view(-1).tolist() == [1, 3, 5]
    # ties with already-pruned neurons in between
    pruned = torch.tensor([[False, True, False, False], [False, False, False, False]])
    chosen = select(scores, pruned, 3 / 8)
    assert chosen.view(-1).nonzero().view(-1).tolist() == [3, 4, 5]
    per_layer = select(scores, no_pruned((2, 4)), 1 / 4, selection="per-layer")
    assert per_layer.nonzero().tolist() == [[0, 1], [1, 1]]
    per_layer = select(scores, no_pruned((2, 4)), 2 / 4, selection="per-layer")
    assert per_layer.nonzero().tolist() == [[0, 1], [0, 3], [1, 0], [1, 1]]


@pytest.mark.parametrize("selection", ["global", "per-layer"])
def test_ties_in_large_layers_follow_the_reference_order(selection):
    """Many equal scores (a few discrete levels) and scattered pruned neurons: the result must be
    the first k of (score descending, flat index ascending) among the available ones."""
    g = torch.Generator().manual_seed(5)
    shape = (4, 250)
    scores = torch.randint(0, 4, shape, generator=g).double()
    pruned = torch.rand(shape, generator=g) < 0.2
    frac = 0.1
    chosen = select(scores, pruned, frac, selection=selection)
    expected = torch.zeros(shape, dtype=torch.bool)
    groups = (
        [list(range(shape[0] * shape[1]))]
        if selection == "global"
        else [list(range(layer * shape[1], (layer + 1) * shape[1])) for layer in range(shape[0])]
    )
    flat_scores, flat_pruned = scores.view(-1).tolist(), pruned.view(-1).tolist()
    for group in groups:
        k = round(frac * len(group))
        available = [i for i in group if not flat_pruned[i]]
        for i in sorted(available, key=lambda i: (-flat_scores[i], i))[:k]:
            expected.view(-1)[i] = True
    assert torch.equal(chosen, expected)


def test_selection_is_deterministic_and_validates():
    scores = random_scores((3, 33), seed=4)
    masks = [select(scores.clone(), no_pruned((3, 33)), 0.1) for _ in range(3)]
    assert all(torch.equal(m, masks[0]) for m in masks)
    with pytest.raises(ValueError, match="unknown --selection"):
        select(scores, no_pruned((3, 33)), 0.1, selection="per-head")
    scores[1, 2] = float("nan")
    with pytest.raises(FloatingPointError):
        select(scores, no_pruned((3, 33)), 0.1)


# --- determinism of the whole loop ------------------------------------------------------------------


def tiny_neox():
    config, cls = FAMILIES["gpt_neox"]
    torch.manual_seed(0)
    return cls(copy.deepcopy(config)).eval()


def token_rows(seed, low, high, n_rows=16, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (n_rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # some right padding
    mask[6, :3] = 0  # and some left padding
    return ids, mask


def as_batches(rows, batch_size):
    ids, mask = rows
    return [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(batch_size), mask.split(batch_size))]


def run(batch_size, selection="global", scoring="abs"):
    forget, retain = token_rows(1, 4, 70), token_rows(2, 60, 128)
    model = tiny_neox()
    result = prune(
        model,
        as_batches(forget, batch_size),
        as_batches(retain, batch_size),
        ff_frac=0.05,
        attn_frac=0.05,
        steps=3,
        selection=selection,
        scoring=scoring,
        progress=False,
    )
    return result, model


@pytest.mark.parametrize("selection", ["global", "per-layer"])
def test_same_masks_whatever_the_batch_size(selection):
    small, model_small = run(2, selection)
    large, model_large = run(8, selection)
    assert small.ff_pruned == 3 * round(0.05 * 128) == 18
    assert small.attn_pruned == (3 * round(0.05 * 64) if selection == "global" else 3 * 2 * round(0.05 * 32))
    assert torch.equal(small.ff_mask, large.ff_mask)
    assert torch.equal(small.attn_mask, large.attn_mask)
    torch.testing.assert_close(small.ff_scores, large.ff_scores, rtol=1e-5, atol=1e-8)
    for (name, a), b in zip(model_small.state_dict().items(), model_large.state_dict().values()):
        assert torch.equal(a, b), name


def test_same_masks_across_runs_and_seeded_random():
    first, _ = run(4)
    again, _ = run(4)
    assert torch.equal(first.ff_mask, again.ff_mask) and torch.equal(first.attn_mask, again.attn_mask)
    assert torch.equal(first.ff_scores, again.ff_scores)
    rand_a, _ = run(4, scoring="random")
    rand_b, _ = run(2, scoring="random")
    assert torch.equal(rand_a.ff_mask, rand_b.ff_mask)
    assert not torch.equal(rand_a.ff_mask, first.ff_mask)
