"""Trust boundaries: what a user with EDIT but no signing key types into the registry is never taken for evidence,
and nothing malformed stops an audit.

A real sqlite store holds tiny-lm v1 (a root registered by hand, alias @base) and two versions pruned from it
through the CLI and signed with a key made by `mlflow-selprune keygen`: v2, moved to @production by a signed
gate, and v3, registered with `prune --alias canary`. Each case does, through the MLflow client, what such a
user can do, and undoes it. The first tests need no store: the parsers of envelopes and records are fed every
wrong shape.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import tempfile
from pathlib import Path

import mlflow
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from mlflow_selprune.registry import attest, lineage, tracking

from mlflow_helpers import ONE_STEP, TINY_NAME, current_store, invoke, recorded, registry_snapshot, sqlite_store


# ----------------------------------------------------------------------------- the parsers, fed every wrong shape

KEY = Ed25519PrivateKey.generate()
TRUSTED = {attest.key_id(KEY.public_key()): KEY.public_key()}
STATEMENT = attest.statement("models:/m/1", "0" * 64, attest.GATE_PREDICATE, {"model_version": "models:/m/1"})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _signed(signed_payload: bytes, **overrides) -> bytes:
    """An envelope over ``signed_payload`` signed by the trusted key, with any field replaced by ``overrides``."""
    signature = {
        "keyid": attest.key_id(KEY.public_key()),
        "sig": _b64(KEY.sign(attest.pae(attest.PAYLOAD_TYPE, signed_payload))),
    }
    signature.update(overrides.pop("signature", {}))
    envelope = {
        "payloadType": attest.PAYLOAD_TYPE,
        "payload": _b64(signed_payload),
        "signatures": [signature],
        **overrides,
    }
    return json.dumps(envelope).encode()


GOOD_PAYLOAD = json.dumps(STATEMENT).encode()
MALFORMED_ENVELOPES = {
    "not JSON": b'{"payloadType": ',
    "not UTF-8": b"\xff\xfe\xfa\x00{",
    "a JSON list": b"[]",
    "a JSON string": b'"envelope"',
    "nested past the parser": b"[" * 100_000 + b"]" * 100_000,
    "payloadType a list": _signed(GOOD_PAYLOAD, payloadType=[attest.PAYLOAD_TYPE]),
    "payloadType null": _signed(GOOD_PAYLOAD, payloadType=None),
    "payloadType another": _signed(GOOD_PAYLOAD, payloadType="text/plain\ntampered: forged line"),
    "payload an int": _signed(GOOD_PAYLOAD, payload=5),
    "payload a dict": _signed(GOOD_PAYLOAD, payload={"a": 1}),
    "payload not base64": _signed(GOOD_PAYLOAD, payload="not base64 !!"),
    "signatures a dict": _signed(GOOD_PAYLOAD, signatures={"keyid": "x", "sig": "eA=="}),
    "signatures a string": _signed(GOOD_PAYLOAD, signatures="keyid"),
    "signatures an int": _signed(GOOD_PAYLOAD, signatures=7),
    "signatures empty": _signed(GOOD_PAYLOAD, signatures=[]),
    "signature an int": _signed(GOOD_PAYLOAD, signatures=[1]),
    "signature a list": _signed(GOOD_PAYLOAD, signatures=[["keyid", "sig"]]),
    "keyid a list": _signed(GOOD_PAYLOAD, signature={"keyid": ["x"]}),
    "keyid a dict": _signed(GOOD_PAYLOAD, signature={"keyid": {"id": "x"}}),
    "keyid an int": _signed(GOOD_PAYLOAD, signature={"keyid": 7}),
    "keyid null": _signed(GOOD_PAYLOAD, signature={"keyid": None}),
    "keyid huge": _signed(GOOD_PAYLOAD, signature={"keyid": "k" * 2_000_000}),
    "keyid with a newline": _signed(GOOD_PAYLOAD, signature={"keyid": "x\ntampered: forged line"}),
    "sig an int": _signed(GOOD_PAYLOAD, signature={"sig": 5}),
    "sig a list": _signed(GOOD_PAYLOAD, signature={"sig": ["eA=="]}),
    "sig null": _signed(GOOD_PAYLOAD, signature={"sig": None}),
    "sig not base64": _signed(GOOD_PAYLOAD, signature={"sig": "%%%"}),
    "sig huge": _signed(GOOD_PAYLOAD, signature={"sig": "A" * 2_000_000}),
    "sig of other bytes": _signed(GOOD_PAYLOAD, signature={"sig": _b64(KEY.sign(b"other"))}),
    "signed payload not JSON": _signed(b"not json"),
    "signed payload a list": _signed(b"[1, 2]"),
    "signed payload a number": _signed(b"1e999"),
}


@pytest.mark.parametrize("shape", sorted(MALFORMED_ENVELOPES))
def test_a_malformed_envelope_is_one_short_line_never_a_crash(shape):
    with pytest.raises(attest.InvalidAttestation) as caught:
        attest.open_envelope(MALFORMED_ENVELOPES[shape], TRUSTED)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300, message


def test_a_well_formed_envelope_opens_and_claims_never_raise_on_a_wrong_shape():
    statement, keyid = attest.open_envelope(_signed(GOOD_PAYLOAD), TRUSTED)
    assert statement == STATEMENT and keyid in TRUSTED
    assert attest.claim(statement, "subject", 0, "digest", "sha256") == "0" * 64
    for path in (("subject", 5), ("subject", 0, "digest", "sha256", "x"), ("predicate", 0), ("predicateType", "x")):
        assert attest.claim(statement, *path) is None
    assert attest.claim({"subject": "abc"}, "subject", 0) is None and attest.claim({"p": [1]}, "p", -2) is None


KEY_OF_RECORD = lineage.GATE_RECORD_PREFIX + "20260101T000000.000000Z-fuzzfuzz"
GOOD_RECORD = {"time": "2026-01-01T00:00:00.000000Z", "verdict": "pass", "user": "u", "alias_moved": "prod"}
MALFORMED_RECORDS = {
    "not JSON": '{"verdict": "pass", "alias_mo',
    "a JSON list": "[]",
    "a JSON number": "5",
    "nested past the parser": "[" * 4000 + "]" * 4000,
    "no time": json.dumps({**GOOD_RECORD, "time": None}),
    "time an int": json.dumps({**GOOD_RECORD, "time": 20300101}),
    "time that sorts after every other": json.dumps({**GOOD_RECORD, "time": "9999"}),
    "time in the future": json.dumps({**GOOD_RECORD, "time": "2999-01-01T00:00:00Z"}),
    "verdict a list": json.dumps({**GOOD_RECORD, "verdict": ["pass"]}),
    "no verdict": json.dumps({k: v for k, v in GOOD_RECORD.items() if k != "verdict"}),
    "user a dict": json.dumps({**GOOD_RECORD, "user": {"name": "u"}}),
    "alias_moved a list": json.dumps({**GOOD_RECORD, "alias_moved": ["prod"]}),
    "alias_moved an int": json.dumps({**GOOD_RECORD, "alias_moved": 1}),
    "alias_moved with a newline": json.dumps({**GOOD_RECORD, "alias_moved": "prod\ntampered: forged"}),
    "alias_requested a dict": json.dumps({**GOOD_RECORD, "alias_requested": {"a": 1}}),
    "thresholds a list": json.dumps({**GOOD_RECORD, "thresholds": [1]}),
    "attestation elsewhere": json.dumps(
        {**GOOD_RECORD, "attestation_artifact": "../../../etc/passwd", "attestation_sha256": "0" * 64}
    ),
    "attestation path a list": json.dumps({**GOOD_RECORD, "attestation_artifact": ["x"], "attestation_sha256": "0"}),
    "attestation digest an int": json.dumps(
        {**GOOD_RECORD, "attestation_artifact": f"selprune/gate/{KEY_OF_RECORD}.dsse.json", "attestation_sha256": 0}
    ),
    "record digest without its artifact": json.dumps({**GOOD_RECORD, "record_sha256": "0" * 64}),
    "record artifact elsewhere": json.dumps(
        {**GOOD_RECORD, "record_artifact": "selprune/lineage.json", "record_sha256": "0" * 64}
    ),
}


@pytest.mark.parametrize("shape", sorted(MALFORMED_RECORDS))
def test_a_malformed_gate_record_is_refused_by_its_parser_and_read_as_unreadable(shape):
    with pytest.raises(ValueError) as caught:
        lineage.parse_gate_record(KEY_OF_RECORD, MALFORMED_RECORDS[shape])
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
    tags = {KEY_OF_RECORD: MALFORMED_RECORDS[shape]}
    assert lineage.gate_record_entries(tags) == [(KEY_OF_RECORD, None)]
    assert lineage.deciding_record(tags, ["prod"]) is None
    assert lineage.parse_gate_record(KEY_OF_RECORD, json.dumps(GOOD_RECORD)) == GOOD_RECORD


def test_tags_that_do_not_hold_their_kind_are_named_and_never_read_as_numbers():
    tags = {
        lineage.METRIC_PREFIX + "forget_top1_drop": "0.95",
        lineage.METRIC_PREFIX + "retain_top1_drop": "abc",
        lineage.METRIC_PREFIX + "selectivity": "nan",
        lineage.METRIC_PREFIX + "relearn_recovery": "1e999",
        lineage.FF_PRUNED: "many",
        lineage.ATTN_PRUNED: "-3",
        lineage.FF_PRUNED_TOTAL: "12",
    }
    assert lineage.metrics_from_tags(tags) == {"forget_top1_drop": 0.95}
    named = lineage.malformed_tags(tags)
    assert len(named) == 5 and all("tag selprune." in phrase for phrase in named), named
    hop = lineage.Hop("models:/m/2", "m", "2", None, {**tags, lineage.PARENT: "models:/m/1"})
    assert hop.to_dict()["ff_pruned"] is None and hop.to_dict()["ff_pruned_total"] == 12


# ----------------------------------------------------------------------------- the registry: a signed chain


def _uri(version) -> str:
    return f"models:/{TINY_NAME}/{version}"


def _latest() -> str:
    return _uri(max(int(v.version) for v in MlflowClient().search_model_versions(f"name='{TINY_NAME}'")))


def test_a_registration_whose_move_cannot_be_recorded_is_a_warning_naming_the_version(monkeypatch, caplog):
    """The version and its alias exist by the time their move is recorded: a failure there, even resolving
    the version, is a warning that names it, never an error that ends `prune --alias` after the version."""
    from mlflow_selprune.registry import gate

    def unreachable(uri):
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(gate, "resolve", unreachable)
    with caplog.at_level("WARNING", logger=gate.logger.name):
        gate.record_registration("models:/tiny-lm/7", "canary")
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and "models:/tiny-lm/7" in said[0] and "the tracking server went away" in said[0], said


def _version(uri: str) -> str:
    return uri.rsplit("/", 1)[1]


def _aliases() -> dict[str, str]:
    return {a: str(v) for a, v in MlflowClient().get_registered_model(TINY_NAME).aliases.items()}


def _rows(out) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.strip()}


def _lines(out, prefix: str) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="session")
def _signed_store(tmp_path_factory, tiny_tokenizer):
    """The store with its signed chain, built once per test process. Under xdist a worker can leave this module
    for another and come back, which sets up its module fixtures again: ``signed`` only makes this store the
    current one again, as the module's tests left it, as when they run one after another."""
    with sqlite_store(tmp_path_factory.mktemp("store"), tiny_tokenizer) as store:
        return {"store": store, **_sign_chain(store, tmp_path_factory)}


