"""pass@k of generated Python functions, with the semantics of Hugging Face's ``code_eval``, offline.

Each candidate program is run with its task's test lines (``candidate + "\\n" + test``) in its own
Python subprocess, isolated from the caller: an empty environment and a fresh temporary directory, no
network (sockets refused), no child processes, no writes outside that directory, at most ``timeout``
seconds of CPU and 1 GiB of memory. CPU time, not wall time, decides a timeout, so a busy machine cannot fail
a correct program; a program that blocks without using CPU is stopped after ``5 * timeout + 5`` seconds
of wall time and fails. This keeps generated code from hanging, reaching the network or damaging files by
accident; it is not a security boundary against code written to escape.

Keep one import per line: evaluate's import scanner misreads ``import a, b``.
"""

import concurrent.futures
import subprocess
import sys
import tempfile

import datasets
import evaluate
import numpy as np

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

# Runs in the child: limits and guards first, then the program read from stdin.
_RUNNER = r"""
import builtins, io, os, resource, socket, subprocess, sys
cpu = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
for limit, size in ((resource.RLIMIT_AS, 1 << 30), (resource.RLIMIT_FSIZE, 1 << 20)):
    try:
        resource.setrlimit(limit, (size, size))
    except (ValueError, OSError):  # a platform that does not enforce it (macOS: RLIMIT_AS)
        pass
program = sys.stdin.read()
def refused(*args, **kwargs):
    raise PermissionError("refused while checking generated code")
class RefusedSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        refused()
socket.socket = RefusedSocket
for name in ("create_connection", "create_server", "getaddrinfo", "socketpair", "fromfd"):
    setattr(socket, name, refused)
for name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execvp", "spawnv", "kill", "killpg",
             "remove", "unlink", "rmdir", "removedirs", "rename", "replace", "chmod", "chown", "truncate",
             "putenv", "chdir", "fchdir"):
    if hasattr(os, name):
        setattr(os, name, refused)
subprocess.Popen = refused
home, real_open, real_os_open = os.getcwd() + os.sep, builtins.open, os.open
def inside(path):
    return isinstance(path, int) or os.path.realpath(path).startswith(home)
def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not inside(file):
        refused()
    return real_open(file, mode, *args, **kwargs)
def guarded_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND) and not inside(path):
        refused()
    return real_os_open(path, flags, *args, **kwargs)
builtins.open = io.open = guarded_open
os.open = guarded_os_open
builtins.exit = builtins.quit = refused
exec(compile(program, "<candidate>", "exec"), {"__name__": "__main__"})
"""


def run_program(program: str, timeout: float) -> str:
    """``"passed"``, ``"timed out"`` or ``"failed: <last line of the error>"``."""
    cpu_seconds = max(1, int(np.ceil(timeout)))
    with tempfile.TemporaryDirectory(prefix="code_pass-") as workdir:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", _RUNNER, str(cpu_seconds)],
                input=program,
                capture_output=True,
                text=True,
                cwd=workdir,
                env={},
                timeout=5 * cpu_seconds + 5,
            )
        except subprocess.TimeoutExpired:
            return "timed out"
    if done.returncode == 0:
        return "passed"
    if done.returncode in (-9, -24):  # SIGKILL / SIGXCPU: the CPU limit
        return "timed out"
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return "failed: " + (lines[-1] if lines else f"exit status {done.returncode}")


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

    def _compute(self, predictions, references, k=(1,), num_workers=2, timeout=3.0):
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
            outcomes = list(pool.map(lambda job: run_program(job[2], timeout), jobs))
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
