"""The record of a file ``mlflow-selprune export`` made of a version (``export.py`` verifies the version and writes
the file, ``gguf_export`` its bytes), and its check in ``lineage --verify``.

The file is logged to the version's run under
``selprune/exports/`` and an export record is appended to the version as its own tag
(``selprune.export.<UTC time>-<random>``, never overwritten): the file's path in the run, its sha256 and size,
the format and quantization, the verified weights digest it was made from, when and by whom. With a signing
key the record is signed too (an in-toto statement whose subject is the file's digest), its envelope in the
run. ``lineage --verify`` checks every export record against the file in the run; with ``--trusted-key`` it
requires each to be signed by a trusted key and to say what the signed statement says, so a user with EDIT
who replaces a file and its record alike is still found out.

The version's manifest, anchored when the version was made, does not change: an export made later has its
own record, checked the same way.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import lineage

logger = logging.getLogger(__name__)

EXPORT_ARTIFACT_DIR = "selprune/exports"
EXPORT_PREDICATE = "https://mlflow-selprune.readthedocs.io/attestation/export/v1"
FORMATS = ("gguf",)
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class ExportResult:
    path: Path
    sha256: str
    size: int
    artifact: str
    record_key: str


def record_export(resolved, path: Path, fmt: str, quantization: str, weights: str, signing_key) -> ExportResult:
    """Log the file to the version's run and append its record (signed with ``signing_key`` when given)."""
    from .resolve import acting_user, client

    digest, size = lineage.file_sha256(path), path.stat().st_size
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp = f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:8]}"
    key = f"{lineage.EXPORT_RECORD_PREFIX}{stamp}"
    folder = f"{EXPORT_ARTIFACT_DIR}/{stamp}"  # one folder per export: a later file of the same name is beside it
    artifact = f"{folder}/{path.name}"
    logger.info(f"logging {path.name} to run {resolved.run_id}")
    client().log_artifact(resolved.run_id, str(path), folder)
    record = {
        "time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "user": acting_user(),
        "format": fmt,
        "quantization": quantization,
        "artifact": artifact,
        "sha256": digest,
        "bytes": size,
        "weights_sha256": weights,
    }
    if signing_key is not None:
        record.update(_sign(resolved, key, record, signing_key))
    client().set_model_version_tag(resolved.registered_name, resolved.version, key, json.dumps(record, sort_keys=True))
    return ExportResult(path, digest, size, artifact, key)


def _sign(resolved, key: str, record: dict, signing_key) -> dict:
    """The export's signed statement (subject: the file's digest), logged beside it; the record's fields for it."""
    from . import attest
    from .resolve import client

    predicate = {
        "model_version": resolved.canonical_uri,
        "run_id": resolved.run_id,
        "record_key": key,
        "export": _signed_fields(record),
    }
    envelope = attest.sign(
        attest.statement(record["artifact"], record["sha256"], EXPORT_PREDICATE, predicate), signing_key
    )
    path = f"{EXPORT_ARTIFACT_DIR}/{key}.dsse.json"
    client().log_text(resolved.run_id, envelope.decode(), path)
    return {"attestation_artifact": path, "attestation_sha256": attest.envelope_sha256(envelope)}


def _signed_fields(record: dict) -> dict:
    return {k: record.get(k) for k in ("format", "quantization", "artifact", "sha256", "weights_sha256")}


def parse_record(value: str) -> dict:
    """An export record as a tag holds it, each field it is read for checked; ``ValueError`` says what is wrong."""
    record = lineage.json_record(value)
    artifact = record.get("artifact")
    parts = artifact.split("/") if isinstance(artifact, str) else []
    if (
        "/".join(parts[:2]) != EXPORT_ARTIFACT_DIR
        or len(parts) < 3
        or any(part in ("", ".", "..") or "\\" in part or "\x00" in part for part in parts)
    ):
        raise ValueError(f"names no file under {EXPORT_ARTIFACT_DIR}/: {lineage.short(artifact)}")
    if not isinstance(record.get("weights_sha256"), str):
        raise ValueError(f"names no weights digest: {lineage.short(record.get('weights_sha256'))}")
    if not isinstance(record.get("sha256"), str) or not _SHA256.fullmatch(record["sha256"]):
        raise ValueError(f"holds no sha256: {lineage.short(record.get('sha256'))}")
    return record


def check_exports(audit, trusted: dict | None) -> None:
    """``lineage --verify``: every export record parses and its file in the run has its digest; with ``trusted``
    keys, each is signed by one of them and its signed statement says what the record says."""
    from . import attest
    from .evidence import opened_statement, run_of

    hop = audit.hop
    for key in sorted(k for k in hop.tags if k.startswith(lineage.EXPORT_RECORD_PREFIX)):
        try:
            record = parse_record(hop.tags[key])
        except ValueError as exc:
            audit.tampered("artifacts", f"export record {key} {exc}")
            continue
        if record["weights_sha256"] != hop.tags.get(lineage.WEIGHTS_SHA):
            audit.tampered(
                "artifacts",
                f"export record {key} was made from other weights (sha256 {record['weights_sha256'][:16]}) than "
                f"this version's ({str(hop.tags.get(lineage.WEIGHTS_SHA))[:16]})",
            )
        stored = _file_sha256(run_of(hop), record["artifact"])
        if stored is None:
            audit.tampered("artifacts", f"export {record['artifact']} (record {key}) is missing from its run")
        elif stored != record["sha256"]:
            audit.tampered(
                "artifacts",
                f"export {record['artifact']} changed: sha256 {stored[:16]}, recorded {record['sha256'][:16]}",
            )
        else:
            audit.ok("artifacts")
        if trusted is None:
            continue
        what = f"export record {key}"
        envelope_path = record.get("attestation_artifact")
        path = envelope_path if isinstance(envelope_path, str) else None
        signed = opened_statement(audit, trusted, path, record.get("attestation_sha256"), what)
        if signed is None:
            continue
        if (
            attest.claim(signed, "predicateType") != EXPORT_PREDICATE
            or attest.claim(signed, "subject", 0, "digest", "sha256") != record["sha256"]
            or attest.claim(signed, "predicate", "model_version") != hop.uri
            or attest.claim(signed, "predicate", "run_id") != run_of(hop)
            or attest.claim(signed, "predicate", "record_key") != key
            or attest.claim(signed, "predicate", "export") != _signed_fields(record)
        ):
            audit.tampered("signature", f"{what}: the signed statement is not the recorded export")


def _file_sha256(run_id: str | None, artifact: str) -> str | None:
    """The sha256 of a run's (possibly large) artifact, hashed from its downloaded copy; None when gone."""
    with lineage.downloaded_run_artifact(run_id, artifact) as local:
        return None if local is None else lineage.file_sha256(local)
