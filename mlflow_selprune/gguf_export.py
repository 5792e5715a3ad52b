"""A model to one GGUF file, the format llama.cpp and Ollama run (``mlflow-selprune export --format gguf``).

Written with the ``gguf`` package: its writer, its names for each architecture's tensors
(``gguf.get_tensor_name_map``) and its quantizers, the same ones the quantization check uses
(``evaluation.quantized``), so a file exported as Q8_0 or Q4_0 holds the very weights that check measured.
Every Linear weight whose rows are a multiple of 32 long is quantized to the chosen type, a tied output head
(the embedding matrix, written once as ``token_embd``) included: the weights ``evaluation.quantized`` rounds,
no more. Other tensors (norms, untied embeddings, matrices a block cannot divide) are float32, or float16 for
an F16 file's matrices. For a float32 model, a Q8_0 or Q4_0 file holds bit for bit what the check measured; a
float16 or bfloat16 model is measured with the round trip rounded back to its own dtype. Llama's query and key
projections are stored with their rows reordered the way llama.cpp's own converter does (transformers undoes it
on load).

The tokenizer goes with it: the BPE vocabulary, token types and merges of a fast tokenizer, its special tokens
and chat template. Families: the Llama architecture (``model_type`` ``llama``, SmolLM2 among them); any other
is refused in one line before anything is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("Q8_0", "Q4_0", "F16")
FAMILIES = ("llama",)  # model_type values this writer knows the metadata of
BLOCK = 32


def unsupported(model, tokenizer) -> str | None:
    """Why ``model`` cannot be exported here, in a few words; None when it can."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        return f"its model_type is {model_type!r}; export --format gguf writes {', '.join(FAMILIES)} models"
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        return "its tokenizer is not a fast (tokenizers) one, whose vocabulary and merges a GGUF file holds"
    model_kind = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    if model_kind != "BPE":
        return f"its tokenizer is a {model_kind} one; export --format gguf writes byte-level BPE tokenizers"
    return None


def write_gguf(model, tokenizer, path: Path, quantization: str, name: str = "") -> None:
    """Write ``model`` and ``tokenizer`` to ``path`` as GGUF, matrices as ``quantization``."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name or getattr(config, "_name_or_path", "") or "model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type({"Q8_0": 7, "Q4_0": 2, "F16": 1}[quantization])  # llama.cpp's LLAMA_FTYPE_* numbers
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config)
    for gguf_name, array, raw_type in _tensors(model, quantization):
        writer.add_tensor(gguf_name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _tensors(model, quantization: str):
    """``(gguf name, array, raw type)`` for every tensor of ``model`` in GGUF's names, each once."""
    import gguf
    import numpy as np
    import torch
    from gguf import quants

    from .evaluation.quantized import quantizable_weights

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    qtype = None if quantization == "F16" else gguf.GGMLQuantizationType[quantization]
    quantizable = {id(weight) for weight, _ in quantizable_weights(model)}  # what the quantization check rounds
    seen: set[int] = set()
    for hf_name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied head: the embedding matrix, already written as token_embd
            continue
        seen.add(id(tensor))
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for the tensor {hf_name}")
        array = tensor.detach().to("cpu", torch.float32).numpy()
        if gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
            array = _permuted(array, heads)
        if array.ndim != 2:
            yield gguf_name, np.ascontiguousarray(array), None
        elif qtype is None:
            yield gguf_name, array.astype(np.float16), None
        elif id(tensor) in quantizable:
            yield gguf_name, quants.quantize(np.ascontiguousarray(array), qtype), qtype
        else:  # rows a block cannot divide, or untied embeddings: unquantized, as the check measured them
            yield gguf_name, np.ascontiguousarray(array), None


def _permuted(weights, heads: int):
    """The row order llama.cpp's converter gives a query or key projection (transformers reverses it)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_tokenizer(writer, tokenizer, config) -> None:
    """The BPE vocabulary (tokens, types, merges), special tokens and chat template."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    size = max(config.vocab_size, max(vocab.values()) + 1)
    by_id = {i: token for token, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    added = {entry["id"] for entry in state.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            setter(int(token_id))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
