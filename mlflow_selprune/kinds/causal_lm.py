"""Causal language models (``*ForCausalLM``, ``*LMHeadModel``): next-token metrics, next-token relearning."""

from __future__ import annotations

from .text import TextKind


class CausalLM(TextKind):
    name = "causal-lm"
    task = "text-generation"
    class_suffixes = ("ForCausalLM", "LMHeadModel")

    def auto_class(self, architectures):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def evaluate(self, model, batches, *, skip_token_ids, prefix, accelerator, progress, masking) -> dict:
        from ..evaluation.next_token import evaluate_model

        return evaluate_model(
            model, batches, skip_token_ids=skip_token_ids, prefix=prefix, accelerator=accelerator, progress=progress
        )

    def training_batch(self, batch: dict, *, masking, seed: int):
        """Next-token loss on the real tokens (padding is -100)."""
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        labels = batch.get("labels")
        if labels is None:
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        return inputs, labels
