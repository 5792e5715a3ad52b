"""Does the effect survive quantization? (``--quantized-check int8,int4``)

Most deployed language models run quantized: GGUF files for llama.cpp and Ollama hold 8- or 4-bit weights. A
change to a weight that is smaller than a quantization bin disappears in it, which is how unlearning by
fine-tuning loses most of its effect at 4 bits. Selective pruning zeroes whole input columns, and every block
format keeps a zero exactly. This check measures that instead of assuming it: the parent, the unlearned model
and the random control are each measured again after every Linear weight made a round trip through a GGUF
block format, quantized and dequantized by the ``gguf`` package's own quantizers (bit-exact with llama.cpp's
reference ``ggml-quants.c``):

* ``int8``: Q8_0, blocks of 32 weights along a row, one float16 scale and 32 signed 8-bit values each;
* ``int4``: Q4_0, the same blocks with 4-bit values.

A weight whose rows are not a multiple of 32 long stays as it is (a GGUF file keeps such a tensor unquantized
too). An output head tied to the input embeddings is one matrix: it is quantized once, and the embeddings with
it, as in a GGUF file whose output shares ``token_embd``. Other weights (embeddings that are not tied, norms,
biases, convolutions) stay in floating point.

Metrics, for each format F (each drop relative to the parent quantized the same way):

* ``quantized_F_forget_top1`` and ``quantized_F_retain_top1``, ``quantized_F_parent_*`` the same for the parent;
* ``quantized_F_forget_top1_drop`` and ``quantized_F_retain_top1_drop``, and the random control's
  ``quantized_F_control_forget_top1_drop`` and ``quantized_F_control_retain_top1_drop``;
* ``quantized_F_recovery``: the share of the floating-point forget drop that quantization takes back,
  ``(forget_top1_drop - quantized_F_forget_top1_drop) / forget_top1_drop``. 0 keeps it all, 1 loses it all, a
  negative share deepens it. NaN under a floating-point forget drop of 5% (``RECOVERY_GAP_FLOOR``): the ratio
  would divide by noise. ``gate --max-quantized-recovery`` reads it.
"""

from __future__ import annotations

import contextlib
import logging
import math

from ..config import QUANTIZED_FORMATS as FORMATS
from .drops import RECOVERY_GAP_FLOOR, relative_drop

logger = logging.getLogger(__name__)

BLOCK = 32  # weights per block along a row, in both formats
SIDES = ("forget", "retain")
_SAID = {"unlearned": "the unlearned model", "parent": "the parent", "control": "the random control"}


def quantizable_weights(model) -> list:
    """``(weight, transposed)`` of every Linear-like layer whose rows GGUF would quantize, each matrix once.

    ``transposed``: the layer stores its matrix as (in, out) (GPT-2's ``Conv1D``); GGUF's blocks run along
    the input dimension either way."""
    import torch
    from transformers.pytorch_utils import Conv1D

    found, seen = [], set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight, transposed = module.weight, False
        elif isinstance(module, Conv1D):
            weight, transposed = module.weight, True
        else:
            continue
        row_length = weight.shape[0] if transposed else weight.shape[1]
        if id(weight) in seen or row_length % BLOCK:
            continue
        seen.add(id(weight))
        found.append((weight, transposed))
    return found


def round_trip(matrix, fmt: str):
    """``matrix`` (a float tensor, blocks along its rows) quantized to ``fmt`` and back, on the CPU, as float32."""
    import torch
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[FORMATS[fmt]]
    rows = matrix.detach().to("cpu", torch.float32).contiguous().numpy()
    return torch.from_numpy(quants.dequantize(quants.quantize(rows, qtype), qtype))


@contextlib.contextmanager
def quantized(model, fmt: str):
    """Inside: ``model`` with every quantizable weight (``quantizable_weights``) replaced by its round trip
    through ``fmt``. On exit: exactly the weights it had (kept on the CPU meanwhile)."""
    import torch

    saved = []
    weights = quantizable_weights(model)
    logger.debug(f"{fmt}: {len(weights)} weights, {sum(w.numel() for w, _ in weights):,} parameters, quantized")
    try:
        with torch.no_grad():
            for weight, transposed in weights:
                saved.append((weight, weight.detach().to("cpu", copy=True)))
                matrix = weight.t() if transposed else weight
                trip = round_trip(matrix, fmt)
                weight.copy_((trip.t() if transposed else trip).to(weight.device, weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original.to(weight.device))


def quantized_metrics(evaluate_fn, formats, float_metrics: dict, models: dict) -> dict[str, float]:
    """The metrics of the module docstring for ``formats``.

    ``models``: ``{"unlearned": (model, view), "parent": ..., "control": ...}`` (parent and control may be left
    out), each view a zero-argument factory of a context manager inside which ``model`` is as it should be
    measured (the engine's ``parent_restored`` and ``randomly_pruned``, or ``contextlib.nullcontext``);
    ``float_metrics`` holds the floating-point ``forget_top1_drop`` that a recovery is a share of."""
    out: dict[str, float] = {}
    for fmt in formats:
        prefix = f"quantized_{fmt}_"
        logger.info(f"quantized check, {fmt} ({FORMATS[fmt]}): " + ", ".join(_SAID[name] for name in models))
        measured = {}
        for name, (model, view) in models.items():
            with view(), quantized(model, fmt):
                scores = evaluate_fn(model)
            measured[name] = {side: float(scores[f"{side}_top1"]) for side in SIDES}
        for side in SIDES:
            out[f"{prefix}{side}_top1"] = measured["unlearned"][side]
            if "parent" in measured:
                parent = measured["parent"][side]
                out[f"{prefix}parent_{side}_top1"] = parent
                out[f"{prefix}{side}_top1_drop"] = relative_drop(parent, measured["unlearned"][side])
                if "control" in measured:
                    out[f"{prefix}control_{side}_top1_drop"] = relative_drop(parent, measured["control"][side])
        if "parent" in measured:
            out[f"{prefix}recovery"] = quantized_recovery(
                float_metrics.get("forget_top1_drop", math.nan), out[f"{prefix}forget_top1_drop"]
            )
    return out


def quantized_recovery(float_drop: float, quantized_drop: float) -> float:
    """``(float_drop - quantized_drop) / float_drop``; NaN under a float drop of ``RECOVERY_GAP_FLOOR``."""
    if math.isnan(float_drop) or math.isnan(quantized_drop) or float_drop < RECOVERY_GAP_FLOOR:
        return float("nan")
    return (float_drop - quantized_drop) / float_drop
