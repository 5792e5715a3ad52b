"""Next-token metrics: the evaluate module, per-token statistics, evaluate_model and drops."""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mlflow_selprune.data import make_batches
from mlflow_selprune.evaluation import (
    METRIC_NAMES,
    NEXT_TOKEN_METRIC_PATH,
    evaluate_model,
    next_token_metric,
    relative_drops,
    selectivity,
    token_statistics,
)

VOCAB = 512


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    return GPTNeoXForCausalLM(config).eval()  # transformers 5 has no Model.from_config


@pytest.fixture(scope="module")
def chunks():
    """Token chunks of varied lengths (1 to 40), as prepare_data makes them."""
    rng = torch.Generator().manual_seed(1)
    lengths = [40, 33, 1, 17, 2, 40, 25, 9, 40, 5, 12, 38]
    return [torch.randint(2, VOCAB, (n,), generator=rng) for n in lengths]


def brute_force(logits, input_ids, attention_mask, skip_ids):
    """The metrics from plain Python loops over every (row, position): the reference."""
    ranks, logprobs, ids = [], [], []
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1] - 1):
            if not (attention_mask[b, t] and attention_mask[b, t + 1]):
                continue
            row = logits[b, t].double().tolist()
            target = int(input_ids[b, t + 1])
            ranks.append(sum(1 for v in row if v > row[target]))
            top = max(row)
            logprobs.append(row[target] - (top + math.log(sum(math.exp(v - top) for v in row))))
            ids.append(target)
    kept = [r for r, i in zip(ranks, ids) if i not in skip_ids]
    loss = -sum(logprobs) / len(logprobs)
    return {
        "top1": sum(r == 0 for r in ranks) / len(ranks),
        "top10": sum(r < 10 for r in ranks) / len(ranks),
        "skip50_top1": sum(r == 0 for r in kept) / len(kept),
        "loss": loss,
        "perplexity": math.exp(loss),
        "n_tokens": len(ranks),
    }


def test_metric_module_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    batch, length, vocab = 3, 12, 40
    # Rounded logits make ties, which must not count against the target ("strictly greater").
    logits = (torch.randn(batch, length, vocab, generator=gen) * 2).round(decimals=1)
    input_ids = torch.randint(vocab, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 3:] = 0
    for b, t in [(0, 0), (0, 4), (1, 2), (2, 1)]:  # some targets are top-1, one is tied for it
        logits[b, t, input_ids[b, t + 1]] = logits[b, t].max() + (0 if (b, t) == (0, 4) else 1)
    skip_ids = {int(i) for i in input_ids[0, 1:6]}

    stats = token_statistics(logits, input_ids, attention_mask)
    result = next_token_metric().compute(**{k: v.numpy() for k, v in stats.items()}, skip_token_ids=sorted(skip_ids))
    expected = brute_force(logits, input_ids, attention_mask, skip_ids)
    assert result["n_tokens"] == expected["n_tokens"] == 11 + 6 + 2
    for name in METRIC_NAMES:
        assert result[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-9), name
    assert 0 < result["top1"] < 1 and result["skip50_top1"] != result["top1"]


def test_metric_module_edge_cases():
    metric = next_token_metric()
    out = metric.compute(
        target_rank=[0, 3, 12], target_logprob=[-0.1, -2.0, -5.0], target_id=[5, 7, 9], skip_token_ids=[5, 7, 9]
    )
    assert out["top1"] == pytest.approx(1 / 3) and out["top10"] == pytest.approx(2 / 3)
    assert out["loss"] == pytest.approx(7.1 / 3, rel=1e-12)  # float64 kept exactly
    assert math.isnan(out["skip50_top1"])  # every target skipped
    metric.add_batch(target_rank=[0], target_logprob=[-0.5], target_id=[1])
    metric.add_batch(target_rank=np.array([1]), target_logprob=np.array([-1.5]), target_id=np.array([2]))
    out = metric.compute()
    assert out["n_tokens"] == 2 and out["loss"] == 1.0 and out["skip50_top1"] == 0.5


def test_metric_module_loads_offline_in_a_fresh_process(tmp_path):
    script = textwrap.dedent(f"""
        import evaluate
        metric = evaluate.load({str(NEXT_TOKEN_METRIC_PATH)!r}, keep_in_memory=True)
        print(metric.compute(target_rank=[0, 4], target_logprob=[-1.0, -3.0], target_id=[3, 4])["top1"])
    """)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "0.5"


def test_token_statistics_ignore_padding():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 20, generator=gen)
    input_ids = torch.randint(20, (2, 6), generator=gen)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    stats = token_statistics(logits, input_ids, attention_mask)
    assert stats["target_id"].tolist() == input_ids[0, 1:].tolist() + input_ids[1, 1:3].tolist()
    # Whatever sits at padded positions, in the ids or the logits, changes nothing.
    noisy_ids, noisy_logits = input_ids.clone(), logits.clone()
    noisy_ids[1, 3:] = 7
    noisy_logits[1, 2:] = torch.randn(4, 20, generator=gen)
    noisy_logits[1, 2, noisy_ids[1, 3]] = 100.0  # position 2 predicts a padding token: excluded
    again = token_statistics(noisy_logits, noisy_ids, attention_mask)
    for name in stats:
        assert torch.equal(stats[name], again[name])
    assert stats["target_rank"].dtype == stats["target_id"].dtype == torch.long
    assert stats["target_logprob"].dtype == torch.float64


def test_token_statistics_of_half_precision_logits_use_float32():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 300, generator=gen)
    ids = torch.randint(300, (2, 5), generator=gen)
    mask = torch.ones_like(ids)
    low = token_statistics(logits.bfloat16(), ids, mask)
    reference = token_statistics(logits.bfloat16().float(), ids, mask)
    for name in low:
        assert torch.equal(low[name], reference[name])


