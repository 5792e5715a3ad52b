"""Which versions of a model comply with a policy, and which aliases point at one: read, verified, never written.

A version complies with a policy when it is an unlearned child of a base version of the model whose anchored
lineage names that policy revision (``selprune.policy`` = ``NAME@SHA256``), the policy's DATA and the
recipe's config digest; when its recorded evidence verifies (with the policy's keys, its signatures too);
and when a recorded gate decision with exactly the policy's thresholds passed it (signed, where the policy
names keys). Every version that is not itself an unlearned child is a base the policy must follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from . import evidence, lineage
from .lineage import Hop
from .policy import Policy

COMPLIANT, UNGATED, FAILED, UNVERIFIED, OTHER = "compliant", "ungated", "failed", "unverified", "other"


@dataclass
class Child:
    hop: Hop
    state: str
    why: str


@dataclass
class Assessment:
    """One policy against one model's versions now."""

    policy: Policy
    hops: list[Hop]
    aliases: dict[str, str]  # alias -> version
    children: dict[str, list[Child]] = field(default_factory=dict)  # base version -> its children, oldest first
    history: evidence.AliasHistory | None = None
    base_hops: list[Hop] = field(default_factory=list)  # the versions that are not verified unlearned children

    def bases(self) -> list[Hop]:
        return self.base_hops

    def state_of_base(self, base: Hop) -> tuple[str, Child | None]:
        """``compliant`` (a compliant child exists), ``ungated``/``failed`` (the newest such child), or
        ``missing`` (none under this policy that verifies)."""
        mine = self.children.get(str(base.version), [])
        for state in (COMPLIANT, UNGATED, FAILED, UNVERIFIED):  # one that does not verify is reported, not redone
            found = [c for c in mine if c.state == state]
            if found:
                return state, found[-1]
        return "missing", None

    def child(self, version: str | None) -> Child | None:
        for children in self.children.values():
            for c in children:
                if str(c.hop.version) == str(version):
                    return c
        return None

    def newest_compliant(self) -> Hop | None:
        found = [c.hop for cs in self.children.values() for c in cs if c.state == COMPLIANT]
        return max(found, key=lambda hop: int(hop.version or 0), default=None)

    def alias_standing(self, alias: str) -> tuple[bool, str]:
        """Whether ``alias`` points at a compliant version now, and why (one phrase)."""
        version = self.aliases.get(alias)
        if version is None:
            return False, "the alias is gone"
        c = self.child(version)
        if c is None:
            hop = next((h for h in self.hops if str(h.version) == version), None)
            if hop is not None and hop in self.base_hops:
                return False, f"v{version} is a base version: it still holds what the policy removes"
            return False, f"v{version} is not unlearned under this policy"
        if c.state != COMPLIANT:
            return False, f"v{version}: {c.why}"
        return True, f"v{version}: {c.why}"

    def explained(self, alias: str) -> bool:
        """Whether the latest recorded move of ``alias`` put it where it points now."""
        latest = self.history.latest.get(alias) if self.history else None
        return latest is not None and latest[1] == self.aliases.get(alias) and not self.history.unreadable  # type: ignore[union-attr]


def unlearned(hop: Hop) -> bool:
    """An unlearned child by its run's verified anchored record only: a parent tag typed onto a version, or a
    record that does not verify, leaves it a base the policy must follow."""
    record = lineage.anchored_record(hop.run_id)
    return record is not None and lineage.PARENT in record


def assess(policy, hops: list[Hop] | None = None, aliases: dict | None = None) -> Assessment:
    """Every version of the policy's model against the policy (``hops``/``aliases``: read here when not given)."""
    if hops is None or aliases is None:
        hops, by_version = lineage.versions(policy.model)
        aliases = {a: v for v, names in by_version.items() for a in names}
    trusted = policy.trusted_keys() or None
    result = Assessment(policy, hops, aliases, base_hops=[hop for hop in hops if not unlearned(hop)])
    bases = {hop.uri: str(hop.version) for hop in result.base_hops}
    config_sha = policy.config_sha256()
    for hop in hops:
        parent = hop.tags.get(lineage.PARENT)
        if parent in bases and hop.tags.get(lineage.POLICY) == policy.ref:
            state, why = _child_state(policy, hop, trusted, config_sha)
            result.children.setdefault(bases[parent], []).append(Child(hop, state, why))
    result.history = evidence.alias_history(hops, trusted)
    return result


def _child_state(policy, hop: Hop, trusted, config_sha: str) -> tuple[str, str]:
    audit = evidence.recorded(hop, trusted)
    found = evidence.findings(audit)
    if found:
        return UNVERIFIED, f"does not verify: {found[0]}"
    tags, body = hop.tags, policy.body
    expected = {
        lineage.FORGET_DATA: body["forget"]["data"],
        lineage.CONFIG_SHA: config_sha,
        lineage.RETAIN_DATA: body["retain"]["data"] or body["forget"]["data"],
    }
    for key, value in expected.items():
        if tags.get(key) != value:
            return OTHER, f"names policy {policy.name} but its {key} is {lineage.short(tags.get(key))}, not {value!r}"
    decisions = [
        r
        for _, r in lineage.gate_record_entries(tags)
        if r is not None
        and r.get("thresholds") == policy.thresholds
        and (trusted is None or "attestation_artifact" in r)
    ]
    if any(r["verdict"] == "pass" for r in decisions):
        return COMPLIANT, f"verified, unlearned under policy {policy.name} r{policy.revision}, passed its gate"
    if any(r["verdict"] == "fail" for r in decisions):
        return FAILED, f"failed policy {policy.name}'s gate"
    return UNGATED, f"verified, unlearned under policy {policy.name}, not yet gated with its thresholds"


# ----------------------------------------------------------------------------- the status table


def status_rows(assessments: list[Assessment], broken: Sequence[Policy] = ()) -> list[dict]:
    """One row per protected alias of each policy (and one per policy that protects none, or does not verify)."""
    rows = []
    for policy in broken:
        rows.append(
            {
                "model": policy.model,
                "policy": f"{policy.name} r{policy.revision}",
                "alias": "-",
                "version": "-",
                "compliant": False,
                "why": f"the policy does not verify: {policy.findings[0]}",
            }
        )
    for a in assessments:
        p = a.policy
        missing = [b for b in a.bases() if a.state_of_base(b)[0] != COMPLIANT]
        bases = f"{len(a.bases()) - len(missing)} of {len(a.bases())} base versions followed" + (
            f" (missing: {', '.join('v' + str(b.version) for b in missing)})" if missing else ""
        )
        for alias in p.protect or [None]:
            ok, why = a.alias_standing(alias) if alias else (not missing, "no alias protected")
            rows.append(
                {
                    "model": p.model,
                    "policy": f"{p.name} r{p.revision}",
                    "alias": f"@{alias}" if alias else "-",
                    "version": a.aliases.get(alias, "-") if alias else "-",
                    "compliant": ok and not missing,
                    "why": f"{why}; {bases}",
                }
            )
    return rows


COLUMNS = ("model", "policy", "alias", "version", "compliant", "why")


def table(rows: list[dict]) -> list[str]:
    """The rows as aligned text lines, a header first."""
    cells = [COLUMNS] + [
        tuple("yes" if r[c] is True else "NO" if r[c] is False else str(r[c]) for c in COLUMNS) for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table, for the registered model's description."""
    from .describe import code

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:  # every string a user or a tag supplied in a code span it cannot close (describe.code)
        values = ["yes" if r[c] is True else "**NO**" if r[c] is False else code(r[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
    return "\n".join(lines)
