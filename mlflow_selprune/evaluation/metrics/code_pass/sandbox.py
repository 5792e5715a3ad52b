"""Runs one generated program where it can reach nothing of the job that checks it.

The operating system holds the boundary, not Python: the program runs under bubblewrap (``bwrap``) in new
PID, network, IPC, UTS, cgroup and mount namespaces, with a cleared environment, a read-only root that holds
only the interpreter and the shared libraries, its own ``/proc`` (no other process is visible), a private
size-bounded tmpfs as its working directory and no network but its own loopback. bwrap itself starts with an
empty environment, so no process in the sandbox holds the job's secrets. As root, the program runs as an
unprivileged uid of its own, without a user namespace: in one, its processes would be the host's uid 0, for
which the kernel never enforces ``RLIMIT_NPROC``; as another user, a user namespace is created as usual.
A syscall filter (seccomp, built here for x86_64 and aarch64; on other machines the sandbox is unavailable)
refuses what the namespaces and limits do not bound: making a namespace (``unshare``, ``setns``, ``clone``
with a namespace flag; a user namespace of its own would give the program every capability in it, to mount a
tmpfs of any size for one), mounting, System V shared memory, message queues and semaphores (the limits of a
new IPC namespace are far above any host's memory) and ``io_uring`` (whose operations no filter sees).

Resource limits: ``timeout`` seconds of CPU (CPU time, not wall time, decides a timeout, so a busy machine
cannot fail a correct program), 1 GiB of address space, 1 MiB per file, 64 open files, 4 processes and
threads. What a check can hold in memory is bounded by them alone: per process 1 GiB of address space and 64
descriptors, each holding at most about 1 MiB outside it (a ``memfd_create`` file, which no tmpfs size counts,
a pipe), so under 4.5 GiB per check with its 64 MiB tmpfs, times the checks run at once. No cgroup bounds a
check: none can be counted on (hosts with cgroup v1, or without a delegated v2 memory controller). A program
that blocks without using CPU is killed with its whole process group after ``5 * timeout + 5`` seconds of wall
time, a guard against hangs. A check returns only once every process of its sandbox has ended. Its stdout goes
to ``/dev/null`` and only the last 4 KiB of its stderr are read, so neither can fill the caller's memory; the
outcome is classified (``passed``, ``failed: <built-in exception type>``, ``timed out``; a custom exception is
named by its nearest built-in base) and carries no other text of the program.

A check passes only when the runner, once the program and its test lines ran to their end, writes the check's
random token to a pipe of its own and exits 0: an ``os._exit(0)`` from any thread, or a failure whose handling
the program made raise ``SystemExit(0)`` (replaced builtins, a metaclass), is ``failed: <type>`` or ``failed:
error``, never a pass (Hugging Face's ``code_eval`` too counts only an ``exec`` that returned). The runner
handles the outcome only through references it took before the program ran. Its limit: the token is in the
runner's frame, which the program shares, so code written to find it (``sys._getframe``) can fake a pass;
that only makes a model pass more tasks, which counts against it (the pass rate is what unlearning must
lower), so the gate is not at risk.

``SELPRUNE_BWRAP`` names the bwrap executable (default: ``bwrap`` on the ``PATH``). Where bwrap is missing
or cannot create namespaces, ``unavailable()`` says why, and programs run only when the caller allows it
(``allow_unsandboxed``): then in a plain subprocess with the same limits and pass marker, an empty environment
and a temporary directory, without the syscall filter. In both, the runner's Python-level guards (no sockets,
child processes or writes outside the working directory through the usual calls) keep generated code from
doing damage by accident; alone they are no boundary against code written to escape.
"""

import builtins
import contextlib
import errno
import functools
import itertools
import json
import math
import os
import secrets
import select
import shutil
import signal
import struct
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