def model_loss(model, batches):
    """Mean next-token cross-entropy from the model's own ``labels=`` loss, padding masked with -100."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            total += float(out.loss) * n
            count += n
    return total / count


def test_evaluate_model_agrees_with_the_model_loss_and_argmax(tiny_model, chunks):
    batches = make_batches(chunks, batch_size=4, pad_id=1)
    result = evaluate_model(tiny_model, batches, skip_token_ids=[5, 6], prefix="forget_", progress=False)
    assert set(result) == {f"forget_{m}" for m in (*METRIC_NAMES, "n_tokens")}
    assert result["forget_n_tokens"] == sum(len(c) - 1 for c in chunks)
    assert result["forget_loss"] == pytest.approx(model_loss(tiny_model, batches), abs=1e-4)
    assert result["forget_perplexity"] == pytest.approx(math.exp(result["forget_loss"]))

    # A cross-check that needs neither evaluate_model nor token_statistics: argmax per chunk.
    hits = targets = 0
    with torch.no_grad():
        for chunk in chunks:
            logits = tiny_model(input_ids=chunk[None]).logits[0, :-1]
            hits += int((logits.argmax(-1) == chunk[1:]).sum())
            targets += len(chunk) - 1
    assert result["forget_top1"] == pytest.approx(hits / targets)


def test_evaluate_model_does_not_depend_on_batch_size(tiny_model, chunks):
    results = [
        evaluate_model(tiny_model, make_batches(chunks, batch_size=size, pad_id=1), progress=False)
        for size in (1, 3, 16)
    ]
    for other in results[1:]:
        assert other["n_tokens"] == results[0]["n_tokens"]
        for name in METRIC_NAMES:
            assert other[name] == pytest.approx(results[0][name], rel=1e-5), name


def test_evaluate_model_restores_training_mode_and_rejects_no_batches(tiny_model, chunks):
    tiny_model.train()
    try:
        evaluate_model(tiny_model, make_batches(chunks[:2], 2, pad_id=1), progress=False)
        assert tiny_model.training
    finally:
        tiny_model.eval()
    with pytest.raises(ValueError, match="at least one batch"):
        evaluate_model(tiny_model, [], progress=False)


class FakeAccelerator:
    """Stands in for one process of several; gather_object is the identity outside torch.distributed."""

    def __init__(self, index, count):
        self.process_index, self.num_processes, self.is_local_main_process = index, count, index == 0


def test_evaluate_model_shards_batches_across_processes(tiny_model, chunks):
    batches = make_batches(chunks, batch_size=2, pad_id=1)
    shards = [evaluate_model(tiny_model, batches, accelerator=FakeAccelerator(i, 2), progress=False) for i in range(2)]
    whole = evaluate_model(tiny_model, batches, progress=False)
    assert shards[0]["n_tokens"] + shards[1]["n_tokens"] == whole["n_tokens"]
    expected_rank0 = evaluate_model(tiny_model, batches[0::2], progress=False)
    assert shards[0] == expected_rank0


def test_relative_drops_arithmetic():
    parent = {"forget_top1": 0.5, "forget_top10": 0.8, "forget_skip50_top1": 0.0, "forget_loss": 2.0}
    new = {"forget_top1": 0.25, "forget_top10": 0.88, "forget_skip50_top1": 0.1, "forget_loss": 3.0}
    drops = relative_drops(parent, new, "forget_")
    assert math.isnan(drops.pop("forget_skip50_top1_drop"))  # a parent value of 0: no relative change
    assert drops == pytest.approx({"forget_top1_drop": 0.5, "forget_top10_drop": -0.1, "forget_loss_increase": 0.5})
    unprefixed = relative_drops(
        {"top1": 0.4, "top10": 0.5, "skip50_top1": float("nan"), "loss": 1.0},
        {"top1": 0.3, "top10": 0.5, "skip50_top1": 0.2, "loss": 0.5},
        "retain_",
    )
    assert unprefixed["retain_top1_drop"] == pytest.approx(0.25)
    assert unprefixed["retain_top10_drop"] == 0.0
    assert math.isnan(unprefixed["retain_skip50_top1_drop"])
    assert unprefixed["retain_loss_increase"] == pytest.approx(-0.5)


def test_selectivity_floors_the_retain_drop():
    assert selectivity(0.3, 0.1) == pytest.approx(3.0)
    assert selectivity(0.3, 0.0) == pytest.approx(30.0)  # a retain drop under 1% counts as 1%
    # retain improved: no reward beyond what a 1% drop would give (the old floor of 0.1% gave 36.5 here)
    assert selectivity(0.0365, -0.004) == pytest.approx(3.65)
    assert selectivity(-0.05, 0.02) < 0  # forget improved: negative, never rewarded
    assert math.isnan(selectivity(float("nan"), 0.1))


def test_near_zero_values_give_no_relative_change():
    """retain_skip50_top1 0.0002 -> 0.0 is not a "-100%" effect: NaN, shown as an absolute change."""
    from mlflow_selprune.evaluation.drops import format_change, relative_drop, relearn_recovery

    assert math.isnan(relative_drop(0.0002, 0.0))
    assert relative_drop(0.2, 0.1) == pytest.approx(0.5)
    assert format_change(0.0002, 0.0) == "-0.0002 abs"
    assert format_change(0.2, 0.1) == "-50.0%"
    assert relearn_recovery(0.4, 0.2, 0.3) == pytest.approx(0.5)
    assert math.isnan(relearn_recovery(0.4, 0.395, 0.4))  # unlearning removed ~nothing: no ratio
