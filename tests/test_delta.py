"""Delta versions: only the masks are stored; loading rebuilds exactly the full version's weights, or fails clearly."""

from __future__ import annotations

import copy
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mlflow_selprune import PruneConfig, prune
from mlflow_selprune.registry import delta, lineage
from mlflow_selprune.registry.loading import download, load_components
from mlflow_selprune.registry.resolve import resolve

from mlflow_helpers import TINY_NAME, invoke, recorded_tags, registry_snapshot, sqlite_store
from model_zoo import FAMILIES

SMALL = [
    "--paragraphs",
    "--max-length",
    "64",
    "--batch-size",
    "8",
    "--collect-tokens",
    "1500",
    "--eval-tokens",
    "800",
    "--no-progress",
    "--no-control",
]
PRUNE = ["--ff-frac", "0.1", "--attn-frac", "0.1", "--steps", "2", "--seed", "3"]


def _batches(seed: int, low: int, high: int):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(low, high, (4, 12), generator=g),
            "attention_mask": torch.ones(4, 12, dtype=torch.long),
        }
        for _ in range(2)
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_delta_rebuilds_the_full_weights_exactly(family):
    """For every family: the parent plus the stored masks (and biases) gives the pruned model, bit for bit."""
    config, cls = FAMILIES[family]
    torch.manual_seed(0)
    parent = cls(copy.deepcopy(config)).eval()
    full = copy.deepcopy(parent)
    has_attn_bias = all(p.module.bias is not None for p in __import__("mlflow_selprune").find_architecture(full).attn)
    result = prune(
        full,
        _batches(1, 4, 70),
        _batches(2, 60, 128),
        PruneConfig(ff_frac=0.2, attn_frac=0.2, steps=2, attn_mean_offset=has_attn_bias),
        progress=False,
    )
    masks = {"ff": result.ff_mask, "attn": result.attn_mask}
    stored = delta.unpack_masks(delta.pack_masks(masks))
    rebuilt = copy.deepcopy(parent)
    delta.apply_delta(rebuilt, stored, delta.changed_biases(full, masks))
    assert lineage.weights_sha256(rebuilt) == lineage.weights_sha256(full)
    batch = _batches(5, 0, 128)[0]
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).logits, full(**batch).logits)


def _latest() -> str:
    versions = MlflowClient().search_model_versions(f"name='{TINY_NAME}'")
    return f"models:/{TINY_NAME}/{max(int(v.version) for v in versions)}"


def _prune(store, parent: str, storage: str) -> str:
    out = invoke(
        "prune",
        "--model-uri",
        parent,
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        "--storage",
        storage,
        *PRUNE,
        *SMALL,
    )
    assert out.exit_code == 0, out.stderr
    return _latest()


