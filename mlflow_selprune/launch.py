"""Start the same command on N processes with torch's elastic launcher (what torchrun and
``accelerate launch`` run underneath), and return the workers' exit code.

Inside the workers, Accelerate reads the launcher's environment (RANK,
WORLD_SIZE, ...), so the code path is the one ``torchrun``/``accelerate
launch`` give. When one worker fails, the launcher stops the others (no hang)
and we exit with that worker's own exit code (2 for bad input), not a
generic failure.
"""

from __future__ import annotations

import socket
import sys
import uuid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, argv: list[str]) -> int:
    """Run ``python -m mlflow_selprune *argv`` on ``num_processes`` local processes."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=num_processes,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        run_id=uuid.uuid4().hex,
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "mlflow_selprune", *argv)
    except ChildFailedError as exc:
        codes = [failure.exitcode for _, failure in sorted(exc.failures.items())]
        return next((c for c in codes if c and c > 0), 3)
    return 0


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (the workers must not relaunch)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out
