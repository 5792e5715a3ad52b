"""Activation statistics and scoring against a direct float64 computation.

The reference captures the projections' inputs with its own forward pre-hooks
on an ordinary forward pass of the full model, keeps only the non-padding
tokens, and computes every sum and importance in float64.
"""

import copy
import math

import pytest
import torch

from mlflow_selprune import collect_statistics, find_architecture, importance, prune, score
from mlflow_selprune.engine.scoring import DEFAULT_EPS
from mlflow_selprune.engine.statistics import SUM_NAMES
from model_zoo import FAMILIES

IMPORTANCES = ("abs", "freq", "rms", "std", "sqrt", "mean")


def build(name: str, seed: int = 0):
    config, cls = FAMILIES[name]
    torch.manual_seed(seed)
    model = cls(copy.deepcopy(config)).eval()
    with torch.no_grad():  # non-zero biases, so means and signs are not centred by construction
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def make_batches(seed: int, low: int = 4, high: int = 128) -> list[dict]:
    """Three batches: right padding, left padding, and no attention mask at all."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(low, high, (3, 10), generator=g) for _ in range(3)]
    right = torch.ones(3, 10, dtype=torch.long)
    right[0, 6:] = 0
    right[2, 9:] = 0
    left = torch.ones(3, 10, dtype=torch.long)
    left[1, :4] = 0
    left[2, :1] = 0
    return [
        {"input_ids": ids[0], "attention_mask": right},
        {"input_ids": ids[1], "attention_mask": left},
        {"input_ids": ids[2]},
    ]


def reference_activations(model, batches) -> dict[str, list[torch.Tensor]]:
    """kind -> per layer, float64 [n_real_tokens, n_neurons] inputs of the output projections."""
    arch = find_architecture(model)
    captured = {kind: [[] for _ in range(arch.n_layers)] for kind in ("ff", "attn")}
    current = {}
    handles = []
    for kind in ("ff", "attn"):
        for p in arch.projections(kind):

            def hook(module, args, kind=kind, layer=p.layer):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                captured[kind][layer].append(x[current["keep"]])

            handles.append(p.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                current["keep"] = (torch.ones_like(batch["input_ids"]) if mask is None else mask).reshape(-1).bool()
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {kind: [torch.cat(chunks) for chunks in layers] for kind, layers in captured.items()}


def reference_sums(acts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "sum": torch.stack([a.sum(0) for a in acts]),
        "sum_sq": torch.stack([(a * a).sum(0) for a in acts]),
        "sum_abs": torch.stack([a.abs().sum(0) for a in acts]),
        "sum_sqrt": torch.stack([a.abs().sqrt().sum(0) for a in acts]),
        "count_pos": torch.stack([(a > 0).double().sum(0) for a in acts]),
    }


def reference_importance(acts: list[torch.Tensor], name: str) -> torch.Tensor:
    stacked = {
        "abs": lambda a: a.abs().mean(0),
        "freq": lambda a: (a > 0).double().mean(0),
        "rms": lambda a: a.pow(2).mean(0).sqrt(),
        "std": lambda a: a.std(0, correction=0),
        "sqrt": lambda a: a.abs().sqrt().mean(0),
        "mean": lambda a: a.mean(0),
    }[name]
    return torch.stack([stacked(a) for a in acts])


def n_real_tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)


def assert_close(actual, expected, rtol=2e-5, atol=1e-7):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture(scope="module", params=["gpt_neox", "gpt2", "opt"])
def setup(request):
    model = build(request.param)
    forget, retain = make_batches(1, 4, 70), make_batches(2, 60, 128)
    return {
        "family": request.param,
        "model": model,
        "forget": forget,
        "retain": retain,
        "stats_forget": collect_statistics(model, forget, sums="all", progress=False),
        "stats_retain": collect_statistics(model, retain, sums="all", progress=False),
        "acts_forget": reference_activations(model, forget),
        "acts_retain": reference_activations(model, retain),
    }


@pytest.mark.parametrize("kind", ["ff", "attn"])
def test_every_sum_matches_direct_float64_over_real_tokens(setup, kind):
    stats = setup["stats_forget"][kind]
    assert stats.n_tokens == n_real_tokens(setup["forget"]) == 3 * 30 - 4 - 1 - 4 - 1
    assert setup["acts_forget"][kind][0].shape[0] == stats.n_tokens
    assert set(stats.sums) == set(SUM_NAMES)
    expected = reference_sums(setup["acts_forget"][kind])
    arch = find_architecture(setup["model"])
    for name in SUM_NAMES:
        value = stats.sums[name]
        assert value.dtype == torch.float64 and tuple(value.shape) == arch.shape(kind), name
        if name == "count_pos":
            assert torch.equal(value, expected[name]), name
        else:
            assert_close(value, expected[name])


@pytest.mark.parametrize("kind", ["ff", "attn"])
def test_padding_tokens_are_excluded(setup, kind):
    """Counting the padded positions too would give visibly different sums."""
    model, batches = setup["model"], setup["forget"]
    unmasked = [{"input_ids": b["input_ids"]} for b in batches]
    with_padding = collect_statistics(model, unmasked, sums="all", progress=False)[kind]
    stats = setup["stats_forget"][kind]
    assert with_padding.n_tokens == 90 != stats.n_tokens
    assert not torch.allclose(with_padding.sums["sum_abs"], stats.sums["sum_abs"], rtol=1e-3)


@pytest.mark.parametrize("kind", ["ff", "attn"])
@pytest.mark.parametrize("name", IMPORTANCES)
def test_importance_matches_direct_computation(setup, kind, name):
    stats = setup["stats_forget"][kind]
    expected = reference_importance(setup["acts_forget"][kind], name)
    value = importance(stats, name)
    assert value.dtype == torch.float64
    assert_close(value, expected)
    if name == "rms":  # the true root mean square, not a mean of something else
        a = setup["acts_forget"][kind][0][:, 3]
        assert math.isclose(float(value[0, 3]), math.sqrt(float((a * a).sum()) / a.numel()), rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["ff", "attn"])
@pytest.mark.parametrize("name", ["abs", "freq", "rms", "std", "sqrt"])
def test_score_is_forget_over_retain_plus_eps(setup, kind, name):
    eps = DEFAULT_EPS[kind]
    expected = reference_importance(setup["acts_forget"][kind], name) / (
        reference_importance(setup["acts_retain"][kind], name) + eps
    )
    value = score(setup["stats_forget"][kind], setup["stats_retain"][kind], name, eps=eps)
    # std cancels in float32 where std << |mean| (see the importance test): looser there
    assert_close(value, expected, rtol=2e-3 if name == "std" else 1e-4, atol=1e-6)


def test_score_default_eps_is_the_feed_forward_one(setup):
    f, r = setup["stats_forget"]["ff"], setup["stats_retain"]["ff"]
    assert torch.equal(score(f, r, "abs"), importance(f, "abs") / (importance(r, "abs") + 1e-3))


def test_prune_scores_with_the_default_eps_per_kind(setup):
    """The loop's scores (before any pruning) use 1e-3 for FF and 1e-4 for attention."""
    model = copy.deepcopy(setup["model"])
    result = prune(model, setup["forget"], setup["retain"], ff_frac=0.05, attn_frac=0.05, steps=1, progress=False)
    for kind, scores in (("ff", result.ff_scores), ("attn", result.attn_scores)):
        expected = reference_importance(setup["acts_forget"][kind], "abs") / (
            reference_importance(setup["acts_retain"][kind], "abs") + DEFAULT_EPS[kind]
        )
        assert_close(scores, expected, rtol=1e-4, atol=1e-6)
        other_eps = DEFAULT_EPS["ff" if kind == "attn" else "attn"]
        wrong = reference_importance(setup["acts_forget"][kind], "abs") / (
            reference_importance(setup["acts_retain"][kind], "abs") + other_eps
        )
        assert not torch.allclose(scores, wrong, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["ff", "attn"])
