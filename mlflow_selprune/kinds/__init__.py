"""The kinds of model selective pruning handles: one strategy per kind, chosen by the transformers head class.

The engine never branches on kind (FF and attention neurons are the same
concept in all of them). Everything that does differ (loading, data
preparation, metrics, the relearning loss, the MLflow task) is a method of
the kind's ``ModelKind``, one module each; nothing outside this package asks
which kind a model is. ``kind_of`` maps a model (``kind_of_class`` a class
name) to its kind and refuses the rest in one line. Adding a kind:
docs/model-kinds.md. Importing this package is cheap (no torch).
"""

from __future__ import annotations

from typing import Sequence

from .base import ModelKind
from .causal_lm import CausalLM
from .image_classifier import ImageClassifier
from .masked_lm import MaskedLM
from .sequence_classifier import SequenceClassifier

# Checked in this order: a class matching several suffixes takes the first kind.
REGISTERED: tuple[ModelKind, ...] = (ImageClassifier(), SequenceClassifier(), MaskedLM(), CausalLM())
BY_NAME = {kind.name: kind for kind in REGISTERED}

CAUSAL_LM, MASKED_LM, IMAGE_CLASSIFIER, SEQUENCE_CLASSIFIER = (
    CausalLM.name,
    MaskedLM.name,
    ImageClassifier.name,
    SequenceClassifier.name,
)
KINDS = tuple(BY_NAME)
# The transformers pipeline task each kind is logged and served under.
TASKS = {kind.name: kind.task for kind in REGISTERED}


def kind_for_class(class_name: str) -> ModelKind | None:
    """The kind of a transformers model class name, None for any other."""
    return next((kind for kind in REGISTERED if kind.matches(class_name)), None)


def known_kind(class_name: str) -> str | None:
    """The kind's name of a transformers model class name (``BertForMaskedLM`` -> ``masked-lm``), or None."""
    kind = kind_for_class(class_name)
    return kind.name if kind is not None else None


def kind_of_class(class_name: str) -> str:
    """The kind of a model class; any other head (a token classifier, a speech model, ...) is refused, never
    scored with another kind's metrics."""
    kind = known_kind(class_name)
    if kind is not None:
        return kind
    from ..errors import BadInputError

    raise BadInputError(
        f"{class_name} is not a model kind selective pruning measures here ({supported_heads()}); load the model "
        "with one of those heads"
    )


def supported_heads() -> str:
    """The kinds and the head classes each takes, for the line that refuses any other head."""
    return ", ".join(f"{k.name}: {' or '.join('*' + s for s in k.class_suffixes)}" for k in REGISTERED)


def kind_of(model) -> ModelKind:
    """The strategy of a loaded model (refused in one line when its head is not a known kind)."""
    return BY_NAME[kind_of_class(type(model).__name__)]


def model_kind(model) -> str:
    """The kind's name of a loaded model."""
    return kind_of(model).name


def kind_for_architectures(architectures: Sequence[str]) -> ModelKind:
    """The kind a saved model loads as, from its config's ``architectures``: the first registered kind any of
    them matches. A config naming only other heads (a token classifier, ...) is refused in one line before
    anything loads: loaded as a causal LM it would be scored with a freshly initialized head. A config naming
    no class loads as a causal LM; its checkpoint must then fill that class (``registry.loading``)."""
    for kind in REGISTERED:
        if any(kind.matches(name) for name in architectures):
            return kind
    if architectures:
        kind_of_class(architectures[0])  # raises: the line that names the supported kinds
    return BY_NAME[CausalLM.name]


__all__ = [
    "CAUSAL_LM",
    "IMAGE_CLASSIFIER",
    "KINDS",
    "MASKED_LM",
    "REGISTERED",
    "SEQUENCE_CLASSIFIER",
    "TASKS",
    "ModelKind",
    "kind_for_architectures",
    "kind_for_class",
    "kind_of",
    "kind_of_class",
    "known_kind",
    "model_kind",
    "supported_heads",
]
