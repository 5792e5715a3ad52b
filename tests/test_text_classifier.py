"""A text classifier, the kind added by following docs/model-kinds.md: forget one label, keep the others.

A tiny BERT sequence classifier is trained here to tell three topics apart by
their words; it is registered, pruned through the CLI with --forget-classes,
verified and gated, as the docs say a user does.
"""

from __future__ import annotations

import json
import os
import random
from unittest import mock

import pytest
import torch
from mlflow.tracking import MlflowClient

from mlflow_helpers import invoke, recorded, sqlite_store
from model_zoo import whole_word_tokenizer

pytestmark = pytest.mark.slow(seconds=60)

TOPICS = {
    "sports": "goal match team score coach league ball player season stadium".split(),
    "cooking": "oven recipe flour butter sauce garlic onion simmer bake spoon".split(),
    "music": "guitar melody chord tempo drum singer album rhythm piano song".split(),
}
SHARED = "the a of and to in is was with for on today very".split()
LABELS = [*TOPICS, "other"]


def _texts(n: int, seed: int) -> list[dict]:
    """Texts of each topic (its words among common ones), and "other" texts of common words only: so every
    topic is recognised by its own words, none by the absence of the others'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        own = TOPICS.get(label, SHARED)
        words = [rng.choice(own) for _ in range(4)] + [rng.choice(SHARED) for _ in range(8)]
        rng.shuffle(words)
        rows.append({"text": f"{i} " + " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_tokenizer):
    import transformers as T

    root = tmp_path_factory.mktemp("text_classifier")
    rows = _texts(800, seed=0)
    tokenizer = whole_word_tokenizer([r["text"] for r in rows], vocab_size=300)
    labels = list(LABELS)
    config = T.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    train = rows[:600]
    model.train()
    # one thread, restored afterwards: the trained model must not depend on what ran before in this worker (an
    # in-process demo leaves torch at its own thread count, and 2 threads train another classifier)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(150):
            batch = [train[(step * 16 + i) % len(train)] for i in range(16)]
            enc = tokenizer([r["text"] for r in batch], padding=True, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([labels.index(r["label"]) for r in batch])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    held_out = rows[600:]
    with torch.no_grad():
        enc = tokenizer([r["text"] for r in held_out], padding=True, return_tensors="pt")
        predicted = model(**enc).logits.argmax(-1)
    accuracy = float((predicted == torch.tensor([labels.index(r["label"]) for r in held_out])).float().mean())
    assert accuracy >= 0.9, f"the classifier must have learned the topics first (accuracy {accuracy:.2f})"
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "topics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _texts(900, seed=1)))
    (root / "store").mkdir()
    with sqlite_store(root / "store", tiny_tokenizer) as store:
        yield {
            "root": root,
            "model": root / "model",
            "data": data,
            "store": store,
            "loaded": model,
            "tokenizer": tokenizer,
        }


def test_per_label_accuracy_is_a_direct_count(classifier):
    """The kind's data and metrics: forget holds only the forgotten label, retain the others; top-1 and each
    label's top-1 equal an argmax count made here."""
    from mlflow_selprune import DataOptions
    from mlflow_selprune.kinds import SEQUENCE_CLASSIFIER, kind_of

    model, tokenizer = classifier["loaded"], classifier["tokenizer"]
    kind = kind_of(model)
    assert kind.name == SEQUENCE_CLASSIFIER and kind.task == "text-classification"
    data = DataOptions(max_length=32, batch_size=16, collect_tokens=2000, eval_tokens=2000, forget_classes="cooking")
    forget, retain = kind.prepare_data(
        str(classifier["data"]), None, tokenizer, model, data, trust_remote_code=False, select_part=False
    )
    assert forget.classes == [1] and retain.classes == [0, 2, 3]
    for prepared, prefix in ((forget, "forget_"), (retain, "retain_")):
        metrics = kind.evaluate(
            model,
            prepared.eval_batches,
            skip_token_ids=[],
            prefix=prefix,
            accelerator=None,
            progress=False,
            masking=None,
        )
        with torch.no_grad():
            pairs = [
                (int(p), int(y))
                for b in prepared.eval_batches
                for p, y in zip(
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1), b["labels"]
                )
            ]
        assert metrics[prefix + "n_texts"] == len(pairs) > 0
        assert metrics[prefix + "top1"] == pytest.approx(sum(p == y for p, y in pairs) / len(pairs))
        for label in prepared.classes:
            mine = [(p, y) for p, y in pairs if y == label]
            assert metrics[f"{prefix}class_{label}_top1"] == pytest.approx(sum(p == y for p, y in mine) / len(mine))


