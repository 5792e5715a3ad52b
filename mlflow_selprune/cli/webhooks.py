"""``webhooks serve|install``: MLflow's registry events wake ``reconcile`` (they never decide anything)."""

from __future__ import annotations

import click

from .common import _announce_store, _say_store, handle_errors, main


@main.group()
def webhooks():
    """The HTTP receiver for MLflow's registry webhooks, and its registration with the server."""


SECRET = click.option(
    "--secret",
    default=None,
    help="The shared secret MLflow signs deliveries with (default: $SELPRUNE_WEBHOOK_SECRET; 16+ characters).",
)


@webhooks.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port to listen on.")
@SECRET
@click.option(
    "--fix/--no-fix",
    default=True,
    show_default=True,
    help="Run reconcile --fix (prune, gate, move aliases back); --no-fix only reports.",
)
@click.option(
    "--max-age",
    type=click.IntRange(10, 3600),
    default=300,
    show_default=True,
    help="Seconds a delivery's timestamp may be from now.",
)
@click.option("--certfile", default=None, metavar="CERT.pem", help="Serve HTTPS with this certificate (chain).")
@click.option("--keyfile", default=None, metavar="KEY.pem", help="The certificate's private key (if not in CERT.pem).")
@click.option(
    "--max-jobs", type=click.IntRange(1, 64), default=1, show_default=True, help="Reconcile jobs run at once."
)
@click.option(
    "--job-timeout",
    type=click.IntRange(60, 86400),
    default=3600,
    show_default=True,
    help="Seconds a job may run before it is stopped (the next event or cron pass finishes its work).",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    metavar="PUB.pem",
    help="Each job follows only policies signed by this Ed25519 public key (repeatable; default: "
    "$SELPRUNE_TRUSTED_KEYS, which the jobs read too).",
)
@handle_errors
def serve(host, port, secret, fix, max_age, certfile, keyfile, max_jobs, job_timeout, trusted_keys):
    """Receive model_version.created and model_version_alias.created deliveries and run reconcile for the model
    each names, one job at a time per model."""
    import logging

    from ..webhooks import Reconciler, make_server, secret_from

    secret = secret_from(secret)
    from ..registry.attest import load_trusted_keys

    load_trusted_keys(list(trusted_keys))  # a key that cannot be read answers now, not in every job
    _say_store()
    logging.getLogger("mlflow_selprune.webhooks").setLevel(logging.INFO)
    try:
        reconciler = Reconciler(fix=fix, max_jobs=max_jobs, job_timeout=job_timeout, trusted_keys=tuple(trusted_keys))
        server = make_server(host, port, secret, reconciler, max_age, certfile, keyfile)
    except OSError as exc:
        from ..errors import BadInputError

        raise BadInputError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    scheme = "https" if certfile else "http"
    click.echo(
        f"listening on {scheme}://{host}:{server.server_address[1]}/ (reconcile {'--fix' if fix else 'report only'})",
        err=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()


@webhooks.command()
@click.option("--url", required=True, help="The receiver's URL, e.g. http://127.0.0.1:8765/.")
@SECRET
@click.option("--name", default="selprune-reconcile", show_default=True, help="The webhook's name on the server.")
@handle_errors
def install(url, secret, name):
    """Register (or update) the webhook on the tracking server (a SQL store; MLflow 3.3+)."""
    from urllib.parse import urlparse

    from ..errors import BadInputError
    from ..webhooks import EVENTS, install as install_webhook, secret_from

    if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        raise BadInputError(f"--url {url!r} is not an http(s) URL")
    secret = secret_from(secret)
    _announce_store(require_existing=True)
    webhook = install_webhook(url, secret, name)
    click.echo(f"webhook {webhook.name} ({webhook.webhook_id}) posts {', '.join(EVENTS)} to {url}")
