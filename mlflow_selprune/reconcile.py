"""``reconcile``: one idempotent pass that makes the registry match its policies.

For each policy (``registry.policy``) of each model, in three steps:

1. every protected alias on a version that does not comply is moved back: to the compliant child of the base it
   points at (the deployed base model stays), else to the version its latest recorded move put it on, else to
   the newest compliant version; by a recorded decision (signed with the key given);
2. every base version without a compliant unlearned child is pruned with the policy's recipe, gated with its
   thresholds and registered with the policy's digest in its lineage (a child registered but not yet gated is
   gated, never pruned again; a child that does not verify is reported, never pruned again);
3. the aliases again, now that new children may comply.

A protected alias found where no recorded move put it is recorded as seen (``seen_by``) before anything moves it;
an alias moved by hand onto a compliant version is recorded as seen and left there (the audit still shows the
move: only a recorded move explains an alias). Deliveries the webhook receiver saw (``seen``: alias, version) are
recorded the same way, even when the alias has moved again since.

Each write is one step the next pass can see done: a pass killed at any point leaves a run without a version (the
next pass prunes again), a version without a gate decision (the next pass gates it), or a move record without its
move (the next pass moves the alias again). A pass holds a lock per model on this machine (the receiver and a
cron job on one host never overlap). Webhooks only wake this pass; it is the guarantee.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field

from .errors import BadInputError, VerificationError
from .registry import compliance, lineage
from .registry import policy as policies

logger = logging.getLogger(__name__)


@dataclass
class Report:
    """What a pass found and did: the status rows after it, and one line per action and per problem left."""

    rows: list[dict] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def compliant(self) -> bool:
        return not self.problems and all(row["compliant"] for row in self.rows)


@dataclass
class Pass:
    """The settings of one pass, passed whole."""

    fix: bool = False
    signing_key: str | None = None  # a path (``attest.load_signing_key``), read only when something is signed
    seen_by: str = "reconcile"
    progress: bool = True
    roots: dict | None = None  # key id -> public key: only policies signed by one of them are followed
    seen: list[tuple[str, str, int]] = field(default_factory=list)  # (alias, version, unix time) deliveries named


def models_with_policies() -> list[str]:
    """Every registered model that carries a policy tag, or that a policy run's params name."""
    from .registry.resolve import all_pages, client

    models = all_pages(client().search_registered_models, max_results=1000)
    names = {m.name for m in models if any(t.startswith(policies.TAG_PREFIX) for t in (m.tags or {}))}
    for run in policies.all_revision_runs():
        names.add(run.data.params[policies.RUN_MODEL_TAG])
    return sorted(names)


def check_model(model: str) -> None:
    """``--model`` must name a registered model (one line, exit 2, nothing written)."""
    from .registry.resolve import registered_model

    registered_model(model)


def reconcile(model: str | None = None, settings: Pass | None = None) -> Report:
    """One pass over ``model`` (None: every model with a policy); see the module's docstring."""
    settings = settings or Pass()
    if model is not None:
        check_model(model)
    report = Report()
    with _project_run(settings.fix):
        for name in [model] if model else models_with_policies():
            with _model_lock(name, settings.fix):
                try:
                    _reconcile_model(name, report, settings)
                except Exception as exc:  # noqa: BLE001 - this model's failure; the other models still get their pass
                    report.problems.append(f"{name}: {_said(exc)}")
    return report


def _said(exc: BaseException) -> str:
    """One line for a failure a pass reports and goes on from."""
    if isinstance(exc, VerificationError):
        return exc.findings[-1]
    first = str(exc).splitlines()[0] if str(exc) else ""
    return first if isinstance(exc, BadInputError) else f"{type(exc).__name__}: {first[:300]}"


@contextlib.contextmanager
def _project_run(fix: bool):
    """Under ``mlflow run . -e reconcile`` the run it made is active while a fixing pass runs, so each prune is a
    run nested under it (not that run itself, which holds one prune at most)."""
    import os

    import mlflow

    if not fix or not os.environ.get("MLFLOW_RUN_ID") or mlflow.active_run() is not None:
        yield
        return
    with mlflow.start_run():
        mlflow.set_tag(lineage.PREFIX + "kind", "reconcile")
        yield