def test_a_text_classifier_forgets_one_label_through_the_cli(classifier):
    """register, prune --forget-classes, lineage --verify and gate, each through the CLI's own code (click's
    runner in this process: what is tested is the kind, not a process's start-up). The environment is put back
    after the prune: its ``--no-progress`` sets progress variables that processes started later would inherit."""
    env = classifier["store"]["env"]
    registered = invoke("register", str(classifier["model"]), "--name", "topics", "--alias", "base")
    assert registered.exit_code == 0, registered.output[-3000:]
    with mock.patch.dict(os.environ):
        out = invoke(
            "prune",
            "--model-uri",
            "models:/topics@base",
            "--forget",
            str(classifier["data"]),
            "--forget-classes",
            "cooking",
            "--ff-frac",
            "0.1",
            "--attn-frac",
            "0.2",
            "--steps",
            "3",
            "--max-length",
            "32",
            "--batch-size",
            "16",
            "--collect-tokens",
            "3000",
            "--eval-tokens",
            "3000",
            "--no-progress",
        )
    assert out.exit_code == 0, out.output[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    version = max(client.search_model_versions("name='topics'"), key=lambda v: int(v.version))
    tags = recorded(version, env["MLFLOW_TRACKING_URI"]).tags
    # how much a tiny classifier forgets depends on the model training made (seeds, threads): measured,
    # not asserted; the drop is what the parent and the result score
    run = client.get_run(version.run_id)
    history = {m.step: m.value for m in client.get_metric_history(version.run_id, "forget_top1")}
    parent, result = history[0], run.data.metrics["forget_top1"]  # step 0: the parent, before any pruning
    assert float(tags["selprune.metric.forget_top1_drop"]) == pytest.approx((parent - result) / parent, abs=1e-4)
    assert int(tags["selprune.attn_pruned"]) > 0
    assert "forget_class_1_top1" in run.data.metrics and "retain_class_0_top1" in run.data.metrics
    assert "retain_class_1_top1" not in run.data.metrics  # the forgotten label is on the forget side only
    assert "forget_class_0_top1" not in run.data.metrics
    verified = invoke("lineage", f"models:/topics/{version.version}", "--verify")
    assert verified.exit_code == 0, verified.output[-3000:]
    gated = invoke(
        "gate",
        "--model-uri",
        f"models:/topics/{version.version}",
        "--min-forget-drop",
        "0.3",
        "--set-alias",
        "forgot-cooking",
    )
    assert gated.exit_code == 0, gated.output[-3000:]


@pytest.mark.parametrize(
    "drop,flag", [("label", "--label-column"), ("text", "--text-column")], ids=["no-label", "no-text"]
)
def test_labelled_text_without_its_column_is_refused_naming_the_flag(classifier, drop, flag):
    """A table without the label (or text) column: one line naming the flag and the columns it has, exit 2,
    before any run."""
    from mlflow_helpers import registry_snapshot

    rows = [{k: v for k, v in r.items() if k != drop} for r in _texts(40, seed=2)]
    path = classifier["root"] / f"no-{drop}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    client = MlflowClient()
    runs = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    before = registry_snapshot()
    out = invoke(
        "prune", "--model-uri", str(classifier["model"]), "--forget", str(path), "--forget-classes", "cooking",
        "--no-register", "--no-progress",
    )  # fmt: skip
    assert out.exit_code == 2, out.output
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {flag}: DATA") and f"has no column '{drop}'" in line, line
    assert registry_snapshot() == before
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs
