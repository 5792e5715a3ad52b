"""Standing policies: create, reconcile (report and --fix), status, history; the webhook receiver on a real
`mlflow server` with webhooks; reconcile and the receiver killed at random points. Real stores, real models."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_selprune.registry import lineage
from mlflow_selprune.webhooks import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, signature

from mlflow_helpers import TINY_NAME, MlflowServer, cli, free_port, invoke, register_tiny, server_store

SMALL = ["--paragraphs", "--max-length", "64", "--batch-size", "4", "--collect-tokens", "2000", "--eval-tokens", "1000"]
RECIPE = ["--ff-frac", "0.1", "--steps", "1", "--no-control", *SMALL]
GATE = ["--max-retain-drop", "1"]  # any result passes: these tests check the mechanics, not the model
SECRET = "a-shared-secret-for-tests-only"
ROOT = Path(__file__).resolve().parents[1]


def versions() -> dict[str, dict]:
    return {str(mv.version): dict(mv.tags) for mv in MlflowClient().search_model_versions(f"name='{TINY_NAME}'")}


def alias(name: str) -> str | None:
    found = MlflowClient().get_registered_model(TINY_NAME).aliases.get(name)
    return None if found is None else str(found)


def children_of(base: str) -> list[str]:
    """The versions unlearned from ``base`` under a policy."""
    return sorted((v for v, t in versions().items() if t.get(lineage.PARENT) == base and lineage.POLICY in t), key=int)


def decision_keys() -> set[tuple[str, str]]:
    return {(v, k) for v, t in versions().items() for k in t if k.startswith(lineage.GATE_RECORD_PREFIX)}


def written() -> tuple:
    """What a command could have written: versions and their tags, the model's tags, the policies' runs."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("selprune-policies")
    runs = [] if experiment is None else client.search_runs([experiment.experiment_id])
    return versions(), dict(client.get_registered_model(TINY_NAME).tags), sorted(r.info.run_id for r in runs)


def policy_args(store, *extra) -> list[str]:
    return [
        "policy", "create", "--model", TINY_NAME, "--name", "no-code", "--forget", store["forget"],
        "--retain", store["retain"], *RECIPE, *GATE, "--protect", "production", *extra,
    ]  # fmt: skip