@pytest.fixture(scope="module")
def signed(_signed_store):
    """v2 (@production, by a signed gate) and v3 (@canary) pruned from v1 and signed; the store is this process's
    tracking store, and its root the working directory, while the module's tests run."""
    with current_store(_signed_store["store"]):
        yield {k: v for k, v in _signed_store.items() if k != "store"}


def _sign_chain(store, tmp_path_factory) -> dict:
    keys = tmp_path_factory.mktemp("keys")
    assert invoke("keygen", str(keys)).exit_code == 0
    private, public = keys / "signing_key.pem", keys / "signing_key.pub.pem"
    versions = []
    for extra in ([], ["--alias", "canary"]):
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
            str(private),
            *extra,
        )
        assert out.exit_code == 0, out.output
        versions.append(_latest())
    v2, v3 = versions
    gated = invoke(
        "gate", "--model-uri", v2, "--max-retain-drop", "1", "--set-alias", "production", "--signing-key", str(private)
    )
    assert gated.exit_code == 0, gated.output
    assert _aliases() == {"base": "1", "production": _version(v2), "canary": _version(v3)}
    return {"private": str(private), "public": str(public), "v2": v2, "v3": v3}


@pytest.mark.slow(seconds=30)
@pytest.mark.parametrize("claims_a_parent", [False, True], ids=["root", "claims a parent"])
def test_the_gate_refuses_a_hand_made_version_with_typed_in_metrics(signed, claims_a_parent):
    """Any model logged in a run of one's own, registered with metric tags that pass: no anchored record of an
    unlearning run backs them, so the gate refuses in one line (exit 1), moves no alias and signs nothing; the
    audit shows `-` for the root's signature, which nothing required."""
    client = MlflowClient()
    with mlflow.start_run(run_name="typed-in") as run:
        pass
    tags = {lineage.METRIC_PREFIX + "forget_top1_drop": "0.95", lineage.METRIC_PREFIX + "retain_top1_drop": "0.0"}
    if claims_a_parent:
        tags.update({lineage.PARENT: _uri(1), lineage.COMPLETE: "true"})
    made = client.create_model_version(
        TINY_NAME, client.get_model_version(TINY_NAME, "1").source, run_id=run.info.run_id, tags=tags
    )
    uri = _uri(made.version)
    try:
        before = registry_snapshot()
        out = invoke(
            "gate",
            *("--model-uri", uri, "--min-forget-drop", "0.5", "--max-retain-drop", "0.05"),
            *("--set-alias", "production", "--signing-key", signed["private"]),
        )
        assert out.exit_code == 1, out.output
        said = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("tracking:")]
        assert len(said) == 1 and said[0].startswith(f"gate FAILED for {uri}: refused, "), said
        assert ("unverifiable:" if claims_a_parent else "no anchored record of an unlearning run") in said[0]
        assert "PASSED" not in out.stdout
        assert registry_snapshot() == before  # no record, no alias moved
        assert client.list_artifacts(run.info.run_id, lineage.GATE_ARTIFACT_DIR) == []  # nothing signed
        if not claims_a_parent:
            table = invoke("lineage", "--all", TINY_NAME, "--trusted-key", signed["public"])
            assert table.exit_code == 0, table.output
            rows = _rows(table)
            assert rows[str(made.version)][1] == "root" and rows[str(made.version)][8] == "-", rows[str(made.version)]
            assert rows["1"][8] == "-" and rows[_version(signed["v2"])][8] == "ok"
    finally:
        client.delete_model_version(TINY_NAME, made.version)


