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

    def prompt_text(self, row, preprocessor, masking):
        masked = self._masked(row, masking)
        return (
            preprocessor.decode(masked["input_ids"][0], skip_special_tokens=False)
            .replace(preprocessor.pad_token or "[PAD]", "")
            .strip()
        )

    def respond(self, model, rows, preprocessor, masking, max_new_tokens):
        """The top-5 fills of the first masked position."""
        import torch

        device = next(model.parameters()).device
        answers = []
        for row in rows:
            masked = self._masked(row, masking)
            position = int((masked["labels"][0] != -100).nonzero()[0, 0])
            with torch.inference_mode():
                logits = model(
                    input_ids=masked["input_ids"].to(device), attention_mask=masked["attention_mask"].to(device)
                ).logits
            top = logits[0, position].topk(5).indices.tolist()
            answers.append(", ".join(preprocessor.decode([t]).strip() for t in top))
        return answers

    @staticmethod
    def _masked(row, masking):
        from ..data.masking import mask_batch

        return mask_batch(row, masking, seed=0)
