"""The project's own error types: the only ones the CLI reports as bad input (exit 2).

Anything else that escapes is a bug or an environment failure and exits 3, so a
programming error is never dressed up as the user's mistake.
"""

from __future__ import annotations


class BadInputError(ValueError):
    """The user asked for something that cannot work; the message says what to do instead."""


class ConfigError(BadInputError):
    """An option out of range or options that conflict; the message names the flag."""


class NonFiniteActivationsError(BadInputError, FloatingPointError):
    """Activations overflowed (fp16) or the weights hold NaNs: the statistics cannot rank neurons."""


class ServerFailure(RuntimeError):
    """The tracking server, its database or its artifact store failed during a job (exit 3, not the user's
    mistake); the message says what was left behind and how to finish."""


class VerificationError(Exception):
    """A version failed verification (registry.verify): the command refuses to use it and exits 1 listing the
    findings, as ``lineage --verify`` does; nothing is written."""

    def __init__(self, findings: list[str]):
        super().__init__("; ".join(findings))
        self.findings = findings


def causes(exc: BaseException | None):
    """``exc`` and what raised it, each once: its ``__cause__`` or ``__context__``, and so on."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def printable(text: str, limit: int) -> str:
    """At most ``limit`` characters of untrusted ``text``, each printable (any other as ``?``): quoted in a
    message, it stays one line of bounded length."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])
