"""`mlflow-selprune export`: a verified version written as GGUF, holding the very weights the quantization check
measured; the file logged to the version's run with a record that `lineage --verify` checks, signed or not."""

from __future__ import annotations

import hashlib
import json
from unittest import mock

import pytest
import torch
import transformers as T

pytestmark = pytest.mark.slow(seconds=40)


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory, tiny_tokenizer):
    """A sqlite store with a tiny Llama (v1) and the version pruned from it with --quantized-check int8,int4 (v2)."""
    from mlflow_helpers import SMALL, current_store, invoke, register_text_model, tiny_llama_config, write_data_files

    root = tmp_path_factory.mktemp("export")
    store = {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}"}
    forget, retain = write_data_files(root / "data")
    torch.manual_seed(0)
    config = tiny_llama_config(tiny_tokenizer)
    with current_store(store), mock.patch.dict("os.environ"):
        register_text_model(T.LlamaForCausalLM(config).eval(), tiny_tokenizer, "tiny-llama")
        pruned = invoke(
            "prune", "--model-uri", "models:/tiny-llama/1", "--forget", str(forget), "--retain", str(retain),
            "--ff-frac", "0.1", "--samples", "0", "--quantized-check", "int8,int4", *SMALL,
        )  # fmt: skip
        assert pruned.exit_code == 0, pruned.output
        yield {**store, "forget": str(forget), "retain": str(retain), "keys": root / "keys"}


@pytest.mark.parametrize("quantization, fmt", [("Q8_0", "int8"), ("Q4_0", "int4")])
def test_an_exported_file_reloads_as_the_weights_the_check_measured_and_measures_the_same(
    llama_store, quantization, fmt
):
    """The GGUF file, read back by transformers, holds exactly the round trip the quantization check made; as a
    registered model it measures the forget and retain top-1 the check recorded."""
    from mlflow.tracking import MlflowClient

    from mlflow_helpers import SMALL, invoke

    from mlflow_selprune.evaluation.quantized import quantized
    from mlflow_selprune.registry.loading import load_components
    from mlflow_selprune.registry.resolve import resolve

    out = llama_store["root"] / f"tiny-{quantization}.gguf"
    with mock.patch.dict("os.environ"):
        written = invoke("export", "models:/tiny-llama/2", str(out), "--quantization", quantization)
        assert written.exit_code == 0, written.output
        assert f"{quantization}, sha256" in written.output
        back = T.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
        model, tokenizer = load_components(resolve("models:/tiny-llama/2"))
        ids = tokenizer("def add(a, b):\n    return a + b", return_tensors="pt")["input_ids"]
        with torch.no_grad(), quantized(model, fmt):
            assert torch.equal(back(ids).logits, model(ids).logits)
        registered = invoke("register", str(out), "--name", f"tiny-llama-{fmt}")
        assert registered.exit_code == 0, registered.output
        measured = invoke(
            "evaluate", "--model-uri", f"models:/tiny-llama-{fmt}/1", "--forget", llama_store["forget"],
            "--retain", llama_store["retain"], *SMALL,
        )  # fmt: skip
        assert measured.exit_code == 0, measured.output
    run_id = measured.output.strip().splitlines()[-1].removeprefix("run: ")
    from_file = MlflowClient().get_run(run_id).data.metrics
    pruning_run = MlflowClient().get_model_version("tiny-llama", "2").run_id
    recorded = MlflowClient().get_run(pruning_run).data.metrics
    for side in ("forget", "retain"):
        assert from_file[f"{side}_top1"] == pytest.approx(recorded[f"quantized_{fmt}_{side}_top1"], abs=1e-9)


