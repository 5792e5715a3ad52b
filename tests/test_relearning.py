"""The relearning check (``--relearn-steps``, ``--relearn-curve``; ``evaluation.relearning``): the unlearned model,
its parent and the random control fine-tuned alike, their forget top-1 measured along the way, every change on
the scale of what unlearning removed; logged as step metrics, recorded, plotted."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch

from mlflow_selprune.config import EvidenceOptions
from mlflow_selprune.errors import ConfigError
from model_zoo import FAMILIES


def tiny(name: str = "gpt2"):
    config, cls = FAMILIES[name]
    torch.manual_seed(0)
    return cls(copy.deepcopy(config)).eval()


def batches(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(4, 60, (4, 12), generator=g) for _ in range(n)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def loss(model, data) -> float:
    with torch.no_grad():
        return sum(float(model(**b, labels=b["input_ids"]).loss) for b in data)


def test_a_point_of_the_curve_is_the_model_fine_tuned_that_many_steps_alone():
    """Measuring along the way changes nothing: the model seen at step 5 is a 5-step fine-tune, bit for bit,
    and the curve's last point is the model the plain check returns (measuring does not disturb dropout's RNG)."""
    from mlflow_selprune.engine import relearn

    model, data = tiny(), batches(1)
    assert model.config.resid_pdrop > 0  # dropout is on while it trains
    seen: dict[int, float] = {}
    last = relearn(
        model,
        data,
        steps=8,
        lr=1e-2,
        seed=3,
        measure_at=(0, 5, 8),
        measure=lambda s, m: seen.update({s: loss(m, data)}),
    )
    assert set(seen) == {0, 5, 8}
    assert seen[0] == loss(model, data)  # step 0: the model as it is
    assert seen[5] == loss(relearn(model, data, steps=5, lr=1e-2, seed=3), data)
    assert seen[8] == loss(last, data) == loss(relearn(model, data, steps=8, lr=1e-2, seed=3), data)
    assert seen[8] < seen[0]


def test_recovery_is_measured_on_the_scale_of_what_unlearning_removed():
    from mlflow_selprune.evaluation.relearning import curve_history, curve_metrics

    curve = {
        "steps": [0, 10, 20],
        "forget_top1": {"unlearned": [0.30, 0.35, 0.40], "parent": [0.50, 0.48, 0.49], "control": [0.49, 0.52, 0.53]},
    }
    m = curve_metrics(curve)
    assert m["relearn_forget_top1"] == 0.40 and m["relearn_control_forget_top1"] == 0.53
    assert m["relearn_recovery"] == pytest.approx(0.5)  # 0.10 of the 0.20 removed
    assert m["relearn_control_recovery"] == pytest.approx(0.2)  # the control gained 0.04: 20% of 0.20
    assert m["relearn_parent_recovery"] == pytest.approx(-0.05)
    history = curve_history(curve)
    assert [step for step, _ in history] == [0, 10, 20]
    assert history[0][1]["relearn_curve_recovery"] == 0 and history[1][1]["relearn_curve_recovery"] == pytest.approx(
        0.25
    )
    # unlearning that removed under 5% of the parent's top-1 has no recovery ratio (it would divide by noise)
    flat = {"steps": [0, 5], "forget_top1": {"unlearned": [0.49, 0.5], "parent": [0.50, 0.5]}}
    assert math.isnan(curve_metrics(flat)["relearn_recovery"])
    # without a parent there is no scale: the top-1s only
    alone = {"steps": [0, 5], "forget_top1": {"unlearned": [0.3, 0.4]}}
    assert curve_metrics(alone) == {"relearn_forget_top1": 0.4}


def test_the_three_models_are_fine_tuned_alike_and_the_pruned_model_is_left_as_it_was():
    from mlflow_selprune import PruneConfig, prune
    from mlflow_selprune.evaluation.relearning import relearning_curve
    from mlflow_selprune.unlearn import model_views

    model = tiny()
    forget, retain = batches(1), batches(2)
    result = prune(model, forget, retain, PruneConfig(ff_frac=0.3, steps=1), progress=False)
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    seen_as = model_views(model, result, seed=0, control=True)
    views = {
        "unlearned": (model, contextlib.nullcontext),
        "parent": (model, seen_as["parent_view"]),
        "control": (model, seen_as["control_view"]),
    }

    def forget_only(m):
        return {"forget_top1": -loss(m, forget)}  # any number the model decides

    start = {}
    for name, (m, view) in views.items():
        with view():
            start[name] = forget_only(m)["forget_top1"]
    settings = dict(steps=4, lr=1e-2, seed=0)
    curve = relearning_curve(forget_only, views, forget, start, (0, 2, 4), settings)
    assert curve["steps"] == [0, 2, 4] and list(curve["forget_top1"]) == ["unlearned", "parent", "control"]
    for name, values in curve["forget_top1"].items():
        assert values[0] == start[name]
        assert values[2] > values[0], f"{name}: fine-tuning on forget data lowers its forget loss"
    assert len({tuple(v) for v in curve["forget_top1"].values()}) == 3  # three different models
    for key, value in model.state_dict().items():
        assert torch.equal(value, pruned[key]), key
    again = relearning_curve(forget_only, views, forget, start, (0, 2, 4), settings)
    assert again == curve  # steps and seeds decide


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(relearn_steps=20, relearn_curve="0,5,50"), "--relearn-curve names step 50, beyond --relearn-steps 20"),
        (dict(relearn_curve="0,5"), "--relearn-curve needs --relearn-steps"),
        (dict(relearn_steps=20, relearn_curve="0,five"), "--relearn-curve must be comma-separated step counts"),
        (dict(relearn_steps=20, relearn_curve="-5,10"), "--relearn-curve must be comma-separated step counts"),
    ],
)
def test_a_curve_that_cannot_be_measured_is_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        EvidenceOptions(**options).validate()


def test_the_curve_is_recorded_in_one_spelling_from_zero_to_the_last_step():
    assert EvidenceOptions(relearn_steps=20, relearn_curve="10, 5,10").validate().relearn_curve == "0,5,10,20"
    assert EvidenceOptions(relearn_steps=20).validate().relearn_points() == (0, 20)
    assert EvidenceOptions().validate().relearn_points() == ()


@pytest.mark.slow(seconds=10)
def test_prune_logs_the_curve_as_step_metrics_records_it_and_plots_it(store):
    """Through the CLI: the curve's points are MLflow step metrics, the anchored record holds the curve, the
    version's tags hold the summary with the control's, and report.html shows the three curves."""
    from mlflow.tracking import MlflowClient

    from mlflow_helpers import ONE_STEP, invoke, recorded

    with mock.patch.dict("os.environ"):
        pruned = invoke(
            "prune", "--model-uri", store["base"], "--forget", store["forget"], "--retain", store["retain"],
            *[a for a in ONE_STEP if a != "--no-control"], "--samples", "0",
            "--relearn-steps", "4", "--relearn-curve", "2", "--relearn-lr", "1e-2",
        )  # fmt: skip
    assert pruned.exit_code == 0, pruned.output
    assert (
        "relearning: forget top-1 back to" in pruned.output
        and "the control after the same fine-tuning" in pruned.output
    )
    client = MlflowClient()
    version = recorded(client.get_model_version("tiny-lm", "2"))
    run_id = version.run_id
    history = client.get_metric_history(run_id, "relearn_curve_forget_top1")
    assert [point.step for point in sorted(history, key=lambda p: p.step)] == [0, 2, 4]
    for who in ("parent_", "control_"):
        assert len(client.get_metric_history(run_id, f"relearn_curve_{who}forget_top1")) == 3
    record = json.loads(Path(client.download_artifacts(run_id, "selprune/pruning_record.json")).read_text())
    curve = record["evidence"]["relearn_curve"]
    assert curve["steps"] == [0, 2, 4] and set(curve["forget_top1"]) == {"unlearned", "parent", "control"}
    final = {point.step: point.value for point in history}[4]
    assert curve["forget_top1"]["unlearned"][-1] == pytest.approx(final)
    assert float(version.tags["selprune.metric.relearn_forget_top1"]) == pytest.approx(final)
    assert float(version.tags["selprune.metric.relearn_control_forget_top1"]) == pytest.approx(
        curve["forget_top1"]["control"][-1]
    )
    assert record["evidence"]["options"]["relearn_curve"] == "0,2,4"
    assert float(version.tags["selprune.metric.relearn_steps"]) == 4  # the check's settings beside its result
    report = Path(client.download_artifacts(run_id, "selprune/report.html")).read_text()
    assert 'alt="relearning"' in report


def test_demo_relearn_adds_the_check_to_the_recipes_evidence_and_nothing_else():
    from mlflow_selprune.demo import RECIPE, _evidence

    plain, relearning = (_evidence(RECIPE, True, False, relearn=flag) for flag in (False, True))
    assert plain == RECIPE.evidence and plain.relearn_steps == 0
    assert relearning.validate().relearn_points() == (0, 5, 10, 20)
    assert (relearning.relearn_lr, relearning.relearn_batch_size) == (EvidenceOptions().relearn_lr, 8)
    same = {k: v for k, v in relearning.to_dict().items() if not k.startswith("relearn_")}
    assert same == {k: v for k, v in plain.to_dict().items() if not k.startswith("relearn_")}


@pytest.mark.parametrize(
    "recorded, refused",
    [
        ({"relearn_steps": 20.0, "relearn_parent_recovery": 0.14}, None),
        ({"relearn_steps": 50.0}, None),  # evaluate without a parent: no parent change to read
        ({"relearn_steps": 2.0, "relearn_parent_recovery": 0.1}, "measured with 2 fine-tuning steps"),
        ({"relearn_parent_recovery": 0.1}, "measured with an unrecorded number of fine-tuning steps"),
        ({"relearn_steps": 20.0, "relearn_parent_recovery": -0.4}, "the parent itself lost 40% of the removed"),
    ],
)
def test_the_gate_reads_a_relearning_recovery_only_from_a_check_that_was_a_real_attack(recorded, refused):
    """Whoever runs prune chooses the check's settings: one step, or a rate that wrecks the parent too, would
    make any version look safe. The settings are recorded (and verified) beside the result, and the gate
    refuses a recovery measured with too few steps or at a rate the parent did not survive."""
    from types import SimpleNamespace

    from mlflow_selprune.errors import BadInputError
    from mlflow_selprune.registry.gate import _metric_thresholds, _require_a_fair_relearning_check

    version = SimpleNamespace(canonical_uri="models:/m/2")
    thresholds = dict.fromkeys(("max_retain_drop", "min_forget_drop", "min_selectivity", "max_code_pass_rate"))
    wanted = _metric_thresholds({**thresholds, "max_relearn_recovery": 0.5, "metric": "top1"})
    metrics = {"relearn_recovery": 0.1, **recorded}
    if refused is None:
        _require_a_fair_relearning_check(version, wanted, metrics)
    else:
        with pytest.raises(BadInputError, match=refused) as caught:
            _require_a_fair_relearning_check(version, wanted, metrics)
        assert "--relearn-steps 20" in str(caught.value)
    _require_a_fair_relearning_check(version, {}, {"relearn_steps": 1.0})  # no relearning threshold: not read


def test_unicode_digits_in_a_curve_are_refused_as_bad_input():
    with pytest.raises(ConfigError, match="--relearn-curve must be comma-separated step counts"):
        EvidenceOptions(relearn_steps=20, relearn_curve="²").validate()
    with pytest.raises(ConfigError, match="--relearn-batch-size must be an integer"):
        EvidenceOptions(relearn_steps=20, relearn_batch_size=True).validate()


@pytest.mark.slow(seconds=10)
def test_evaluate_logs_the_curve_of_the_model_and_its_parent_with_the_checks_settings(store):
    """`evaluate --relearn-steps`: nothing is registered, so the run holds the curve whole and as step metrics,
    and the check's settings beside its result."""
    from mlflow.tracking import MlflowClient

    from mlflow_helpers import SMALL, invoke

    with mock.patch.dict("os.environ"):
        measured = invoke(
            "evaluate", "--model-uri", store["base"], "--parent-model-uri", store["base"], "--forget", store["forget"],
            "--retain", store["retain"], *SMALL, "--relearn-steps", "2", "--relearn-curve", "1",
        )  # fmt: skip
    assert measured.exit_code == 0, measured.output
    run_id = measured.output.strip().splitlines()[-1].removeprefix("run: ")
    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    assert (metrics["relearn_steps"], metrics["relearn_lr"]) == (2, EvidenceOptions().relearn_lr)
    for who in ("", "parent_"):
        history = client.get_metric_history(run_id, f"relearn_curve_{who}forget_top1")
        assert sorted(point.step for point in history) == [0, 1, 2]
    curve = json.loads(Path(client.download_artifacts(run_id, "selprune/relearning.json")).read_text())
    assert curve["steps"] == [0, 1, 2] and set(curve["forget_top1"]) == {"unlearned", "parent"}
    assert curve["forget_top1"]["unlearned"] == curve["forget_top1"]["parent"]  # the same model, fine-tuned alike
    assert metrics["relearn_forget_top1"] == pytest.approx(curve["forget_top1"]["unlearned"][-1])
