"""The pruning loop: masks and records, budget mode with a real evaluation, rollback,
input validation before any weight is touched, the attention mean offset, and
the saved artifacts."""

import copy
import json
import math

import pytest
import safetensors.torch
import torch
from torch import nn

from mlflow_selprune.errors import ConfigError
from mlflow_selprune import PruneResult, collect_statistics, find_architecture, prune
from mlflow_selprune.engine.surgery import pruned_columns
from model_zoo import FAMILIES
from trained_model import full_batches, top1_accuracy, trained_model


def build(name: str, seed: int = 0):
    config, cls = FAMILIES[name]
    torch.manual_seed(seed)
    model = cls(copy.deepcopy(config)).eval()
    with torch.no_grad():  # non-zero biases, so the mean offset and "unchanged" checks bite
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def token_batches(seed, low, high, n_batches=2, batch_size=4, length=12):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(low, high, (batch_size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length - 3 :] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


FORGET = token_batches(1, 4, 70)
RETAIN = token_batches(2, 60, 128)


def snapshot(model) -> dict:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_weights(model, before: dict):
    state = model.state_dict()
    assert state.keys() == before.keys()
    for name, value in state.items():
        assert torch.equal(value, before[name]), f"{name} changed"


# --- fixed number of steps --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fixed_steps_masks_and_records(family):
    model = build(family)
    arch = find_architecture(model)
    steps = 3
    result = prune(model, FORGET, RETAIN, ff_frac=0.05, attn_frac=0.05, steps=steps, progress=False)
    k_ff = round(0.05 * arch.n_layers * arch.d_mlp)
    k_attn = round(0.05 * arch.n_layers * arch.d_attn)
    d_mlp, d_attn = {"gpt2": (128, 32), "llama": (64, 32)}[family]  # from the zoo configs
    assert result.ff_mask.shape == (2, d_mlp) and result.attn_mask.shape == (2, d_attn)
    assert result.ff_mask.dtype == torch.bool and result.attn_mask.dtype == torch.bool
    assert result.ff_pruned == steps * k_ff and result.attn_pruned == steps * k_attn
    # the masks are exactly the zeroed columns of the weights
    assert torch.equal(pruned_columns(arch, "ff"), result.ff_mask)
    assert torch.equal(pruned_columns(arch, "attn"), result.attn_mask)

    assert [r["step"] for r in result.steps] == [1, 2, 3]
    for i, record in enumerate(result.steps, start=1):
        assert record["ff_pruned"] == k_ff and record["attn_pruned"] == k_attn
        assert sum(record["ff_pruned_per_layer"]) == k_ff and len(record["ff_pruned_per_layer"]) == arch.n_layers
        assert sum(record["attn_pruned_per_layer"]) == k_attn
        assert record["ff_pruned_total"] == i * k_ff and record["attn_pruned_total"] == i * k_attn
        assert isinstance(record["ff_threshold"], float) and isinstance(record["attn_threshold"], float)
        assert record["ff_threshold"] > 0
        assert record["seconds"] >= record["seconds_collect"] >= 0
        assert record["kept"] is True and "metrics" not in record
    assert result.ff_mask.sum(1).tolist() == [
        sum(r["ff_pruned_per_layer"][layer] for r in result.steps) for layer in range(arch.n_layers)
    ]
    record = result.record()
    assert record["ff_pruned"] == steps * k_ff and record["architecture"]["d_mlp"] == arch.d_mlp
    assert "completed 3 step" in result.stop_reason


def test_threshold_is_the_lowest_chosen_score():
    model = build("gpt_neox")
    result = prune(model, FORGET, RETAIN, ff_frac=0.1, attn_frac=0.1, steps=1, selection="per-layer", progress=False)
    for kind, scores, mask in (
        ("ff", result.ff_scores, result.ff_mask),
        ("attn", result.attn_scores, result.attn_mask),
    ):
        threshold = result.steps[0][f"{kind}_threshold"]
        assert threshold == float(scores[mask].min())
        for layer in range(mask.shape[0]):  # per-layer: the top of every layer
            assert scores[layer][mask[layer]].min() >= scores[layer][~mask[layer]].max()
        assert mask.sum(1).tolist() == [round(0.1 * mask.shape[1])] * mask.shape[0]


def test_attention_only_pruning_leaves_mlp_alone():
    model = build("gpt_neox")
    arch = find_architecture(model)
    before = snapshot(model)
    result = prune(model, FORGET, RETAIN, ff_frac=0.0, attn_frac=0.1, steps=2, progress=False)
    assert result.ff_pruned == 0 and result.ff_scores is None
    assert result.attn_pruned == 2 * round(0.1 * 64)
    for p in arch.ff:
        assert torch.equal(p.module.weight, before[f"{p.name}.weight"])


def test_eval_every_and_final_evaluation():
    model = build("gpt_neox")
    calls = []

    def evaluate(m):
        calls.append(int(pruned_columns(find_architecture(m), "ff").sum()))
        return {"forget_top1": 0.5, "retain_top1": 0.5}

    result = prune(model, FORGET, RETAIN, ff_frac=0.05, steps=5, eval_every=2, evaluate_fn=evaluate, progress=False)
    k = round(0.05 * 128)
    # baseline, after steps 2 and 4, and after the last step
    assert calls == [0, 2 * k, 4 * k, 5 * k]
    assert [r["step"] for r in result.steps if "metrics" in r] == [2, 4, 5]
    assert result.baseline_metrics == {"forget_top1": 0.5, "retain_top1": 0.5}


# --- validation: bad input fails before any weight is touched ---------------------------------------


def _evaluate_constant(model):
    return {"forget_top1": 0.5, "retain_top1": 0.5}


BAD_INPUTS = {
    "ff_frac_one": (dict(ff_frac=1.0, steps=1), ConfigError, "--ff-frac"),
    "ff_frac_negative": (dict(ff_frac=-0.1, steps=1), ConfigError, "--ff-frac"),
    "ff_frac_nan": (dict(ff_frac=float("nan"), steps=1), ConfigError, "--ff-frac"),
    "attn_frac_above_one": (dict(attn_frac=1.5, steps=1), ConfigError, "--attn-frac"),
    "both_fracs_zero": (dict(ff_frac=0.0, attn_frac=0.0, steps=1), ValueError, "both 0"),
    "steps_zero": (dict(steps=0), ValueError, "steps"),
    "steps_negative": (dict(steps=-2), ValueError, "steps"),
    "steps_not_integer": (dict(steps=2.5), ValueError, "steps"),
    "steps_and_target": (dict(steps=2, target_forget_drop=0.5, evaluate_fn=_evaluate_constant), ValueError, "not both"),
    "steps_and_retain_budget": (
        dict(steps=2, max_retain_drop=0.1, evaluate_fn=_evaluate_constant),
        ValueError,
        "not both",
    ),
    "unknown_scoring": (dict(scoring="l2", steps=1), ValueError, "unknown --scoring"),
    "unknown_attn_scoring": (dict(attn_scoring="l2", attn_frac=0.1, steps=1), ConfigError, "unknown --attn-scoring"),
    "unknown_selection": (dict(selection="per-head", steps=1), ValueError, "unknown --selection"),
    "budget_without_evaluate": (dict(target_forget_drop=0.5), ValueError, "evaluation function"),
    "retain_budget_without_evaluate": (dict(max_retain_drop=0.1), ValueError, "evaluation function"),
    "target_zero": (dict(target_forget_drop=0.0, evaluate_fn=_evaluate_constant), ValueError, "--target-forget-drop"),
    "retain_budget_one": (dict(max_retain_drop=1.0, evaluate_fn=_evaluate_constant), ValueError, "--max-retain-drop"),
    "max_steps_zero": (
        dict(max_retain_drop=0.1, max_steps=0, evaluate_fn=_evaluate_constant),
        ValueError,
        "--max-steps",
    ),
    "eps_zero": (dict(ff_eps=0.0, steps=1), ValueError, "--ff-eps"),
    "eval_every_zero": (dict(eval_every=0, steps=1, evaluate_fn=_evaluate_constant), ValueError, "--eval-every"),
    # the budget metric the evaluation never returns: found at the baseline, not after a step
    "budget_metric_missing": (
        dict(target_forget_drop=0.5, budget_metric="top5", evaluate_fn=_evaluate_constant),
        ConfigError,
        "--budget-metric",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_settings_raise_before_any_weight_is_touched(case):
    kwargs, error, message = BAD_INPUTS[case]
    model = build("gpt_neox")
    before = snapshot(model)
    with pytest.raises(error, match=message):
        prune(model, FORGET, RETAIN, progress=False, **kwargs)
    assert_same_weights(model, before)


@pytest.mark.parametrize("which", ["forget", "retain"])
def test_empty_batches_raise_before_any_weight_is_touched(which):
    model = build("gpt_neox")
    before = snapshot(model)
    forget, retain = ([], RETAIN) if which == "forget" else (FORGET, iter(()))
    with pytest.raises(ValueError, match=f"{which} batches are empty"):
        prune(model, forget, retain, steps=1, progress=False)
    assert_same_weights(model, before)


def test_plain_module_is_a_type_error_and_untouched():
    model = nn.Sequential(nn.Embedding(128, 8), nn.Linear(8, 32), nn.Linear(32, 8))
    before = snapshot(model)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        prune(model, FORGET, RETAIN, steps=1, progress=False)
    assert_same_weights(model, before)


def test_mean_offset_without_attention_bias_is_refused_before_touching_weights():
    model = build("llama")
    assert find_architecture(model).attn[0].module.bias is None
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"bias.*o_proj|o_proj.*bias"):
        prune(model, FORGET, RETAIN, ff_frac=0.05, attn_frac=0.05, steps=1, attn_mean_offset=True, progress=False)
    assert_same_weights(model, before)


# --- attention mean offset --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_attention_mean_offset_replaces_pruned_heads_by_their_retain_mean(family):
    original = build(family)
    arch_original = find_architecture(original)
    means = collect_statistics(original, RETAIN, sums=("sum",), kinds=("attn",), progress=False).attn
    retain_mean = means.sums["sum"] / means.n_tokens

    pruned = copy.deepcopy(original)
    result = prune(
        pruned,
        FORGET,
        RETAIN,
        ff_frac=0.0,
        attn_frac=0.2,
        steps=1,
        selection="per-layer",
        attn_mean_offset=True,
        progress=False,
    )
    mask = result.attn_mask
    assert mask.sum(1).min() > 0, "the check needs pruned neurons in every layer"
    without_offset = copy.deepcopy(original)
    prune(without_offset, FORGET, RETAIN, ff_frac=0.0, attn_frac=0.2, steps=1, selection="per-layer", progress=False)

    # the reference: the original model whose pruned activations are replaced by their retain mean
    handles = []
    for p in arch_original.attn:
        index = mask[p.layer].nonzero().squeeze(1)
        value = retain_mean[p.layer, index].float()

        def replace(module, args, index=index, value=value):
            x = args[0].clone()
            x[..., index] = value
            return (x,) + tuple(args[1:])

        handles.append(p.module.register_forward_pre_hook(replace))
    try:
        for batch in RETAIN + FORGET:
            with torch.no_grad():
                expected = original(**batch).logits
                got = pruned(**batch).logits
                plain = without_offset(**batch).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            assert (plain - expected).abs().max() > 1e-3, "the offset must matter for this check to mean anything"
    finally:
        for handle in handles:
            handle.remove()


# --- evidence: the random control and the relearning check -------------------------------------------


@pytest.mark.parametrize("mean_offset", [False, True], ids=["plain", "attn-mean-offset"])
def test_control_and_parent_views_put_the_pruned_model_back_exactly(mean_offset):
    from mlflow_selprune import PruneConfig
    from mlflow_selprune.engine import parent_restored, randomly_pruned

    original = build("gpt2")
    parent = snapshot(original)
    model = copy.deepcopy(original)
    result = prune(
        model,
        FORGET,
        RETAIN,
        PruneConfig(ff_frac=0.1, attn_frac=0.1, steps=2, attn_mean_offset=mean_offset),
        progress=False,
    )
    pruned = snapshot(model)
    arch = find_architecture(model)
    with parent_restored(model, result):
        assert_same_weights(model, parent)
    assert_same_weights(model, pruned)
    with randomly_pruned(model, result, seed=0) as random_masks:
        for kind in ("ff", "attn"):
            mask = getattr(result, f"{kind}_mask")
            assert torch.equal(random_masks[kind].sum(1), mask.sum(1))  # same count per layer
            assert not torch.equal(random_masks[kind], mask)
            assert torch.equal(pruned_columns(arch, kind), random_masks[kind])  # exactly those are zero now
    assert_same_weights(model, pruned)
    with randomly_pruned(model, result, seed=0) as again:
        assert all(torch.equal(again[k], random_masks[k]) for k in again)  # seeded


def test_the_control_removes_its_neurons_the_way_the_selective_run_did():
    """With --attn-mean-offset the control's attention neurons give their parent retain mean, not zero:
    like for like with the selective step, which folded its own neurons' means into the bias."""
    from mlflow_selprune import PruneConfig
    from mlflow_selprune.engine import randomly_pruned

    original = build("gpt2")
    arch_original = find_architecture(original)
    means = collect_statistics(original, RETAIN, sums=("sum",), kinds=("attn",), progress=False).attn
    retain_mean = means.sums["sum"] / means.n_tokens
    model = copy.deepcopy(original)
    result = prune(
        model,
        FORGET,
        RETAIN,
        PruneConfig(ff_frac=0.0, attn_frac=0.2, steps=1, selection="per-layer", attn_mean_offset=True),
        progress=False,
    )
    with randomly_pruned(model, result, seed=3) as random_masks:
        chosen = random_masks["attn"]
        assert chosen.sum(1).min() > 0
        for p, q in zip(find_architecture(model).attn, arch_original.attn):
            index = chosen[p.layer].nonzero().squeeze(1)
            expected = q.module.bias.double() + q.columns()[:, index].double() @ retain_mean[p.layer, index]
            torch.testing.assert_close(p.module.bias.double(), expected, rtol=0, atol=1e-5)
            assert (p.module.bias - q.module.bias).abs().max() > 1e-3, "the offset must matter for this check"


def test_relearning_tunes_a_copy_and_recovers_the_loss():
    from mlflow_selprune import PruneConfig
    from mlflow_selprune.engine import relearn

    model = build("gpt2")
    prune(model, FORGET, RETAIN, PruneConfig(ff_frac=0.3, steps=1), progress=False)
    pruned = snapshot(model)

    def loss(m):
        with torch.no_grad():
            return sum(float(m(**b, labels=b["input_ids"]).loss) for b in FORGET)

    tuned = relearn(model, FORGET, steps=20, lr=1e-2, seed=0)
    assert_same_weights(model, pruned)
    assert loss(tuned) < loss(model)
    again = relearn(model, FORGET, steps=20, lr=1e-2, seed=0)
    assert_same_weights(again, snapshot(tuned))  # steps and seed decide, nothing else


# --- budget mode on a trained model, with a real evaluation -----------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


@pytest.fixture(scope="module")
def budget_data(trained):
    forget_stats = trained.blocks(trained.forget_texts)[:32]
    retain_stats = trained.blocks(trained.retain_texts)[:32]
    forget_eval = trained.blocks(trained.forget_eval_texts)[:16]
    retain_eval = trained.blocks(trained.retain_eval_texts)[:16]

    def evaluate(model):
        return {"forget_top1": top1_accuracy(model, forget_eval), "retain_top1": top1_accuracy(model, retain_eval)}

    return full_batches(forget_stats), full_batches(retain_stats), evaluate


# On this model, 10% steps drop forget top-1 by about -0.5%, 3%, 7%, 19%, 40% (cumulative) and
# retain top-1 by about 0%, 2%, 8%, 18%, 23%: a target of 30% is reached at step 5 within a retain
# budget of 30%, and a retain budget of 12% is broken at step 4.


@pytest.mark.slow  # trains the shared model (~20 s) unless test_capability already did
def test_budget_stops_when_the_forget_target_is_reached(trained, budget_data):
    forget, retain, evaluate = budget_data
    model = trained.load()
    arch = find_architecture(model)
    target, budget = 0.3, 0.3
    result = prune(
        model,
        forget,
        retain,
        ff_frac=0.1,
        target_forget_drop=target,
        max_retain_drop=budget,
        max_steps=10,
        evaluate_fn=evaluate,
        progress=False,
    )
    steps = result.steps
    assert len(steps) >= 2, "the target should take a few steps on this model"
    assert all(r["kept"] for r in steps)
    assert steps[-1]["forget_drop"] >= target > max(r["forget_drop"] for r in steps[:-1])
    assert all(r["retain_drop"] <= budget for r in steps)
    assert "reached the target" in result.stop_reason
    k = round(0.1 * arch.n_layers * arch.d_mlp)
    assert result.ff_pruned == len(steps) * k
    # the drops are the real relative drops of what the evaluation measures on the model we got back
    final = evaluate(model)
    assert final == result.final_metrics == steps[-1]["metrics"]
    base = result.baseline_metrics["forget_top1"]
    assert math.isclose(steps[-1]["forget_drop"], (base - final["forget_top1"]) / base)
    assert final["forget_top1"] < base


@pytest.mark.slow  # trains the shared model (~20 s) unless test_capability already did
def test_budget_rolls_back_the_step_that_breaks_the_retain_budget(trained, budget_data, tmp_path):
    forget, retain, measure = budget_data
    model = trained.load()
    arch = find_architecture(model)
    weights_at_evaluation = []

    def evaluate(m):
        weights_at_evaluation.append(snapshot(m))
        return measure(m)

    budget = 0.12
    result = prune(
        model, forget, retain, ff_frac=0.1, max_retain_drop=budget, max_steps=10, evaluate_fn=evaluate, progress=False
    )
    steps = result.steps
    last = steps[-1]
    assert last["kept"] is False and last["retain_drop"] > budget
    assert all(r["kept"] and r["retain_drop"] <= budget for r in steps[:-1])
    assert len(steps) >= 2, "the budget should allow a few steps on this model"
    assert "rolled back" in result.stop_reason
    # weights: exactly those before the rolled-back step (the evaluation after the previous step saw them)
    before_step = weights_at_evaluation[-2]
    after_step = weights_at_evaluation[-1]
    assert not all(torch.equal(after_step[n], before_step[n]) for n in before_step), "the step changed weights"
    assert_same_weights(model, before_step)
    # masks and metrics: those of the last kept step
    k = round(0.1 * arch.n_layers * arch.d_mlp)
    assert result.ff_pruned == (len(steps) - 1) * k == steps[-2]["ff_pruned_total"]
    assert torch.equal(pruned_columns(arch, "ff"), result.ff_mask)
    assert result.final_metrics == steps[-2]["metrics"] == measure(model)

    paths = result.save(tmp_path)
    record = json.loads(paths["record"].read_text())
    assert [r["kept"] for r in record["steps"]] == [True] * (len(steps) - 1) + [False]
    assert record["ff_pruned"] == result.ff_pruned and record["stop_reason"] == result.stop_reason


# --- artifacts ---------------------------------------------------------------------------------------


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_save_writes_safetensors_and_json(tmp_path):
    model = build("gpt_neox")

    def evaluate(m):
        return {"forget_top1": 0.25, "retain_top1": 0.5, "forget_perplexity": float("inf")}

    result = prune(model, FORGET, RETAIN, ff_frac=0.05, attn_frac=0.05, steps=2, evaluate_fn=evaluate, progress=False)
    assert isinstance(result, PruneResult)
    paths = result.save(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "masks.safetensors",
        "scores.safetensors",
        "pruning_record.json",
    }
    masks = safetensors.torch.load_file(str(paths["masks"]))
    assert set(masks) == {"ff_mask", "attn_mask"}
    assert torch.equal(masks["ff_mask"], result.ff_mask) and torch.equal(masks["attn_mask"], result.attn_mask)
    assert masks["ff_mask"].dtype == torch.bool
    scores = safetensors.torch.load_file(str(paths["scores"]))
    assert set(scores) == {"ff_scores", "attn_scores"}
    assert torch.equal(scores["ff_scores"], result.ff_scores.float())
    assert torch.equal(scores["attn_scores"], result.attn_scores.float())
    # strict JSON (no NaN/Infinity literals, which other parsers reject): non-finite values become null
    record = _strict_json(paths["record"].read_text())
    assert record["ff_pruned"] == result.ff_pruned == 2 * round(0.05 * 128)
    assert record["attn_pruned"] == result.attn_pruned
    assert record["ff_pruned_per_layer"] == result.ff_mask.sum(1).tolist()
    assert record["config"]["ff_frac"] == 0.05 and record["config"]["steps"] == 2
    assert [s["step"] for s in record["steps"]] == [1, 2]
    assert record["baseline_metrics"]["forget_perplexity"] is None
    assert record["steps"][-1]["metrics"]["forget_top1"] == 0.25
    for path in (paths["masks"], paths["scores"]):
        assert not path.read_bytes().startswith(b"\x80"), "no pickle"


# --- chains: a prune starts from what is already dead in its parent ------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_chain_of_prunes_composes_instead_of_re_pruning_dead_neurons(family):
    """v1 -> v2 -> v3 at 10% FF and 10% attention a run: each run chooses only live neurons, so v3 has ~20%
    dead (not ~10%), and the counts say both: this run's and the total dead in the result."""
    from mlflow_selprune import PruneConfig

    model = build(family)
    arch = find_architecture(model)
    config = PruneConfig(ff_frac=0.1, attn_frac=0.1, steps=1)
    first = prune(model, FORGET, RETAIN, config, progress=False)
    second = prune(model, FORGET, RETAIN, config, progress=False)
    for kind, a, b in (("ff", first.ff_mask, second.ff_mask), ("attn", first.attn_mask, second.attn_mask)):
        assert not (a & b).any(), kind  # nothing chosen twice
        assert torch.equal(second.dead_before(kind), a), kind  # the parent's dead neurons, found in the weights
        assert torch.equal(pruned_columns(arch, kind), a | b), kind
    n_ff, n_attn = first.ff_mask.numel(), first.attn_mask.numel()
    assert second.ff_pruned == round(0.1 * n_ff) and second.ff_pruned_total == 2 * round(0.1 * n_ff)
    assert second.attn_pruned_total == 2 * round(0.1 * n_attn)
    assert second.record()["ff_pruned_total"] == second.ff_pruned_total
    assert second.steps[-1]["ff_pruned_total"] == second.ff_pruned_total


def test_the_random_control_of_a_chain_draws_from_live_neurons_only():
    from mlflow_selprune import PruneConfig
    from mlflow_selprune.engine import randomly_pruned

    model = build("llama")
    arch = find_architecture(model)
    first = prune(model, FORGET, RETAIN, PruneConfig(ff_frac=0.3, steps=1), progress=False)
    second = prune(model, FORGET, RETAIN, PruneConfig(ff_frac=0.3, steps=1), progress=False)
    for seed in range(5):
        with randomly_pruned(model, second, seed=seed) as masks:
            assert not (masks["ff"] & first.ff_mask).any()  # never a neuron the parent had already lost
            assert torch.equal(masks["ff"].sum(1), second.ff_mask.sum(1))
            assert torch.equal(pruned_columns(arch, "ff"), first.ff_mask | masks["ff"])


def test_running_out_of_neurons_still_measures_the_last_state():
    """With --eval-every 5 and every FF neuron gone by step 3, the loop stops at step 4 ("no neurons left") and
    its final metrics are those of the fully pruned model, not the baseline's."""
    from mlflow_selprune import PruneConfig

    model = build("llama")
    calls = []

    def evaluate_fn(m):
        calls.append(len(calls))
        return {"ff_dead": float(pruned_columns(find_architecture(m), "ff").sum())}

    result = prune(
        model, FORGET, RETAIN, PruneConfig(ff_frac=0.4, steps=10, eval_every=5), evaluate_fn=evaluate_fn, progress=False
    )
    assert result.stop_reason == "no neurons left to prune after step 4"
    assert result.final_metrics["ff_dead"] == result.ff_mask.numel() != result.baseline_metrics["ff_dead"]
    assert len(calls) == 2  # the baseline and the last state


def test_relearn_batch_size_regroups_the_rows_it_trains_on():
    """--relearn-batch-size is used: each AdamW step sees that many rows (every row of FORGET once per pass)."""
    from mlflow_selprune.engine import relearn
    from mlflow_selprune.engine.control import rebatched

    regrouped = rebatched(FORGET, 3)
    assert [b["input_ids"].shape[0] for b in regrouped] == [3, 3, 2]  # 8 rows
    assert torch.equal(
        torch.cat([b["attention_mask"] for b in regrouped]), torch.cat([b["attention_mask"] for b in FORGET])
    )
    model = build("llama")
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        relearn(model, FORGET, steps=4, lr=1e-3, seed=0, batch_size=3)
    finally:
        handle.remove()
    assert sorted(seen) == [2, 3, 3, 3]
