"""Masked-token prediction metrics of a masked language model, from its masked positions.

The masking and the forward pass happen outside (``mlflow_selprune.data.masking``
and ``mlflow_selprune.evaluation.masked_token``); this module aggregates one
row per masked position, so it stays small, framework-free and loadable
offline with ``evaluate.load(<this folder>)``.

Keep one import per line: evaluate's import scanner misreads ``import a, b``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Masked-token prediction quality of a masked language model (BERT, RoBERTa),
over the positions chosen for masking (a seeded 15% of each text's
non-special tokens; 80% shown as the mask token, 10% as a random token, 10%
unchanged): top-1 and top-10 accuracy of the original token, top-1 accuracy
on positions whose original token is outside a set of very frequent tokens
(skip50_top1), mean cross-entropy (loss) and perplexity (exp(loss)).
"""

_KWARGS_DESCRIPTION = """
Args:
    masked_rank (`list` of `int`): number of vocabulary entries whose logit is
        strictly greater than the original token's logit at a chosen position
        (0 means the original token is top-1).
    masked_logprob (`list` of `float`): log-softmax probability of the original token.
    masked_id (`list` of `int`): the original token id.
    skip_token_ids (`list` of `int`, optional): ids excluded from skip50_top1.
Returns:
    top1, top10, skip50_top1 (NaN when every position is skipped), loss,
    perplexity and n_tokens (number of chosen positions).
Examples:
    >>> metric = evaluate.load("path/to/masked_token")
    >>> metric.compute(masked_rank=[0, 12], masked_logprob=[-0.1, -3.0], masked_id=[5, 7])["top10"]
    0.5
"""

_CITATION = """
@inproceedings{devlin2019bert,
  title={BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding},
  author={Devlin, Jacob and Chang, Ming-Wei and Lee, Kenton and Toutanova, Kristina},
  booktitle={NAACL},
  year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaskedToken(evaluate.Metric):
    """top1 / top10 / skip50_top1 / loss / perplexity over masked positions."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "masked_rank": datasets.Value("int64"),
                    "masked_logprob": datasets.Value("float64"),
                    "masked_id": datasets.Value("int64"),
                }
            ),
            format="arrow",  # exact float64 (the numpy format casts floats to float32)
        )

    def _compute(self, masked_rank, masked_logprob, masked_id, skip_token_ids=()):
        rank = np.asarray(masked_rank, dtype=np.int64)
        if rank.size == 0:
            raise ValueError("masked_token: no masked positions to score")
        frequent = np.isin(np.asarray(masked_id, dtype=np.int64), np.asarray(list(skip_token_ids), dtype=np.int64))
        mean_logprob = float(np.mean(np.asarray(masked_logprob, dtype=np.float64)))
        rare_rank = rank[~frequent]
        return {
            "top1": float(np.mean(rank == 0)),
            "top10": float(np.mean(rank < 10)),
            "skip50_top1": float(np.mean(rare_rank == 0)) if rare_rank.size else float("nan"),
            "loss": -mean_logprob,
            "perplexity": float(np.exp(-mean_logprob)),
            "n_tokens": int(rank.size),
        }