# Runs in the child: the uid and the limits first, then the program read from stdin after the check's token (its
# first line); an exception ends it with its type's name as the last line of stderr. Only once the program and its
# tests ran to their end does it write the token to the marker pipe (its fd is argv[4]) and exit 0. Everything it
# does after the program ran goes through locals bound before: a program that replaces builtins or raises from a
# metaclass cannot turn a failure into that exit.
_RUNNER = r"""
def main():
    import builtins, io, os, resource, socket, subprocess, sys
    uid, cpu, nproc, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    token, _, program = sys.stdin.read().partition("\n")
    token = token.encode()
    if uid != "-":
        os.setgroups([])
        os.setgid(int(uid))
        os.setuid(int(uid))
    limits = ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, 1 << 30, 1 << 30),
              (resource.RLIMIT_FSIZE, 1 << 20, 1 << 20), (resource.RLIMIT_NPROC, nproc, nproc),
              (resource.RLIMIT_NOFILE, 64, 64), (resource.RLIMIT_CORE, 0, 0))
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
    write, leave, type_of, mro_of, anything = os.write, os._exit, type, type.__dict__["__mro__"].__get__, BaseException
    named = tuple((value, ("\n" + name + "\n").encode()) for name, value in vars(builtins).items()
                  if isinstance(value, type) and issubclass(value, BaseException))
    code = compile(program, "<candidate>", "exec")
    try:
        exec(code, {"__name__": "__main__"})
    except anything as exc:
        try:  # by identity along the real MRO: no attribute, hash or comparison of the program's classes
            line = [name for cls in mro_of(type_of(exc)) for builtin, name in named if cls is builtin][0]
        except anything:
            line = b"\nerror\n"
        write(2, line)
        leave(1)
    try:
        write(marker, token)
    finally:
        leave(0)
main()
"""
# The syscall filter of the sandbox (seccomp, classic BPF) per machine: its audit architecture, the syscalls
# refused with EPERM (making namespaces, mounting, System V IPC, whose limits in the check's IPC namespace are far
# above any host's memory, and io_uring, whose operations no filter sees) and their numbers.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALL_NUMBERS = {
    "x86_64": {"clone": 56, "clone3": 435, "unshare": 272, "setns": 308, "mount": 165, "umount2": 166,
               "pivot_root": 155, "shmget": 29, "semget": 64, "msgget": 68},
    "aarch64": {"clone": 220, "clone3": 435, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
                "pivot_root": 41, "shmget": 194, "semget": 190, "msgget": 186},
}  # fmt: skip
_SAME_NUMBERS = {"io_uring_setup": 425, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
                 "fsmount": 432, "fspick": 433, "mount_setattr": 442}  # fmt: skip
_CLONE_NEW_NAMESPACES = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET


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
    if _syscall_filter() is None:
        return f"no syscall filter for {os.uname().machine} machines (only {', '.join(_AUDIT_ARCH)})"
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
    marker, marker_write = os.pipe()
    token = secrets.token_hex(16)
    try:
        try:
            command = [_interpreter(), "-I", "-S", "-c", _RUNNER, "-", str(cpu_seconds), str(NPROC), str(marker_write)]
            process = _start(command, token + "\n" + program, cwd=workdir, pass_fds=(marker_write,))
        finally:
            os.close(marker_write)
        status, tail, hung = _finish(process, time.monotonic() + _hang_guard(cpu_seconds))
        return _classified(status, tail, hung, _marked(marker, token))
    finally:
        os.close(marker)
        shutil.rmtree(workdir, ignore_errors=True)  # its process group is dead by now


def _check_uid() -> int:
    """A uid no host user has, one per check: ``RLIMIT_NPROC`` counts that check's processes only."""
    return (1 << 31) + (os.getpid() << 8) + next(_CHECK_UIDS) % 256


def _interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=None)
def _syscall_filter() -> bytes | None:
    """The sandbox's seccomp filter for this machine (classic BPF, as bwrap's ``--seccomp`` reads it), None for
    a machine it has no syscall numbers of. Another architecture (x86_64's 32-bit calls) and x86_64's x32 calls
    are refused too; ``clone`` is refused only with a new-namespace flag, ``clone3`` with ``ENOSYS``, so that
    the C library falls back to ``clone``, whose flags the filter can read."""
    machine = os.uname().machine
    if machine not in _AUDIT_ARCH:
        return None
    numbers = {**_SYSCALL_NUMBERS[machine], **_SAME_NUMBERS}
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    # (code, jump if true, jump if false, k); a jump names its target, resolved to an offset below
    program: list[tuple[int, int | str, int | str, int]] = [(load, 0, 0, 4), (jeq, 0, "kill", _AUDIT_ARCH[machine])]
    program.append((load, 0, 0, 0))
    program.append((jge, "refuse", 0, 0x40000000))  # x32: the same arch, numbers from __X32_SYSCALL_BIT
    refused = sorted(numbers[name] for name in numbers if name not in ("clone", "clone3"))
    program += [(jeq, "refuse", 0, number) for number in refused]
    program.append((jeq, "nosys", 0, numbers["clone3"]))
    program.append((jeq, 0, "allow", numbers["clone"]))
    program += [(load, 0, 0, 16), (jset, "refuse", "allow", _CLONE_NEW_NAMESPACES)]  # the low half of its flags
    labels = {"allow": len(program), "refuse": len(program) + 1, "nosys": len(program) + 2, "kill": len(program) + 3}
    program += [(ret, 0, 0, 0x7FFF0000), (ret, 0, 0, 0x00050000 | errno.EPERM)]
    program += [(ret, 0, 0, 0x00050000 | errno.ENOSYS), (ret, 0, 0, 0x80000000)]  # ALLOW, ERRNO, KILL_PROCESS

    def offset(index: int, target: int | str) -> int:
        return target if isinstance(target, int) else labels[target] - index - 1

    return b"".join(
        struct.pack("=HBBI", code, offset(i, true), offset(i, false), k)
        for i, (code, true, false, k) in enumerate(program)
    )


