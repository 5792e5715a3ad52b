"""Generated code cannot reach the job that checks it (``--code-tasks``, the ``code_pass`` metric).

Each test is a real escape attempt by a program run as a code check: reading the job's environment or files,
connecting out, leaving a process behind, forking without bound, writing outside its own directory, opening
the job's database, flooding its output. Each one worked against Python-level guards alone; the OS sandbox
(bubblewrap) must stop it, and the outcome says only ``passed``, ``timed out`` or ``failed: <exception type>``.
Without bubblewrap, code tasks are refused unless the user allows them without it.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_helpers import SMALL, TINY_NAME, invoke, recorded, registry_snapshot
from mlflow_selprune.evaluation.metrics.code_pass.code_pass import run_program
from system_tools import missing

ROOT = Path(__file__).resolve().parents[1]
SANDBOX_MODULE = ROOT / "mlflow_selprune" / "evaluation" / "metrics" / "code_pass" / "sandbox.py"


@pytest.fixture
def sandboxed():
    """These tests need bubblewrap: skipped without it (failed under CI)."""
    from mlflow_selprune.evaluation.metrics.code_pass.sandbox import unavailable

    why = unavailable()
    if why is not None:
        missing("bubblewrap", f"the sandbox of generated code: {why}")


def _in_a_job(programs: list[str], cwd: Path, env: dict, timeout: float = 3) -> dict:
    """Run ``programs`` through the metric's ``run_program`` from a fresh process that stands for the job: its
    environment is ``env`` (what ``/proc/<pid>/environ`` shows: the environment a process started with) and
    its working directory ``cwd``. Returns the outcomes and the growth of that process's peak memory (KiB).
    The module is loaded by its path, as ``evaluate`` loads it, without the package's start-up cost."""
    script = textwrap.dedent(
        """
        import importlib.util, json, resource, sys
        spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
        sandbox = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sandbox)
        programs, timeout = json.load(sys.stdin)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        outcomes = [sandbox.run_program(p, timeout) for p in programs]
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({"outcomes": outcomes, "maxrss_growth_kib": grown}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(SANDBOX_MODULE)],
        input=json.dumps([programs, timeout]),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _job_env(secret: str) -> dict:
    return {**os.environ, "SELPRUNE_SIGNING_KEY": f"/keys/{secret}.pem", "MLFLOW_TRACKING_TOKEN": secret}


def test_a_program_cannot_read_the_jobs_environment_or_let_it_out_through_its_outcome(sandboxed, tmp_path, monkeypatch):
    """The job's secrets (in its environment: ``/proc/<parent>/environ``, or any process's) appear in no
    outcome, whether the program raises them, prints them or writes them to stderr and exits."""
    secret = "secret-" + secrets.token_hex(8)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    read_parent = "import os\ndata = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
    read_all = (
        "import os\ndata = b''\nfor pid in os.listdir('/proc'):\n    try:\n"
        "        data += open(f'/proc/{pid}/environ', 'rb').read()\n    except (OSError, ValueError):\n        pass\n"
    )
    programs = [
        read_parent + "raise ValueError(data)",
        read_parent + "import sys\nsys.stderr.write(data.decode())\nsys.stderr.flush()\nos._exit(1)",
        read_all + "assert False, data",
        read_all
        + "import sys\nsys.stderr.write(data.decode().replace(chr(0), chr(10)))\nsys.stderr.flush()\nos._exit(1)",
    ]
    outcomes = _in_a_job(programs, tmp_path, _job_env(secret))["outcomes"]
    assert not any(secret in outcome for outcome in outcomes), outcomes
    assert outcomes[0] == "failed: PermissionError"  # its parent is the sandbox's init, not the job
    assert outcomes[1:] == ["failed: PermissionError", "failed: AssertionError", "failed: error"], outcomes


def test_the_outcome_of_an_exception_is_its_type_only(sandboxed):
    secret = "secret-" + secrets.token_hex(8)
    assert run_program(f"raise ValueError({secret!r})", timeout=3) == "failed: ValueError"
    assert run_program(f"class Leak(KeyError):\n    pass\nraise Leak({secret!r})", timeout=3) == "failed: KeyError"
    named = f"import os\nos.write(2, b'\\n{secret}\\n')\nos._exit(1)"  # a last line that is no exception type
    assert run_program(named, timeout=3) == "failed: error"


def test_a_program_cannot_read_the_jobs_files(sandboxed, tmp_path):
    """Neither a file the job owns nor the repository nor the home directory exists inside the sandbox."""
    secret = "secret-" + secrets.token_hex(8)
    mine = tmp_path / "credentials"
    mine.write_text(secret)
    for path in (mine, ROOT / "pyproject.toml", Path.home() / ".bashrc", Path(sys.prefix) / "pyvenv.cfg"):
        outcome = run_program(f"raise ValueError(open({str(path)!r}).read())", timeout=3)
        assert outcome == "failed: FileNotFoundError", (path, outcome)


def test_a_program_cannot_connect_out_even_through_the_raw_socket_module(sandboxed):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = (
            "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
            f"s.connect(('127.0.0.1', {port}))\ns.send(b'leak')"
        )
        assert run_program(program, timeout=3) == "failed: ConnectionRefusedError"
        with pytest.raises(BlockingIOError):  # nothing arrived: the sandbox's 127.0.0.1 is its own
            server.accept()


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_spawned_grandchild_does_not_outlive_the_check_nor_touch_the_host(sandboxed, tmp_path):
    """``os.posix_spawn`` of an interpreter that keeps trying to write a file the test watches: once the check
    has returned, no process of it is left and the file was never written."""
    marker, target = "grandchild-" + secrets.token_hex(8), tmp_path / "escaped"
    body = f"import time\nfor _ in range(100):\n    try:\n        open({str(target)!r}, 'w').write('x')\n"
    body += "    except OSError:\n        pass\n    time.sleep(0.1)"
    program = f"import os, sys\nos.posix_spawn(sys.executable, [sys.executable, '-c', {body!r}, {marker!r}], {{}})"
    try:
        assert run_program(program, timeout=3) == "passed"
        assert _processes_with(marker) == []
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)
    assert not target.exists()


def test_a_fork_bomb_is_bounded_by_the_process_limit(sandboxed):
    """A program that forks as often as it can gets at most 4 processes and threads (``RLIMIT_NPROC``), and the
    check ends. (``posix.fork``: the Python-level guard on ``os.fork`` does not see it.)"""
    program = textwrap.dedent(
        """
        import posix, time
        forked = 0
        try:
            for _ in range(300):
                if posix.fork() == 0:
                    time.sleep(5)
                    posix._exit(0)
                forked += 1
        except BlockingIOError:
            pass
        assert forked < 4, forked
        """
    )
    assert run_program(program, timeout=3) == "passed"


def test_memory_files_are_bounded_by_the_descriptor_and_file_size_limits(sandboxed):
    """``memfd_create`` pages are shared memory, in no tmpfs and outside ``RLIMIT_AS``: a program that keeps
    256 of them of 2 MiB each open must stop at the descriptor limit (``EMFILE``) holding at most 64 MiB, each
    file cut to 1 MiB (``RLIMIT_FSIZE``). It raises ``LookupError`` only then; holding them all, it passes."""
    program = textwrap.dedent(
        """
        import errno, os
        held = []
        try:
            for _ in range(256):
                fd = os.memfd_create("m")
                os.write(fd, b"x" * (2 << 20))
                held.append(os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno == errno.EMFILE and len(held) < 64 and max(held) <= 1 << 20:
                raise LookupError(len(held))
            raise
        """
    )
    assert run_program(program, timeout=3) == "failed: LookupError"


# The raw ``clone`` syscall per machine, for a program that tries ``clone(CLONE_NEWUSER)`` through ``syscall``.
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}


def _refused(call: str) -> str:
    """A program that makes the libc ``call`` and raises ``LookupError`` only if it returned -1 with ``EPERM``:
    a call that works lets the program pass."""
    return (
        "import ctypes, errno, os\nlibc = ctypes.CDLL(None, use_errno=True)\nparent = os.getpid()\n"
        f"result = {call}\n"
        "if result == 0 and os.getpid() != parent:\n    os._exit(0)\n"  # a clone's child leaves at once
        "if result == -1 and ctypes.get_errno() == errno.EPERM:\n    raise LookupError(result)"
    )


def test_a_program_cannot_make_a_namespace_of_its_own(sandboxed):
    """A user namespace would give the program every capability in it: mount a tmpfs of any size over its
    directory, make network and mount namespaces. ``unshare(CLONE_NEWUSER | CLONE_NEWNS)`` and a raw
    ``clone(CLONE_NEWUSER)`` are refused with ``EPERM``."""
    clone = _SYS_CLONE[platform.machine()]
    programs = [
        "libc.unshare(0x10000000 | 0x00020000)",  # CLONE_NEWUSER | CLONE_NEWNS
        "libc.unshare(0x10000000) or libc.unshare(0x40000000 | 0x00020000)",  # then CLONE_NEWNET | CLONE_NEWNS in it
        f"libc.syscall({clone}, 0x10000000 | 17, 0, 0, 0, 0)",  # CLONE_NEWUSER | SIGCHLD
    ]
    for call in programs:
        assert run_program(_refused(call), timeout=3) == "failed: LookupError", call


def test_kernel_objects_without_a_memory_bound_are_refused(sandboxed):
    """System V shared memory, message queues and semaphores live in the check's IPC namespace with limits far
    above the host's memory, and ``io_uring`` rings are a way around the syscall filter: each is refused."""
    io_uring_setup = 425  # the same number on x86_64 and aarch64
    assert platform.machine() in _SYS_CLONE
    programs = [
        "libc.shmget(0, 1 << 20, 0o1000 | 0o600)",  # IPC_PRIVATE, IPC_CREAT
        "libc.msgget(0, 0o1000 | 0o600)",
        "libc.semget(0, 64, 0o1000 | 0o600)",
        f"libc.syscall({io_uring_setup}, 4, ctypes.create_string_buffer(120))",
    ]
    for call in programs:
        assert run_program(_refused(call), timeout=3) == "failed: LookupError", call


def test_only_a_program_whose_tests_ran_to_their_end_passes(sandboxed, monkeypatch):
    """A candidate that ends the process with status 0 before its failing test line (``os._exit(0)``, from the
    main thread or another), or that makes the runner's own handling of the failure raise ``SystemExit(0)``
    (a replaced ``builtins.next``, an exception class whose metaclass ``__name__`` raises), does not pass; with
    and without the sandbox."""
    test = "\nassert add(2, 2) == 5"
    add = "def add(a, b):\n    return a + b\n"
    exit_now = "def leave(*args, **kwargs):\n    raise SystemExit(0)\n"
    odd = "class Meta(type):\n    __name__ = property(leave)\nclass Odd(Exception, metaclass=Meta):\n    pass\n"
    in_a_thread = "import os, threading\nthread = threading.Thread(target=os._exit, args=(0,))\nthread.start()\n"
    programs = [
        add + "import os\nos._exit(0)",
        add + in_a_thread + "thread.join()",
        add + exit_now + "import builtins\nbuiltins.next = leave",
        exit_now + odd + "def add(a, b):\n    raise Odd()",
    ]
    expected = ["failed: error", "failed: error", "failed: AssertionError", "failed: Exception"]
    assert [run_program(p + test, timeout=3) for p in programs] == expected
    assert run_program(add + "assert add(2, 2) == 4", timeout=3) == "passed"
    monkeypatch.setenv("SELPRUNE_BWRAP", "/nonexistent/bwrap")
    assert [run_program(p + test, timeout=3, allow_unsandboxed=True) for p in programs] == expected


def test_a_program_cannot_write_outside_its_directory_through_low_level_calls(sandboxed, tmp_path):
    """``_io.FileIO``, ``posix.mkdir``, ``posix.symlink`` and ``posix.unlink`` on paths the test owns: nothing
    on the host changes, and a file in the program's own directory still works."""
    kept = tmp_path / "kept"
    kept.write_text("kept")
    written, made, linked = tmp_path / "written", tmp_path / "made", tmp_path / "linked"
    for program in (
        f"import _io\n_io.FileIO({str(written)!r}, 'w').write(b'x')",
        f"import posix\nposix.mkdir({str(made)!r})",
        f"import posix\nposix.symlink('/etc/passwd', {str(linked)!r})",
        f"import posix\nposix.unlink({str(kept)!r})",
    ):
        assert run_program(program, timeout=3) == "failed: FileNotFoundError", program
    assert not written.exists() and not made.exists() and not linked.is_symlink()
    assert kept.read_text() == "kept"
    own = "import _io, posix\n_io.FileIO('mine', 'w').write(b'x')\nposix.mkdir('d')\nposix.unlink('mine')"
    assert run_program(own, timeout=3) == "passed"


def test_a_program_cannot_open_the_jobs_database(sandboxed, tmp_path):
    """``sqlite3`` on a store the test created, through the job's working directory
    (``/proc/<parent>/cwd/mlflow.db``) and by its absolute path: the store keeps its rows as they were."""
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE runs (id TEXT)")
    write = "\nc.execute(\"INSERT INTO runs VALUES ('forged')\")\nc.commit()"
    programs = [
        "import os, sqlite3\nc = sqlite3.connect(f'/proc/{os.getppid()}/cwd/mlflow.db')" + write,
        f"import sqlite3\nc = sqlite3.connect({str(db)!r})" + write,
    ]
    outcomes = _in_a_job(programs, tmp_path, dict(os.environ))["outcomes"]
    assert all(outcome.startswith("failed: ") for outcome in outcomes), outcomes
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)