def test_mean_scoring_is_absolute_difference_of_means(setup, kind):
    expected = (
        reference_importance(setup["acts_forget"][kind], "mean")
        - reference_importance(setup["acts_retain"][kind], "mean")
    ).abs()
    value = score(setup["stats_forget"][kind], setup["stats_retain"][kind], "mean", eps=DEFAULT_EPS[kind])
    assert_close(value, expected, rtol=1e-4, atol=1e-6)
    assert (value >= 0).all()


def test_random_scoring_is_seeded(setup):
    f, r = setup["stats_forget"]["ff"], setup["stats_retain"]["ff"]
    a = score(f, r, "random", seed=7)
    b = score(f, r, "random", seed=7)
    c = score(f, r, "random", seed=8)
    assert a.shape == f.sums["sum_abs"].shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert ((a >= 0) & (a < 1)).all() and a.unique().numel() == a.numel()


def test_unknown_scoring_is_refused_and_rand_is_random(setup):
    with pytest.raises(ValueError, match="unknown scoring"):
        score(None, None, "l2")
    f, r = setup["stats_forget"]["ff"], setup["stats_retain"]["ff"]
    assert torch.equal(score(f, r, "rand", seed=3), score(f, r, "random", seed=3))  # the reference library's name


@pytest.mark.parametrize("kind", ["ff", "attn"])
def test_statistics_merge_by_addition(setup, kind):
    model, batches = setup["model"], setup["forget"] + setup["retain"]
    part_a = collect_statistics(model, batches[:2], sums="all", progress=False)
    part_b = collect_statistics(model, batches[2:], sums="all", progress=False)
    whole = collect_statistics(model, batches, sums="all", progress=False)
    merged = part_a + part_b
    assert merged[kind].n_tokens == whole[kind].n_tokens == n_real_tokens(batches)
    for name in SUM_NAMES:
        torch.testing.assert_close(merged[kind].sums[name], whole[kind].sums[name], rtol=1e-9, atol=1e-12)
    assert part_a[kind].n_tokens + part_b[kind].n_tokens == whole[kind].n_tokens


