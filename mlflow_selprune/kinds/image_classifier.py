"""Image classifiers (``*ForImageClassification``): image DATA split by class, per-class metrics."""

from __future__ import annotations

from .base import ModelKind


class ImageClassifier(ModelKind):
    name = "image-classifier"
    task = "image-classification"
    class_suffixes = ("ForImageClassification", "ForImageClassificationWithTeacher")
    preprocessor = "image_processor"
    data_kind = "images"
    unused_data_options = ("max_length", "collect_tokens", "eval_tokens", "chunks_per_document", "token_cache")

    def auto_class(self, architectures):
        """Its own head (e.g. DeiT's ...WithTeacher) when transformers has it, else the auto class."""
        import transformers

        for name in architectures:
            if name.endswith("ForImageClassificationWithTeacher") and hasattr(transformers, name):
                return getattr(transformers, name)
        return transformers.AutoModelForImageClassification

    def check_files(self, directory, uri, architectures) -> None:
        from ..errors import BadInputError

        if not (directory / "preprocessor_config.json").is_file():
            raise BadInputError(
                f"'{uri}' is an image classifier ({architectures[0]}) without its image processor; "
                "log the model together with it ({'model': ..., 'image_processor': ...})"
            )

    def load_preprocessor(self, directory, trust_remote_code: bool):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)

    def prepare_data(self, forget, retain, preprocessor, model, data, *, trust_remote_code: bool, select_part: bool):
        from ..data.images import prepare_image_data

        return prepare_image_data(
            forget,
            retain,
            preprocessor,
            model.config,
            data,
            trust_remote_code=trust_remote_code,
            select_part=select_part,
        )

    def evaluate(self, model, batches, *, skip_token_ids, prefix, accelerator, progress, masking) -> dict:
        from ..evaluation.image_classes import evaluate_image_model

        return evaluate_image_model(
            model, batches, skip_token_ids=skip_token_ids, prefix=prefix, accelerator=accelerator, progress=progress
        )

    def prompt_text(self, row, preprocessor, masking):
        return f"an eval image of class {int(row['labels'][0])}"

    def sample_image(self, row, preprocessor):
        """The eval image as the model saw it: its pixel values with the processor's normalization and
        rescaling undone, enlarged to at least 64 pixels a side (nearest neighbour) so a small one shows."""
        import numpy as np
        from PIL import Image

        pixels = row["pixel_values"][0].float().numpy()  # channels, height, width
        if getattr(preprocessor, "do_normalize", False):
            mean = np.asarray(preprocessor.image_mean, dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(preprocessor.image_std, dtype=np.float32).reshape(-1, 1, 1)
            pixels = pixels * std + mean
        scale = 1 / preprocessor.rescale_factor if getattr(preprocessor, "do_rescale", False) else 255.0
        array = np.clip(pixels * scale, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        factor = max(1, -(-64 // min(image.size)))
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)

    def respond(self, model, rows, preprocessor, masking, max_new_tokens):
        return self.predicted_classes(model, rows)
