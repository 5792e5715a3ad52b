"""The recorded evidence of a version, checked without loading its model.

A version's tags against the lineage record its run anchored (an artifact
whose sha256 is an immutable run param), its gate decision records, the run's
masks, scores and pruning record against their digests, every file of its
model directory against its manifest, and, with trusted keys, its signed
attestations. What needs the weights loaded (its own digest and its parent's)
is ``registry.verify``'s, which builds on this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..errors import BadInputError, VerificationError
from .lineage import (
    ARTIFACTS_SHA,
    ATTESTATION_SHA,
    COMPLETE,
    LINEAGE_PARAM,
    LINEAGE_RECORD,
    MANIFEST_SHA,
    PARENT,
    RUN_ID,
    WEIGHTS_SHA,
    Hop,
    anchored_digest,
    gate_record_entries,
    lineage_tags,
    refuse_if_denied,
    run_artifact,
    short,
)


OK, CHANGED, NOT_APPLICABLE = "ok", "CHANGED", "-"
CHECKS = ("weights", "parent", "tags", "artifacts", "files", "signature")


@dataclass
class Audit:
    """What verifying one version found: a status per check, one line per finding (exit 1) and per note."""

    hop: Hop
    status: dict = field(default_factory=lambda: dict.fromkeys(CHECKS, NOT_APPLICABLE))
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    actual_weights_sha256: str | None = None

    def ok(self, check: str) -> None:
        if self.status[check] == NOT_APPLICABLE:
            self.status[check] = OK

    def tampered(self, check: str, message: str) -> None:
        self.status[check] = CHANGED
        self.findings.append(f"tampered: {self.hop.uri}: {message}")

    def to_dict(self) -> dict:
        return {
            "kind": self.hop.kind,
            "checks": dict(self.status),
            "findings": list(self.findings),
            "notes": list(self.notes),
        }


def run_of(hop: Hop) -> str | None:
    """The run that made the version: the registry's own field (not a tag anyone can edit), else the tag."""
    return hop.run_id or hop.tags.get(RUN_ID)


def check_tags(audit: Audit) -> None:
    """The version's selprune tags against the record its run anchored: an edited tag cannot hide."""
    from mlflow.exceptions import MlflowException

    hop, run_id = audit.hop, run_of(audit.hop)
    try:
        anchored = anchored_digest(run_id) if run_id else None
    except MlflowException as exc:
        refuse_if_denied(exc)
        audit.tampered("tags", f"its run {run_id} cannot be read ({str(exc).splitlines()[0]})")
        return
    if anchored is None:
        if hop.is_unlearned:
            audit.notes.append(
                f"note: {hop.uri}: its run holds no lineage record (made by an older plugin); "
                "its tags cannot be checked"
            )
        return
    record = run_artifact(run_id, LINEAGE_RECORD)
    if record is None:
        audit.tampered("tags", f"the lineage record artifact {LINEAGE_RECORD} of run {run_id} is missing")
        return
    actual = hashlib.sha256(record).hexdigest()
    if actual != anchored:
        audit.tampered(
            "tags",
            f"the lineage record artifact changed: {LINEAGE_RECORD} of run {run_id} has sha256 "
            f"{actual[:16]}, the run param {LINEAGE_PARAM} records {anchored[:16]}",
        )
        return
    recorded, now = json.loads(record), lineage_tags(hop.tags)
    for key in sorted(recorded.keys() | now.keys()):
        if key not in now:
            audit.tampered("tags", f"tag {key} removed (recorded {short(recorded[key])})")
        elif key not in recorded:
            audit.tampered("tags", f"tag {key} added (now {short(now[key])})")
        elif recorded[key] != now[key]:
            audit.tampered("tags", f"tag {key} changed: recorded {short(recorded[key])}, now {short(now[key])}")
    audit.ok("tags")