@pytest.mark.slow(seconds=5)
def test_a_flood_of_output_does_not_fill_the_jobs_memory(sandboxed, tmp_path):
    """A print loop that would write 4 GiB to stdout, and one to stderr: the job's peak memory grows by less
    than 500 MB, and each ends on its CPU limit."""
    flood = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(4096):\n    sys.{}.write(chunk)\nwhile True:\n    pass"
    programs = [flood.format("stdout"), flood.format("stderr")]
    done = _in_a_job(programs, tmp_path, dict(os.environ), timeout=1)
    assert done["outcomes"] == ["timed out", "timed out"]
    assert done["maxrss_growth_kib"] < 500 * 1024, done


def test_a_grandchild_writing_into_the_working_directory_cannot_fail_the_check(sandboxed, monkeypatch):
    """Its directory vanishes with the sandbox: no ``Directory not empty`` from the cleanup, a classified
    outcome; and without the sandbox (allowed) the temporary directory is removed without raising too."""
    writer = "import itertools\nfor i in itertools.count():\n    open(f'f{i}', 'w').close()"
    detached = "file_actions=[(os.POSIX_SPAWN_CLOSE, fd) for fd in (0, 1, 2)]"  # holds no pipe of the check
    program = (
        f"import os, sys, time\nos.posix_spawn(sys.executable, [sys.executable, '-c', {writer!r}], {{}}, {detached})\n"
        "time.sleep(0.3)"
    )
    assert run_program(program, timeout=3) == "passed"
    monkeypatch.setenv("SELPRUNE_BWRAP", "/nonexistent/bwrap")
    assert run_program(program, timeout=3, allow_unsandboxed=True) == "passed"


