"""One gateway for every version a decision reads or a job builds on: verified first, refused on any finding.

Tags are editable by anyone with EDIT on a registered model; the lineage record
a run anchored (an artifact whose sha256 is an immutable run param) is not. So
before ``gate`` decides on a version's metrics, ``materialize`` copies its
lineage, ``prune``/``evaluate`` start from it, or a delta version is rebuilt
from its parent, the version's tags are checked against that record and the
run's masks, scores and pruning record against their digests, and every file
of the model directory against its manifest (``gate`` also reloads the
weights and the parent's). What is then read is what was verified.
A finding stops the command with exit 1 and nothing written.
"""

from __future__ import annotations

from ..errors import VerificationError
from . import lineage


def findings(resolved, *, load_weights: bool = False) -> list[str]:
    """Why ``resolved`` cannot be trusted; empty when it verifies (or is a plain model with no lineage to check).

    Always: its tags against the record its run anchored, the run's evidence files against their digests, and,
    for an unlearned version, that a record was anchored at all. ``load_weights``: also its weights and its
    parent's against the recorded digests (``lineage --verify``'s full audit; loads both models).
    """
    hop = lineage.Hop(
        resolved.canonical_uri, resolved.registered_name, resolved.version, resolved.run_id, dict(resolved.tags)
    )
    if not resolved.is_registered:
        return []
    if load_weights:
        audit = lineage.audit(hop, cache={}, strict=False)
    else:
        audit = lineage.Audit(hop)
        lineage.check_tags(audit)
        lineage.check_gate_records(audit)
        lineage.check_artifacts(audit)
        lineage.check_files(audit)
    found = list(audit.findings)
    if hop.kind == "incomplete" and not load_weights:
        found.append(
            f"incomplete: {hop.uri}: an unlearned version without {lineage.COMPLETE} (its prune did not finish)"
        )
    if hop.is_unlearned and audit.status["tags"] == lineage.NOT_APPLICABLE:
        found.append(
            f"unverifiable: {hop.uri}: its run holds no anchored lineage record, so its tags cannot be trusted"
        )
    return found


def require_verified(resolved, purpose: str, *, load_weights: bool = False) -> None:
    """Raise ``VerificationError`` (exit 1) naming ``purpose`` when ``resolved`` does not verify."""
    found = findings(resolved, load_weights=load_weights)
    if found:
        raise VerificationError([f"refusing to {purpose} {resolved.canonical_uri}: it does not verify"] + found)


def require_weights(resolved, loaded_digest: str, purpose: str) -> None:
    """The weights as loaded (in their stored dtype) must be the ones the version's verified tag records."""
    recorded = resolved.tags.get(lineage.WEIGHTS_SHA)
    if recorded is not None and loaded_digest != recorded:
        raise VerificationError(
            [
                f"refusing to {purpose} {resolved.canonical_uri}: it does not verify",
                f"tampered: {resolved.canonical_uri}: weights changed: sha256 {loaded_digest[:16]}, "
                f"recorded {recorded[:16]}",
            ]
        )
