"""Who pointed an alias where, when, and by which decision: read from the decision records, which are never lost.

Every move this project makes is a record on the version it moved the alias to (``gate --set-alias``, ``prune
--alias``, ``reconcile --fix``), and every move by hand that a webhook delivery or a ``reconcile`` pass saw
is a record too (verdict ``observed``) on the version it was found on. Records are version tags that only a
user with MANAGE can delete; with trusted keys, each signed one is checked against its signature.
"""

from __future__ import annotations

from . import lineage

EVENTS = {
    "pass": "gate",
    lineage.REGISTERED: "prune --alias",
    lineage.RECONCILED: "reconcile",
    lineage.OBSERVED: "moved by hand",
}


def alias_history(model: str, alias: str, trusted: dict | None = None) -> tuple[list[dict], str | None]:
    """``(rows oldest first, the version the alias points at now or None)``; each row: time, version, event,
    user, what, signature."""
    from .resolve import client

    hops, _ = lineage.versions(model)
    now = (client().get_registered_model(model).aliases or {}).get(alias)
    rows = []
    for hop in hops:
        for key, record in lineage.gate_record_entries(hop.tags):
            if record is None:
                rows.append(_row("?", hop, "unreadable record", "-", f"record {key} does not parse", "-"))
                continue
            if not lineage.names_alias(record, alias):
                continue
            rows.append(
                _row(
                    record["time"],
                    hop,
                    _event(record),
                    record.get("user") or "-",
                    _what(record, alias),
                    _signature(hop, key, record, trusted),
                )
            )
    rows.sort(key=lambda row: row["time"])
    return rows, None if now is None else str(now)


def _row(time, hop, event, user, what, signature) -> dict:
    return {
        "time": time,
        "version": str(hop.version),
        "event": event,
        "user": user,
        "what": what,
        "signature": signature,
    }


def _event(record: dict) -> str:
    event = EVENTS.get(record["verdict"], record["verdict"])
    if record["verdict"] == lineage.OBSERVED:
        event += f" (seen by {record.get('seen_by') or '?'})"
    return event


def _what(record: dict, alias: str) -> str:
    if record["verdict"] == lineage.OBSERVED:
        return "found here; no recorded move put it here"
    moved = record.get("alias_moved") == alias
    said = "moved here" if moved else f"asked for, not moved ({record.get('alias_not_moved') or 'no move recorded'})"
    if record.get("reason"):
        said += f": {record['reason']}"
    elif record["verdict"] == "pass" and isinstance(record.get("thresholds"), dict):
        given = ", ".join(f"{k} {v}" for k, v in record["thresholds"].items() if v is not None and k != "metric")
        said += f" (passed {given})"
    return said


def _signature(hop, key: str, record: dict, trusted: dict | None) -> str:
    """``unsigned``, ``signed`` (not checked: no keys given), ``valid`` or ``INVALID: why`` (the audit's own check
    of a signed decision against its record, ``evidence.check_decision``)."""
    if "attestation_artifact" not in record:
        return "unsigned"
    if trusted is None:
        return "signed"
    from . import evidence

    audit = evidence.Audit(hop)
    evidence.check_decision(audit, trusted, key, record)
    if not audit.findings:
        return "valid"
    return "INVALID: " + audit.findings[0].removeprefix(f"tampered: {hop.uri}: ")
