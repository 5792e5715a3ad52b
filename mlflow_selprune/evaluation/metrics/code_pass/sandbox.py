"""Runs one generated program where it can reach nothing of the job that checks it.

The operating system holds the boundary, not Python: the program runs under bubblewrap (``bwrap``) in new
PID, network, IPC, UTS, cgroup and mount namespaces, with a cleared environment, a read-only root that holds
only the interpreter and the shared libraries, its own ``/proc`` (no other process is visible), a private
size-bounded tmpfs as its working directory and no network but its own loopback. bwrap itself starts with an
empty environment, so no process in the sandbox holds the job's secrets. As root, the program runs as an
unprivileged uid of its own, without a user namespace: in one, its processes would be the host's uid 0, for
which the kernel never enforces ``RLIMIT_NPROC``; as another user, a user namespace is created as usual.

Resource limits: ``timeout`` seconds of CPU (CPU time, not wall time, decides a timeout, so a busy machine
cannot fail a correct program), 1 GiB of address space, 1 MiB per file, 4 processes and threads (so 4 GiB
of memory at most). A program that blocks without using CPU is killed with its whole process group after
``5 * timeout + 5`` seconds of wall time, a guard against hangs. A check returns only once every process of
its sandbox has ended. Its stdout goes to ``/dev/null`` and only the last 4 KiB of its stderr are read, so
neither can fill the caller's memory; the outcome is classified (``passed``, ``failed: <built-in exception
type>``, ``timed out``; a custom exception is named by its nearest built-in base) and carries no other text
of the program.

``SELPRUNE_BWRAP`` names the bwrap executable (default: ``bwrap`` on the ``PATH``). Where bwrap is missing
or cannot create namespaces, ``unavailable()`` says why, and programs run only when the caller allows it
(``allow_unsandboxed``): then in a plain subprocess with the same limits, an empty environment and a temporary
directory. In both, the runner's Python-level guards (no sockets, child processes or writes outside the
working directory through the usual calls) keep generated code from doing damage by accident; alone they are
no boundary against code written to escape.
"""

import builtins
import contextlib
import functools
import itertools
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import PurePosixPath

BWRAP_ENV = "SELPRUNE_BWRAP"
INSTALL = "apt-get install bubblewrap"
STDERR_TAIL = 4096
NPROC = 4  # processes and threads of one check: a fork bomb stops here
WORKDIR = "/tmp"
WORKDIR_BYTES = 64 << 20
# What a failure may say: the name of a built-in exception (the runner names a custom one by its nearest
# built-in base), never other text of the program.
_EXCEPTION_NAMES = frozenset(
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
)
_CHECK_UIDS = itertools.count()

# Runs in the child: the uid and the limits first, then the program read from stdin; an exception ends it
# with its type's name as the last line of stderr.
_RUNNER = r"""
import builtins, io, os, resource, socket, subprocess, sys
uid, cpu, nproc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
program = sys.stdin.read()
if uid != "-":
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
limits = ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, 1 << 30, 1 << 30),
          (resource.RLIMIT_FSIZE, 1 << 20, 1 << 20), (resource.RLIMIT_NPROC, nproc, nproc),
          (resource.RLIMIT_CORE, 0, 0))
for limit, soft, hard in limits:
    try:
        resource.setrlimit(limit, (soft, hard))
    except (ValueError, OSError):  # a platform that does not enforce it (macOS: RLIMIT_AS)
        pass
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
try:
    exec(compile(program, "<candidate>", "exec"), {"__name__": "__main__"})
except BaseException as exc:
    name = next(c.__name__ for c in type(exc).__mro__ if getattr(builtins, c.__name__, None) is c)
    os.write(2, ("\n" + name + "\n").encode())
    os._exit(1)
"""


def bwrap() -> str:
    """The bwrap executable: ``$SELPRUNE_BWRAP``, else ``bwrap`` on the ``PATH``."""
    return os.environ.get(BWRAP_ENV) or shutil.which("bwrap") or "bwrap"


def unavailable() -> str | None:
    """None when programs can run in the sandbox here; otherwise why not, in a few words."""
    return _probe(bwrap())


@functools.lru_cache(maxsize=None)
def _probe(executable: str) -> str | None:
    if shutil.which(executable) is None:
        return f"no executable {executable!r}"
    try:
        outcome, tail = _run_sandboxed(executable, "pass", 1)
    except OSError as exc:
        return f"a trial run failed: {exc}"
    if outcome == "passed":
        return None
    lines = [line for line in tail.decode(errors="replace").splitlines() if line.strip()]
    return f"a trial run failed: {lines[0][:200] if lines else 'no message'}"


def run_program(program: str, timeout: float, allow_unsandboxed: bool = False) -> str:
    """``"passed"``, ``"timed out"`` or ``"failed: <exception type name>"`` of ``program`` run apart."""
    cpu_seconds = max(1, math.ceil(timeout))
    why = unavailable()
    if why is None:
        return _run_sandboxed(bwrap(), program, cpu_seconds)[0]
    if not allow_unsandboxed:
        raise RuntimeError(
            f"code_pass: generated code runs only in a bubblewrap sandbox, which cannot run here ({why}); "
            f"install it with `{INSTALL}`, or pass allow_unsandboxed=True"
        )
    workdir = tempfile.mkdtemp(prefix="code_pass-")
    try:
        command = [_interpreter(), "-I", "-S", "-c", _RUNNER, "-", str(cpu_seconds), str(NPROC)]
        process = _start(command, program, cwd=workdir)
        return _finish(process, time.monotonic() + _hang_guard(cpu_seconds))[0]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # its process group is dead by now