@pytest.mark.slow(seconds=60)
def test_an_alias_moved_by_hand_onto_an_unlearned_version_is_a_finding(signed):
    """@production moved from v2 (a signed gate's doing) to v3 by hand: with a trusted key and without, the
    chain and the table name the alias (exit 1). Put back, the gate's alias and the prune's @canary pass."""
    client = MlflowClient()
    v2, v3 = signed["v2"], signed["v3"]
    expected = f"unexplained alias: {v3}: @production points here"
    client.set_registered_model_alias(TINY_NAME, "production", _version(v3))
    try:
        for args in (
            [v3, "--verify", "--trusted-key", signed["public"]],
            ["--all", TINY_NAME, "--trusted-key", signed["public"]],
            [v3, "--verify"],
            ["--all", TINY_NAME],
        ):
            out = invoke("lineage", *args)
            assert out.exit_code == 1, (args, out.output)
            found = _lines(out, "unexplained alias:")
            assert len(found) == 1 and found[0].startswith(expected), (args, found)
            assert "moved it to version " + _version(v2) in found[0], found
    finally:
        client.set_registered_model_alias(TINY_NAME, "production", _version(v2))
    for args in (
        [v2, "--verify", "--trusted-key", signed["public"]],
        [v3, "--verify", "--trusted-key", signed["public"]],
        ["--all", TINY_NAME, "--trusted-key", signed["public"]],
        ["--all", TINY_NAME],
    ):
        out = invoke("lineage", *args)
        assert out.exit_code == 0, (args, out.output)
    chain = invoke("lineage", v3, "--verify")
    assert "@canary moved here when it was registered" in chain.stdout, chain.stdout


