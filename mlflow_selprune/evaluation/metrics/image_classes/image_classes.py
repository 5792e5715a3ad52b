"""Image classification metrics from per-image target ranks and log-probabilities.

The model's forward pass happens outside (see ``mlflow_selprune.evaluation.image_classes``);
this module only aggregates three per-image values, so it stays small,
framework-free and loadable offline with ``evaluate.load(<this folder>)``.

Keep one import per line: evaluate's import scanner misreads ``import a, b``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Classification quality of an image classifier, from one row per image: top-1
and top-5 accuracy, mean cross-entropy (loss), and top-1 accuracy of each
class asked for (class_<id>_top1), e.g. the classes being forgotten.
"""

_KWARGS_DESCRIPTION = """
Args:
    target_rank (`list` of `int`): number of classes whose logit is strictly
        greater than the true class's logit (0 means the true class is top-1).
    target_logprob (`list` of `float`): log-softmax probability of the true class.
    label (`list` of `int`): the true class id.
    classes (`list` of `int`, optional): class ids to report top-1 accuracy for
        (class_<id>_top1; NaN for a class with no image).
Returns:
    top1, top5, loss, n_images, and class_<id>_top1 for each id in `classes`.
Examples:
    >>> metric = evaluate.load("path/to/image_classes")
    >>> metric.compute(target_rank=[0, 3], target_logprob=[-0.1, -2.0], label=[5, 7], classes=[7])["class_7_top1"]
    0.0
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
class ImageClasses(evaluate.Metric):
    """top1 / top5 / loss / per-class top1 over images."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "target_rank": datasets.Value("int64"),
                    "target_logprob": datasets.Value("float64"),
                    "label": datasets.Value("int64"),
                }
            ),
            format="arrow",  # exact float64 (the numpy format casts floats to float32)
        )

    def _compute(self, target_rank, target_logprob, label, classes=()):
        rank = np.asarray(target_rank, dtype=np.int64)
        logprob = np.asarray(target_logprob, dtype=np.float64)
        labels = np.asarray(label, dtype=np.int64)
        n = int(rank.size)
        if n == 0:
            raise ValueError("image_classes: no images to score")
        out = {
            "top1": float((rank == 0).mean()),
            "top5": float((rank < 5).mean()),
            "loss": float(-logprob.mean()),
            "n_images": n,
        }
        for class_id in classes:
            chosen = labels == int(class_id)
            out[f"class_{int(class_id)}_top1"] = float((rank[chosen] == 0).mean()) if chosen.any() else float("nan")
        return out