def check_gate_records(audit: Audit) -> None:
    """Each gate decision must parse, and one kept whole in an artifact must match the digest in its tag."""
    tags = audit.hop.tags
    for key, record in gate_record_entries(tags):
        if record is None:
            audit.tampered("tags", f"gate record {key} is not a JSON record: {short(tags[key])}")
            continue
        if "record_sha256" in record:
            stored = run_artifact(run_of(audit.hop), str(record.get("record_artifact")))
            if stored is None or hashlib.sha256(stored).hexdigest() != record["record_sha256"]:
                audit.tampered(
                    "tags",
                    f"gate record {key}: its full record {record.get('record_artifact')} is "
                    f"{'missing' if stored is None else 'changed'}",
                )


def check_artifacts(audit: Audit) -> None:
    """The run's masks, scores and pruning record against their digests: the evidence of what was pruned."""
    recorded = audit.hop.tags.get(ARTIFACTS_SHA)
    if recorded is None:
        return
    try:
        recorded = json.loads(recorded)
    except ValueError:
        audit.tampered("artifacts", f"tag {ARTIFACTS_SHA} is not JSON")
        return
    run_id = run_of(audit.hop)
    for path, digest in sorted(recorded.items()):
        stored = run_artifact(run_id, path)
        if stored is None:
            audit.tampered("artifacts", f"artifact {path} of run {run_id} is missing")
        elif (actual := hashlib.sha256(stored).hexdigest()) != digest:
            audit.tampered(
                "artifacts", f"artifact {path} of run {run_id} changed: sha256 {actual[:16]}, recorded {digest[:16]}"
            )
    audit.ok("artifacts")


def check_files(audit: Audit) -> None:
    """Every file of the model directory (config, tokenizer, MLmodel, weights, the record's copies) against the
    manifest recorded when the version was made, whose digest the (verified) tags hold."""
    from mlflow.exceptions import MlflowException

    from . import manifest

    recorded_digest = audit.hop.tags.get(MANIFEST_SHA)
    if recorded_digest is None:
        return
    run_id = run_of(audit.hop)
    stored = run_artifact(run_id, manifest.MANIFEST_ARTIFACT)
    if stored is None:
        audit.tampered("files", f"the manifest {manifest.MANIFEST_ARTIFACT} of run {run_id} is missing")
        return
    if (actual := hashlib.sha256(stored).hexdigest()) != recorded_digest:
        audit.tampered(
            "files",
            f"the manifest {manifest.MANIFEST_ARTIFACT} of run {run_id} changed: sha256 "
            f"{actual[:16]}, recorded {recorded_digest[:16]}",
        )
        return
    try:
        now = manifest.of_artifacts(audit.hop.uri)
    except (MlflowException, OSError) as exc:
        audit.tampered("files", f"the model files cannot be read ({str(exc).splitlines()[0][:120]})")
        return
    for difference in manifest.differences(json.loads(stored)["files"], now):
        audit.tampered("files", difference)
    audit.ok("files")


