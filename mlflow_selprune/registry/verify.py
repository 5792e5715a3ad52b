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

from ..errors import BadInputError, VerificationError, printable
from . import evidence, exports, lineage, manifest
from .evidence import Audit
from .lineage import PARENT, PARENT_WEIGHTS_SHA, WEIGHTS_SHA, Hop, weights_sha256


def findings(resolved, *, load_weights: bool = False) -> list[str]:
    """Why ``resolved`` cannot be trusted; empty when it verifies (or is a plain model with no lineage to check).

    Always its recorded evidence (``evidence.recorded``); ``load_weights``: also its weights and its parent's
    against the recorded digests (``lineage --verify``'s full audit; loads both models).
    """
    if not resolved.is_registered:
        return []
    hop = evidence.hop_of(resolved)
    return evidence.findings(audit(hop, cache={}, strict=False) if load_weights else evidence.recorded(hop))


def require_verified(resolved, purpose: str, *, load_weights: bool = False) -> None:
    """Raise ``VerificationError`` (exit 1) naming ``purpose`` when ``resolved`` does not verify."""
    evidence.refuse(findings(resolved, load_weights=load_weights), resolved, purpose)


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


# ----------------------------------------------------------------------------- the full audit (weights loaded)


def _weights(uri: str, dtype: str | None, cache: dict) -> tuple[str, str]:
    """``(digest, dtype)`` of the model at ``uri`` loaded in ``dtype`` (None: as stored); each model loads once."""
    if (uri, dtype) not in cache:
        from .loading import load_components
        from .resolve import resolve

        model, _ = load_components(resolve(uri), dtype=dtype)
        loaded = str(model.dtype).removeprefix("torch.")
        cache[(uri, dtype)] = cache[(uri, loaded)] = (weights_sha256(model), loaded)
        del model
    return cache[(uri, dtype)]


def check_weights(audit: Audit, cache: dict) -> str:
    """The version's weights against the digest recorded when it was made; returns the dtype they load in."""
    actual, dtype = _weights(audit.hop.uri, None, cache)
    audit.actual_weights_sha256 = actual
    recorded = audit.hop.tags.get(WEIGHTS_SHA)
    if actual != recorded:
        audit.tampered("weights", f"weights changed: sha256 {actual[:16]}, recorded {str(recorded)[:16]}")
    audit.ok("weights")
    return dtype


def check_parent(audit: Audit, dtype: str, cache: dict) -> None:
    """The parent's weights against the digest taken before pruning: a changed parent voids the comparison.

    The parent is loaded in the version's dtype, as ``prune --dtype`` loaded it.
    """
    recorded = audit.hop.tags.get(PARENT_WEIGHTS_SHA)
    if recorded is None:
        return
    parent = audit.hop.tags[PARENT]
    actual, _ = _weights(parent, dtype, cache)
    if actual != recorded:
        audit.tampered(
            "parent",
            f"parent {parent} weights changed since this version was made: sha256 "
            f"{actual[:16]}, recorded {recorded[:16]}",
        )
    audit.ok("parent")


def parent_verified(audit: Audit) -> bool:
    """Whether the parent the version's tags name, and its digest, are the ones its run's anchored lineage record
    holds: only then is the parent loaded (a parent tag edited, or never anchored, may name anything)."""
    anchored, tags = audit.anchored, audit.hop.tags
    return anchored is not None and all(anchored.get(k) == tags.get(k) for k in (PARENT, PARENT_WEIGHTS_SHA))


@manifest.one_copy()  # the files are fetched and hashed once; the weights load from that copy
def audit(hop: Hop, cache: dict, strict: bool = True, trusted: dict | None = None) -> Audit:
    """Every check on one version: its recorded evidence (``evidence.recorded``), then its weights and its
    parent's (the parent only where ``parent_verified``). ``cache`` holds weights digests across versions (each
    model loads once); ``strict``: a model that cannot be loaded, as the loader says in one line, raises (else it
    is a finding, so a table of versions goes on); anything else a model raises as it loads (a config that does
    not parse, say) is a finding either way; ``trusted``: key id -> public key, whose signatures are then
    required (None: not checked)."""
    result = evidence.recorded(hop, trusted)
    exports.check_exports(result, trusted)
    if hop.kind == "incomplete" or (hop.kind == "root" and WEIGHTS_SHA not in hop.tags):
        return result
    if result.status["files"] == evidence.CHANGED:  # files that fail their manifest are never loaded
        result.notes.append(f"note: {hop.uri}: weights not loaded: its files do not match their manifest")
        return result
    loading = "its model"
    try:
        dtype = check_weights(result, cache)
        if hop.kind == "unlearned" and parent_verified(result):
            loading = f"its parent {lineage.short(hop.tags[PARENT])}"
            check_parent(result, dtype, cache)
        elif hop.kind == "unlearned" and PARENT_WEIGHTS_SHA in hop.tags:
            result.notes.append(f"note: {hop.uri}: parent not loaded: its parent tags do not verify")
    except VerificationError as exc:  # the loader refuses a model whose evidence does not verify
        result.notes.append(f"note: {hop.uri}: weights not loaded: {exc.findings[0]}")
        if not result.findings:  # what it refused is not this version's own evidence (its parent's): say so
            result.findings.append(f"unverifiable: {hop.uri}: {exc.findings[0]}")
    except BadInputError as exc:
        if strict:
            raise
        result.findings.append(f"unverifiable: {hop.uri}: {str(exc).splitlines()[0]}")
    except Exception as exc:  # noqa: BLE001 - a model read from the store is untrusted input: a finding, never a crash
        lineage.refuse_if_denied(exc)
        said = printable((str(exc).splitlines() or [""])[0], 120)
        result.findings.append(f"unverifiable: {hop.uri}: {loading} cannot be loaded ({type(exc).__name__}: {said})")
    return result
