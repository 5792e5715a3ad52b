"""Masked LMs (BERT, RoBERTa): wrapped inputs, seeded masking, masked-token metrics, relearning, registry."""

from __future__ import annotations

import inspect
import json
import math
import textwrap

import numpy as np
import pytest
import torch

from mlflow_selprune.data.batching import prepare_data, special_affixes
from mlflow_selprune.data.masking import IGNORE_INDEX, MASK_FRACTION, batch_seed, mask_batch, masking_ids
from mlflow_selprune.evaluation import evaluate_model
from mlflow_selprune.kinds import MASKED_LM, model_kind

from model_zoo import tiny_masked_lm, wordpiece_tokenizer


def _paragraphs(module) -> list[str]:
    return [" ".join(p.split()) for p in inspect.getsource(module).split("\n\n") if len(p.strip()) > 60]


@pytest.fixture(scope="module")
def tokenizer():
    return wordpiece_tokenizer(_paragraphs(json) + _paragraphs(textwrap) + _paragraphs(inspect))


@pytest.fixture(scope="module")
def prepared(tokenizer):
    return prepare_data(
        _paragraphs(inspect), tokenizer, max_length=48, collect_tokens=800, eval_tokens=600, batch_size=4
    )


def test_chunks_are_wrapped_in_cls_and_sep(tokenizer, prepared):
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert special_affixes(tokenizer) == ([cls], [sep])
    for batch in prepared.eval_batches + prepared.collect_batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            real = ids[mask.bool()].tolist()
            assert real[0] == cls and real[-1] == sep
            assert cls not in real[1:-1] and sep not in real[1:-1]
    assert cls not in prepared.skip_token_ids and sep not in prepared.skip_token_ids