@pytest.mark.slow(seconds=60)
def test_only_the_latest_decision_explains_an_alias(signed):
    """A signed gate moves @production to v3, then the alias is moved back to v2 by hand: v2's older decision
    that moved it there explains nothing now. A later gate that moves it back to v2 does."""
    client = MlflowClient()
    v2, v3 = signed["v2"], signed["v3"]
    gate = ["gate", "--max-retain-drop", "1", "--set-alias", "production", "--signing-key", signed["private"]]
    try:
        assert invoke(*gate, "--model-uri", v3).exit_code == 0
        assert _aliases()["production"] == _version(v3)
        assert invoke("lineage", v3, "--verify", "--trusted-key", signed["public"]).exit_code == 0
        client.set_registered_model_alias(TINY_NAME, "production", _version(v2))
        for args in ([v2, "--verify", "--trusted-key", signed["public"]], [v2, "--verify"]):
            out = invoke("lineage", *args)
            assert out.exit_code == 1, (args, out.output)
            found = _lines(out, f"unexplained alias: {v2}: @production points here")
            assert len(found) == 1 and f"moved it to version {_version(v3)}" in found[0], found
    finally:
        assert invoke(*gate, "--model-uri", v2).exit_code == 0
    assert _aliases()["production"] == _version(v2)
    for args in ([v2, "--verify", "--trusted-key", signed["public"]], ["--all", TINY_NAME]):
        out = invoke("lineage", *args)
        assert out.exit_code == 0, (args, out.output)


