"""Text classifiers (``*ForSequenceClassification``): labelled text DATA split by class, per-label accuracy.

Forgetting a class of a sentiment or topic classifier: ``--forget-classes``
names the labels to forget, the other labels are retained, and the metrics are
those of the image classifiers (top-1 accuracy, top-5, loss, and top-1 per
label), computed by the same ``classes`` metric module.
"""

from __future__ import annotations

from .base import ModelKind
from .text import refuse_image_data


class SequenceClassifier(ModelKind):
    name = "text-classifier"
    task = "text-classification"
    class_suffixes = ("ForSequenceClassification",)
    unused_data_options = ("collect_images", "eval_images", "chunks_per_document")

    def auto_class(self, architectures):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def prepare_data(self, forget, retain, preprocessor, model, data, *, trust_remote_code: bool, select_part: bool):
        from ..data.labelled_text import prepare_labelled_text

        refuse_image_data(forget, retain, f"{type(model).__name__} is a text classifier")
        return prepare_labelled_text(
            forget,
            retain,
            preprocessor,
            model.config,
            data,
            trust_remote_code=trust_remote_code,
            select_part=select_part,
        )

    def evaluate(self, model, batches, *, skip_token_ids, prefix, accelerator, progress, masking) -> dict:
        from ..evaluation.image_classes import evaluate_classes

        def statistics(model, batch, device):
            from ..evaluation.next_token import target_ranks

            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            return target_ranks(logits, batch["labels"].to(device).long())

        return evaluate_classes(
            model, batches, statistics, prefix=prefix, accelerator=accelerator, progress=progress, count_name="n_texts"
        )

    def prompt_text(self, row, preprocessor, masking):
        return f"{preprocessor.decode(row['input_ids'][0], skip_special_tokens=True)} (label {int(row['labels'][0])})"

    def respond(self, model, rows, preprocessor, masking, max_new_tokens):
        return self.predicted_classes(model, rows)