def _check_uid() -> int:
    """A uid no host user has, one per check: ``RLIMIT_NPROC`` counts that check's processes only."""
    return (1 << 31) + (os.getpid() << 8) + next(_CHECK_UIDS) % 256


def _interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _sandboxed(executable: str, cpu_seconds: int, info_fd: int) -> list[str]:
    """The bwrap command line that runs the runner: as root, as a check uid of its own (the runner drops to
    it, the only capabilities it keeps); otherwise as the caller, in a user namespace. bwrap writes the host
    pid of the sandbox's init to ``info_fd``."""
    namespaces = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup"]
    capabilities = ["--cap-drop", "ALL"]
    if os.geteuid() == 0:
        uid = str(_check_uid())
        capabilities += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        uid = "-"
        namespaces.append("--unshare-user")
    interpreter = _interpreter()
    binds = [p for p in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache") if os.path.exists(p)]
    binds += [sys.base_prefix] + ([] if interpreter.startswith(sys.base_prefix + os.sep) else [interpreter])
    root = []
    for parent in dict.fromkeys(a for path in binds for a in reversed(PurePosixPath(path).parents) if a != a.parent):
        root += ["--perms", "0755", "--dir", str(parent)]  # bwrap would make them 0700: closed to the check uid
    for path in binds:
        root += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
    return [
        executable,
        "--info-fd", str(info_fd),
        *namespaces,
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        *capabilities,
        *root,
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(WORKDIR_BYTES), "--perms", "1777", "--tmpfs", WORKDIR,
        "--chdir", WORKDIR,
        "--hostname", "sandbox",
        "--",
        interpreter, "-I", "-S", "-c", _RUNNER, uid, str(cpu_seconds), str(NPROC),
    ]  # fmt: skip


def _hang_guard(cpu_seconds: int) -> float:
    """Wall seconds after which a program is killed: a guard against hangs; CPU time decides a timeout."""
    return 5 * cpu_seconds + 5


def _run_sandboxed(executable: str, program: str, cpu_seconds: int) -> tuple[str, bytes]:
    """The outcome and stderr tail of ``program`` under bwrap, once every process of the sandbox has ended:
    bwrap may exit while the kernel still ends the processes of its PID namespace, whose init ends last."""
    deadline = time.monotonic() + _hang_guard(cpu_seconds)
    info_read, info_write = os.pipe()
    try:
        process = _start(_sandboxed(executable, cpu_seconds, info_write), program, pass_fds=(info_write,))
    except OSError:
        os.close(info_read)
        raise
    finally:
        os.close(info_write)
    init = _init_pidfd(info_read, deadline)
    try:
        done = _finish(process, deadline)
        if init is not None:
            select.select([init], [], [], max(1.0, deadline - time.monotonic()))  # readable once it has ended
        return done
    finally:
        if init is not None:
            os.close(init)


def _init_pidfd(info: int, deadline: float) -> int | None:
    """A pidfd of the sandbox's init, from bwrap's ``--info-fd`` JSON (closed here); None if it never came."""
    data = b""
    try:
        while select.select([info], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(info, 4096)
            if not chunk:
                return os.pidfd_open(int(json.loads(data)["child-pid"]))
            data += chunk
    except (OSError, ValueError, KeyError):  # bwrap failed before, or the init has ended already
        pass
    finally:
        os.close(info)
    return None


def _start(command: list[str], program: str, cwd: str | None = None, pass_fds: tuple = ()) -> subprocess.Popen:
    """``command`` started in a session of its own with an empty environment, fed ``program`` on stdin."""
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env={},
        start_new_session=True,
        pass_fds=pass_fds,
    )
    with contextlib.suppress(BrokenPipeError):
        process.stdin.write(program.encode())  # type: ignore[union-attr]
        process.stdin.close()  # type: ignore[union-attr]
    return process


def _finish(process: subprocess.Popen, deadline: float) -> tuple[str, bytes]:
    """The outcome and stderr tail of ``process``, whose process group is dead on return."""
    tail, hung = _stderr_tail(process, deadline)
    process.stderr.close()  # type: ignore[union-attr]
    if not hung:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # it closed its stderr and went on
            hung = True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the group id stays taken while any member lives
    status = process.wait()
    return _classified(status, tail, hung), tail


def _stderr_tail(process: subprocess.Popen, deadline: float) -> tuple[bytes, bool]:
    """The last ``STDERR_TAIL`` bytes of stderr, read as they come until the process ends (where the OS cannot
    tell, until no process holds stderr open); ``hung`` when the deadline came first."""
    fd = process.stderr.fileno()  # type: ignore[union-attr]
    ended = os.pidfd_open(process.pid) if hasattr(os, "pidfd_open") else None  # readable once it has ended
    tail = b""
    try:
        while True:
            left = deadline - time.monotonic()
            ready = select.select([fd] + ([ended] if ended is not None else []), [], [], max(0.0, left))[0]
            if not ready:
                return tail, True
            chunk = os.read(fd, 1 << 20) if fd in ready else b""
            tail = (tail + chunk)[-STDERR_TAIL:]
            if (fd in ready and not chunk) or ended in ready:  # a grandchild holding stderr does not count
                return tail, False
    finally:
        if ended is not None:
            os.close(ended)


def _classified(status: int, tail: bytes, hung: bool) -> str:
    if hung or status in (-9, -24, 128 + 9, 128 + 24):  # the wall guard; SIGKILL / SIGXCPU: the CPU limit
        return "timed out"
    if status == 0:
        return "passed"
    lines = tail.decode(errors="replace").split()
    name = lines[-1] if lines else ""
    return "failed: " + (name if name in _EXCEPTION_NAMES else "error")
