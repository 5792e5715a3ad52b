"""Next-token prediction metrics from per-token ranks and log-probabilities.

The model's forward pass happens outside (see ``mlflow_selprune.evaluation``);
this module only aggregates three per-target-token values, so it stays small,
framework-free and loadable offline with ``evaluate.load(<this folder>)``.

Keep one import per line: evaluate's import scanner misreads ``import a, b``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Next-token prediction quality of a causal language model, from one row per
predicted (target) token: top-1 and top-10 accuracy, top-1 accuracy on targets
outside a set of very frequent tokens (skip50_top1), mean cross-entropy (loss)
and perplexity.
"""

_KWARGS_DESCRIPTION = """
Args:
    target_rank (`list` of `int`): number of vocabulary entries whose logit is
        strictly greater than the target's logit (0 means the target is top-1).
    target_logprob (`list` of `float`): log-softmax probability of the target.
    target_id (`list` of `int`): the target token id.
    skip_token_ids (`list` of `int`, optional): ids excluded from skip50_top1,
        usually the 50 most frequent tokens of the data.
Returns:
    top1, top10, skip50_top1 (NaN when every target is skipped), loss,
    perplexity (exp(loss)) and n_tokens (number of targets).
Examples:
    >>> metric = evaluate.load("path/to/next_token")
    >>> metric.compute(target_rank=[0, 3], target_logprob=[-0.1, -2.0], target_id=[5, 7])["top1"]
    0.5
"""

_CITATION = """
@article{pochinkov2024dissecting,
  title={Dissecting Language Models: Machine Unlearning via Selective Pruning},
  author={Pochinkov, Nicholas and Schoots, Nandi},
  journal={arXiv preprint arXiv:2403.01267},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NextToken(evaluate.Metric):
    """top1 / top10 / skip50_top1 / loss / perplexity over target tokens."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "target_rank": datasets.Value("int64"),
                    "target_logprob": datasets.Value("float64"),
                    "target_id": datasets.Value("int64"),
                }
            ),
            format="arrow",  # exact float64 (the numpy format casts floats to float32)
        )

    def _compute(self, target_rank, target_logprob, target_id, skip_token_ids=()):
        rank = np.asarray(target_rank, dtype=np.int64)
        logprob = np.asarray(target_logprob, dtype=np.float64)
        ids = np.asarray(target_id, dtype=np.int64)
        n = int(rank.size)
        if n == 0:
            raise ValueError("next_token: no target tokens to score")
        kept = ~np.isin(ids, np.asarray(list(skip_token_ids), dtype=np.int64))
        loss = float(-logprob.mean())
        return {
            "top1": float((rank == 0).mean()),
            "top10": float((rank < 10).mean()),
            "skip50_top1": float((rank[kept] == 0).mean()) if kept.any() else float("nan"),
            "loss": loss,
            "perplexity": float(np.exp(loss)),
            "n_tokens": n,
        }
