"""The interface every model kind implements: what differs between a causal LM, a masked LM, an image
classifier and a text classifier, and nothing else.

The engine never branches on kind (feed-forward and attention neurons are the
same concept in all of them). What a kind decides: which transformers class
loads it and what prepares its inputs, how its DATA becomes batches, what its
metrics mean, what loss relearning trains, and how it is logged and served. A
new kind is one module with one subclass of ``ModelKind`` and one entry in
``kinds.REGISTERED`` (docs/model-kinds.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


class ModelKind:
    """One kind of model. Subclasses set the class attributes and implement the methods."""

    name: str = ""  # e.g. "causal-lm": recorded and shown
    task: str = ""  # the transformers pipeline task MLflow logs and serves it under
    class_suffixes: tuple[str, ...] = ()  # transformers head classes of this kind end with one of these
    preprocessor: str = "tokenizer"  # the transformers-flavor component that prepares its inputs
    data_kind: str = "text"  # what DATA holds for it: "text" or "images" (to refuse the other early)
    writes_text: bool = False  # it generates free text: the code and cloze checks apply (``--code-tasks``)
    # DataOptions that do not apply to it: not logged as run params
    unused_data_options: tuple[str, ...] = ("collect_images", "eval_images", "forget_classes")

    def matches(self, class_name: str) -> bool:
        return class_name.endswith(self.class_suffixes)

    # --- loading
    def auto_class(self, architectures: Sequence[str]):
        """The transformers class that loads a saved model of this kind."""
        raise NotImplementedError

    def check_files(self, directory: Path, uri: str, architectures: Sequence[str]) -> None:
        """Refuse (``BadInputError``) a model directory without what prepares this kind's inputs."""
        from ..errors import BadInputError

        if not directory.is_dir() or not any(directory.glob("tokenizer*")):
            raise BadInputError(
                f"'{uri}' has no tokenizer; log the model together with its tokenizer "
                "({'model': ..., 'tokenizer': ...})"
            )

    def load_preprocessor(self, directory: Path, trust_remote_code: bool):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)

    # --- data
    def prepare_data(self, forget, retain, preprocessor, model, data, *, trust_remote_code: bool, select_part: bool):
        """``(forget, retain)`` prepared data (``data.batching.PreparedData`` or the kind's own shape)."""
        raise NotImplementedError

    # --- metrics and relearning
    def evaluate(self, model, batches, *, skip_token_ids, prefix, accelerator, progress, masking) -> dict:
        """``{prefix + metric: value}``; every kind reports at least ``top1`` and ``loss``."""
        raise NotImplementedError

    def training_batch(self, batch: dict, *, masking, seed: int) -> tuple[dict, Any]:
        """``(inputs, labels)`` for one relearning step: the model's own training loss on ``batch``."""
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        return inputs, batch["labels"]

    def check_relearn(self, batches: list[dict], masking) -> None:
        """Refuse relearning that cannot build its training batches (a masked LM without masking ids)."""

    # --- behaviour before and after (evaluation.samples)
    def sample_rows(self, batches: list[dict], n: int, seed: int) -> list[dict]:
        """``n`` eval examples (seeded), each a one-row batch without its padding."""
        import random

        import torch

        rows = []
        for batch in batches:
            for i in range(next(iter(batch.values())).shape[0]):
                row = {k: v[i : i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
                if "attention_mask" in row:
                    keep = row["attention_mask"][0].bool()
                    row = {
                        k: (v[:, keep] if v.dim() == 2 and v.shape[1] == keep.shape[0] else v) for k, v in row.items()
                    }
                rows.append(row)
        picked = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
        return [rows[i] for i in picked]

    def prompt_text(self, row: dict, preprocessor, masking) -> str:
        """What a person sees as the example's input."""
        return preprocessor.decode(row["input_ids"][0], skip_special_tokens=True)

    def sample_image(self, row: dict, preprocessor):
        """The example as a picture (a PIL image) for the samples table, or None for a kind whose input is
        text."""
        return None

    def respond(self, model, rows: list[dict], preprocessor, masking, max_new_tokens: int) -> list[str]:
        """The model's answer to each example, in words."""
        raise NotImplementedError

    def predicted_classes(self, model, rows: list[dict]) -> list[str]:
        """A classifier's answer: the predicted class's name (``id2label``) for each one-row batch."""
        import torch

        device = next(model.parameters()).device
        names = getattr(model.config, "id2label", None) or {}
        answers = []
        for row in rows:
            inputs = {k: v.to(device) for k, v in row.items() if k != "labels"}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
            with torch.inference_mode():
                predicted = int(model(**inputs).logits[0].argmax())
            answers.append(str(names.get(predicted, predicted)))
        return answers

    # --- logging
    def components(self, model, preprocessor) -> dict:
        """The transformers-flavor components: ``{"model": ..., <preprocessor key>: ...}``."""
        return {"model": model, self.preprocessor: preprocessor}