def test_a_policy_follows_every_base_version_and_keeps_its_alias_on_a_compliant_one(store, tiny_tokenizer):
    """Reconcile run directly (no webhook): report, fix, a second pass that writes nothing, a new base version
    followed, a move by hand to a raw base found and undone, and the history and status that tell it."""
    client = MlflowClient()
    client.set_registered_model_alias(TINY_NAME, "production", "1")
    out = invoke(*policy_args(store))
    assert out.exit_code == 0, out.output
    assert "policy no-code r1" in out.stdout
    report = invoke("reconcile", "--model", TINY_NAME)
    assert report.exit_code == 1, report.output
    assert "v1 is a base version" in report.stdout and versions().keys() == {"1"}  # a report writes nothing
    fixed = invoke("reconcile", "--model", TINY_NAME, "--fix", "--no-progress")
    assert fixed.exit_code == 0, fixed.output
    first = children_of(f"models:/{TINY_NAME}/1")
    assert len(first) == 1 and alias("production") == first[0]
    tags = versions()
    assert tags[first[0]][lineage.POLICY].startswith("no-code@")
    shown = {k for k in tags[first[0]] if not k.startswith(lineage.GATE_RECORD_PREFIX)}
    assert shown <= set(lineage.SHOWN) and len(shown) == 6  # the rest is in the anchored record, read verified
    decided = invoke("gate", "--model-uri", f"models:/{TINY_NAME}/{first[0]}", "--min-selectivity", "0", "--dry-run")
    assert decided.exit_code in (0, 1) and "selectivity = " in decided.stdout, decided.output  # a metric not shown
    description = client.get_registered_model(TINY_NAME).description
    again = invoke("reconcile", "--model", TINY_NAME, "--fix", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["actions"] == []
    assert versions() == tags and client.get_registered_model(TINY_NAME).description == description

    base = register_tiny(tiny_tokenizer, alias=None)
    assert invoke("reconcile", "--model", TINY_NAME, "--fix", "--no-progress").exit_code == 0
    second = children_of(base)
    assert len(second) == 1 and alias("production") == first[0]  # a compliant alias is not moved

    client.set_registered_model_alias(TINY_NAME, "production", base.rsplit("/", 1)[1])  # by hand, to the raw base
    seen = invoke("reconcile", "--model", TINY_NAME)
    assert seen.exit_code == 1 and "is a base version" in seen.stdout
    assert invoke("reconcile", "--model", TINY_NAME, "--fix").exit_code == 0
    assert alias("production") == second[0]  # the newest compliant version

    history = invoke("history", f"models:/{TINY_NAME}@production")
    assert history.exit_code == 0, history.output
    lines = history.stdout.splitlines()
    assert [line.split()[2] for line in lines[1:-1]] == ["moved", "reconcile", "moved", "reconcile"]
    assert "seen by reconcile" in lines[3] and f"to v{second[0]}" in lines[4]
    assert lines[-1] == f"now: models:/{TINY_NAME}@production -> version {second[0]}"
    status = invoke("status", "--model", TINY_NAME)
    assert status.exit_code == 0 and "2 of 2 base versions followed" in status.stdout
    assert "### Forget policies" in client.get_registered_model(TINY_NAME).description
    assert invoke("lineage", "--all", TINY_NAME).exit_code == 0  # every alias move explained, every record sound


def test_bad_input_is_one_line_exit_2_and_writes_nothing(store):
    before = written()
    cases = {
        "--model": policy_args(store)[:3] + ["nope"] + policy_args(store)[4:],
        "--protect": policy_args(store)[:-1] + ["no-such-alias"],
        "--max-retain-drop": [*policy_args(store), "--max-retain-drop", "2"],
        "--name": policy_args(store)[:5] + ["bad name!"] + policy_args(store)[6:],
        "--forget": policy_args(store)[:7] + ["/no/such/file.txt"] + policy_args(store)[8:],
    }
    for flag, args in cases.items():
        out = invoke(*args)
        assert out.exit_code == 2, (flag, out.output)
        error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and flag in error[0], (flag, out.stderr)
    for args, flag in (
        (["reconcile", "--model", "nope"], "--model"),
        (["status", "--model", "nope"], "--model"),
        (["history", "tiny-lm@production"], "models:/NAME@ALIAS"),
        (["webhooks", "serve", "--secret", "short"], "--secret"),
        (["webhooks", "install", "--url", "ftp://x", "--secret", SECRET], "--url"),
    ):
        out = invoke(*args)
        assert out.exit_code == 2 and flag in out.stderr, (args, out.output)
    assert written() == before


def _post(url: str, body: bytes, headers: dict) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_receiver_refuses_unsigned_stale_and_replayed_deliveries():
    import threading

    from mlflow_selprune.webhooks import Reconciler, make_server

    reconciler = Reconciler(command=[sys.executable, "-c", "import sys; sys.exit(0)"])
    server = make_server("127.0.0.1", 0, SECRET, reconciler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "m", "version": "1"}}).encode()
    now = str(int(time.time()))

    def headers(delivery="d-1", timestamp=now, secret=SECRET, payload=body):
        return {
            DELIVERY_ID_HEADER: delivery,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(secret, delivery, timestamp, payload),
        }

    try:
        assert _post(url, body, {}) == 401  # unsigned
        assert _post(url, body, headers(secret="another-secret-entirely")) == 401
        assert _post(url, body.replace(b'"1"', b'"2"'), headers()) == 401  # body changed after signing
        old = str(int(time.time()) - 3600)
        assert _post(url, body, headers(timestamp=old)) == 401
        assert reconciler.runs == [] and not reconciler.running and not reconciler.pending  # nothing refused woke a job
        assert _post(url, body, headers()) == 202
        assert _post(url, body, headers()) == 409  # the same delivery again: a replay
        assert reconciler.idle(60) and reconciler.runs == [("m", 0)]
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- end to end through a real server


def test_the_receiver_serves_https_with_the_certificate_given(tmp_path):
    """``webhooks serve --certfile/--keyfile``: a delivery signed with the secret is taken over TLS."""
    cert, key = _self_signed(tmp_path / "tls")
    receiver = Receiver(
        tmp_path, {"SELPRUNE_WEBHOOK_SECRET": SECRET, "MLFLOW_TRACKING_URI": "sqlite:///x.db"}, cert, key
    )
    try:
        assert receiver.url.startswith("https://")
        body = json.dumps({"entity": "registered_model", "action": "created", "data": {"name": "m"}}).encode()
        delivery, timestamp = "d-tls", str(int(time.time()))
        headers = {
            DELIVERY_ID_HEADER: delivery,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(SECRET, delivery, timestamp, body),
        }
        request = urllib.request.Request(receiver.url, data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=30, context=ssl.create_default_context(cafile=cert)) as answer:
            assert answer.status == 200 and json.loads(answer.read()) == {"ignored": "registered_model.created"}
    finally:
        receiver.kill()