def test_masking_is_seeded_and_chooses_15_percent_of_ordinary_tokens_80_10_10(tokenizer, prepared):
    ids = masking_ids(tokenizer)
    batch = prepared.eval_batches[0]
    first, again = mask_batch(batch, ids, seed=3), mask_batch(batch, ids, seed=3)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(mask_batch(batch, ids, seed=4)["labels"], first["labels"])
    special = set(tokenizer.all_special_ids)
    for row in range(batch["input_ids"].shape[0]):
        original, masked, labels = batch["input_ids"][row], first["input_ids"][row], first["labels"][row]
        real = batch["attention_mask"][row].bool()
        eligible = [i for i in range(len(original)) if real[i] and int(original[i]) not in special]
        chosen = (labels != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        assert set(chosen) <= set(eligible)  # never a special token or padding
        n = max(1, int(len(eligible) * MASK_FRACTION))
        assert len(chosen) == n
        assert torch.equal(labels[chosen], original[chosen])
        n_mask = sum(int(masked[i]) == tokenizer.mask_token_id for i in chosen)
        n_unchanged = sum(int(masked[i]) == int(original[i]) for i in chosen)
        assert n_mask >= 1 and abs(n_mask - 0.8 * n) < 1  # the nearest apportionment, never none masked
        assert abs(n_unchanged - 0.1 * n) < 1 + 0.1 * n  # unchanged, or a random draw that hit the same token
        changed = [i for i in range(len(original)) if masked[i] != original[i]]
        assert set(changed) <= set(chosen)  # nothing outside the chosen positions changes
        assert all(int(masked[i]) not in special for i in chosen if int(masked[i]) != tokenizer.mask_token_id)


@pytest.mark.parametrize(
    "n, expected", [(1, (1, 0)), (2, (2, 0)), (3, (3, 0)), (5, (4, 1)), (10, (8, 1)), (18, (14, 2)), (19, (15, 2))]
)
def test_the_80_10_10_shares_round_to_the_nearest_and_mask_a_lone_position(n, expected):
    """Rounding both shares down used to leave a lone scored position unmasked (the model saw the answer) and a
    third of a short chunk's scored positions visible."""
    from mlflow_selprune.data.masking import shares

    masked, random_ = shares(n)
    assert (masked, random_) == expected
    assert n - masked - random_ <= max(1, round(0.1 * n))  # visible: at most the 10% share, rounded


def _train(model, batches, masking, lr=3e-3):
    """A few seeded masked-LM steps, so ranks are not all ties of an untrained model."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step, batch in enumerate(batches):
        model(**mask_batch(batch, masking, seed=100 + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _direct_metrics(model, batches, ids, skip):
    """Masked-token metrics by plain loops over every masked position: the reference."""
    ranks, logprobs, targets = [], [], []
    for index, batch in enumerate(batches):
        masked = mask_batch(batch, ids, seed=batch_seed(index))
        with torch.no_grad():
            logits = model(input_ids=masked["input_ids"], attention_mask=masked["attention_mask"]).logits.double()
        for b, t in (masked["labels"] != IGNORE_INDEX).nonzero().tolist():
            row, target = logits[b, t], int(masked["labels"][b, t])
            ranks.append(int((row > row[target]).sum()))
            logprobs.append(float(torch.log_softmax(row, -1)[target]))
            targets.append(target)
    rare = [r for r, t in zip(ranks, targets) if t not in skip]
    loss = -sum(logprobs) / len(logprobs)
    return {
        "top1": np.mean([r == 0 for r in ranks]),
        "top10": np.mean([r < 10 for r in ranks]),
        "skip50_top1": np.mean([r == 0 for r in rare]),
        "loss": loss,
        "perplexity": math.exp(loss),
        "n_tokens": len(ranks),
    }


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_masked_metrics_equal_a_direct_computation_on_masked_positions(tokenizer, prepared, family):
    model = tiny_masked_lm(tokenizer, family)
    _train(model, prepared.collect_batches * 2, prepared.masking)
    got = evaluate_model(
        model, prepared.eval_batches, skip_token_ids=prepared.skip_token_ids, masking=prepared.masking, progress=False
    )
    want = _direct_metrics(model, prepared.eval_batches, prepared.masking, set(prepared.skip_token_ids))
    assert got["n_tokens"] == want["n_tokens"] > 0
    for name in ("top1", "top10", "skip50_top1", "loss", "perplexity"):
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-9), name
    assert got["top10"] > 0  # trained: the comparison is not between two zeros


def test_masked_lm_is_never_scored_on_next_tokens(tokenizer, prepared):
    """The silent wrong answer: a masked LM sees its targets when read as a causal LM."""
    from mlflow_selprune.evaluation.next_token import evaluate_model as next_token_evaluate

    model = tiny_masked_lm(tokenizer)
    assert model_kind(model) == MASKED_LM
    masked = evaluate_model(model, prepared.eval_batches, masking=prepared.masking, progress=False)
    causal = next_token_evaluate(model, prepared.eval_batches, progress=False)
    assert masked["n_tokens"] < causal["n_tokens"]  # only the chosen positions
    assert masked != causal


def test_relearning_a_masked_lm_trains_on_masked_tokens_and_is_seeded(tokenizer, prepared):
    from mlflow_selprune.engine import relearn

    model = tiny_masked_lm(tokenizer)
    before = evaluate_model(model, prepared.eval_batches, masking=prepared.masking, progress=False)["loss"]
    tuned = relearn(model, prepared.collect_batches, steps=12, lr=3e-3, seed=0, masking=prepared.masking)
    again = relearn(model, prepared.collect_batches, steps=12, lr=3e-3, seed=0, masking=prepared.masking)
    after = evaluate_model(tuned, prepared.eval_batches, masking=prepared.masking, progress=False)["loss"]
    assert after < before
    for a, b in zip(tuned.parameters(), again.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="masking"):
        relearn(model, prepared.collect_batches, steps=1, lr=1e-3, seed=0, masking=None)


@pytest.fixture(scope="module")
def masked_store(tmp_path_factory, tokenizer):
    """A sqlite store holding a tiny BERT (fill-mask, alias base), pruned once to forget json's prose."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mlflow_selprune import DataOptions, EvidenceOptions, PruneConfig, run_prune
    from mlflow_selprune.registry.flavor import default_pip_requirements

    root = tmp_path_factory.mktemp("masked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = root / "data"
    data.mkdir()
    (data / "forget.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in _paragraphs(json)))
    (data / "retain.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in _paragraphs(inspect)))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            both = prepare_data(
                _paragraphs(json) + _paragraphs(inspect),
                tokenizer,
                max_length=48,
                collect_tokens=4000,
                eval_tokens=100,
                batch_size=8,
            )
            model = _train(tiny_masked_lm(tokenizer), both.collect_batches * 3, both.masking)
            with mlflow.start_run(run_name="register-bert"):
                info = mlflow.transformers.log_model(
                    {"model": model, "tokenizer": tokenizer},
                    name="model",
                    task="fill-mask",
                    pip_requirements=default_pip_requirements(),
                )
            version = mlflow.register_model(info.model_uri, "tiny-bert").version
            MlflowClient().set_registered_model_alias("tiny-bert", "base", version)
            result = run_prune(
                "models:/tiny-bert@base",
                str(data / "forget.jsonl"),
                str(data / "retain.jsonl"),
                config=PruneConfig(ff_frac=0.05, attn_frac=0.05, steps=1),
                data=DataOptions(max_length=48, collect_tokens=600, eval_tokens=400, batch_size=4),
                evidence=EvidenceOptions(relearn_steps=2),
                progress=False,
            )
            yield {"root": root, "uri": uri, "env": {"MLFLOW_TRACKING_URI": uri}, "result": result}
        finally:
            mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_a_pruned_masked_lm_registers_with_masked_metrics_and_reloads_exactly(masked_store, tokenizer):
    import mlflow
    from mlflow.tracking import MlflowClient

    from mlflow_selprune.registry.lineage import weights_sha256

    result = masked_store["result"]
    assert result.model_uri == "models:/tiny-bert/2"
    run = MlflowClient().get_run(result.run_id)
    metrics = run.data.metrics
    for name in (
        "forget_top1",
        "retain_top1",
        "forget_top1_drop",
        "control_forget_top1_drop",
        "relearn_forget_top1",
        "relearn_parent_forget_top1",
    ):
        assert name in metrics, name
    # the masked-token definition: n_tokens counts masked positions (~15% of the ordinary tokens), not next tokens
    prepared = prepare_data(
        str(masked_store["root"] / "data" / "forget.jsonl"),
        tokenizer,
        max_length=48,
        collect_tokens=600,
        eval_tokens=400,
        batch_size=4,
    )
    ordinary = sum(int(b["attention_mask"].sum()) - 2 * b["input_ids"].shape[0] for b in prepared.eval_batches)
    assert metrics["forget_n_tokens"] < 0.2 * ordinary
    info = mlflow.models.get_model_info(result.model_uri)
    assert info.flavors["transformers"]["task"] == "fill-mask"
    loaded = mlflow.transformers.load_model(result.model_uri, return_type="components")["model"]
    assert weights_sha256(loaded) == result.tags["selprune.weights_sha256"]


@pytest.mark.slow
def test_served_masked_lm_answers_a_fill_mask_request(masked_store, tokenizer):
    from mlflow_helpers import post_json, served_model

    with served_model(masked_store["result"].model_uri, masked_store) as (url, _):
        answer = post_json(url, {"inputs": [f"the object is {tokenizer.mask_token} to json"]})
    (prediction,) = answer["predictions"]
    assert isinstance(prediction, str) and prediction.strip()