def test_lineage_verify_checks_each_export_and_with_trusted_keys_its_signature(llama_store):
    """The export's file in the run against its record; a replaced file is found; with --trusted-key, an
    unsigned record (one any user with EDIT could write beside a file of their own) is found too."""
    from mlflow.tracking import MlflowClient

    from mlflow_helpers import SMALL, invoke, recorded

    client = MlflowClient()
    with mock.patch.dict("os.environ"):
        assert invoke("keygen", str(llama_store["keys"])).exit_code == 0
        private, public = llama_store["keys"] / "signing_key.pem", llama_store["keys"] / "signing_key.pub.pem"
        pruned = invoke(
            "prune", "--model-uri", "models:/tiny-llama/1", "--forget", llama_store["forget"], "--retain",
            llama_store["retain"], "--ff-frac", "0.1", "--samples", "0", "--no-control", "--signing-key", str(private),
            "--register-as", "signed-llama", *SMALL,
        )  # fmt: skip
        assert pruned.exit_code == 0, pruned.output
        out = llama_store["root"] / "signed.gguf"
        signed = invoke("export", "models:/signed-llama/1", str(out), "--signing-key", str(private))
        assert signed.exit_code == 0, signed.output
        again = llama_store["root"] / "again" / "signed.gguf"  # a second export under the same file name
        again.parent.mkdir()
        assert invoke("export", "models:/signed-llama/1", str(again), "--signing-key", str(private)).exit_code == 0
        clean = invoke("lineage", "models:/signed-llama/1", "--verify", "--trusted-key", str(public))
        assert clean.exit_code == 0, clean.output
        version = recorded(client.get_model_version("signed-llama", "1"))
        (first, _) = sorted(json.loads(v)["artifact"] for k, v in version.tags.items() if k.startswith("selprune.ex"))
        # someone with EDIT logs a file of their own and a record that matches it, unsigned
        forged = llama_store["root"] / "forged.gguf"
        forged.write_bytes(out.read_bytes()[:-64] + bytes(64))
        client.log_artifact(version.run_id, str(forged), "selprune/exports/mine")
        record = {"format": "gguf", "quantization": "Q8_0", "artifact": "selprune/exports/mine/forged.gguf"}
        record |= {"sha256": hashlib.sha256(forged.read_bytes()).hexdigest(), "time": "2026-12-04T00:00:00Z"}
        record |= {"weights_sha256": version.tags["selprune.weights_sha256"]}
        key = "selprune.export.20261204T000000.000000Z-0"
        client.set_model_version_tag("signed-llama", "1", key, json.dumps(record))
        unsigned = invoke("lineage", "models:/signed-llama/1", "--verify", "--trusted-key", str(public))
        assert unsigned.exit_code == 1, unsigned.output
        assert f"unsigned: export record {key} has no signed attestation" in unsigned.output
        # an export of the parent's weights (the model before unlearning) passed off as this version's
        parents = record | {"weights_sha256": version.tags["selprune.parent_weights_sha256"]}
        client.set_model_version_tag("signed-llama", "1", key, json.dumps(parents))
        copied = invoke("lineage", "models:/signed-llama/1", "--verify")
        assert copied.exit_code == 1, copied.output
        assert f"export record {key} was made from other weights" in copied.output
        client.set_model_version_tag("signed-llama", "1", key, json.dumps(record))
        # and the signed export's own file replaced in the run
        replaced = llama_store["root"] / "replaced" / "signed.gguf"
        replaced.parent.mkdir()
        replaced.write_bytes(forged.read_bytes())
        client.log_artifact(version.run_id, str(replaced), first.rsplit("/", 1)[0])
        changed = invoke("lineage", "models:/signed-llama/1", "--verify")
        assert changed.exit_code == 1, changed.output
        assert f"export {first} changed" in changed.output


def test_an_untied_model_is_written_as_the_weights_the_check_measured(tmp_path, tiny_tokenizer):
    """Untied embeddings are not a Linear weight: the check leaves them, and so does the file."""
    from mlflow_selprune.evaluation.quantized import quantized
    from mlflow_selprune.gguf_export import write_gguf

    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = T.LlamaForCausalLM(config).eval()
    write_gguf(model, tiny_tokenizer, tmp_path / "untied.gguf", "Q4_0")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="untied.gguf").eval()
    ids = tiny_tokenizer("def add(a, b):", return_tensors="pt")["input_ids"]
    with torch.no_grad(), quantized(model, "int4"):
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_a_model_gguf_is_not_written_for_and_a_taken_path_are_refused_writing_nothing(llama_store, tiny_tokenizer):
    """Bad input is one line, exit 2, before anything is written: a GPT-NeoX (not a family this writer knows),
    an OUT that exists, an OUT that is no .gguf file."""
    from mlflow.tracking import MlflowClient

    from mlflow_helpers import invoke, register_tiny

    taken = llama_store["root"] / "taken.gguf"
    taken.write_bytes(b"mine")
    with mock.patch.dict("os.environ"):
        exists = invoke("export", "models:/tiny-llama/2", str(taken))
        assert exists.exit_code == 2 and f"OUT '{taken}' exists" in exists.output
        named = invoke("export", "models:/tiny-llama/2", str(llama_store["root"] / "tiny.bin"))
        assert named.exit_code == 2 and "OUT must be a .gguf file path" in named.output
        neox = register_tiny(tiny_tokenizer, name="tiny-neox", alias=None)
        out = llama_store["root"] / "neox.gguf"
        refused = invoke("export", neox, str(out))
        assert refused.exit_code == 2, refused.output
        assert "cannot be exported as GGUF: its model_type is 'gpt_neox'" in refused.output
        assert not out.exists()
        tags = MlflowClient().get_model_version("tiny-neox", "1").tags
        assert not [k for k in tags if k.startswith("selprune.export.")]
    assert taken.read_bytes() == b"mine"
