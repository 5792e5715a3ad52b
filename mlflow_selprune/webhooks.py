"""A receiver for MLflow's registry webhooks that wakes ``reconcile``; it never decides anything itself.

MLflow (3.3+, SQL stores) posts ``model_version.created`` and ``model_version_alias.created`` events after the
change is made, fire and forget: a webhook cannot veto a version or an alias move, and a delivery can be
lost (the receiver down, retries spent). So the receiver only runs ``mlflow-selprune reconcile --model NAME
--fix`` for the model an event names, and that pass -- which a cron job runs too -- is the guarantee.

Each delivery is checked before it is read: MLflow's HMAC-SHA256 signature (``v1,`` + base64 of the digest of
``DELIVERY_ID.TIMESTAMP.BODY`` under the shared secret), a timestamp within ``max_age`` seconds of now, and a
delivery id not seen within that window (a replay). Jobs run one at a time per model; events that arrive while
a model's job runs are folded into one more run after it (the pass is idempotent, so one run covers them all).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import BadInputError

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"  # mlflow.webhooks.constants, read on mlflow 3.17
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
EVENTS = ("model_version.created", "model_version_alias.created")
SECRET_ENV = "SELPRUNE_WEBHOOK_SECRET"
MAX_BODY = 1 << 20
DEFAULT_MAX_AGE = 300


class Refused(Exception):
    """A delivery that is not read: ``status`` is the HTTP answer, the message says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def secret_from(value: str | None, flag: str = "--secret") -> str:
    """The shared secret (``--secret`` or ``$SELPRUNE_WEBHOOK_SECRET``); an unsigned receiver is refused."""
    secret = value or os.environ.get(SECRET_ENV) or ""
    if len(secret) < 16:
        raise BadInputError(
            f"{flag}: give the webhook's shared secret, at least 16 characters (or set {SECRET_ENV}); deliveries "
            "are accepted only when MLflow signed them with it"
        )
    return secret


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """What MLflow sends in ``X-MLflow-Signature`` for this delivery."""
    signed = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


class ReplayGuard:
    """Delivery ids seen within the timestamp window: one seen again is a replay (an older one fails the
    timestamp check, so the set stays small)."""

    def __init__(self, max_age: float):
        self.max_age = max_age
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()

    def first_time(self, delivery_id: str, now: float) -> bool:
        with self.lock:
            self.seen = {k: t for k, t in self.seen.items() if now - t <= 2 * self.max_age}
            if delivery_id in self.seen:
                return False
            self.seen[delivery_id] = now
            return True


def check_delivery(secret: str, headers, body: bytes, guard: ReplayGuard, now: float | None = None) -> dict:
    """The payload of a delivery MLflow signed with ``secret``, recently, once; else ``Refused``."""
    now = time.time() if now is None else now
    delivery_id, timestamp, signed = (headers.get(h) for h in (DELIVERY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not (delivery_id and timestamp and signed):
        raise Refused(401, "unsigned: the delivery id, timestamp or signature header is missing")
    if (
        not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) < 12)
        or abs(now - int(timestamp)) > guard.max_age
    ):
        raise Refused(401, f"timestamp {timestamp[:20]!r} is not within {guard.max_age:.0f} s of now")
    if not hmac.compare_digest(signed.encode(), signature(secret, delivery_id, timestamp, body).encode()):
        raise Refused(401, "the signature does not match (another secret, or the body was changed)")
    if not guard.first_time(delivery_id, now):
        raise Refused(409, f"delivery {delivery_id[:40]!r} was received already (a replay)")
    try:
        payload = json.loads(body)
    except ValueError:
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise Refused(400, "the body is not an MLflow webhook payload")
    return payload


class Reconciler:
    """Runs ``reconcile --model NAME`` in a subprocess, one job at a time per model and at most ``max_jobs`` at once;
    events for a model whose job is running are folded into one more run after it."""

    def __init__(
        self,
        fix: bool = True,
        command: list[str] | None = None,
        max_jobs: int = 1,
        job_timeout: float = 3600,
        trusted_keys: tuple[str, ...] = (),
    ):
        self.fix = fix
        self.trusted_keys = trusted_keys  # PEM paths: each job follows only the policies they signed
        self.command = command or [sys.executable, "-m", "mlflow_selprune"]
        self.job_timeout = job_timeout
        self.slots = threading.BoundedSemaphore(max_jobs)
        self.lock = threading.Lock()
        self.pending: dict[str, list] = {}  # model -> the alias moves seen for its next run
        self.held: dict[str, list] = {}  # model -> the moves of a job that did not finish, for its next event
        self.running: set[str] = set()
        self.finished = threading.Condition(self.lock)
        self.runs: list[tuple[str, int]] = []  # (model, exit code) of every finished job, for logs and tests

    def submit(self, model: str, seen: tuple[str, str, int] | None = None) -> None:
        with self.lock:
            self.pending.setdefault(model, []).extend(self.held.pop(model, []))
            if seen is not None:
                self.pending[model].append(seen)
            if model in self.running:
                return
            self.running.add(model)
        threading.Thread(target=self._work, args=(model,), daemon=True).start()

    def _work(self, model: str) -> None:
        try:
            while True:
                with self.lock:
                    if model not in self.pending:
                        return
                    seen = self.pending.pop(model)
                code = -1
                try:
                    code = self._run(model, seen)
                finally:
                    with self.lock:
                        self.runs.append((model, code))
                        if code not in (0, 1) and seen:  # not run to its end: its deliveries wait for the next
                            self.held.setdefault(model, []).extend(seen)  # event (never a rerun at once)
        finally:
            with self.lock:
                self.running.discard(model)
                self.finished.notify_all()

    def _run(self, model: str, seen: list) -> int:
        argv = [*self.command, "reconcile", "--model", model, "--no-progress"]
        argv += ["--fix"] if self.fix else []
        for alias, version, when in seen:
            argv += ["--seen", f"{alias}={version}@{when}"]
        for path in self.trusted_keys:
            argv += ["--trusted-key", path]
        with self.slots:
            logger.info("reconcile %s (%s)", model, "fix" if self.fix else "report only")
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=self.job_timeout)
            except subprocess.TimeoutExpired:
                logger.warning("reconcile %s ran past %d s and was stopped", model, self.job_timeout)
                return 124
            except OSError as exc:
                logger.warning("reconcile %s could not start: %s", model, exc)
                return 127
        for line in (done.stdout + done.stderr).splitlines():
            logger.info("  [%s] %s", model, line)
        logger.info("reconcile %s exited %d", model, done.returncode)
        return done.returncode

    def idle(self, timeout: float) -> bool:
        """Wait until no job runs or waits; whether that happened within ``timeout`` seconds."""
        with self.lock:
            return self.finished.wait_for(lambda: not self.running and not self.pending, timeout)


