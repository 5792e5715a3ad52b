"""pass@k of generated Python functions, with the semantics of Hugging Face's ``code_eval``, offline.

Each candidate program is run with its task's test lines (``candidate + "\\n" + test``) in a sandbox
(``sandbox.py``, beside this file): a security boundary against code written to escape, not only against
accidents. It holds against reading the caller's environment, files or memory (no host ``/proc``, nothing of
the host's file system but the interpreter and its libraries, read-only), reaching the network, writing
outside its private tmpfs, leaving processes behind, fork bombs, making namespaces of its own, holding
memory past its limits (memory files, System V shared memory), and filling the caller's memory with output.
At most ``timeout`` seconds of CPU decide a timeout; an outcome is ``passed``, ``timed out`` or ``failed:
<built-in exception type>``, never other text of the program, and ``passed`` only once the test lines ran to
their end (an ``os._exit(0)`` before them is no pass). Where the sandbox cannot run,
``compute`` refuses unless ``allow_unsandboxed=True`` (as Hugging Face's ``HF_ALLOW_CODE_EVAL`` gates
``code_eval``).

Keep one import per line: evaluate's import scanner misreads ``import a, b``; ``from .sandbox import``
makes evaluate copy ``sandbox.py`` beside this module.
"""

import concurrent.futures

import datasets
import evaluate
import numpy as np

from .sandbox import run_program

_DESCRIPTION = """
The share of programming tasks solved by generated code: each candidate is
executed with the task's test lines, and passes when they all run without
error. pass@k is the unbiased estimate of the chance that at least one of k
candidates passes (Chen et al., 2021), as in the `code_eval` metric.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str`): candidate programs per task.
    references (`list` of `str`): the test lines of each task (e.g. `assert` lines).
    k (`list` of `int`, optional): the k of pass@k, default [1]; a k over a task's
        number of candidates is left out.
    num_workers (`int`, optional): programs run at once, default 2.
    timeout (`float`, optional): CPU seconds a program may use, default 3.0.
    allow_unsandboxed (`bool`, optional): run the programs in a plain subprocess where the
        sandbox (bubblewrap) is not available, default False: refused.
Returns:
    (pass_at_k, results): `{"pass@1": ...}` and, per task index, a list of
    `(candidate_index, {"task_id", "completion_id", "passed", "result"})`.
Examples:
    >>> metric = evaluate.load("path/to/code_pass")
    >>> pass_at_k, _ = metric.compute(predictions=[["def f():\\n    return 1"]], references=["assert f() == 1"])
    >>> pass_at_k["pass@1"]
    1.0
"""

_CITATION = """
@article{chen2021codex,
  title={Evaluating Large Language Models Trained on Code},
  author={Chen, Mark and Tworek, Jerry and others},
  journal={arXiv preprint arXiv:2107.03374},
  year={2021}
}
"""


def estimate_pass_at_k(num_samples: np.ndarray, num_correct: np.ndarray, k: int) -> np.ndarray:
    """Per task, ``1 - C(n - c, k) / C(n, k)``, computed as a stable product."""

    def estimator(n: int, c: int) -> float:
        if n - c < k:
            return 1.0
        return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

    return np.array([estimator(int(n), int(c)) for n, c in zip(num_samples, num_correct)])


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CodePass(evaluate.Metric):
    """pass@k of candidate programs checked by executing their tasks' tests."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1,), num_workers=2, timeout=3.0, allow_unsandboxed=False):
        if len(predictions) == 0:
            raise ValueError("code_pass: no tasks to check")
        if timeout <= 0 or num_workers < 1:
            raise ValueError(f"code_pass: timeout must be > 0 and num_workers >= 1, got {timeout}, {num_workers}")
        jobs = [
            (task, index, candidate + "\n" + test)
            for task, (candidates, test) in enumerate(zip(predictions, references))
            for index, candidate in enumerate(candidates)
        ]
        with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool:
            outcomes = list(pool.map(lambda job: run_program(job[2], timeout, allow_unsandboxed), jobs))
        results = {task: [] for task in range(len(predictions))}
        for (task, index, _), outcome in zip(jobs, outcomes):
            results[task].append(
                (index, {"task_id": task, "completion_id": index, "passed": outcome == "passed", "result": outcome})
            )
        total = np.array([len(results[task]) for task in results])
        correct = np.array([sum(r["passed"] for _, r in results[task]) for task in results])
        pass_at_k = {
            f"pass@{kk}": float(estimate_pass_at_k(total, correct, kk).mean()) for kk in k if (total >= kk).all()
        }
        return pass_at_k, results
