"""A throwaway PostgreSQL cluster for the tests: ``initdb`` and ``pg_ctl`` in a temp dir, on a free loopback port.

Teams run MLflow with PostgreSQL behind the tracking server; this is that
database, for real, stopped by PID when the tests end. PostgreSQL refuses to
run as root, so as root the cluster belongs to the ``postgres`` system user.
Under CI (``CI=true``) a cluster that cannot start fails the tests that need
it; elsewhere they skip, with the reason printed.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USER = "selprune"
TEMPLATE = "mlflow_template"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries, no user to run them as, or a cluster that would not start."""


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    raise PostgresUnavailable(f"no '{name}' on PATH or in /usr/lib/postgresql/*/bin (apt-get install -y postgresql)")


class PostgresCluster:
    """One cluster: ``uri(db)`` for a database in it, ``new_database()`` for a migrated MLflow database."""

    def __init__(self):
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="selprune-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "postgres.log"
        self._run_as = []
        self._databases = 0
        self._template_made = False
        if os.geteuid() == 0:
            import pwd

            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "running as root and there is no 'postgres' user to own the cluster"
                ) from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._run_as = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]

    def _pg(self, *command, timeout=120):
        out = subprocess.run([*self._run_as, *command], capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            tail = self.log.read_text()[-1500:] if self.log.exists() else ""
            raise PostgresUnavailable(
                f"{Path(command[0]).name} failed ({out.returncode}): {(out.stderr or out.stdout)[-1500:]} {tail}"
            )
        return out

    def start(self) -> "PostgresCluster":
        if not self.data.exists():
            self._pg(
                _binary("initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            self._pg("mkdir", "-p", str(self.socket_dir))
        # fsync off: a test database need not survive a power cut, and a clean restart still checkpoints
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        )
        self._pg(_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        return self

    @property
    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        try:
            return int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut, as in a database failover or upgrade."""
        self._pg(
            _binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w", "-t", "60", "restart"
        )

    def stop(self) -> None:
        """Stop the postmaster by its PID (SIGQUIT after a grace period), then remove the cluster."""
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGINT)  # "fast" shutdown
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> None:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname=database)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql)
        finally:
            connection.close()

    def new_database(self, prefix: str = "mlflow") -> str:
        """A fresh database holding MLflow's schema, copied from a template migrated once (seconds saved per
        server); returns its URI."""
        if not self._template_made:
            self.execute(f"CREATE DATABASE {TEMPLATE}")
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            # the Default experiment it creates keeps its artifacts where a --serve-artifacts server puts them
            store = SqlAlchemyStore(self.uri(TEMPLATE), "mlflow-artifacts:/")
            store.engine.dispose()
            self._template_made = True
        self._databases += 1
        name = f"{prefix}_{self._databases}"
        self.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.uri(name)

    def empty_database(self, prefix: str) -> str:
        self._databases += 1
        name = f"{prefix}_{self._databases}"
        self.execute(f"CREATE DATABASE {name}")
        return self.uri(name)


BACKENDS = ("sqlite", "postgresql")


def backend_store_uri(request, backend: str) -> str | None:
    """A tracking server's backend for ``backend``: None (sqlite in the server's root) or a fresh PostgreSQL
    database with MLflow's schema, in the ``postgres`` fixture's cluster."""
    if backend == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()


def start_or_report() -> PostgresCluster:
    """A running cluster, or the pytest outcome for none: a failure under CI, a skip with the reason elsewhere."""
    try:
        cluster = PostgresCluster()
        return cluster.start()
    except (PostgresUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        from system_tools import missing

        missing("PostgreSQL", f"a cluster could not be started: {exc}")


if __name__ == "__main__":
    # `python tests/pg_cluster.py`: .ci/run's check that a cluster starts and answers here, before the tests
    try:
        cluster = PostgresCluster().start()
    except (PostgresUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        sys.exit(f"PostgreSQL could not be started: {exc}")
    try:
        version = subprocess.run([_binary("postgres"), "--version"], capture_output=True, text=True).stdout.strip()
        cluster.execute("SELECT 1")
        print(f"postgresql: a throwaway cluster started and answered ({version})")
    finally:
        cluster.stop()