def _sandboxed(executable: str, cpu_seconds: int, info_fd: int, marker_fd: int, filter_fd: int) -> list[str]:
    """The bwrap command line that runs the runner: as root, as a check uid of its own (the runner drops to
    it, the only capabilities it keeps); otherwise as the caller, in a user namespace. bwrap writes the host
    pid of the sandbox's init to ``info_fd`` and reads the syscall filter from ``filter_fd``; ``marker_fd`` is
    the runner's."""
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
        "--seccomp", str(filter_fd),
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
        interpreter, "-I", "-S", "-c", _RUNNER, uid, str(cpu_seconds), str(NPROC), str(marker_fd),
    ]  # fmt: skip


def _hang_guard(cpu_seconds: int) -> float:
    """Wall seconds after which a program is killed: a guard against hangs; CPU time decides a timeout."""
    return 5 * cpu_seconds + 5


def _run_sandboxed(executable: str, program: str, cpu_seconds: int) -> tuple[str, bytes]:
    """The outcome and stderr tail of ``program`` under bwrap, once every process of the sandbox has ended:
    bwrap may exit while the kernel still ends the processes of its PID namespace, whose init ends last."""
    deadline = time.monotonic() + _hang_guard(cpu_seconds)
    token = secrets.token_hex(16)
    info_read, info_write = os.pipe()
    marker, marker_write = os.pipe()
    filter_read, filter_write = os.pipe()
    os.write(filter_write, _syscall_filter() or b"")  # a few hundred bytes: the pipe takes them at once
    os.close(filter_write)
    passed_on = (info_write, marker_write, filter_read)
    try:
        process = _start(_sandboxed(executable, cpu_seconds, *passed_on), token + "\n" + program, pass_fds=passed_on)
    except OSError:
        os.close(info_read)
        os.close(marker)
        raise
    finally:
        for fd in passed_on:
            os.close(fd)
    init = _init_pidfd(info_read, deadline)
    try:
        status, tail, hung = _finish(process, deadline)
        if init is not None:
            select.select([init], [], [], max(1.0, deadline - time.monotonic()))  # readable once it has ended
        return _classified(status, tail, hung, _marked(marker, token)), tail
    finally:
        os.close(marker)
        if init is not None:
            os.close(init)


def _marked(marker: int, token: str) -> bool:
    """Whether the marker pipe holds the check's token and nothing else: the runner writes it only once the
    program and its tests ran to their end."""
    os.set_blocking(marker, False)
    try:
        return os.read(marker, len(token) + 1) == token.encode()
    except BlockingIOError:  # nothing written
        return False


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


def _finish(process: subprocess.Popen, deadline: float) -> tuple[int, bytes, bool]:
    """The exit status and stderr tail of ``process``, and whether it hung; its process group is dead on
    return."""
    tail, hung = _stderr_tail(process, deadline)
    process.stderr.close()  # type: ignore[union-attr]
    if not hung:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # it closed its stderr and went on
            hung = True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the group id stays taken while any member lives
    return process.wait(), tail, hung


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


def _classified(status: int, tail: bytes, hung: bool, marked: bool) -> str:
    """Passed only with exit status 0 and the marker (an ``os._exit(0)`` before the tests ended is neither a
    pass nor an exception: ``failed: error``)."""
    if hung or status in (-9, -24, 128 + 9, 128 + 24):  # the wall guard; SIGKILL / SIGXCPU: the CPU limit
        return "timed out"
    if status == 0 and marked:
        return "passed"
    lines = tail.decode(errors="replace").split()
    name = lines[-1] if lines else ""
    return "failed: " + (name if name in _EXCEPTION_NAMES else "error")
