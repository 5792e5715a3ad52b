"""The quantization check (``--quantized-check``, ``evaluation.quantized``): a round trip through GGUF's block
formats that is the ``gguf`` package's own, bit for bit; an effect that lives inside quantization bins (as
fine-tuning's does) measured as taken back in full; and a gate that fails a version whose forget drop is gone
once its weights are quantized."""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import pytest
import torch
import transformers as T
from gguf import GGMLQuantizationType, quants

from mlflow_selprune.config import QUANTIZED_FORMATS, EvidenceOptions
from mlflow_selprune.errors import ConfigError
from mlflow_selprune.evaluation.quantized import quantizable_weights, quantized, quantized_metrics


def _gguf_round_trip(matrix: torch.Tensor, fmt: str) -> torch.Tensor:
    qtype = GGMLQuantizationType[QUANTIZED_FORMATS[fmt]]
    rows = matrix.detach().float().contiguous().numpy()
    return torch.from_numpy(quants.dequantize(quants.quantize(rows, qtype), qtype))


def _tiny_llama(intermediate: int = 96, seed: int = 0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return T.LlamaForCausalLM(config).eval()


def _tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


@pytest.mark.parametrize("fmt", list(QUANTIZED_FORMATS))
@pytest.mark.parametrize("family", ["llama", "gpt2", "llama-ragged"])
def test_a_round_trip_is_the_gguf_packages_own_bit_for_bit_keeps_zeros_and_puts_the_model_back(family, fmt):
    model = {"llama": _tiny_llama, "gpt2": _tiny_gpt2, "llama-ragged": lambda: _tiny_llama(intermediate=48)}[family]()
    with torch.no_grad():  # pruned neurons: zeroed input columns of each output projection
        for name, module in model.named_modules():
            if name.endswith(("mlp.down_proj", "mlp.c_proj")):
                weight = module.weight
                if isinstance(module, torch.nn.Linear):
                    weight[:, ::3] = 0
                else:  # GPT-2's Conv1D keeps its matrix as (in, out)
                    weight[::3, :] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = {id(w): transposed for w, transposed in quantizable_weights(model)}
    named = dict(model.named_parameters(remove_duplicate=False))
    with quantized(model, fmt):
        for name, param in named.items():
            original = before[name]
            if id(param) not in found:
                assert torch.equal(param, original), f"{name} is not quantized in GGUF, and must stay as it was"
                continue
            transposed = found[id(param)]
            expected = _gguf_round_trip(original.t() if transposed else original, fmt)
            assert torch.equal(param, expected.t() if transposed else expected), name
            zeros = original == 0
            assert bool((param[zeros] == 0).all()), f"{name}: a zeroed weight is no longer zero"
        if family == "llama":  # the tied head is the embedding matrix: one round trip, not two
            assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} differs after the check"
    assert found, "nothing was quantized"
    if family == "llama-ragged":  # rows of 48 weights: GGUF keeps such a tensor unquantized, and so does the check
        assert all(id(layer.mlp.down_proj.weight) not in found for layer in model.model.layers)
    if family == "gpt2":
        assert any(found.values()), "GPT-2's Conv1D matrices are quantized along their input rows"


def test_an_effect_inside_the_quantization_bins_is_measured_as_taken_back_in_full():
    """Fine-tuning moves weights by less than a 4-bit bin: its effect on a model can be large in floating point
    and nil once quantized. Built here as an ascent on the forget loss whose every step is kept inside the
    parent's Q4_0 bins (the quantized bytes are the parent's), the check reports a recovery of exactly 1."""
    parent = _tiny_llama(seed=1)
    generator = torch.Generator().manual_seed(0)
    forget = torch.randint(0, 128, (8, 32), generator=generator)
    retain = torch.randint(0, 128, (8, 32), generator=generator)
    with torch.no_grad():
        targets = {"forget": parent(forget).logits.argmax(-1), "retain": parent(retain).logits.argmax(-1)}

    def evaluate_fn(model):  # top-1: agreement with the parent's own floating-point answers
        with torch.no_grad():
            return {
                f"{side}_top1": float((model(inputs).logits.argmax(-1) == targets[side]).float().mean())
                for side, inputs in (("forget", forget), ("retain", retain))
            }

    unlearned = _tiny_llama(seed=1)
    bins = [(w, _gguf_round_trip(w.t() if t else w, "int4")) for w, t in quantizable_weights(unlearned)]
    codes = {id(w): _q4_codes(w) for w, _ in bins}
    for _ in range(20):
        unlearned.zero_grad()
        loss = -torch.nn.functional.cross_entropy(unlearned(forget).logits.flatten(0, 1), targets["forget"].flatten())
        loss.backward()
        with torch.no_grad():
            for weight, _trip in bins:
                scale = _q4_scales(weight)
                # a block's largest weight sets its scale: it stays, and no other weight grows past it ...
                movable = (weight.abs() < 8 * scale) & ((weight - 0.2 * scale * weight.grad.sign()).abs() < 8 * scale)
                moved = torch.where(movable, weight - 0.2 * scale * weight.grad.sign(), weight)
                # ... so each weight's code depends on it alone: a weight moves only where it keeps its code
                weight.copy_(torch.where(_q4_codes(moved) == codes[id(weight)], moved, weight))
    for weight, trip in bins:
        assert torch.equal(_gguf_round_trip(weight.detach(), "int4"), trip), "a weight left its bin"
    float_drop = 1 - evaluate_fn(unlearned)["forget_top1"]
    assert float_drop >= 0.2, f"the ascent moved too little to show anything ({float_drop:.3f})"
    models = {"unlearned": (unlearned, contextlib.nullcontext), "parent": (parent, contextlib.nullcontext)}
    measured = quantized_metrics(evaluate_fn, ("int4",), {"forget_top1_drop": float_drop}, models)
    assert measured["quantized_int4_forget_top1_drop"] == 0.0
    assert measured["quantized_int4_recovery"] == 1.0


