"""Causal language models (``*ForCausalLM``, ``*LMHeadModel``): next-token metrics, next-token relearning."""

from __future__ import annotations

from .text import TextKind


class CausalLM(TextKind):
    name = "causal-lm"
    task = "text-generation"
    class_suffixes = ("ForCausalLM", "LMHeadModel")
    writes_text = True

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

    def sample_rows(self, batches, n, seed):
        """Each example cut to its first half (at most 24 tokens): the model continues it."""
        rows = super().sample_rows(batches, n, seed)
        return [{k: v[:, : max(1, min(24, v.shape[1] // 2))] for k, v in row.items()} for row in rows]

    def respond(self, model, rows, preprocessor, masking, max_new_tokens):
        """Greedy continuations of all rows in one generation: left-padded, so each row continues from its own
        last token (on a CPU, one batch costs about what one row does)."""
        import torch

        if not rows:
            return []
        device = next(model.parameters()).device
        pad = preprocessor.pad_token_id if preprocessor.pad_token_id is not None else preprocessor.eos_token_id
        width = max(row["input_ids"].shape[1] for row in rows)
        ids = torch.full((len(rows), width), pad, dtype=rows[0]["input_ids"].dtype)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - row["input_ids"].shape[1] :] = row["input_ids"][0]
            mask[i, width - row["input_ids"].shape[1] :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return [preprocessor.decode(row[width:], skip_special_tokens=True) for row in out]
