"""The kinds of model selective pruning handles, told apart by their transformers head class.

The engine never branches on kind (FF and attention neurons are the same
concept in all of them); data preparation, metrics and the MLflow task do.
Importing this module is cheap (no torch).
"""

from __future__ import annotations

CAUSAL_LM = "causal-lm"
MASKED_LM = "masked-lm"
IMAGE_CLASSIFIER = "image-classifier"
KINDS = (CAUSAL_LM, MASKED_LM, IMAGE_CLASSIFIER)

# The transformers pipeline task each kind is logged and served under.
TASKS = {CAUSAL_LM: "text-generation", MASKED_LM: "fill-mask", IMAGE_CLASSIFIER: "image-classification"}


def known_kind(class_name: str) -> str | None:
    """The kind of a transformers model class name (``BertForMaskedLM`` -> ``masked-lm``), None for any other."""
    if class_name.endswith("ForMaskedLM"):
        return MASKED_LM
    if class_name.endswith("ForImageClassification") or class_name.endswith("ForImageClassificationWithTeacher"):
        return IMAGE_CLASSIFIER
    if class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    return None


def kind_of_class(class_name: str) -> str:
    """The kind of a model class; any other head (a sequence classifier, a speech model, ...) is refused, never
    scored with another kind's metrics."""
    kind = known_kind(class_name)
    if kind is not None:
        return kind
    from .errors import BadInputError

    raise BadInputError(
        f"{class_name} is not a model kind selective pruning measures here (a causal LM: "
        "*ForCausalLM / *LMHeadModel, a masked LM: *ForMaskedLM, or an image classifier: "
        "*ForImageClassification); load the model with one of those heads"
    )


def model_kind(model) -> str:
    """The kind of a loaded model."""
    return kind_of_class(type(model).__name__)
