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
    if not timestamp.isdigit() or abs(now - int(timestamp)) > guard.max_age:
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
    """Runs ``reconcile --model NAME`` in a subprocess, one job at a time per model; events for a model whose job
    is running are folded into one more run after it."""

    def __init__(self, fix: bool = True, command: list[str] | None = None):
        self.fix = fix
        self.command = command or [sys.executable, "-m", "mlflow_selprune"]
        self.lock = threading.Lock()
        self.running: dict[str, str | None] = {}  # model -> who saw a move by hand for the next run (None: no rerun)
        self.finished = threading.Condition(self.lock)
        self.runs: list[tuple[str, int]] = []  # (model, exit code) of every finished job, for logs and tests

    def submit(self, model: str, seen_by: str) -> None:
        with self.lock:
            if model in self.running:
                pending = self.running[model]
                self.running[model] = "webhook" if "webhook" in (pending, seen_by) else "reconcile"
                return
            self.running[model] = None
        threading.Thread(target=self._work, args=(model, seen_by), daemon=True).start()

    def _work(self, model: str, seen_by: str) -> None:
        while True:
            code = self._run(model, seen_by)
            with self.lock:
                self.runs.append((model, code))
                again = self.running[model]
                if again is None:
                    del self.running[model]
                    self.finished.notify_all()
                    return
                self.running[model], seen_by = None, again

    def _run(self, model: str, seen_by: str) -> int:
        argv = [*self.command, "reconcile", "--model", model, "--seen-by", seen_by, "--no-progress"]
        argv += ["--fix"] if self.fix else []
        logger.info("reconcile %s (%s)", model, "fix" if self.fix else "report only")
        done = subprocess.run(argv, capture_output=True, text=True)
        for line in (done.stdout + done.stderr).splitlines():
            logger.info("  [%s] %s", model, line)
        logger.info("reconcile %s exited %d", model, done.returncode)
        return done.returncode

    def idle(self, timeout: float) -> bool:
        """Wait until no job runs; whether that happened within ``timeout`` seconds."""
        with self.lock:
            return self.finished.wait_for(lambda: not self.running, timeout)


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
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                return self._answer(413 if length else 400, {"refused": "a body of 1 byte to 1 MiB is expected"})
            body = self.rfile.read(length)
            try:
                payload = check_delivery(secret, self.headers, body, guard)
            except Refused as exc:
                logger.warning("refused a delivery from %s: %s", self.client_address[0], exc)
                return self._answer(exc.status, {"refused": str(exc)})
            event = f"{payload.get('entity')}.{payload.get('action')}"
            model = payload["data"].get("name")
            if event not in EVENTS or not isinstance(model, str) or not model:
                return self._answer(200, {"ignored": event})
            seen_by = "webhook" if event == "model_version_alias.created" else "reconcile"
            logger.info("%s for '%s': reconciling", event, model)
            reconciler.submit(model, seen_by)
            return self._answer(202, {"reconciling": model})

    server = ThreadingHTTPServer((host, port), Handler)
    if certfile:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            server.server_close()
            raise BadInputError(f"--certfile/--keyfile: cannot load a certificate and key ({exc})") from None
        server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def install(url: str, secret: str, name: str = "selprune-reconcile"):
    """Register (or update) the webhook that posts both events to ``url``, signed with ``secret``."""
    from .registry.resolve import client

    existing = [w for w in client().list_webhooks() if w.name == name]
    if existing:
        return client().update_webhook(existing[0].webhook_id, url=url, events=list(EVENTS), secret=secret)
    return client().create_webhook(
        name, url, list(EVENTS), description="wakes mlflow-selprune reconcile", secret=secret
    )