def test_merging_different_sums_is_refused(setup):
    model, batches = setup["model"], setup["forget"]
    with pytest.raises(ValueError, match="cannot merge"):
        collect_statistics(model, batches, progress=False) + collect_statistics(
            model, batches, sums="all", progress=False
        )


def test_default_collects_only_sum_abs(setup):
    stats = collect_statistics(setup["model"], setup["forget"], progress=False)
    for kind in ("ff", "attn"):
        assert set(stats[kind].sums) == {"sum_abs"}
        assert stats[kind].n_tokens == n_real_tokens(setup["forget"])
        assert_close(stats[kind].sums["sum_abs"], reference_sums(setup["acts_forget"][kind])["sum_abs"])


def test_chosen_kinds_and_sums_only(setup):
    stats = collect_statistics(
        setup["model"], setup["forget"], sums=("sum", "count_pos"), kinds=("ff",), progress=False
    )
    assert stats.attn is None
    assert set(stats.ff.sums) == {"sum", "count_pos"}
    with pytest.raises(ValueError, match="unknown statistics"):
        collect_statistics(setup["model"], setup["forget"], sums=("sum_cubed",), progress=False)


def test_collection_restores_training_mode_and_leaves_no_hooks(setup):
    model = setup["model"]
    model.train()
    try:
        collect_statistics(model, setup["forget"], progress=False)
        assert model.training
    finally:
        model.eval()
    arch = find_architecture(model)
    for p in arch.ff + arch.attn:
        assert not p.module._forward_pre_hooks


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_activations_raise_floating_point_error(bad_value):
    model = build("gpt_neox")
    with torch.no_grad():
        model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight[0, 0] = bad_value
    forget, retain = make_batches(1), make_batches(2)
    f = collect_statistics(model, forget, progress=False)
    r = collect_statistics(model, retain, progress=False)
    with pytest.raises(FloatingPointError, match=r"non-finite forget activations .*layer 0.*float32"):
        score(f["ff"], r["ff"], "abs")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="non-finite"):
        prune(model, forget, retain, ff_frac=0.1, steps=1, progress=False)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)


def test_empty_batches_raise_value_error():
    model = build("gpt_neox")
    with pytest.raises(ValueError, match="empty"):
        collect_statistics(model, [], progress=False)
    with pytest.raises(ValueError, match="empty"):
        collect_statistics(model, iter(()), progress=False)


def test_all_padding_raises_value_error():
    model = build("gpt_neox")
    ids = torch.randint(4, 128, (2, 6))
    with pytest.raises(ValueError, match="non-padding"):
        collect_statistics(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}], progress=False)


def test_std_keeps_its_precision_when_the_mean_is_a_thousand_times_the_spread():
    """E[x^2] - E[x]^2 cancels almost every digit here: the sums it subtracts must be float64 from the start."""
    model = build("gpt_neox")
    arch = find_architecture(model)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            layer.mlp.dense_h_to_4h.bias.fill_(1000.0)  # GELU is the identity up there: inputs of 1000 +- ~1
            layer.mlp.dense_h_to_4h.weight.mul_(5.0)
    batches = make_batches(3)
    acts = reference_activations(model, batches)["ff"]
    spread = torch.stack([a.std(0, correction=0) for a in acts])
    ratio = torch.stack([a.mean(0) for a in acts]) / spread
    # mean/std from 1,000 to 100,000 (beyond that, float32 activations themselves hold no spread to measure)
    studied = (ratio >= 1000) & (ratio <= 100_000)
    assert int(studied.sum()) >= 50 and float(ratio.min()) >= 1000
    stats = collect_statistics(model, batches, sums=("sum", "sum_sq"), progress=False).ff
    assert stats.sums["sum"].shape == arch.shape("ff")
    torch.testing.assert_close(importance(stats, "std")[studied], spread[studied], rtol=1e-6, atol=0)


def test_statistics_of_a_model_offloaded_to_disk_equal_the_in_memory_ones(tmp_path):
    """A device map that runs some layers from disk: each hook's totals and token weights follow its input."""
    from transformers import AutoModelForCausalLM

    model = build("gpt_neox")
    model.save_pretrained(tmp_path / "model")
    device_map = {f"gpt_neox.{name}": "cpu" for name, _ in model.gpt_neox.named_children() if name != "layers"}
    device_map |= {name: "cpu" for name, _ in model.named_children() if name != "gpt_neox"}
    device_map |= {"gpt_neox.layers.0": "cpu", "gpt_neox.layers.1": "disk"}
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert offloaded.gpt_neox.layers[1].mlp.dense_4h_to_h.weight.device.type == "meta"
    batches = make_batches(4)
    expected = collect_statistics(model, batches, sums="all", progress=False)
    actual = collect_statistics(offloaded, batches, sums="all", progress=False)
    for kind in ("ff", "attn"):
        assert actual[kind].n_tokens == expected[kind].n_tokens
        for name, value in expected[kind].sums.items():
            torch.testing.assert_close(actual[kind].sums[name], value, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="offloaded to disk"):
        prune(offloaded, batches, make_batches(5), ff_frac=0.1, steps=1, progress=False)
