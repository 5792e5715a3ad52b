"""The lineage record a run anchors, read back: what a version's tags are, from the one place they cannot be edited.

A run writes a version's whole lineage (every ``selprune.*`` tag but its decision and export records) to the
artifact ``selprune/lineage.json`` and its sha256 to the param ``selprune.lineage_sha256`` before the version
exists (``tracking.record_lineage``); MLflow cannot change or delete a param. The version itself shows a few of
those tags (``lineage.SHOWN``). Everything that reads a version's lineage reads it from here, once the record
matched its anchor; ``evidence.check_tags`` says why where it does not.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

PREFIX = "selprune."
# One tag per gate decision, never overwritten: selprune.gate.<UTC time>-<random>, a JSON record.
GATE_RECORD_PREFIX = PREFIX + "gate."
# One tag per file `mlflow-selprune export` made of the version, never overwritten (registry.exports).
EXPORT_RECORD_PREFIX = PREFIX + "export."
# The version's tags as registered, a run artifact anchored by a run param (params cannot be changed or deleted).
LINEAGE_RECORD = "selprune/lineage.json"
LINEAGE_PARAM = PREFIX + "lineage_sha256"


def lineage_tags(tags: dict) -> dict[str, str]:
    """The tags a lineage record covers: every ``selprune.*`` tag but the gate and export records, appended later
    by design."""
    return {
        k: v
        for k, v in tags.items()
        if k.startswith(PREFIX) and not k.startswith((GATE_RECORD_PREFIX, EXPORT_RECORD_PREFIX))
    }


_RECORDS: dict[str, dict] = {}  # run id -> its verified lineage record (a param never changes, so neither does it)


# Set on tags read back where a run anchored a record that does not match (or cannot be read now): the version's own
# tags are all there is, and ``evidence.check_tags`` reports the record; nothing treats the version as incomplete.
UNVERIFIED = PREFIX + "record_unverified"


def anchored_record(run_id: str | None) -> dict | None:
    """The lineage record run ``run_id`` anchored, once its sha256 matched the run's param; None where there is none
    that matches (a run of an older plugin, a plain run, or tampering: ``evidence.check_tags`` names it)."""
    return _record(run_id)[0]


def _record(run_id: str | None) -> tuple[dict | None, bool]:
    """``(the verified record or None, whether the run anchored one)``."""
    if not run_id:
        return None, False
    if run_id in _RECORDS:
        return _RECORDS[run_id], True
    stored, anchored = _read(run_id)
    if anchored is None:
        return None, False
    if stored is None or hashlib.sha256(stored).hexdigest() != anchored:
        return None, True
    try:
        record = json.loads(stored)
    except (ValueError, RecursionError):
        return None, True
    if not isinstance(record, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in record.items()):
        return None, True
    _RECORDS[run_id] = record
    return record, True


def recorded_tags(run_id: str | None, version_tags: dict) -> dict:
    """A version's tags as its run's anchored lineage record holds them (every lineage tag), with the version's
    own records (gate decisions, exports) and other tags. Where the run anchored no record, the version's tags as
    they are; where it anchored one that does not match now, the same marked ``UNVERIFIED``."""
    record, anchored = _record(run_id)
    if record is None:
        return {**version_tags, **({UNVERIFIED: "true"} if anchored else {})}
    own = {k: v for k, v in version_tags.items() if k not in lineage_tags(version_tags)}
    return {**own, **record}


def _read(run_id: str) -> tuple[bytes | None, str | None]:
    """``(the record's bytes or None, the anchored sha256 or None)`` of run ``run_id``: no sha256 where the run
    anchored none (or cannot be read at all), no bytes where the record cannot be read (a refusal is said by the
    audit, which reads the same run again)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        anchored = MlflowClient().get_run(run_id).data.params.get(LINEAGE_PARAM)
    except Exception:  # noqa: BLE001 - a run that cannot be read: the version's own tags, which the audit checks
        return None, None
    if anchored is None:
        return None, None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=LINEAGE_RECORD, dst_path=tmp)
            return Path(local).read_bytes(), anchored
    except Exception:  # noqa: BLE001 - an anchored record that cannot be read now: marked, and the audit says why
        return None, anchored