def test_without_bubblewrap_code_tasks_are_refused_unless_allowed(monkeypatch):
    """No sandbox and no permission: the metric raises instead of running anything; with it, programs run."""
    monkeypatch.setenv("SELPRUNE_BWRAP", "/nonexistent/bwrap")
    with pytest.raises(RuntimeError, match="apt-get install bubblewrap"):
        run_program("pass", timeout=3)
    assert run_program("assert 1 == 2", timeout=3, allow_unsandboxed=True) == "failed: AssertionError"


@pytest.mark.slow(seconds=15)
def test_prune_with_code_tasks_without_bubblewrap_is_refused_in_one_line_unless_allowed(store, monkeypatch):
    """``prune --code-tasks`` where bubblewrap cannot run: exit 2, one line naming the package and the flag,
    nothing written; with ``--allow-unsandboxed-code`` the prune runs and records its checks."""
    monkeypatch.setenv("SELPRUNE_BWRAP", "/nonexistent/bwrap")
    client = MlflowClient()

    def runs() -> int:
        return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))

    args = ["--model-uri", f"models:/{TINY_NAME}@base", "--forget", store["forget"], "--retain", store["retain"]]
    before = registry_snapshot(), runs()
    out = invoke("prune", *args, "--code-tasks", "--samples", "0", *SMALL)
    assert out.exit_code == 2, out.output
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "apt-get install bubblewrap" in errors[0], out.output
    assert "--allow-unsandboxed-code" in errors[0]
    assert (registry_snapshot(), runs()) == before
    evaluate = invoke("evaluate", *args, "--code-tasks", *SMALL)
    assert evaluate.exit_code == 2 and "apt-get install bubblewrap" in evaluate.output, evaluate.output
    assert (registry_snapshot(), runs()) == before

    allowed = invoke("prune", *args, "--code-tasks", "--allow-unsandboxed-code", "--samples", "0", *SMALL)
    assert allowed.exit_code == 0, allowed.output
    version = max(client.search_model_versions(f"name='{TINY_NAME}'"), key=lambda v: int(v.version))
    assert "selprune.metric.forget_code_pass_rate" in recorded(version).tags
    assert client.get_run(version.run_id).data.params["evidence_allow_unsandboxed_code"] == "True"