@contextlib.contextmanager
def _model_lock(model: str, fix: bool):
    """One fixing pass per model and tracking store at a time on this machine (an exclusive lock in the user cache;
    a pass that only reads takes none)."""
    if not fix:
        yield
        return
    import fcntl
    import os
    from pathlib import Path

    import mlflow

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlflow-selprune" / "locks"
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{mlflow.get_tracking_uri().rstrip('/')}\n{model}".encode()).hexdigest()[:32]
    with open(root / f"{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reconcile_model(model: str, report: Report, settings: Pass) -> None:
    from .registry import describe

    active = policies.policies(model)
    if not active:
        return  # a model no policy follows: nothing to report, nothing written (a delivery names any model)
    broken = [p for p in active if p.findings]
    for p in broken:
        report.problems.append(f"{model}: policy {p.name} does not verify: {p.findings[0]}")
    followed = []
    for p in (p for p in active if not p.findings):
        if settings.roots is not None and not policies.signed_by(p, settings.roots):
            report.problems.append(f"{model}: policy {p.name} is not signed by a trusted key; not followed")
        else:
            followed.append(p)
    contested = _contested_aliases(followed)
    for alias, names in sorted(contested.items()):
        report.problems.append(
            f"models:/{model}@{alias} is protected by {len(names)} policies ({', '.join(names)}); no version can "
            "comply with both: retire all but one (the alias is left where it is)"
        )
    protected = {alias for p in followed for alias in p.protect}
    if settings.fix and settings.seen:
        _record_deliveries(model, settings, report, protected)
    assessments = []
    for p in followed:
        assessment = compliance.assess(p)
        unsigned = settings.fix and _signer_missing(p, settings.signing_key)
        if unsigned:
            report.problems.append(f"{model}: policy {p.name}: not fixed: {unsigned}")
        elif settings.fix:
            assessment = _fix_aliases(assessment, report, settings, contested, final=False)
            assessment = _fix_versions(assessment, report, settings)
            assessment = _fix_aliases(assessment, report, settings, contested, final=True)
        _report_left(assessment, report, contested)
        assessments.append(assessment)
    rows = compliance.status_rows(assessments, broken)
    report.rows.extend(rows)
    if settings.fix:
        describe.set_status_section(model, compliance.markdown(rows))


def _contested_aliases(followed: list) -> dict[str, list[str]]:
    protected: dict[str, list[str]] = {}
    for p in followed:
        for alias in p.protect:
            protected.setdefault(alias, []).append(p.name)
    return {alias: names for alias, names in protected.items() if len(names) > 1}


def _signer_missing(policy, signing_key_path) -> str | None:
    """Why a pass cannot write what ``policy`` requires (its decisions signed by one of its keys), or None."""
    keys = policy.trusted_keys()
    if not keys:
        return None
    from .registry.attest import load_signing_key, signs_for

    if not signs_for(load_signing_key(signing_key_path), keys):
        return "it requires signatures by one of its keys; give --signing-key with one of them"
    return None


def _fix_versions(a: compliance.Assessment, report: Report, settings: Pass) -> compliance.Assessment:
    """Gate each ungated child, prune each base without one; returns the assessment after."""
    changed = False
    problem = None  # why the DATA cannot be used: read once, at the first base that needs it
    data_checked = False
    for base in a.bases():
        state, child = a.state_of_base(base)
        if state == compliance.UNGATED and child is not None:
            _gate(a.policy, child.hop.uri, report, settings.signing_key)
            changed = True
        elif state == "missing":
            if not data_checked:
                problem, data_checked = _data_changed(a.policy), True
            if problem:
                report.problems.append(f"{base.uri}: not pruned: {problem}")
                continue
            try:
                uri = _prune(a.policy, base, settings)
            except Exception as exc:  # noqa: BLE001 - this base's failure; the other bases still get theirs
                report.problems.append(f"{base.uri}: not pruned under policy {a.policy.name}: {_said(exc)}")
                continue
            report.actions.append(f"pruned {base.uri} under policy {a.policy.name}: {uri}")
            _gate(a.policy, uri, report, settings.signing_key)
            changed = True
    return compliance.assess(a.policy) if changed else a


def _data_changed(policy) -> str | None:
    """Why the policy's DATA cannot be used now (its documents are not the ones it pinned), or None."""
    _, data, _ = policy.recipe()
    for side in ("forget", "retain"):
        pinned = policy.body[side]
        if not pinned["data"]:
            continue
        try:
            now = policies.documents_sha256(pinned["data"], data.source_for(side))
        except BadInputError as exc:
            return f"the {side} DATA {pinned['data']} cannot be read: {str(exc).splitlines()[0]}"
        if now != pinned["documents_sha256"]:
            return (
                f"the {side} DATA {pinned['data']} changed since policy {policy.name} pinned it (documents sha256 "
                f"{now[:16]}, pinned {pinned['documents_sha256'][:16]}); restore it or revise the policy"
            )
    return None


def _prune(policy, base, settings: Pass) -> str:
    from .unlearn import run_prune

    config, data, evidence = policy.recipe()
    result = run_prune(
        base.uri,
        policy.body["forget"]["data"],
        policy.body["retain"]["data"],
        config=config,
        data=data,
        evidence=evidence,
        register_as=policy.model,
        storage=policy.body["recipe"].get("storage", "full"),
        run_name=f"reconcile {policy.model} v{base.version} under {policy.name}",
        signing_key=settings.signing_key,
        policy=policy.ref,
        progress=settings.progress,
    )
    return str(result.model_uri)


def _gate(policy, uri: str, report: Report, signing_key_path) -> None:
    from .registry.attest import load_signing_key
    from .registry.gate import gate

    try:
        result = gate(uri, signing_key=load_signing_key(signing_key_path), **policy.thresholds)
    except BadInputError as exc:  # e.g. a metric the thresholds read that the version does not record
        report.problems.append(f"{uri} cannot be gated with policy {policy.name}'s thresholds: {exc}")
        return
    verdict = "passed" if result.passed else "FAILED: " + "; ".join(result.failures)
    report.actions.append(f"gated {result.model_uri} with policy {policy.name}'s thresholds: {verdict}")


# ----------------------------------------------------------------------------- aliases


def _latest_about(a: compliance.Assessment, alias: str) -> tuple[str, dict] | None:
    """``(version, record)`` of the newest readable record that names ``alias`` (moved, requested or seen)."""
    latest = None
    for hop in a.hops:
        for _, record in lineage.gate_record_entries(hop.tags):
            if record and lineage.names_alias(record, alias):
                if latest is None or record["time"] > latest[1]["time"]:
                    latest = (str(hop.version), record)
    return latest


def _fix_aliases(
    a: compliance.Assessment, report: Report, settings: Pass, contested: dict, final: bool
) -> compliance.Assessment:
    """Each protected alias (not contested by another policy) on a version that does not comply is moved back;
    one found where no recorded move put it is recorded as seen first; returns the assessment after. Before the
    versions are fixed (``final`` false) an alias with nowhere to go yet waits for them, unreported."""
    from .registry.resolve import resolve

    changed = False
    for alias in a.policy.protect:
        if alias in contested:
            continue
        ok, why = a.alias_standing(alias)
        version = a.aliases.get(alias)
        unreadable = a.history is not None and bool(a.history.unreadable)
        if unreadable and final:
            report.problems.append(
                f"models:/{a.policy.model}@{alias}: its moves cannot all be read ({a.history.unreadable[0]}); "  # type: ignore[union-attr]
                "a version that does not comply is still moved back, but no move is recorded as seen"
            )
        latest = _latest_about(a, alias)
        if ok and (unreadable or a.explained(alias)):
            continue
        ours = (
            latest is not None
            and latest[1]["verdict"] == lineage.RECONCILED
            and latest[1].get("policy") == a.policy.ref
        )
        signed = not a.policy.trusted_keys() or (latest is not None and "attestation_artifact" in latest[1])
        if ok and latest and latest[0] == version and ours and signed:
            # a move of a pass that was killed before its record said it moved: this pass moves it again
            _move(a, alias, resolve(f"models:/{a.policy.model}/{version}"), report, settings, "the move of a pass "
                  "that was stopped before its record said so, made again")  # fmt: skip
            changed = True
            continue
        seen = latest is not None and latest[0] == version and latest[1]["verdict"] == lineage.OBSERVED
        if version is not None and not unreadable and not a.explained(alias) and not seen:
            _observe(a.policy.model, alias, version, settings, report)
            changed = True
        if ok:
            continue  # a move by hand onto a compliant version: recorded as seen, left there
        target = _target(a, alias, version)
        if target is None:
            if not final:
                continue
            report.problems.append(
                f"models:/{a.policy.model}@{alias}: {why}, and no version complies with policy {a.policy.name} to "
                "move it to"
            )
            continue
        reason = (
            f"moved from {'nowhere' if version is None else 'v' + version} ({why}) to v{target.version}, which "
            f"complies with policy {a.policy.name}"
        )
        _move(a, alias, resolve(target.uri), report, settings, reason)
        changed = True
    return compliance.assess(a.policy) if changed else a


def _target(a: compliance.Assessment, alias: str, version: str | None):
    """Where a protected alias goes back to: the compliant child of the base it points at (or of the base of the
    child it points at), else the version its latest recorded move put it on if that complies, else the newest
    compliant version."""
    hop = next((h for h in a.hops if str(h.version) == str(version)), None)
    if hop is not None:
        parent = hop.tags.get(lineage.PARENT)
        # a version is a child only by its verified record, as compliance counts it
        base = hop if hop in a.bases() else next((h for h in a.bases() if h.uri == parent), None)
        if base is not None:
            state, child = a.state_of_base(base)
            if state == compliance.COMPLIANT and child is not None:
                return child.hop
    latest = a.history.latest.get(alias) if a.history else None
    if latest is not None:
        child = a.child(latest[1])
        if child is not None and child.state == compliance.COMPLIANT:
            return child.hop
    return a.newest_compliant()


def _move(a: compliance.Assessment, alias: str, target, report: Report, settings: Pass, reason: str) -> None:
    from .registry.attest import load_signing_key
    from .registry.gate import move_alias_recorded

    move_alias_recorded(
        target, alias, lineage.RECONCILED, load_signing_key(settings.signing_key), policy=a.policy.ref, reason=reason
    )
    report.actions.append(f"@{alias}: {reason}")


def _observe(model: str, alias: str, version: str, settings: Pass, report: Report) -> None:
    from .registry.attest import load_signing_key
    from .registry.gate import record_observation
    from .registry.resolve import resolve

    record_observation(
        resolve(f"models:/{model}/{version}"), alias, settings.seen_by, load_signing_key(settings.signing_key)
    )
    report.actions.append(f"recorded @{alias} on v{version}, put there by no recorded move ({settings.seen_by})")


def _record_deliveries(model: str, settings: Pass, report: Report, protected: set[str]) -> None:
    """Each alias move a webhook delivery named, recorded as seen on the version it named, unless a record of this
    project names that alias there from around the delivery's time (a gate or reconcile move, written just before
    its move) or it was recorded as seen already: even a move undone since is in the history."""
    hops, _ = lineage.versions(model)
    by_version = {str(h.version): h for h in hops}
    for alias, version, when in settings.seen:
        hop = by_version.get(str(version)) if alias in protected else None
        if hop is None:
            continue
        around = [
            r
            for _, r in lineage.gate_record_entries(hop.tags)
            if r and lineage.names_alias(r, alias) and -DELIVERY_SLACK <= when - _epoch(r["time"]) <= DELIVERY_SLACK
        ]
        if not around:
            _observe(model, alias, str(version), dataclasses.replace(settings, seen_by="webhook"), report)


# how far apart a delivery's time and the record of the move it reports may be (a move is recorded just before it is
# made; a delivery is sent just after it, with retries)
DELIVERY_SLACK = 600


def _epoch(record_time: str) -> int:
    import calendar
    import time

    return calendar.timegm(time.strptime(record_time[:19], "%Y-%m-%dT%H:%M:%S"))


def _report_left(a: compliance.Assessment, report: Report, contested: dict) -> None:
    for base in a.bases():
        state, child = a.state_of_base(base)
        if state == compliance.COMPLIANT:
            continue
        what = {
            "missing": "has no verified unlearned child under policy",
            compliance.UNGATED: f"has an ungated child ({child.hop.uri if child else '?'}) under policy",
            compliance.FAILED: f"has a child that failed the gate ({child.hop.uri if child else '?'}) of policy",
            compliance.UNVERIFIED: f"has a child that does not verify ({child.hop.uri if child else '?'}; "
            f"{child.why if child else ''}) under policy",
        }[state]
        report.problems.append(f"{base.uri} {what} {a.policy.name}")
    for alias in a.policy.protect:
        ok, why = a.alias_standing(alias)
        if not ok and alias not in contested:
            report.problems.append(
                f"models:/{a.policy.model}@{alias} does not comply with policy {a.policy.name}: {why}"
            )
