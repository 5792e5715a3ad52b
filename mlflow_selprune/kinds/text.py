"""What the language-model kinds share: text DATA, tokenized into token batches (``data.batching``)."""

from __future__ import annotations

from ..config import SIDES
from .base import ModelKind


class TextKind(ModelKind):
    """A kind whose DATA is text documents, prepared into token batches for both sides."""

    def prepare_data(self, forget, retain, preprocessor, model, data, *, trust_remote_code: bool, select_part: bool):
        from ..data.batching import prepare_data
        from ..errors import ConfigError

        what = f"{type(model).__name__} is a language model" if model is not None else "the model is a language model"
        if data.forget_classes is not None:
            raise ConfigError(f"--forget-classes applies to classifiers only; {what}: pass forget and retain text")
        refuse_image_data(forget, retain, what)
        return tuple(
            prepare_data(
                spec,
                preprocessor,
                data,
                source=data.source_for(side),
                min_tokens=data.min_tokens,
                select_part=select_part,
                trust_remote_code=trust_remote_code,
            )
            for side, spec in zip(SIDES, (forget, retain))
        )


def refuse_image_data(forget, retain, what: str) -> None:
    """Image DATA given to a text model: one line naming the flag."""
    from ..data.images import looks_like_image_data
    from ..errors import BadInputError

    for side, spec in zip(SIDES, (forget, retain)):
        if isinstance(spec, str) and looks_like_image_data(spec):
            raise BadInputError(f"--{side}: DATA {spec!r} holds images, but {what}; give it text DATA")
