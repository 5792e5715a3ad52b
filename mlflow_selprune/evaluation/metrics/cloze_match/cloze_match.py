"""Exact match of a completion's first word against the accepted answers of a cloze prompt.

A greedy continuation of "The capital of France is" reads " Paris.\\n\\nThe answer"; its first word,
compared without case and punctuation, is what the prompt asks for. Loadable offline with
``evaluate.load(<this folder>)``.

Keep one import per line: evaluate's import scanner misreads ``import a, b``.
"""

import re

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
The share of cloze prompts whose completion starts with an accepted answer:
the first word of the prediction (letters and digits), lower-cased, equals one
of the references, lower-cased.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the completions (text generated after each prompt).
    references (`list` of `list` of `str`): the accepted answers of each prompt.
Returns:
    exact_match: the share of predictions whose first word is an accepted answer.
Examples:
    >>> metric = evaluate.load("path/to/cloze_match")
    >>> metric.compute(predictions=[" Paris.", " a city"], references=[["Paris"], ["Rome"]])["exact_match"]
    0.5
"""

_WORD = re.compile(r"[^\W_]+")


def first_word(text: str) -> str:
    """The first run of letters and digits, lower-cased ('' when there is none)."""
    match = _WORD.search(text)
    return match.group(0).lower() if match else ""


class ClozeMatch(evaluate.Metric):
    """Exact match of first words."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("cloze_match: no prompts to score")
        matched = [first_word(p) in {first_word(a) for a in answers} for p, answers in zip(predictions, references)]
        return {"exact_match": float(np.mean(matched)), "matched": matched}