def _logits(uri: str):
    model, tokenizer = load_components(resolve(uri))
    batch = tokenizer(["def parse(text):\n    return text.split()"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits, lineage.weights_sha256(model)


def _bytes(uri: str) -> int:
    return sum(f.stat().st_size for f in Path(download(resolve(uri))).rglob("*") if f.is_file())


@pytest.mark.slow
def test_delta_versions_register_load_chain_serve_and_materialize(store):
    base = f"models:/{TINY_NAME}/1"
    as_delta = _prune(store, base, "delta")
    as_full = _prune(store, base, "full")
    client = MlflowClient()
    tags_delta = recorded_tags(TINY_NAME, as_delta.rsplit("/", 1)[1])
    tags_full = recorded_tags(TINY_NAME, as_full.rsplit("/", 1)[1])
    assert tags_delta[lineage.STORAGE] == "delta" and tags_full[lineage.STORAGE] == "full"
    # the same pruning: the same weights digest, whichever way it is stored
    assert tags_delta[lineage.WEIGHTS_SHA] == tags_full[lineage.WEIGHTS_SHA]
    assert tags_delta[lineage.PARENT_WEIGHTS_SHA] == lineage.weights_sha256(load_components(resolve(base))[0])
    logits_delta, digest_delta = _logits(as_delta)
    logits_full, digest_full = _logits(as_full)
    assert torch.equal(logits_delta, logits_full) and digest_delta == digest_full == tags_full[lineage.WEIGHTS_SHA]
    local = Path(download(resolve(as_delta)))
    weights = [f.name for f in local.rglob("*.safetensors") if f.parent.name not in ("delta", "selprune")]
    assert weights == [], "a delta stores no weights"
    assert _bytes(as_delta) < _bytes(as_full)

    # a delta of a delta resolves the chain down to the full version; lineage shows each link's storage
    chained = _prune(store, as_delta, "delta")
    assert (
        lineage.weights_sha256(load_components(resolve(chained))[0])
        == recorded_tags(TINY_NAME, chained.rsplit("/", 1)[1])[lineage.WEIGHTS_SHA]
    )
    out = invoke("lineage", chained, "--json", "--verify")
    assert out.exit_code == 0, out.stderr
    import json

    hops = json.loads(out.stdout)
    assert [h["storage"] for h in hops[:2]] == ["delta", "delta"] and all(h.get("verified", True) for h in hops)

    # served through pyfunc (what `mlflow models serve` loads): greedy, so the same answer twice
    served = mlflow.pyfunc.load_model(as_delta)
    first, second = served.predict(["def "]), served.predict(["def "])
    assert first == second and isinstance(first[0], str)

    # materialize before the parent goes: a full version with the same lineage and digest
    out = invoke("materialize", as_delta)
    assert out.exit_code == 0, out.stderr
    materialized = _latest()
    tags_m = recorded_tags(TINY_NAME, materialized.rsplit("/", 1)[1])
    assert tags_m[lineage.STORAGE] == "full" and tags_m["selprune.materialized_from"] == as_delta
    for key in (lineage.PARENT, lineage.ROOT, lineage.WEIGHTS_SHA, lineage.FORGET_DIGEST, lineage.CONFIG_SHA):
        assert tags_m[key] == tags_delta[key], key
    assert torch.equal(_logits(materialized)[0], logits_full)

    # the parent deleted: loading the delta fails with one line naming the missing link
    client.delete_model_version(TINY_NAME, "1")
    for args in (
        ["evaluate", "--model-uri", as_delta, "--forget", store["forget"], "--retain", store["retain"], *SMALL[:-1]],
        ["lineage", as_delta],
    ):
        out = invoke(*args)
        assert out.exit_code == 2, out.stderr
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and base in errors[0], out.stderr
    assert torch.equal(_logits(materialized)[0], logits_full)  # the materialized copy still loads


def test_delta_needs_a_registered_parent(store, tmp_path, tiny_tokenizer):
    from mlflow_helpers import tiny_model

    tiny_model(tiny_tokenizer).save_pretrained(tmp_path / "local")
    tiny_tokenizer.save_pretrained(tmp_path / "local")
    before = registry_snapshot()
    out = invoke(
        "prune",
        "--model-uri",
        str(tmp_path / "local"),
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        "--storage",
        "delta",
        "--register-as",
        "x",
        *PRUNE,
        *SMALL,
    )
    assert out.exit_code == 2 and "--storage delta needs a registered parent" in out.stderr
    assert registry_snapshot() == before


@pytest.mark.slow
def test_a_parent_whose_weights_changed_is_refused(tmp_path_factory, tiny_tokenizer):
    with sqlite_store(tmp_path_factory.mktemp("changed"), tiny_tokenizer) as s:
        as_delta = _prune(s, f"models:/{TINY_NAME}/1", "delta")
        from safetensors.torch import load_file, save_file

        # tamper with the parent's stored weights where the store keeps them (the only full model here)
        for weights in (s["root"] / "mlruns").rglob("model.safetensors"):
            tensors = load_file(str(weights))
            name = sorted(tensors)[0]
            tensors[name] = tensors[name] + 1
            save_file(tensors, str(weights))
        out = invoke("lineage", as_delta, "--verify")
        assert out.exit_code == 2 and "weights changed" in out.stderr, out.stderr
