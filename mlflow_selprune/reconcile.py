"""``reconcile``: one idempotent pass that makes the registry match its policies.

For each policy (``registry.policy``) of each model: every base version without a compliant unlearned child is
listed, and with ``fix`` pruned with the policy's recipe, gated with its thresholds and registered with the
policy's digest in its lineage (a child already registered but not yet gated is gated, never pruned again);
every protected alias on a version that does not comply is listed, and with ``fix`` moved to the newest
compliant version by a recorded decision (signed with the key given). A protected alias found where no
recorded move put it is recorded as seen (``seen_by``) before anything moves it.

Each write is one step that the next pass can see done: a pass killed at any point leaves a run without a
version (the next pass prunes again), a version without a gate decision (the next pass gates it), or a move
record without its move (the next pass moves the alias again) -- never a second child of the same base under
the same policy, never a lost record. Webhooks only wake this pass; it is the guarantee.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from .errors import BadInputError
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


def models_with_policies() -> list[str]:
    """Every registered model that carries a policy tag (or has a policy run)."""
    from .registry.resolve import client

    names = set()
    for model in client().search_registered_models(max_results=1000):
        if any(tag.startswith(policies.TAG_PREFIX) for tag in (model.tags or {})):
            names.add(model.name)
    experiment = client().get_experiment_by_name(policies.EXPERIMENT)
    if experiment is not None:
        for run in client().search_runs([experiment.experiment_id], max_results=1000):
            if run.data.tags.get(policies.RUN_MODEL_TAG):
                names.add(run.data.tags[policies.RUN_MODEL_TAG])
    return sorted(names)


def check_model(model: str) -> None:
    """``--model`` must name a registered model (one line, exit 2, nothing written)."""
    from mlflow.exceptions import MlflowException

    from .registry.resolve import client, did_you_mean

    try:
        client().get_registered_model(model)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise
        raise BadInputError(f"--model: registered model '{model}' does not exist{did_you_mean(model)}") from None


def reconcile(
    model: str | None = None,
    *,
    fix: bool = False,
    signing_key=None,
    seen_by: str = "reconcile",
    progress: bool = True,
    write_description: bool | None = None,
) -> Report:
    """One pass over ``model`` (None: every model with a policy); see the module's docstring."""
    if model is not None:
        check_model(model)
    report = Report()
    with _project_run():
        for name in [model] if model else models_with_policies():
            _reconcile_model(name, report, fix, signing_key, seen_by, progress)
    return report


@contextlib.contextmanager
def _project_run():
    """Under ``mlflow run . -e reconcile`` the run it made is active while the pass runs, so each prune is a run
    nested under it (not that run itself, which holds one prune at most)."""
    import os

    import mlflow

    if not os.environ.get("MLFLOW_RUN_ID") or mlflow.active_run() is not None:
        yield
        return
    with mlflow.start_run():
        mlflow.set_tag(lineage.PREFIX + "kind", "reconcile")
        yield


def _reconcile_model(model: str, report: Report, fix: bool, signing_key, seen_by: str, progress: bool) -> None:
    from .registry import describe

    active = policies.policies(model)
    broken = [p for p in active if p.findings]
    for p in broken:
        report.problems.append(f"{model}: policy {p.name} does not verify: {p.findings[0]}")
    assessments = []
    for p in (p for p in active if not p.findings):
        assessment = compliance.assess(p)
        unsigned = fix and _signer_missing(p, signing_key)
        if unsigned:
            report.problems.append(f"{model}: policy {p.name}: not fixed: {unsigned}")
        elif fix:
            assessment = _fix_versions(assessment, report, signing_key, progress)
            assessment = _fix_aliases(assessment, report, signing_key, seen_by)
        _report_left(assessment, report)
        assessments.append(assessment)
    rows = compliance.status_rows(assessments, broken)
    report.rows.extend(rows)
    if fix:
        describe.set_status_section(model, compliance.markdown(rows))


def _signer_missing(policy, signing_key_path) -> str | None:
    """Why a pass cannot write what ``policy`` requires (its decisions signed by one of its keys), or None."""
    keys = policy.trusted_keys()
    if not keys:
        return None
    from .registry.attest import key_id, load_signing_key

    key = load_signing_key(signing_key_path)
    if key is None or key_id(key.public_key()) not in keys:
        return "it requires signatures by one of its keys; give --signing-key with one of them"
    return None