def _self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key: MLflow posts webhooks over https only."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "receiver.pem", directory / "receiver.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


class Receiver:
    """``mlflow-selprune webhooks serve`` in its own process group (killed with what it started)."""

    def __init__(self, root: Path, env: dict, cert: str | None, key: str | None):
        self.port = free_port()
        self.url = f"{'https' if cert else 'http'}://127.0.0.1:{self.port}/"
        self.log = root / f"receiver-{self.port}.log"
        command = [sys.executable, "-m", "mlflow_selprune", "webhooks", "serve", "--port", str(self.port)]
        command += ["--certfile", cert, "--keyfile", key] if cert else []
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
            )
        context = ssl.create_default_context(cafile=cert) if cert else None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}health", timeout=2, context=context):
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"the receiver did not start: {self.log.read_text()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def _until(condition, what: str, timeout: float = 420):
    """Wait for ``condition()`` (a deadline for a failure to show, never what decides the result)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _compliant() -> bool:
    return invoke("reconcile", "--model", TINY_NAME).exit_code == 0


@pytest.mark.slow
def test_webhooks_wake_reconcile_on_a_real_server_with_a_sql_store(tmp_path, tiny_tokenizer):
    """A real `mlflow server` (SQL store) with webhooks posting to the receiver on loopback: a new base version
    gets its unlearned child, gated with the policy's digest; a move by hand of the protected alias to the raw base
    is seen through the webhook and undone; history shows all of it.

    MLflow posts to https URLs only, verified against its own CA bundle (certifi's: the session ignores
    REQUESTS_CA_BUNDLE), so a self-signed loopback receiver is reached over http here, which the server allows
    with MLFLOW_WEBHOOK_ALLOWED_SCHEMES (not for production; ``test_the_receiver_serves_https...`` covers TLS)."""
    server_env = {
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
    }
    with MlflowServer(tmp_path / "srv", extra_env=server_env) as srv, server_store(srv, tiny_tokenizer) as store:
        client = MlflowClient()
        client.set_registered_model_alias(TINY_NAME, "production", "1")
        env = {**store["env"], "SELPRUNE_WEBHOOK_SECRET": SECRET}
        receiver = Receiver(tmp_path, env, cert=None, key=None)
        try:
            installed = invoke("webhooks", "install", "--url", receiver.url, "--secret", SECRET)
            assert installed.exit_code == 0, installed.output
            assert invoke(*policy_args(store)).exit_code == 0
            time.sleep(2)  # the server's webhook list is cached for a second
            base = register_tiny(tiny_tokenizer, alias=None)  # model_version.created -> the receiver reconciles
            _until(lambda: _compliant() and children_of(base), "the receiver to unlearn the new base version")
            child = children_of(base)[0]
            tags = versions()[child]
            assert tags[lineage.POLICY].startswith("no-code@")
            passed = [r for _, r in lineage.gate_record_entries(tags) if r and r["verdict"] == "pass"]
            assert passed and passed[-1]["thresholds"]["max_retain_drop"] == 1
            assert alias("production") in children_of(f"models:/{TINY_NAME}/1") + [child]

            client.set_registered_model_alias(TINY_NAME, "production", base.rsplit("/", 1)[1])  # by hand
            _until(lambda: alias("production") == child and _compliant(), "the receiver to move @production back")
            history = invoke("history", f"models:/{TINY_NAME}@production")
            assert "moved by hand (seen by webhook)" in history.stdout, history.stdout
            assert f"moved from v{base.rsplit('/', 1)[1]}" in history.stdout
            assert len(children_of(base)) == 1  # however many deliveries came, one child
        finally:
            receiver.kill()
        assert "reconcile tiny-lm exited 0" in receiver.log.read_text()


def _signed_delivery(url: str, model: str) -> int:
    body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": model}}).encode()
    delivery, timestamp = f"d-{random.random()}", str(int(time.time()))
    headers = {
        DELIVERY_ID_HEADER: delivery,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(SECRET, delivery, timestamp, body),
    }
    return _post(url, body, headers)


@pytest.mark.slow
def test_reconcile_and_the_receiver_killed_at_random_points_leave_no_half_state(tmp_path, tiny_tokenizer):
    """SIGKILL `reconcile --fix`, and a receiver running one, at seeded random moments, then run it to the end:
    one child per base, the protected alias on a compliant version, no decision record lost."""
    from mlflow_helpers import sqlite_store

    with sqlite_store(tmp_path, tiny_tokenizer) as store:
        client = MlflowClient()
        client.set_registered_model_alias(TINY_NAME, "production", "1")
        assert invoke(*policy_args(store)).exit_code == 0
        register_tiny(tiny_tokenizer, alias=None)
        env = {**os.environ, **store["env"], "SELPRUNE_WEBHOOK_SECRET": SECRET}
        draw = random.Random(31)
        recorded: set = set()
        command = [sys.executable, "-m", "mlflow_selprune", "reconcile", "--model", TINY_NAME, "--fix", "--no-progress"]
        for attempt in range(5):
            if attempt == 3:  # a new base, and the receiver (woken by a signed delivery) killed while it works
                register_tiny(tiny_tokenizer, alias=None)
            if attempt < 3:
                process = subprocess.Popen(command, env=env, start_new_session=True,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                try:
                    process.wait(timeout=draw.uniform(2, 12))
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            else:
                receiver = Receiver(tmp_path, env, cert=None, key=None)
                try:
                    assert _signed_delivery(receiver.url, TINY_NAME) == 202
                    time.sleep(draw.uniform(2, 12))
                finally:
                    receiver.kill()
            now = decision_keys()
            assert recorded <= now, "a decision record was lost"
            recorded = now
            if attempt == 1:  # a move by hand between kills
                client.set_registered_model_alias(TINY_NAME, "production", "2")
        # the pass that finishes the job: the MLproject's entry point, as a cron job would run it
        project = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "reconcile", "--env-manager", "local"]
        final = subprocess.run([*project, "-P", f"model={TINY_NAME}"], env=env, capture_output=True, text=True)
        assert final.returncode == 0, final.stdout + final.stderr
        bases = [v for v, t in versions().items() if lineage.PARENT not in t]
        assert len(bases) == 3
        for base in bases:
            assert len(children_of(f"models:/{TINY_NAME}/{base}")) == 1, versions()
        assert recorded <= decision_keys()
        assert alias("production") in [c for b in bases for c in children_of(f"models:/{TINY_NAME}/{b}")]
        second = json.loads(invoke("reconcile", "--model", TINY_NAME, "--fix", "--json").stdout)
        assert second["actions"] == [] and second["problems"] == []
        assert invoke("lineage", "--all", TINY_NAME).exit_code == 0


@pytest.mark.slow
def test_what_a_user_with_edit_can_do_to_a_policy_is_seen_and_changes_nothing(tmp_path, tiny_tokenizer):
    """A move by hand onto a compliant version is recorded as seen and left (a second pass writes nothing); a
    second policy on the same alias is reported, the alias left alone; a run tag edited to hide the newest
    revision hides nothing; a body that is no policy is a finding, never a crash; with --trusted-key only
    policies the operator signed are followed."""
    from mlflow_helpers import sqlite_store

    from mlflow_selprune.registry import policy as policies

    with sqlite_store(tmp_path, tiny_tokenizer) as store:
        client = MlflowClient()
        client.set_registered_model_alias(TINY_NAME, "production", "1")
        assert invoke(*policy_args(store)).exit_code == 0
        register_tiny(tiny_tokenizer, alias=None)
        assert invoke("reconcile", "--model", TINY_NAME, "--fix").exit_code == 0
        first, second = children_of(f"models:/{TINY_NAME}/1")[0], children_of(f"models:/{TINY_NAME}/2")[0]
        assert alias("production") == first
        client.set_registered_model_alias(TINY_NAME, "production", second)  # by hand, onto a compliant version
        seen = json.loads(invoke("reconcile", "--model", TINY_NAME, "--fix", "--json").stdout)
        assert seen["actions"] == [f"recorded @production on v{second}, put there by no recorded move (reconcile)"]
        assert alias("production") == second
        settled = written()
        again = json.loads(invoke("reconcile", "--model", TINY_NAME, "--fix", "--json").stdout)
        assert again["actions"] == [] and again["problems"] == [] and written() == settled
        audit = invoke("lineage", "--all", TINY_NAME)
        assert audit.exit_code == 1 and "@production points here" in audit.stdout  # the audit still shows it

        # a second revision, then its run's tag edited so a search by tag would miss it
        assert invoke(*policy_args(store), "--max-retain-drop", "0.99").exit_code == 0
        newest = policies.get(TINY_NAME, "no-code")
        assert newest.revision == 2 and not newest.findings
        client.set_tag(newest.run_id, policies.RUN_MODEL_TAG, "another-model")
        assert policies.get(TINY_NAME, "no-code").revision == 2

        # a policy anyone with EDIT can write: protects the same alias
        other = {**newest.body, "name": "zzz", "revision": 1, "previous_sha256": None}
        policies.write(other)
        contested = json.loads(invoke("reconcile", "--model", TINY_NAME, "--fix", "--json").stdout)
        assert any("protected by 2 policies" in line for line in contested["problems"]), contested
        assert alias("production") == second

        # a revision run whose anchored body is no policy
        junk = client.create_run(client.create_experiment("elsewhere"))
        client.log_text(junk.info.run_id, "[]", policies.BODY_ARTIFACT)
        client.log_param(junk.info.run_id, policies.RUN_MODEL_TAG, TINY_NAME)
        client.log_param(junk.info.run_id, policies.RUN_NAME_TAG, "junk")
        client.log_param(junk.info.run_id, policies.BODY_PARAM, hashlib.sha256(b"[]").hexdigest())
        status = invoke("status", "--model", TINY_NAME)
        assert status.exit_code == 1 and "policy junk does not verify" in status.stdout + status.stderr, status.output

        # the UI's tag for a policy holding no pointer at all
        pointer = client.get_registered_model(TINY_NAME).tags[policies.TAG_PREFIX + "no-code"]
        client.set_registered_model_tag(TINY_NAME, policies.TAG_PREFIX + "no-code", '{"sha256": "x", "run_id": []}')
        pointed = invoke("status", "--model", TINY_NAME)
        assert pointed.exit_code == 1 and "tag selprune.policy.no-code names" in pointed.stdout, pointed.output
        client.set_registered_model_tag(TINY_NAME, policies.TAG_PREFIX + "no-code", pointer)

        # only what the operator signed is followed
        keys = tmp_path / "keys"
        assert invoke("keygen", str(keys)).exit_code == 0
        before = written()
        rooted = invoke("reconcile", "--model", TINY_NAME, "--fix", "--trusted-key", str(keys / "signing_key.pub.pem"))
        assert rooted.exit_code == 1 and "no-code is not signed by a trusted key; not followed" in rooted.stdout
        assert written()[0] == before[0]  # no version, no decision

        # history checks each signed move against its record: valid, then INVALID once the record is edited
        public, private = str(keys / "signing_key.pub.pem"), str(keys / "signing_key.pem")
        gated = invoke(
            "gate", "--model-uri", f"models:/{TINY_NAME}/{first}", "--max-retain-drop", "1", "--set-alias", "canary",
            "--signing-key", private,
        )  # fmt: skip
        assert gated.exit_code == 0, gated.output
        signed_history = invoke("history", f"models:/{TINY_NAME}@canary", "--trusted-key", public)
        (row,) = [line for line in signed_history.stdout.splitlines() if " gate " in line]
        assert " valid " in row, signed_history.stdout
        key, record = next(
            (k, r)
            for k, r in lineage.gate_record_entries(client.get_model_version(TINY_NAME, first).tags)
            if r and r.get("alias_moved") == "canary"
        )
        client.set_model_version_tag(TINY_NAME, first, key, json.dumps({**record, "user": "someone-else"}))
        edited = invoke("history", f"models:/{TINY_NAME}@canary", "--trusted-key", public)
        assert "INVALID: gate decision" in edited.stdout and "not the recorded one" in edited.stdout, edited.stdout

        # a child's anchored record overwritten (EDIT on the experiment allows it): a finding, seen by a fresh
        # process too (this one keeps records it verified), and the gate refuses the version
        run_id = client.get_model_version(TINY_NAME, second).run_id
        client.log_text(run_id, "{}", "selprune/lineage.json")
        uri = f"models:/{TINY_NAME}/{second}"
        audit = cli("lineage", uri, "--verify", env=store["env"])
        assert audit.returncode == 1 and "the lineage record artifact changed" in audit.stdout, audit.stdout
        refused = cli("gate", "--model-uri", uri, "--max-retain-drop", "1", "--dry-run", env=store["env"])
        assert refused.returncode == 1 and "refused, tampered" in refused.stderr + refused.stdout, refused.stderr


def test_show_list_and_retire_read_and_write_revisions(tmp_path, tiny_tokenizer):
    from mlflow_helpers import sqlite_store

    with sqlite_store(tmp_path, tiny_tokenizer) as store:
        MlflowClient().set_registered_model_alias(TINY_NAME, "production", "1")
        assert invoke(*policy_args(store)).exit_code == 0
        shown = invoke("policy", "show", "--model", TINY_NAME, "--name", "no-code", "--json")
        assert shown.exit_code == 0, shown.output
        body = json.loads(shown.stdout)
        assert body["revision"] == 1 and body["findings"] == [] and body["body"]["protect"] == ["production"]
        assert body["body"]["forget"]["data"] == str(Path(store["forget"]).resolve())
        listed = invoke("policy", "list")
        assert listed.exit_code == 0 and listed.stdout.split()[:3] == [TINY_NAME, "no-code", "r1"]
        retired = invoke("policy", "retire", "--model", TINY_NAME, "--name", "no-code")
        assert retired.exit_code == 0 and "retired (r2" in retired.stdout, retired.output
        assert invoke("policy", "list").stdout == ""
        assert "retired" in invoke("policy", "list", "--retired").stdout
        again = invoke("policy", "retire", "--model", TINY_NAME, "--name", "no-code")
        assert again.exit_code == 2 and "retired already" in again.stderr
        assert invoke("policy", "show", "--model", TINY_NAME, "--name", "nope").exit_code == 2
        before = written()
        nothing = invoke("reconcile", "--model", TINY_NAME, "--fix", "--json")  # a retired policy asks for nothing
        assert nothing.exit_code == 0 and json.loads(nothing.stdout)["rows"] == []
        assert written() == before and not MlflowClient().get_registered_model(TINY_NAME).description


def test_a_job_that_fails_keeps_its_deliveries_for_the_next_event_and_is_not_rerun_at_once(tmp_path):
    """A job that exits 2 runs once (no loop of reruns); the alias move it was to record goes to the next job."""
    from mlflow_selprune.webhooks import Reconciler

    calls = tmp_path / "calls.jsonl"
    script = f"import json, sys; open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n'); sys.exit(2)"
    reconciler = Reconciler(command=[sys.executable, "-c", script])
    reconciler.submit("m", ("production", "3", 1700000000))
    assert reconciler.idle(60) and reconciler.runs == [("m", 2)]
    reconciler.submit("m")
    assert reconciler.idle(60) and reconciler.runs == [("m", 2), ("m", 2)]
    first, second = (json.loads(line) for line in calls.read_text().splitlines())
    assert "production=3@1700000000" in first and "production=3@1700000000" in second


def _readme_commands(prefix: str) -> list[list[str]]:
    """The README's command lines that start with ``prefix`` (continuations joined, comments dropped)."""
    import shlex

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line, comments=True)[1:] for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.slow
def test_the_readme_policy_commands_run_as_printed(tmp_path, tiny_tokenizer):
    """README's policy lines, exactly as printed, on a registered `my-lm@production` with `code.jsonl` and
    `prose.txt` beside it: the policy is made, the pass prunes and gates the base (a tiny random model may pass the
    README's thresholds or not: exit 0 or 1, never bad input), and status prints its table."""
    from mlflow_helpers import register_text_model, sqlite_store, tiny_model, write_data_files

    with sqlite_store(tmp_path, tiny_tokenizer):
        register_text_model(tiny_model(tiny_tokenizer), tiny_tokenizer, "my-lm", alias="production")
        forget, retain = write_data_files(tmp_path / "files")
        forget.rename(tmp_path / "code.jsonl")
        retain.rename(tmp_path / "prose.txt")
        (create,) = _readme_commands("mlflow-selprune policy create ")
        made = invoke(*create)
        assert made.exit_code == 0, made.output
        (fix,) = _readme_commands("mlflow-selprune reconcile ")
        fixed = invoke(*fix, "--no-progress")
        assert fixed.exit_code in (0, 1) and "did: pruned models:/my-lm/1 under policy no-python" in fixed.stdout, (
            fixed.output
        )
        assert "did: gated models:/my-lm/2 with policy no-python's thresholds" in fixed.stdout
        (status,) = _readme_commands("mlflow-selprune status ")
        shown = invoke(*status)
        assert shown.exit_code == fixed.exit_code, shown.output
        assert shown.stdout.splitlines()[1].split()[:4] == ["my-lm", "no-python", "r1", "@production"], shown.stdout