def make_server(
    host: str,
    port: int,
    secret: str,
    reconciler: Reconciler,
    max_age: float = DEFAULT_MAX_AGE,
    certfile: str | None = None,
    keyfile: str | None = None,
):
    """The receiver (not yet serving); with ``certfile`` (and ``keyfile``) it speaks HTTPS, which MLflow requires
    of a webhook URL unless the server allows http (``MLFLOW_WEBHOOK_ALLOWED_SCHEMES``, not for production)."""
    guard = ReplayGuard(max_age)

    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # seconds a connection may stay silent (a slow sender holds one thread, not the server)

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            logger.debug("%s %s", self.address_string(), format % args)

        def _answer(self, status: int, message: dict) -> None:
            data = json.dumps(message).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's name
            self._answer(200 if self.path == "/health" else 404, {"ok": self.path == "/health"})

        def do_POST(self):  # noqa: N802
            given = self.headers.get("Content-Length") or "0"
            length = int(given) if given.isascii() and given.isdigit() and len(given) < 10 else -1
            if not 0 < length <= MAX_BODY:
                return self._answer(413 if length else 400, {"refused": "a body of 1 byte to 1 MiB is expected"})
            body = self.rfile.read(length)
            try:
                payload = check_delivery(secret, self.headers, body, guard)
            except Refused as exc:
                logger.warning("refused a delivery from %s: %s", self.client_address[0], exc)
                return self._answer(exc.status, {"refused": str(exc)})
            event = f"{payload.get('entity')}.{payload.get('action')}"
            data = payload["data"]
            model = data.get("name")
            if event not in EVENTS or not isinstance(model, str) or not model:
                return self._answer(200, {"ignored": event})
            seen = None
            if event == "model_version_alias.created":
                from .registry.lineage import ALIAS

                alias, version = data.get("alias"), str(data.get("version"))
                if not (isinstance(alias, str) and ALIAS.fullmatch(alias) and version.isascii() and version.isdigit()):
                    return self._answer(400, {"refused": "the alias event names no alias and version"})
                seen = (alias, version, int(self.headers[TIMESTAMP_HEADER]))
            logger.info("%s for '%s': reconciling", event, model)
            reconciler.submit(model, seen)
            return self._answer(202, {"reconciling": model})

    context = None
    if certfile:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise BadInputError(f"--certfile/--keyfile: cannot load a certificate and key ({exc})") from None
    elif keyfile:
        raise BadInputError("--keyfile: give the certificate too (--certfile); without both the receiver speaks http")
    return _Server((host, port), Handler, context)


class _Server(ThreadingHTTPServer):
    """Each connection in its own thread, its TLS handshake there too (under the handler's timeout), so a client
    that connects and says nothing holds one thread, never the accepting one."""

    daemon_threads = True
    max_connections = 64  # connections served at once; more wait in the listen queue

    def __init__(self, address, handler, context=None):
        self.context = context
        self.connections = threading.BoundedSemaphore(self.max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self.connections.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def finish_request(self, request, client_address):
        if self.context is None:
            return super().finish_request(request, client_address)
        request.settimeout(30)
        try:
            secured = self.context.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError and timeouts are OSErrors
            logger.warning("TLS handshake with %s failed: %s", client_address[0], exc)
            return None
        try:
            return super().finish_request(secured, client_address)
        finally:
            secured.close()

    def handle_error(self, request, client_address):
        logger.warning("a request from %s failed: %s", client_address[0], sys.exc_info()[1])


def install(url: str, secret: str, name: str = "selprune-reconcile"):
    """Register (or update) the webhook that posts both events to ``url``, signed with ``secret``."""
    from .registry.resolve import client

    events: list = list(EVENTS)  # MLflow's own event names (WebhookEventStr)
    existing = [w for w in client().list_webhooks() if w.name == name]
    if existing:
        return client().update_webhook(existing[0].webhook_id, url=url, events=events, secret=secret)
    return client().create_webhook(name, url, events, description="wakes mlflow-selprune reconcile", secret=secret)
