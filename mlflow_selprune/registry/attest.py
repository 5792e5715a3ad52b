"""Signed attestations: evidence that anyone with EDIT on a model, but not the key, cannot forge.

Tags and run artifacts can be written by whoever may edit the model or the
run. With a signing key (``--signing-key PATH`` or ``SELPRUNE_SIGNING_KEY``,
an Ed25519 private key in PEM), ``prune``, ``materialize`` and ``gate`` also
write an in-toto Statement v1 in a DSSE envelope signed with it:

- subject: the version's model files, by their manifest digest
  (``registry.manifest``), named by the logged model's URI;
- predicate (``UNLEARNING_PREDICATE``): the parent (URI, manifest and
  weights digests), the forget/retain data and digests, the config digest,
  the weights digest, the run, and the metrics as tagged; for ``gate``
  (``GATE_PREDICATE``), the version, the decision record and its key (the
  envelope's name in the run is ``selprune/gate/<key>.dsse.json``, so a
  statement logged under another name is no decision of that name).

The envelope is the standard DSSE JSON (``payloadType``, base64 ``payload``,
``signatures`` of ``{keyid, sig}``; the signature is over DSSE's
pre-authentication encoding), so in-toto and DSSE tooling can read it. The
key id is the sha256 of the raw public key. ``lineage --verify
--trusted-key PUB.pem`` checks the signature and that the statement says what
the version's verified tags say.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from ..errors import BadInputError, printable

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
UNLEARNING_PREDICATE = "https://mlflow-selprune.readthedocs.io/attestation/unlearning/v1"
GATE_PREDICATE = "https://mlflow-selprune.readthedocs.io/attestation/gate/v1"
# what a signed gate decision holds of its record (each where the record has it)
DECISION_FIELDS = (
    "time",
    "verdict",
    "thresholds",
    "failures",
    "user",
    "alias_requested",
    "policy",
    "reason",
    "alias_seen",
    "seen_by",
)
ATTESTATION_ARTIFACT = "selprune/attestation.dsse.json"
SIGNING_KEY_ENV = "SELPRUNE_SIGNING_KEY"
TRUSTED_KEYS_ENV = "SELPRUNE_TRUSTED_KEYS"


class InvalidAttestation(Exception):
    """An envelope that does not parse, or whose signature is not by a trusted key."""


def keygen(directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``signing_key.pem`` (owner read/write only) and ``signing_key.pub.pem`` into ``directory``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory = Path(directory)
    private_path, public_path = directory / "signing_key.pem", directory / "signing_key.pub.pem"
    if private_path.exists() or public_path.exists():
        raise BadInputError(
            f"keygen: {directory} already holds a key pair; choose another directory (a key is never overwritten)"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private)
    public_path.write_bytes(public)
    return private_path, public_path


def load_signing_key(path: str | os.PathLike | None, flag: str = "--signing-key"):
    """The Ed25519 private key at ``path`` (or ``$SELPRUNE_SIGNING_KEY``); None when neither is set."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path is None:
        path = os.environ.get(SIGNING_KEY_ENV) or None
        flag = SIGNING_KEY_ENV if path else flag
    if path is None:
        return None
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BadInputError(
            f"{flag}: cannot read an unencrypted PEM private key from {path} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "make one with `mlflow-selprune keygen DIR`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInputError(
            f"{flag}: {path} is a {type(key).__name__}, not an Ed25519 key; make one with `mlflow-selprune keygen DIR`"
        )
    return key


def load_trusted_keys(paths: list[str] | tuple[str, ...] = ()) -> dict:
    """``{key id: Ed25519 public key}`` from ``--trusted-key`` paths, or ``$SELPRUNE_TRUSTED_KEYS`` (paths joined
    by the OS path separator) when none is given."""
    flag = "--trusted-key"
    if not paths:
        paths = [p for p in os.environ.get(TRUSTED_KEYS_ENV, "").split(os.pathsep) if p]
        flag = TRUSTED_KEYS_ENV
    keys = {}
    for path in paths:
        try:
            key = public_key(Path(path).read_bytes())
        except NotEd25519:
            raise BadInputError(f"{flag}: {path} is not an Ed25519 public key") from None
        except (OSError, ValueError) as exc:
            raise BadInputError(
                f"{flag}: cannot read a PEM public key from {path} "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        keys[key_id(key)] = key
    return keys


class NotEd25519(ValueError):
    """A PEM public key of another kind."""


def public_key(pem: bytes):
    """The Ed25519 public key in ``pem``; ``ValueError`` (``NotEd25519`` for another kind of key) where it is none."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise NotEd25519(f"a {type(key).__name__}, not an Ed25519 public key")
    return key


def public_pem(key) -> str:
    """``key`` (a public key) as PEM text: how a policy names the keys it requires."""
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def signs_for(private_key, keys: dict) -> bool:
    """Whether ``private_key`` (or None) is the private half of one of ``keys`` (key id -> public key)."""
    return private_key is not None and key_id(private_key.public_key()) in keys


def key_id(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed, so the type cannot be swapped under a signature."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def statement(subject_name: str, manifest_digest: str, predicate_type: str, predicate: dict) -> dict:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": manifest_digest}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    }


def sign(statement_: dict, key) -> bytes:
    """The DSSE envelope (JSON bytes) of ``statement_`` signed with ``key``."""
    payload = json.dumps(statement_, sort_keys=True, separators=(",", ":")).encode()
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode()}],
    }
    return json.dumps(envelope, sort_keys=True, indent=2).encode()


def _kind(value) -> str:
    """A JSON value's kind, as a finding names it."""
    return "null" if value is None else type(value).__name__


def _shown(text: str) -> str:
    """At most 16 printable characters of an untrusted string: a finding stays one line of bounded length."""
    return printable(text, 16)


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidAttestation(f"the envelope's {what} is a {_kind(value)}, not a string")
    return value


def _base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error
        raise InvalidAttestation(f"the envelope's {what} is not base64") from None


def _json(data: bytes | str, what: str):
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's depth
        raise InvalidAttestation(f"{what} is not JSON") from None


def parse_envelope(envelope: bytes) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """``(payloadType, payload, [(keyid, signature)])`` of a DSSE envelope, every field checked for its type.

    An envelope is read from a run that anyone with EDIT may write, so nothing in it is trusted before this:
    a wrong type is ``InvalidAttestation`` saying which field, never a crash of the audit."""
    parsed = _json(envelope, "the envelope")
    if not isinstance(parsed, dict):
        raise InvalidAttestation(f"the envelope is a JSON {_kind(parsed)}, not a DSSE object")
    payload_type = _text(parsed.get("payloadType"), "payloadType")
    payload = _base64(_text(parsed.get("payload"), "payload"), "payload")
    signatures = parsed.get("signatures")
    if not isinstance(signatures, list):
        raise InvalidAttestation(f"the envelope's signatures is a {_kind(signatures)}, not a list")
    if not signatures:
        raise InvalidAttestation("the envelope has no signature")
    entries = []
    for i, entry in enumerate(signatures):
        if not isinstance(entry, dict):
            raise InvalidAttestation(f"the envelope's signature {i} is a {_kind(entry)}, not an object")
        keyid = _text(entry.get("keyid"), f"signature {i} keyid")
        entries.append((keyid, _base64(_text(entry.get("sig"), f"signature {i} sig"), f"signature {i} sig")))
    return payload_type, payload, entries


def open_envelope(envelope: bytes, trusted: dict) -> tuple[dict, str]:
    """``(statement, key id)`` when a signature of the envelope is by a ``trusted`` key and the signed payload is
    a JSON object; else ``InvalidAttestation`` saying why."""
    from cryptography.exceptions import InvalidSignature

    payload_type, payload, signatures = parse_envelope(envelope)
    if payload_type != PAYLOAD_TYPE:
        raise InvalidAttestation(f"the envelope's payloadType is {_shown(payload_type)!r}, not {PAYLOAD_TYPE}")
    for keyid, signature in signatures:
        key = trusted.get(keyid)
        if key is None:
            continue
        try:
            key.verify(signature, pae(payload_type, payload))
        except (InvalidSignature, ValueError):
            raise InvalidAttestation(
                f"the signature by trusted key {_shown(keyid)} does not verify (the statement was changed after "
                "signing)"
            ) from None
        signed = _json(payload, "the signed payload")
        if not isinstance(signed, dict):
            raise InvalidAttestation(f"the signed payload is a JSON {_kind(signed)}, not a statement")
        return signed, keyid
    raise InvalidAttestation("signed by no trusted key (key ids " + ", ".join(_shown(k) for k, _ in signatures) + ")")


def claim(statement: dict, *path):
    """What a signed statement says at ``path`` (keys and list indexes), or None where its shape is not that:
    a statement signed by a trusted key is still compared field by field, never assumed well-formed."""
    value = statement
    for step in path:
        if isinstance(step, int):
            if not isinstance(value, list) or not -len(value) <= step < len(value):
                return None
        elif not isinstance(value, dict) or step not in value:
            return None
        value = value[step]
    return value


def envelope_sha256(envelope: bytes) -> str:
    return hashlib.sha256(envelope).hexdigest()


# ----------------------------------------------------------------------------- what is attested


def unlearning_predicate(tags: dict, parent_manifest: str | None) -> dict:
    """What a version claims, from its lineage tags (all of them, so every tagged fact is signed)."""
    from . import lineage

    signed = {k: v for k, v in lineage.lineage_tags(tags).items() if k != lineage.ATTESTATION_SHA}
    return {
        "parent": {
            "uri": tags.get(lineage.PARENT),
            "manifest_sha256": parent_manifest,
            "weights_sha256": tags.get(lineage.PARENT_WEIGHTS_SHA),
        },
        "forget": {"data": tags.get(lineage.FORGET_DATA), "digest": tags.get(lineage.FORGET_DIGEST)},
        "retain": {"data": tags.get(lineage.RETAIN_DATA), "digest": tags.get(lineage.RETAIN_DIGEST)},
        "config_sha256": tags.get(lineage.CONFIG_SHA),
        "weights_sha256": tags.get(lineage.WEIGHTS_SHA),
        "run_id": tags.get(lineage.RUN_ID),
        "metrics": {
            k[len(lineage.METRIC_PREFIX) :]: v for k, v in sorted(signed.items()) if k.startswith(lineage.METRIC_PREFIX)
        },
        "lineage_tags": signed,
    }


def log_unlearning(run_id: str, subject_name: str, tags: dict, parent_manifest: str | None, key) -> str:
    """Sign the version's statement, log its envelope in run ``run_id``; returns the envelope's sha256 (a tag)."""
    from . import lineage
    from .resolve import client

    envelope = sign(
        statement(
            subject_name, tags[lineage.MANIFEST_SHA], UNLEARNING_PREDICATE, unlearning_predicate(tags, parent_manifest)
        ),
        key,
    )
    client().log_text(run_id, envelope.decode(), ATTESTATION_ARTIFACT)
    return envelope_sha256(envelope)


def log_gate_decision(run_id: str, version_uri: str, subject_digest: str, key_name: str, record: dict, key) -> dict:
    """Sign a gate decision, log it in the version's run; returns the fields to add to the decision record.

    The signed predicate binds the version, the record's key ``key_name`` (and so the envelope's path, which is
    made of it) and the decision: a copy under another name, in another version's run, or beside a record that
    says otherwise is a finding of the audit."""
    from . import lineage
    from .resolve import client

    decision = {k: record[k] for k in DECISION_FIELDS if k in record}
    predicate = {"model_version": version_uri, "record_key": key_name, "decision": decision}
    envelope = sign(statement(version_uri, subject_digest, GATE_PREDICATE, predicate), key)
    path = lineage.gate_envelope_path(key_name)
    client().log_text(run_id, envelope.decode(), path)
    return {"attestation_artifact": path, "attestation_sha256": envelope_sha256(envelope)}
