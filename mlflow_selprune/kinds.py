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


def kind_of_class(class_name: str) -> str:
    """The kind of a transformers model class name (``BertForMaskedLM`` -> ``masked-lm``)."""
    if class_name.endswith("ForMaskedLM"):
        return MASKED_LM
    if class_name.endswith("ForImageClassification") or class_name.endswith("ForImageClassificationWithTeacher"):
        return IMAGE_CLASSIFIER
    return CAUSAL_LM


def model_kind(model) -> str:
    """The kind of a loaded model."""
    return kind_of_class(type(model).__name__)