def _fix_versions(a: compliance.Assessment, report: Report, signing_key, progress: bool) -> compliance.Assessment:
    """Gate each ungated child, prune each base without one; returns the assessment after."""
    changed = False
    for base in a.bases():
        state, child = a.state_of_base(base)
        if state == compliance.UNGATED and child is not None:
            _gate(a.policy, child.hop.uri, report, signing_key)
            changed = True
        elif state == "missing":
            problem = _data_changed(a.policy)
            if problem:
                report.problems.append(f"{base.uri}: not pruned: {problem}")
                continue
            uri = _prune(a.policy, base, signing_key, progress)
            report.actions.append(f"pruned {base.uri} under policy {a.policy.name}: {uri}")
            _gate(a.policy, uri, report, signing_key)
            changed = True
    return compliance.assess(a.policy) if changed else a


def _data_changed(policy) -> str | None:
    """Why the policy's DATA cannot be used now (its documents are not the ones it pinned), or None."""
    _, data, _ = policy.recipe()
    for side in ("forget", "retain"):
        pinned = policy.body[side]
        if not pinned["data"]:
            continue
        now = policies.documents_sha256(pinned["data"], data.source_for(side))
        if now != pinned["documents_sha256"]:
            return (
                f"the {side} DATA {pinned['data']} changed since policy {policy.name} pinned it (documents sha256 "
                f"{now[:16]}, pinned {pinned['documents_sha256'][:16]}); restore it or revise the policy"
            )
    return None


def _prune(policy, base, signing_key_path, progress: bool) -> str:
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
        signing_key=signing_key_path,
        policy=policy.ref,
        progress=progress,
    )
    return result.model_uri


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


def _fix_aliases(a: compliance.Assessment, report: Report, signing_key_path, seen_by: str) -> compliance.Assessment:
    """Record each protected alias found where no recorded move put it; move each one on a version that does not
    comply to the newest compliant version (or record why the one it is on stays)."""
    from .registry.attest import load_signing_key
    from .registry.gate import move_alias_recorded, record_observation
    from .registry.resolve import resolve

    key = None
    changed = False
    for alias in a.policy.protect:
        ok, why = a.alias_standing(alias)
        if ok and a.explained(alias):
            continue
        key = key or load_signing_key(signing_key_path)
        version = a.aliases.get(alias)
        if version is not None and not a.explained(alias) and not _seen_already(a, alias, version):
            record_observation(resolve(f"models:/{a.policy.model}/{version}"), alias, seen_by, key)
            report.actions.append(f"recorded @{alias} on v{version}, put there by no recorded move ({seen_by})")
        target = resolve(f"models:/{a.policy.model}/{version}") if ok else None
        if target is None:
            newest = a.newest_compliant()
            if newest is None:
                report.problems.append(
                    f"models:/{a.policy.model}@{alias}: {why}, and no version complies with policy {a.policy.name} "
                    "to move it to"
                )
                continue
            target = resolve(newest.uri)
        reason = (
            f"kept on v{target.version}, which complies with policy {a.policy.name}: the alias was moved there by hand"
            if ok
            else f"moved from {'nowhere' if version is None else 'v' + version} ({why}) to v{target.version}, "
            f"the newest version that complies with policy {a.policy.name}"
        )
        move_alias_recorded(target, alias, lineage.RECONCILED, key, policy=a.policy.ref, reason=reason)
        report.actions.append(f"@{alias}: {reason}")
        changed = True
    return compliance.assess(a.policy) if changed else a


def _seen_already(a: compliance.Assessment, alias: str, version: str) -> bool:
    """Whether the latest record about ``alias`` is already the observation of it on ``version``."""
    latest = None
    for hop in a.hops:
        for _, record in lineage.gate_record_entries(hop.tags):
            if record and alias in (record.get("alias_moved"), record.get("alias_seen")):
                if latest is None or record["time"] > latest[0]:
                    latest = (record["time"], str(hop.version), record["verdict"])
    return latest is not None and latest[1:] == (version, lineage.OBSERVED)


def _report_left(a: compliance.Assessment, report: Report) -> None:
    for base in a.bases():
        state, child = a.state_of_base(base)
        if state == compliance.COMPLIANT:
            continue
        what = {
            "missing": "has no verified unlearned child under policy",
            compliance.UNGATED: f"has an ungated child ({child.hop.uri if child else '?'}) under policy",
            compliance.FAILED: f"has a child that failed the gate ({child.hop.uri if child else '?'}) of policy",
        }[state]
        report.problems.append(f"{base.uri} {what} {a.policy.name}")
    for alias in a.policy.protect:
        ok, why = a.alias_standing(alias)
        if not ok:
            report.problems.append(
                f"models:/{a.policy.model}@{alias} does not comply with policy {a.policy.name}: {why}"
            )
