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
from typing import TypeGuard

from ..errors import BadInputError, VerificationError
from .lineage import (
    ALIAS,
    ARTIFACTS_SHA,
    ATTESTATION_SHA,
    COMPLETE,
    GATE_ARTIFACT_DIR,
    GATE_RECORD_PREFIX,
    LINEAGE_PARAM,
    LINEAGE_RECORD,
    MANIFEST_SHA,
    MOVES,
    PARENT,
    RECORD_TIME,
    RUN_ID,
    SHOWN,
    WEIGHTS_SHA,
    Hop,
    anchored_digest,
    gate_envelope_path,
    gate_record_entries,
    lineage_tags,
    malformed_tags,
    parse_gate_record,
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
    anchored: dict | None = None  # the tags its run's lineage record holds, once that record matched its anchor

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
    on_version = hop.version_tags if hop.version_tags is not None else hop.tags
    recorded, now = _json_or_none(record), lineage_tags(on_version)
    if not _text_map(recorded):
        audit.tampered("tags", f"the lineage record {LINEAGE_RECORD} of run {run_id} is not a JSON object of tags")
        return
    audit.anchored = recorded
    # the version shows only SHOWN (older versions: every tag); each one it shows must be the record's
    for key in sorted(recorded.keys() | now.keys()):
        if key not in now and key not in SHOWN:
            continue
        if key not in now:
            audit.tampered("tags", f"tag {key} removed (recorded {short(recorded[key])})")
        elif key not in recorded:
            audit.tampered("tags", f"tag {key} added (now {short(now[key])})")
        elif recorded[key] != now[key]:
            audit.tampered("tags", f"tag {key} changed: recorded {short(recorded[key])}, now {short(now[key])}")
    audit.ok("tags")


def _json_or_none(data):
    """Parsed JSON, or None where it is not JSON (stored data is untrusted input)."""
    try:
        return json.loads(data)
    except (TypeError, ValueError, RecursionError):
        return None


def _text_map(value) -> TypeGuard[dict[str, str]]:
    """A JSON object of strings to strings: what a lineage record, a digest list and a manifest are."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _run_path(path: str) -> bool:
    """A path inside a run's ``selprune/`` artifacts: never absolute, never up and out."""
    parts = path.split("/")
    return path.startswith("selprune/") and "\\" not in path and not {"", ".", ".."} & set(parts[1:])


def check_values(audit: Audit) -> None:
    """A lineage tag that does not hold a value of its kind (a metric that is no number) is a finding, whether or
    not its anchored record holds the same: nothing reads it as one."""
    on_version = audit.hop.version_tags or {}
    for phrase in malformed_tags({**on_version, **audit.hop.tags}):
        audit.tampered("tags", phrase)


def check_gate_records(audit: Audit) -> None:
    """Each gate decision must parse, and one kept whole in an artifact must match the digest in its tag."""
    tags = audit.hop.tags
    for key in sorted(k for k in tags if k.startswith(GATE_RECORD_PREFIX)):
        try:
            record = parse_gate_record(key, tags[key])
        except ValueError as exc:
            audit.tampered("tags", f"gate record {key} {exc}: {short(tags[key])}")
            continue
        if "record_sha256" in record:  # and so its record_artifact, where the gate writes it
            stored = run_artifact(run_of(audit.hop), record["record_artifact"])
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
    recorded = _json_or_none(recorded)
    if not _text_map(recorded) or not all(_run_path(path) for path in recorded):
        audit.tampered("artifacts", f"tag {ARTIFACTS_SHA} is not a JSON object of selprune/ paths to digests")
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
    parsed = _json_or_none(stored)
    files = parsed.get("files") if isinstance(parsed, dict) else None
    if not _text_map(files):
        audit.tampered("files", f"the manifest {manifest.MANIFEST_ARTIFACT} of run {run_id} is not a list of files")
        return
    try:
        now = manifest.of_artifacts(audit.hop.uri)
    except (MlflowException, OSError) as exc:
        audit.tampered("files", f"the model files cannot be read ({str(exc).splitlines()[0][:120]})")
        return
    for difference in manifest.differences(files, now):
        audit.tampered("files", difference)
    audit.ok("files")


def check_signatures(audit: Audit, trusted: dict, parent_manifest: str | None) -> None:
    """With trusted keys: an unlearned version must carry a statement signed by one of them that says what its
    verified tags say; every gate decision that moved an alias must be signed the same way, and every signed one
    must say what its record says. A version that needs neither (a root that no decision promoted) shows ``-``:
    nothing was signed, nothing required."""
    if audit.hop.is_unlearned:
        _check_statement(audit, trusted, parent_manifest)
    for key, record in gate_record_entries(audit.hop.tags):
        # an unreadable record: check_gate_records names it
        if record is not None and (record.get("alias_moved") or "attestation_artifact" in record):
            check_decision(audit, trusted, key, record)


def opened_statement(
    audit: Audit, trusted: dict, path: str | None, recorded_digest: str | None, what: str
) -> dict | None:
    """The statement of the envelope at ``path`` in the version's run, which must have the ``recorded_digest``
    and open with a ``trusted`` key; None, with a finding, where it does not."""
    from . import attest

    audit.ok("signature")  # required here: ok unless a finding below says otherwise
    envelope = run_artifact(run_of(audit.hop), path) if path and recorded_digest else None
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


def _check_statement(audit: Audit, trusted: dict, parent_manifest: str | None) -> None:
    """The version's signed statement against its verified tags, its run and its parent's manifest."""
    from . import attest

    hop, claim = audit.hop, attest.claim
    signed = opened_statement(audit, trusted, attest.ATTESTATION_ARTIFACT, hop.tags.get(ATTESTATION_SHA), "the version")
    if signed is None:
        return
    expected = attest.unlearning_predicate(hop.tags, parent_manifest)
    claims = {
        "predicate type": (claim(signed, "predicateType"), attest.UNLEARNING_PREDICATE),
        "subject": (claim(signed, "subject", 0, "digest", "sha256"), hop.tags.get(MANIFEST_SHA)),
        "run": (claim(signed, "predicate", "run_id"), run_of(hop)),
        "parent manifest": (claim(signed, "predicate", "parent", "manifest_sha256"), parent_manifest),
        "lineage": (claim(signed, "predicate", "lineage_tags"), expected["lineage_tags"]),
    }
    for name, (said, now) in claims.items():
        if said != now:
            audit.tampered(
                "signature",
                f"the signed statement's {name} is not the version's ({short(said)} signed, {short(now)} now)",
            )


def check_decision(audit: Audit, trusted: dict, key: str, record: dict) -> None:
    """A gate decision record against its signed decision: the same version, record key and decision, and a
    record that says no alias moved where the signed decision passed and asked for one must say why."""
    from . import attest

    moved, claim = record.get("alias_moved"), attest.claim
    what = f"gate decision {key}" + (f" (moved @{moved})" if moved else "")
    path, digest = record.get("attestation_artifact"), record.get("attestation_sha256")
    signed = opened_statement(audit, trusted, path, digest, what)
    if signed is None:
        return
    decision, whole = claim(signed, "predicate", "decision"), _whole_record(audit, record)
    if (
        claim(signed, "predicateType") != attest.GATE_PREDICATE
        or claim(signed, "predicate", "model_version") != audit.hop.uri
        or claim(signed, "predicate", "record_key") != key
        or not isinstance(decision, dict)
        or any(decision.get(k) != whole.get(k) for k in attest.DECISION_FIELDS)
        or (moved is not None and moved != decision.get("alias_requested"))
    ):
        audit.tampered("signature", f"{what}: the signed decision is not the recorded one")
        return
    asked = decision.get("alias_requested")
    failed = record.get("alias_not_moved")  # written by the gate where the move failed: "ALIAS: why"
    if asked and moved is None and decision.get("verdict") in MOVES:
        if not (isinstance(failed, str) and failed.startswith(f"{asked}: ")):
            audit.tampered(
                "signature",
                f"{what}: the signed decision passed and moved @{asked}, but the record says no alias moved "
                "and names no failed move",
            )


def _whole_record(audit: Audit, record: dict) -> dict:
    """The decision as recorded: the tag's record, or the whole record it names where it was too long for a tag
    (its digest is ``check_gate_records``'s to check; where it does not match, the tag's fields alone)."""
    if "record_sha256" not in record:
        return record
    stored = run_artifact(run_of(audit.hop), record["record_artifact"])
    if stored is None or hashlib.sha256(stored).hexdigest() != record["record_sha256"]:
        return record
    whole = _json_or_none(stored)
    return whole if isinstance(whole, dict) else record


# ----------------------------------------------------------------------------- aliases only the gate moves


@dataclass
class AliasHistory:
    """What a registered model's decisions say about its aliases: the latest move of each, as ``alias ->
    (time, version, where it is recorded)``, and what in that history could not be read."""

    latest: dict = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    signed: bool = False

    def moved(self, alias: str, time: str, version: str, where: str) -> None:
        if alias not in self.latest or time >= self.latest[alias][0]:
            self.latest[alias] = (time, version, where)


def alias_history(hops: list[Hop], trusted: dict | None = None) -> AliasHistory:
    """The latest recorded move of each alias of one registered model (``hops``: every version of it).

    Without keys, the decision records in its versions' tags: anyone with EDIT can write one, so this tells an
    alias moved by hand from one the tool moved, not a forger. With ``trusted`` keys, the signed decisions in
    its versions' runs (``selprune/gate/``), read from the runs and not through the records that name them, so
    an edited or emptied record cannot hide a later move. Fail closed: each file there (but the whole records
    the gate keeps, ``KEY.json``) must be a gate decision signed by a trusted key, named after the record key it
    signs, on a version of this model made by that run; anything else leaves the history unreadable, and then
    no alias of the model is explained."""
    history = AliasHistory(signed=trusted is not None)
    if trusted is None:
        for hop in hops:
            for key, record in gate_record_entries(hop.tags):
                if record is not None and record.get("alias_moved") and record["verdict"] in MOVES:
                    history.moved(record["alias_moved"], record["time"], str(hop.version), f"record {key}")
        return history
    from . import attest

    versions = {hop.uri: (str(hop.version), run_of(hop)) for hop in hops}
    for run_id in sorted({run_id for _, run_id in versions.values() if run_id}):
        for path in _gate_files(run_id):
            where = f"{path if path.isprintable() else short(path)} of run {run_id}"
            try:
                alias, time, version, verdict = _signed_decision(run_id, path, trusted, versions)
            except attest.InvalidAttestation as exc:
                history.unreadable.append(f"{where}: {exc}")
                continue
            if alias is not None and verdict in MOVES:
                history.moved(alias, time, version, where)
    return history


def _signed_decision(run_id: str, path: str, trusted: dict, versions: dict) -> tuple:
    """``(alias requested or None, time, version, verdict)`` of the signed gate decision at ``path`` of run
    ``run_id``; ``InvalidAttestation`` says why it is not one. ``versions``: the model's versions' URIs, each
    to ``(version, its run)``."""
    from .attest import GATE_PREDICATE, InvalidAttestation, claim, open_envelope

    if not path.endswith(".dsse.json"):
        raise InvalidAttestation("it is no signed decision (the gate writes only KEY.dsse.json and KEY.json there)")
    envelope = run_artifact(run_id, path)
    if envelope is None:
        raise InvalidAttestation("it cannot be read")
    signed = open_envelope(envelope, trusted)[0]
    kind, key = claim(signed, "predicateType"), claim(signed, "predicate", "record_key")
    version_uri, decision = claim(signed, "predicate", "model_version"), claim(signed, "predicate", "decision")
    if kind != GATE_PREDICATE:
        raise InvalidAttestation(f"it is a signed statement of another kind ({short(kind)}), not a gate decision")
    if not isinstance(key, str) or gate_envelope_path(key) != path:
        raise InvalidAttestation(f"it signs the decision of record {short(key)}, not the one its name says")
    if not isinstance(version_uri, str) or versions.get(version_uri, (None, None))[1] != run_id:
        raise InvalidAttestation(f"it is a decision on {short(version_uri)}, no version of this model from this run")
    if not isinstance(decision, dict):
        raise InvalidAttestation("it holds no decision")
    alias, time = decision.get("alias_requested"), decision.get("time")
    if alias is not None and not (isinstance(alias, str) and ALIAS.fullmatch(alias)):
        raise InvalidAttestation(f"it names no alias: {short(alias)}")
    if not (isinstance(time, str) and RECORD_TIME.fullmatch(time)):
        raise InvalidAttestation(f"it has no time: {short(time)}")
    return alias, time, versions[version_uri][0], decision.get("verdict")


def _gate_files(run_id: str) -> list[str]:
    """Every entry of run ``run_id``'s ``selprune/gate/`` but the whole records kept there (``KEY.json``, each
    checked against the digest in its tag): what must be signed decisions (none where the run is gone)."""
    from mlflow.exceptions import MlflowException

    from .resolve import client

    try:
        listed = client().list_artifacts(run_id, GATE_ARTIFACT_DIR)
    except MlflowException as exc:
        refuse_if_denied(exc)
        return []

    def whole_record(path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return name.startswith(GATE_RECORD_PREFIX) and name.endswith(".json") and not name.endswith(".dsse.json")

    return sorted(f.path for f in listed if f.is_dir or not whole_record(f.path))


def check_aliases(audit: Audit, aliases: list[str], history: AliasHistory) -> None:
    """Aliases only the gate moves: each alias now on an unlearned version must have been moved here by the
    latest recorded move of that alias (with trusted keys, the latest signed decision); an older decision
    that moved it here does not explain it once a later one moved it elsewhere. Aliases on a root are the
    registrar's, and are not checked."""
    hop = audit.hop
    if not hop.is_unlearned:
        return
    kind = "signed decision" if history.signed else "recorded decision"
    for alias in aliases:
        latest = history.latest.get(alias)
        if history.unreadable:
            why = f"the model's decisions cannot all be read: {history.unreadable[0]}"
        elif latest is None:
            why = f"no {kind} moved it (moved by hand?)"
        elif latest[1] != str(hop.version):
            why = f"the latest {kind} that moved it ({latest[2]}, {latest[0]}) moved it to version {latest[1]}"
        else:
            continue
        audit.findings.append(f"unexplained alias: {hop.uri}: @{alias} points here, but {why}")


def parent_manifest(hop: Hop) -> str | None:
    """The parent's manifest digest as its tags say now (verified as that hop of the chain)."""
    if not hop.is_unlearned:
        return None
    from mlflow.exceptions import MlflowException

    from .resolve import resolve

    try:
        return resolve(hop.tags[PARENT]).tags.get(MANIFEST_SHA)
    except (BadInputError, MlflowException):
        return None


def recorded(hop: Hop, trusted: dict | None = None) -> Audit:
    """Every check of ``hop``'s recorded evidence (no model is loaded): tags, gate records, signatures (with
    ``trusted`` keys), and unless it is incomplete or a root without a weights digest, its evidence files and
    model files."""
    result = Audit(hop)
    check_tags(result)
    check_values(result)
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
    return Hop(
        resolved.canonical_uri,
        resolved.registered_name,
        resolved.version,
        resolved.run_id,
        dict(resolved.tags),
        None if resolved.version_tags is None else dict(resolved.version_tags),
    )


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