def check_signatures(audit: Audit, trusted: dict, parent_manifest: str | None) -> None:
    """With trusted keys: an unlearned version must carry a statement signed by one of them that says what its
    verified tags say, and every gate decision that moved an alias must be signed the same way."""
    from . import attest

    hop, run_id = audit.hop, run_of(audit.hop)

    def opened(path: str | None, recorded_digest: str | None, what: str):
        envelope = run_artifact(run_id, path) if path and recorded_digest else None
        if envelope is None:
            audit.tampered("signature", f"unsigned: {what} has no signed attestation, and --trusted-key requires one")
            return None
        if attest.envelope_sha256(envelope) != recorded_digest:
            audit.tampered("signature", f"{what}: its attestation {path} changed since it was recorded")
            return None
        try:
            return attest.open_envelope(envelope, trusted)[0]
        except attest.InvalidAttestation as exc:
            audit.tampered("signature", f"{what}: {exc}")
            return None

    if hop.is_unlearned:
        signed = opened(attest.ATTESTATION_ARTIFACT, hop.tags.get(ATTESTATION_SHA), "the version")
        if signed is not None:
            expected = attest.unlearning_predicate(hop.tags, parent_manifest)
            claims = {
                "predicate type": (signed.get("predicateType"), attest.UNLEARNING_PREDICATE),
                "subject": (signed.get("subject", [{}])[0].get("digest", {}).get("sha256"), hop.tags.get(MANIFEST_SHA)),
                "run": (signed.get("predicate", {}).get("run_id"), run_id),
                "parent manifest": (
                    signed.get("predicate", {}).get("parent", {}).get("manifest_sha256"),
                    parent_manifest,
                ),
                "lineage": (signed.get("predicate", {}).get("lineage_tags"), expected["lineage_tags"]),
            }
            for name, (said, now) in claims.items():
                if said != now:
                    audit.tampered(
                        "signature",
                        f"the signed statement's {name} is not the version's ({short(said)} signed, {short(now)} now)",
                    )
    for key, record in gate_record_entries(hop.tags):
        if record is None or not record.get("alias_moved"):  # an unreadable one: check_gate_records names it
            continue
        what = f"gate decision {key} (moved @{record['alias_moved']})"
        signed = opened(record.get("attestation_artifact"), record.get("attestation_sha256"), what)
        if signed is None:
            continue
        decision = signed.get("predicate", {}).get("decision", {})
        if (
            signed.get("predicateType") != attest.GATE_PREDICATE
            or signed.get("predicate", {}).get("model_version") != hop.uri
            or decision.get("alias_requested") != record["alias_moved"]
            or any(decision.get(k) != record.get(k) for k in ("time", "verdict", "thresholds", "user"))
        ):
            audit.tampered("signature", f"{what}: the signed decision is not the recorded one")
    audit.ok("signature")


def parent_manifest(hop: Hop) -> str | None:
    """The parent's manifest digest as its tags say now (verified as that hop of the chain)."""
    if not hop.is_unlearned:
        return None
    from .resolve import resolve

    try:
        return resolve(hop.tags[PARENT]).tags.get(MANIFEST_SHA)
    except BadInputError:
        return None


def recorded(hop: Hop, trusted: dict | None = None) -> Audit:
    """Every check of ``hop``'s recorded evidence (no model is loaded): tags, gate records, signatures (with
    ``trusted`` keys), and unless it is incomplete or a root without a weights digest, its evidence files and
    model files."""
    result = Audit(hop)
    check_tags(result)
    check_gate_records(result)
    if trusted is not None:
        check_signatures(result, trusted, parent_manifest(hop))
    if hop.kind == "incomplete":
        result.findings.append(
            f"incomplete: {hop.uri}: an unlearned version without {COMPLETE} "
            "(its prune did not finish); do not deploy it"
        )
    if hop.kind == "incomplete" or (hop.kind == "root" and WEIGHTS_SHA not in hop.tags):
        return result
    check_artifacts(result)
    check_files(result)
    return result


def hop_of(resolved) -> Hop:
    """A resolved registered version as a lineage hop."""
    return Hop(resolved.canonical_uri, resolved.registered_name, resolved.version, resolved.run_id, dict(resolved.tags))


def findings(audit: Audit) -> list[str]:
    """The audit's findings, and for an unlearned version whose run anchored no record, that it cannot be
    trusted at all."""
    found = list(audit.findings)
    if audit.hop.is_unlearned and audit.status["tags"] == NOT_APPLICABLE:
        found.append(
            f"unverifiable: {audit.hop.uri}: its run holds no anchored lineage record, so its tags cannot be trusted"
        )
    return found


def refuse(found: list[str], resolved, purpose: str) -> None:
    """Raise ``VerificationError`` (exit 1) naming ``purpose`` when there is any finding."""
    if found:
        raise VerificationError([f"refusing to {purpose} {resolved.canonical_uri}: it does not verify", *found])


def require_recorded(resolved, purpose: str) -> None:
    """The gateway without loading a model (what loading a delta uses: its parent is loaded next, and checked
    against the digest verified here)."""
    if resolved.is_registered:
        refuse(findings(recorded(hop_of(resolved))), resolved, purpose)