def _run_dir(run_id: str) -> Path:
    return Path(local_file_uri_to_path(MlflowClient().get_run(run_id).info.artifact_uri))


@contextlib.contextmanager
def _decision(version_uri: str, envelope: bytes):
    """A decision record on the version that says it moved @decoy, signed by ``envelope`` (put in the version's
    run where the gate puts its own): all that EDIT on the model and its experiment allows. Removed afterwards."""
    client = MlflowClient()
    version = _version(version_uri)
    run_id = client.get_model_version(TINY_NAME, version).run_id
    path = f"{lineage.GATE_ARTIFACT_DIR}/{KEY_OF_RECORD}.dsse.json"
    record = {
        **GOOD_RECORD,
        "alias_moved": "decoy",
        "alias_requested": "decoy",
        "attestation_artifact": path,
        "attestation_sha256": hashlib.sha256(envelope).hexdigest(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(path).name
        local.write_bytes(envelope)
        client.log_artifact(run_id, str(local), artifact_path=lineage.GATE_ARTIFACT_DIR)
    client.set_model_version_tag(TINY_NAME, version, KEY_OF_RECORD, json.dumps(record))
    try:
        yield
    finally:
        client.delete_model_version_tag(TINY_NAME, version, KEY_OF_RECORD)
        (_run_dir(run_id) / path).unlink()


ENVELOPES_IN_A_RUN = ["keyid a list", "sig an int", "not JSON", "signatures a dict", "payload not base64"]


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("shape", ENVELOPES_IN_A_RUN + ["signed statement a list", "signed predicate a list"])
def test_a_malformed_envelope_is_a_finding_for_its_version_and_the_table_goes_on(signed, shape):
    """An envelope of each wrong shape behind a decision record on v3: `lineage --all --trusted-key` exits 1 (not
    3) with the finding on v3, and prints every row. Shapes signed with the key itself (a statement that is a
    list, a predicate that is a list) are checked field by field all the same."""
    from mlflow_selprune.registry.attest import load_signing_key

    if shape.startswith("signed"):
        key = load_signing_key(signed["private"])
        statement = [] if shape == "signed statement a list" else {**STATEMENT, "predicate": ["decision"]}
        envelope = attest.sign(statement, key)
    else:
        envelope = MALFORMED_ENVELOPES[shape]
    with _decision(signed["v3"], envelope):
        out = invoke("lineage", "--all", TINY_NAME, "--trusted-key", signed["public"])
        assert out.exit_code == 1, out.output
        assert set(_rows(out)) >= {"version", "1", _version(signed["v2"]), _version(signed["v3"])}, out.stdout
        mine = _lines(out, f"tampered: {signed['v3']}: gate decision {KEY_OF_RECORD} (moved @decoy)")
        assert len(mine) == 1, out.stdout
        assert _lines(out, f"tampered: {signed['v2']}:") == [], out.stdout
        # the history of the model's decisions cannot be read whole: no alias of it is taken as explained
        assert len(_lines(out, "unexplained alias:")) == 2, out.stdout


@pytest.mark.slow(seconds=40)
def test_a_malformed_anchored_attestation_is_a_finding_for_its_version_only(signed):
    """Versions made from runs of one's own that anchor a version attestation with a list for its keyid, or an
    int for its signature: each is a finding for its version, and the genuine rows are printed and pass."""
    client = MlflowClient()
    genuine = recorded(client.get_model_version(TINY_NAME, _version(signed["v2"])))
    made = []
    try:
        for shape in ("keyid a list", "sig an int"):
            envelope = MALFORMED_ENVELOPES[shape]
            with mlflow.start_run(run_name=f"anchored {shape}") as run, tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / Path(attest.ATTESTATION_ARTIFACT).name
                local.write_bytes(envelope)
                mlflow.log_artifact(str(local), artifact_path="selprune")
                tags = lineage.lineage_tags(genuine.tags)
                tags[lineage.RUN_ID] = run.info.run_id
                tags[lineage.ATTESTATION_SHA] = attest.envelope_sha256(envelope)
                tracking.record_lineage(run.info.run_id, tags)
            made.append(client.create_model_version(TINY_NAME, genuine.source, run_id=run.info.run_id, tags=tags))
        out = invoke("lineage", "--all", TINY_NAME, "--trusted-key", signed["public"])
        assert out.exit_code == 1, out.output
        rows = _rows(out)
        for mv in made:
            assert rows[str(mv.version)][8] == "CHANGED", rows[str(mv.version)]
            assert _lines(out, f"tampered: {_uri(mv.version)}: the version: the envelope's signature 0"), out.stdout
        for genuine_version in ("1", _version(signed["v2"]), _version(signed["v3"])):
            assert genuine_version in rows and _lines(out, f"tampered: {_uri(genuine_version)}:") == []
    finally:
        for mv in made:
            client.delete_model_version(TINY_NAME, mv.version)


@contextlib.contextmanager
def _tag_set(uri: str, key: str, value: str | None):
    """Set (or, with None, delete) a version tag; put the original back afterwards."""
    client = MlflowClient()
    original = client.get_model_version(TINY_NAME, _version(uri)).tags.get(key)
    if value is None:
        client.delete_model_version_tag(TINY_NAME, _version(uri), key)
    else:
        client.set_model_version_tag(TINY_NAME, _version(uri), key, value)
    try:
        yield
    finally:
        if original is None:
            client.delete_model_version_tag(TINY_NAME, _version(uri), key)
        else:
            client.set_model_version_tag(TINY_NAME, _version(uri), key, original)


MALFORMED_TAGS = {
    "metric not a number": (lineage.METRIC_PREFIX + "forget_top1_drop", "abc"),
    "metric not finite": (lineage.METRIC_PREFIX + "retain_top1_drop", "nan"),
    "count not a count": (lineage.FF_PRUNED, "many"),
    "forget data removed": (lineage.FORGET_DATA, None),
    "artifact digests a list": (lineage.ARTIFACTS_SHA, "[1, 2]"),
    "artifact digests up and out": (lineage.ARTIFACTS_SHA, '{"../../../../etc/hostname": "0"}'),
    "parent nowhere": (lineage.PARENT, "models:/" + "x" * 4000 + "/1"),
    **{f"gate record: {shape}": (KEY_OF_RECORD, value) for shape, value in MALFORMED_RECORDS.items()},
}


@pytest.mark.slow(seconds=60)
@pytest.mark.parametrize("shape", sorted(MALFORMED_TAGS))
def test_a_malformed_tag_is_a_finding_for_its_version_and_the_table_goes_on(signed, shape):
    """A tag of v3 set to a value of the wrong kind: the table (with a trusted key) exits 1 with a finding on v3
    that names the tag, and every row printed; the chain exits 1 too, never 3."""
    key, value = MALFORMED_TAGS[shape]
    v3 = signed["v3"]
    with _tag_set(v3, key, value):
        out = invoke("lineage", "--all", TINY_NAME, "--trusted-key", signed["public"])
        assert out.exit_code == 1, out.output
        assert set(_rows(out)) >= {"version", "1", _version(signed["v2"]), _version(v3)}, out.output
        assert any(key in line for line in _lines(out, f"tampered: {v3}:")), out.stdout
        assert _lines(out, f"tampered: {signed['v2']}:") == [], out.stdout
        chain = invoke("lineage", v3, "--verify")  # it follows the parent the anchored record names, not the tag
        assert chain.exit_code == 1, chain.output
        assert any(key in line for line in _lines(chain, f"tampered: {v3}:")), chain.stdout


# ----------------------------------------------------------------------------- a signed decision cannot be hidden


def _gate_dir(uri: str) -> tuple[str, Path]:
    """``(run id, the run's selprune/gate/ as stored)`` of a version."""
    run_id = MlflowClient().get_model_version(TINY_NAME, _version(uri)).run_id
    return run_id, _run_dir(run_id) / lineage.GATE_ARTIFACT_DIR


def _moved(uri: str, alias: str) -> str:
    """The key of the latest decision record on the version that says it moved ``alias``."""
    tags = MlflowClient().get_model_version(TINY_NAME, _version(uri)).tags
    return [k for k, record in lineage.gate_record_entries(tags) if record and record.get("alias_moved") == alias][-1]


def _log_as(run_id: str, name: str, data: bytes) -> None:
    """Log ``data`` as ``selprune/gate/<name>`` in run ``run_id`` (over any file of that name): what EDIT allows."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(data)
        MlflowClient().log_artifact(run_id, str(Path(tmp) / name), artifact_path=lineage.GATE_ARTIFACT_DIR)


HIDINGS = ["the version's attestation over it", "the older decision over it", "the record alone"]


@pytest.mark.slow(seconds=90)
@pytest.mark.parametrize("hiding", HIDINGS)
def test_a_signed_decision_hidden_under_its_name_leaves_an_alias_moved_back_by_hand_unexplained(signed, hiding):
    """A signed gate moves @production to v3; an EDIT user moves it back to v2 by hand, writes v3's record as if
    no alias moved, and (but in the last case) logs another validly signed statement over v3's signed decision:
    its version's attestation, or v2's decision. A signed decision binds its record key (so its file name) and
    its version, so the file is no decision of that name: the history is unreadable, and with the record alone
    edited the decision still stands and the record is not it. Either way the chain and the table exit 1 and
    name @production on v2."""
    client = MlflowClient()
    v2, v3 = signed["v2"], signed["v3"]
    gate = ["gate", "--max-retain-drop", "1", "--set-alias", "production", "--signing-key", signed["private"]]
    assert invoke(*gate, "--model-uri", v3).exit_code == 0
    key = _moved(v3, "production")
    run3, gate3 = _gate_dir(v3)
    genuine = (gate3 / f"{key}.dsse.json").read_bytes()
    record = json.loads(client.get_model_version(TINY_NAME, _version(v3)).tags[key])
    try:
        client.set_registered_model_alias(TINY_NAME, "production", _version(v2))
        if hiding == "the version's attestation over it":
            _log_as(run3, f"{key}.dsse.json", (_run_dir(run3) / attest.ATTESTATION_ARTIFACT).read_bytes())
        elif hiding == "the older decision over it":
            _log_as(run3, f"{key}.dsse.json", (_gate_dir(v2)[1] / f"{_moved(v2, 'production')}.dsse.json").read_bytes())
        with _tag_set(v3, key, json.dumps({**record, "alias_moved": None}, sort_keys=True)):
            for args in (
                ["--all", TINY_NAME, "--trusted-key", signed["public"]],
                [f"models:/{TINY_NAME}@production", "--verify", "--trusted-key", signed["public"]],
            ):
                out = invoke("lineage", *args)
                assert out.exit_code == 1, (hiding, args, out.output)
                assert len(_lines(out, f"unexplained alias: {v2}: @production points here")) == 1, out.stdout
            table = invoke("lineage", "--all", TINY_NAME, "--trusted-key", signed["public"])
            assert any(key in line for line in _lines(table, f"tampered: {v3}:")), table.stdout
    finally:
        _log_as(run3, f"{key}.dsse.json", genuine)
        assert invoke(*gate, "--model-uri", v2).exit_code == 0
    assert _aliases()["production"] == _version(v2)
    assert invoke("lineage", "--all", TINY_NAME, "--trusted-key", signed["public"]).exit_code == 0


STRAYS = ["an older decision copied under its own name", "an attestation under a decision's name", "a text file"]


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("stray", STRAYS)
def test_any_file_in_a_runs_gate_folder_that_is_no_signed_decision_of_its_name_and_run_is_a_finding(signed, stray):
    """In v3's run, beside its genuine decisions: v2's signed decision copied under its own name (a decision of a
    version whose run this is not), v3's attestation under a decision's name, a text file. With a trusted key
    the history of the model's decisions cannot be read whole, so no alias of an unlearned version is explained
    (exit 1); once it is gone the table passes."""
    v2, v3 = signed["v2"], signed["v3"]
    run3, gate3 = _gate_dir(v3)
    if stray == "an older decision copied under its own name":
        name = f"{_moved(v2, 'production')}.dsse.json"
        data = (_gate_dir(v2)[1] / name).read_bytes()
    elif stray == "an attestation under a decision's name":
        name, data = f"{KEY_OF_RECORD}.dsse.json", (_run_dir(run3) / attest.ATTESTATION_ARTIFACT).read_bytes()
    else:
        name, data = "notes.txt", b"nothing to see\n"
    _log_as(run3, name, data)
    try:
        out = invoke("lineage", "--all", TINY_NAME, "--trusted-key", signed["public"])
        assert out.exit_code == 1, (stray, out.output)
        found = _lines(out, "unexplained alias:")
        assert len(found) == 2 and all("cannot all be read" in line and name in line for line in found), found
    finally:
        (gate3 / name).unlink()
    assert invoke("lineage", "--all", TINY_NAME, "--trusted-key", signed["public"]).exit_code == 0


# ----------------------------------------------------------------------------- a parent that cannot be loaded


def _bad_parent(kind: str, tmp: Path) -> str:
    """A model whose config.json does not load: logged in a run of one's own, or a local directory."""
    config = {"model_type": "gpt_neox", "hidden_size": "x"} if "hidden_size" in kind else {}
    if kind.startswith("a local directory"):
        (tmp / "config.json").write_text(json.dumps(config))
        return str(tmp)
    with mlflow.start_run(run_name="bad parent") as run:
        mlflow.log_text(json.dumps(config), "m/config.json")
    return f"runs:/{run.info.run_id}/m"


BAD_PARENTS = ["a run's empty config", "a run's config with hidden_size 'x'", "a local directory's empty config"]


@pytest.mark.slow(seconds=60)
@pytest.mark.parametrize("anchored", [False, True], ids=["tag edited", "anchored in a run of one's own"])
@pytest.mark.parametrize("kind", BAD_PARENTS)
def test_a_parent_that_cannot_be_loaded_is_a_finding_for_its_version_and_the_gate_refuses(signed, kind, anchored):
    """A version of v2's model files whose parent is a model that does not load: named in an edited parent tag
    (v2's run), or in tags a run of one's own anchored (so they verify, and only loading the parent fails).
    The chain and the table exit 1 (never 3) with a finding for that version, every row printed, and the gate
    refuses in one line, writing nothing."""
    client = MlflowClient()
    genuine = recorded(client.get_model_version(TINY_NAME, _version(signed["v2"])))
    with tempfile.TemporaryDirectory() as tmp:
        parent = _bad_parent(kind, Path(tmp))
        tags = lineage.lineage_tags(genuine.tags)
        tags[lineage.PARENT] = parent
        run_id = genuine.run_id
        if anchored:  # evidence files it cannot copy are left out: their tags with them
            for tag in (lineage.MANIFEST_SHA, lineage.ARTIFACTS_SHA, lineage.ATTESTATION_SHA):
                tags.pop(tag)
            with mlflow.start_run(run_name="own parent") as run:
                run_id = tags[lineage.RUN_ID] = run.info.run_id
            tracking.record_lineage(run_id, tags)
        made = client.create_model_version(TINY_NAME, genuine.source, run_id=run_id, tags=tags)
        uri = _uri(made.version)
        try:
            chain = invoke("lineage", uri, "--verify")
            assert chain.exit_code == 1, chain.output
            assert _lines(chain, f"tampered: {uri}:" if not anchored else f"unverifiable: {uri}:"), chain.stdout
            table = invoke("lineage", "--all", TINY_NAME)
            assert table.exit_code == 1, table.output
            assert set(_rows(table)) >= {"version", "1", _version(signed["v2"]), str(made.version)}, table.stdout
            assert _lines(table, f"tampered: {signed['v2']}:") == [], table.stdout
            before = registry_snapshot()
            gated = invoke("gate", "--model-uri", uri, "--max-retain-drop", "1")
            assert gated.exit_code == 1, gated.output
            assert gated.stderr.count(f"gate FAILED for {uri}: refused, ") == 1, gated.stderr
            assert registry_snapshot() == before
        finally:
            client.delete_model_version(TINY_NAME, made.version)