def _q4_scales(weight: torch.Tensor) -> torch.Tensor:
    """Each weight's Q4_0 scale (the width of its bin): |its block's largest weight| / 8."""
    blocks = weight.detach().reshape(-1, 32)
    return (blocks.abs().amax(1, keepdim=True) / 8).expand_as(blocks).reshape(weight.shape)


def _q4_codes(weight: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes the gguf package gives each weight (the scale bytes are checked by the round trip)."""
    qtype = GGMLQuantizationType.Q4_0
    raw = torch.from_numpy(quants.quantize(weight.detach().float().contiguous().numpy(), qtype))
    packed = raw.reshape(-1, 18)[:, 2:]
    low, high = packed & 0x0F, packed >> 4
    return torch.cat([low, high], dim=1).reshape(weight.shape)


@pytest.mark.parametrize("text", ["int2", "int8,fp8", "Q4_0"])
def test_an_unknown_format_is_refused_naming_the_flag(text):
    with pytest.raises(ConfigError, match=r"--quantized-check: unknown format .*choose from int8, int4"):
        EvidenceOptions(quantized_check=text).validate()


def test_formats_are_read_in_order_once_each():
    assert EvidenceOptions(quantized_check=" int4, int8,int4 ").quantized_formats() == ("int4", "int8")
    assert EvidenceOptions().quantized_formats() == ()
    # recorded in one spelling (selprune.quantized_check), which the gate splits on commas
    assert EvidenceOptions(quantized_check=" int4, int8,int4 ").validate().quantized_check == "int4,int8"


@pytest.mark.slow(seconds=20)
def test_the_gate_fails_a_version_whose_forget_drop_is_gone_once_quantized(tmp_path_factory):
    """The parent carries one huge weight per Q4_0 block of its MLP output projections, on a neuron that never
    fires: in floating point nothing changes and pruning removes the counting source as usual, but a 4-bit
    round trip rounds every other weight of those blocks to zero, in the parent and the unlearned model alike,
    so the quantized forget drop is 0 and the whole float drop is taken back (recovery 1)."""

    from mlflow_helpers import current_store, invoke, register_text_model
    from trained_model import trained_model

    trained = trained_model(tmp_path_factory)
    model = trained.load()
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            into, out = layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h
            for neuron in range(0, out.weight.shape[1], 32):
                into.weight[neuron], into.bias[neuron] = 0, 0  # ReLU(0): it never fires
                out.weight[:, neuron] = 1000.0
    root = tmp_path_factory.mktemp("quantized-gate")
    forget, retain = root / "counting.jsonl", root / "words.jsonl"
    forget.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in trained.forget_texts))
    retain.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in trained.retain_texts))
    store = {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}"}
    with current_store(store), mock.patch.dict("os.environ"):
        register_text_model(model, trained.tokenizer, "two-sources")
        pruned = invoke(
            "prune", "--model-uri", "models:/two-sources/1", "--forget", str(forget), "--retain", str(retain),
            "--ff-frac", "0.2", "--steps", "3", "--samples", "0", "--no-control", "--quantized-check", "int4",
            "--no-progress",
        )  # fmt: skip
        assert pruned.exit_code == 0, pruned.output
        assert "forget_top1 int4" in pruned.output and "of the forget drop, int4 keeps 0%" in pruned.output
        from mlflow_helpers import recorded_tags

        measured_in = recorded_tags("two-sources", "2")["selprune.quantized_check"]
        assert measured_in == "int4"  # the gate requires a recovery for each format the check was asked for
        floats = invoke("gate", "--model-uri", "models:/two-sources/2", "--min-forget-drop", "0.3", "--dry-run")
        assert floats.exit_code == 0, floats.output  # in floating point the version does what it says
        gated = invoke("gate", "--model-uri", "models:/two-sources/2", "--max-quantized-recovery", "0.5")
        assert gated.exit_code == 1, gated.output
        assert "quantized_int4_recovery = 1.0000" in gated.output
        assert "gate FAILED" in gated.output
        base = invoke("gate", "--model-uri", "models:/two-sources/2", "--max-quantized-recovery", "1.5")
        assert base.exit_code == 2 and "--max-quantized-recovery must be a share" in base.output


@pytest.mark.slow(seconds=8)
def test_a_model_with_no_weight_gguf_would_quantize_is_refused_before_anything_is_written(store, tiny_tokenizer):
    """Rows of 24 and 48 weights: a GGUF file keeps every matrix unquantized, and the check would measure nothing."""
    from mlflow.tracking import MlflowClient

    from mlflow_helpers import invoke, register_text_model, registry_snapshot, tiny_neox_config

    torch.manual_seed(0)
    config = tiny_neox_config(tiny_tokenizer)
    config.hidden_size, config.intermediate_size = 24, 48
    narrow = T.GPTNeoXForCausalLM(config).eval()
    register_text_model(narrow, tiny_tokenizer, "narrow-lm")
    client = MlflowClient()
    before, runs = registry_snapshot(), len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    with mock.patch.dict("os.environ"):
        refused = invoke(
            "prune", "--model-uri", "models:/narrow-lm/1", "--forget", store["forget"], "--retain", store["retain"],
            "--quantized-check", "int4", "--no-progress",
        )  # fmt: skip
    assert refused.exit_code == 2, refused.output
    (line,) = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert "--quantized-check: no weight that pruning edits in this GPTNeoXForCausalLM would be quantized" in line
    assert "rows are a multiple of 32" in line
    assert registry_snapshot() == before
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs
