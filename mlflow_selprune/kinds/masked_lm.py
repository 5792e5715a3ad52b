"""Masked language models (``*ForMaskedLM``): metrics on seeded masked positions, masked-token relearning."""

from __future__ import annotations

from .text import TextKind


class MaskedLM(TextKind):
    name = "masked-lm"
    task = "fill-mask"
    class_suffixes = ("ForMaskedLM",)

    def auto_class(self, architectures):
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM

    def evaluate(self, model, batches, *, skip_token_ids, prefix, accelerator, progress, masking) -> dict:
        from ..evaluation.masked_token import evaluate_masked_model

        return evaluate_masked_model(
            model,
            batches,
            skip_token_ids=skip_token_ids,
            prefix=prefix,
            accelerator=accelerator,
            progress=progress,
            masking=masking,
        )

    def check_relearn(self, batches: list[dict], masking) -> None:
        if masking is None and not all("labels" in batch for batch in batches):
            raise ValueError("relearning a masked LM needs masking ids (PreparedData.masking) or batches with labels")

    def training_batch(self, batch: dict, *, masking, seed: int):
        """The masked-LM loss on positions masked by the 80/10/10 rule, seeded per step."""
        if "labels" not in batch:
            from ..data.masking import mask_batch

            batch = mask_batch(batch, masking, seed=seed)
        return super().training_batch(batch, masking=masking, seed=seed)
