"""Signed attestations: with a trusted key, a forged version fails `lineage --verify`; a genuine chain passes.

A real sqlite store holds tiny-lm v1 (root); two prunes signed with a key made
by `mlflow-selprune keygen` chain from it, and a gate signed with the same key
moves an alias. Each forgery is made with what a user holding EDIT (but not
the key) can do through the MLflow client.
"""

from __future__ import annotations

import json
import stat
import tempfile
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mlflow_selprune.registry import attest, lineage, tracking

from mlflow_helpers import ONE_STEP, TINY_NAME, invoke

pytestmark = pytest.mark.slow(seconds=40)


def _latest() -> str:
    versions = MlflowClient().search_model_versions(f"name='{TINY_NAME}'")
    return f"models:/{TINY_NAME}/{max(int(v.version) for v in versions)}"


def _findings(out) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith("tampered:")]


@pytest.fixture(scope="module")
def signed(store, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    made = invoke("keygen", str(keys / "ours"))
    assert made.exit_code == 0, made.output
    other = invoke("keygen", str(keys / "theirs"))
    assert other.exit_code == 0, other.output
    private, public = keys / "ours" / "signing_key.pem", keys / "ours" / "signing_key.pub.pem"
    chain = []
    parent = store["base"]
    for _ in range(2):
        out = invoke(
            "prune",
            "--model-uri",
            parent,
            "--forget",
            store["forget"],
            "--retain",
            store["retain"],
            *ONE_STEP,
            "--signing-key",
            str(private),
        )
        assert out.exit_code == 0, out.output
        parent = _latest()
        chain.append(parent)
    gated = invoke(
        "gate",
        "--model-uri",
        parent,
        "--max-retain-drop",
        "1",
        "--set-alias",
        "signed-prod",
        "--signing-key",
        str(private),
    )
    assert gated.exit_code == 0, gated.output
    return {
        "private": private,
        "public": public,
        "untrusted": keys / "theirs" / "signing_key.pub.pem",
        "chain": chain,
        "keys": keys,
    }


def test_keygen_writes_an_owner_only_private_key_and_never_overwrites(signed):
    mode = stat.S_IMODE(signed["private"].stat().st_mode)
    assert mode == 0o600, oct(mode)
    again = invoke("keygen", str(signed["private"].parent))
    assert again.exit_code == 2 and "already holds a key pair" in again.stderr


def test_a_genuine_signed_chain_verifies_and_without_keys_says_signatures_were_not_checked(signed):
    tip = signed["chain"][-1]
    out = invoke("lineage", tip, "--verify", "--trusted-key", str(signed["public"]))
    assert out.exit_code == 0, out.output
    assert _findings(out) == [] and "signature ok" in out.stdout
    plain = invoke("lineage", tip, "--verify")
    assert plain.exit_code == 0 and "signatures: not checked" in plain.stdout
    envelope = json.loads(
        Path(
            MlflowClient().download_artifacts(
                MlflowClient().get_model_version(TINY_NAME, tip.rsplit("/", 1)[1]).run_id,
                attest.ATTESTATION_ARTIFACT,
                tempfile.mkdtemp(),
            )
        ).read_text()
    )
    assert envelope["payloadType"] == "application/vnd.in-toto+json" and envelope["signatures"][0]["sig"]


def test_a_signature_by_an_untrusted_key_is_a_finding(signed):
    out = invoke("lineage", signed["chain"][-1], "--verify", "--trusted-key", str(signed["untrusted"]))
    assert out.exit_code == 1
    assert sum("signed by no trusted key" in line for line in _findings(out)) == 3  # 2 versions and the gate


def test_a_forged_version_from_a_fresh_run_with_copied_tags_fails_only_with_a_trusted_key(signed):
    """Everything an EDIT user can copy: the model files (same source), tags, record, manifest and the
    attestation, all re-anchored in their own run. Self-consistent, so the unsigned checks pass; the signed
    statement names another run and other lineage, so the trusted key catches it."""
    client = MlflowClient()
    genuine = client.get_model_version(TINY_NAME, signed["chain"][-1].rsplit("/", 1)[1])
    tags = lineage.lineage_tags(lineage.recorded_tags(genuine.run_id, dict(genuine.tags)))  # its run's record
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name="forged") as run:
        local = Path(client.download_artifacts(genuine.run_id, "selprune", tmp))
        for path in local.iterdir():
            if path.name != "lineage.json":
                mlflow.log_artifact(str(path), artifact_path="selprune")
        tags[lineage.RUN_ID] = run.info.run_id
        tracking.record_lineage(run.info.run_id, tags)
    forged = client.create_model_version(
        TINY_NAME,
        genuine.source,
        run_id=run.info.run_id,
        tags={
            **lineage.shown(tags),
            **{k: v for k, v in genuine.tags.items() if k.startswith(lineage.GATE_RECORD_PREFIX)},
        },
    )
    uri = f"models:/{TINY_NAME}/{forged.version}"
    try:
        hole = invoke("lineage", uri, "--verify")
        assert hole.exit_code == 0, hole.output  # without a key the forgery cannot be told from the real one
        caught = invoke("lineage", uri, "--verify", "--trusted-key", str(signed["public"]))
        assert caught.exit_code == 1, caught.output
        lines = [line for line in _findings(caught) if line.startswith(f"tampered: {uri}:")]
        assert any("signed statement's run is not the version's" in line for line in lines), lines
        assert any("gate decision" in line and "not the recorded one" in line for line in lines), lines
    finally:
        client.delete_model_version(TINY_NAME, forged.version)


def test_an_edited_gate_record_and_an_unsigned_promotion_are_findings(signed):
    client = MlflowClient()
    tip = signed["chain"][-1]
    version = tip.rsplit("/", 1)[1]
    key = next(
        k
        for k, v in client.get_model_version(TINY_NAME, version).tags.items()
        if k.startswith(lineage.GATE_RECORD_PREFIX) and json.loads(v).get("alias_moved")
    )
    original = client.get_model_version(TINY_NAME, version).tags[key]
    edited = {**json.loads(original), "thresholds": {"max_retain_drop": 0.01, "metric": "top1"}}
    client.set_model_version_tag(TINY_NAME, version, key, json.dumps(edited, sort_keys=True))
    try:
        out = invoke("lineage", tip, "--verify", "--trusted-key", str(signed["public"]))
        assert out.exit_code == 1
        assert any(f"gate decision {key}" in line and "not the recorded one" in line for line in _findings(out))
    finally:
        client.set_model_version_tag(TINY_NAME, version, key, original)
    unsigned = invoke("gate", "--model-uri", tip, "--max-retain-drop", "1", "--set-alias", "unsigned-prod")
    assert unsigned.exit_code == 0, unsigned.output
    out = invoke("lineage", tip, "--verify", "--trusted-key", str(signed["public"]))
    assert out.exit_code == 1
    assert any("unsigned: gate decision" in line and "@unsigned-prod" in line for line in _findings(out))


def test_a_bad_signing_key_is_refused_before_anything_is_written(store, signed, tmp_path):
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("not a key\n")
    out = invoke(
        "prune",
        "--model-uri",
        store["base"],
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        *ONE_STEP,
        "--signing-key",
        str(not_a_key),
    )
    assert out.exit_code == 2 and "--signing-key" in out.stderr and "keygen" in out.stderr, out.output
    out = invoke("lineage", signed["chain"][-1], "--trusted-key", str(not_a_key))
    assert out.exit_code == 2 and "--trusted-key" in out.stderr
