"""Deployment gate: check a version's recorded unlearning metrics against thresholds.

The verdict uses MLflow's own ``validate_evaluation_results`` with
``MetricThreshold``s, is appended to the version's tags whether it passes or
not (never overwriting an earlier decision), and moves an alias only on a pass.
A user without the permission to move the alias is refused before the record
is written (see ``_record_and_move``). Only a version with an anchored record
of an unlearning run is decided on: anyone with EDIT can register a model with
metric tags typed in. ``record_registration`` records the alias ``prune
--alias`` moves in the same form, so that every alias on an unlearned version
is explained by a recorded move (``evidence.check_aliases``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import uuid
from dataclasses import dataclass

from mlflow.models import MetricThreshold
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import ModelValidationFailedException

from . import describe, evidence, lineage, verify
from ..errors import BadInputError
from .resolve import acting_user, check_alias, client, resolve

logger = logging.getLogger(__name__)


@dataclass
class GateResult:
    passed: bool
    model_uri: str
    thresholds: dict
    metrics: dict
    failures: list[str]
    alias_set: str | None = None


def _check_fraction(name: str, value: float | None) -> None:
    if value is not None and (not isinstance(value, (int, float)) or math.isnan(value) or not -1 <= value <= 1):
        raise BadInputError(f"{name} must be a relative change in [-1, 1] (e.g. 0.05 for 5%), got {value}")


def gate(
    model_uri: str,
    *,
    max_retain_drop: float | None = None,
    min_forget_drop: float | None = None,
    min_selectivity: float | None = None,
    max_relearn_recovery: float | None = None,
    metric: str = "top1",
    set_alias: str | None = None,
    dry_run: bool = False,
    signing_key=None,
    max_code_pass_rate: float | None = None,
    max_quantized_recovery: float | None = None,
) -> GateResult:
    """Pass if ``retain_<metric>_drop <= max_retain_drop``, ``forget_<metric>_drop >= min_forget_drop``,
    the selectivity *of that metric* ``>= min_selectivity``, ``relearn_recovery <= max_relearn_recovery``
    ``forget_code_pass_rate <= max_code_pass_rate`` (an absolute share of the Python tasks the unlearned
    model still solves) and ``quantized_<format>_recovery <= max_quantized_recovery`` for every format the
    version was measured in (``prune --quantized-check``); each only when given.

    Every decision is appended to the version as its own tag (time, thresholds,
    verdict, failures, user, alias moved); none is ever overwritten, so a
    stricter what-if gate cannot rewrite the record of the one that promoted
    it. ``dry_run`` decides without writing anything. ``signing_key`` (an Ed25519 private key,
    ``attest.load_signing_key``): the decision is also signed (``registry.attest``), its envelope in the version's
    run and its digest in the record.
    """
    thresholds: dict = {
        "max_retain_drop": max_retain_drop,
        "min_forget_drop": min_forget_drop,
        "min_selectivity": min_selectivity,
        "max_relearn_recovery": max_relearn_recovery,
        "max_code_pass_rate": max_code_pass_rate,
        "max_quantized_recovery": max_quantized_recovery,
    }
    check_thresholds(set_alias=set_alias, **thresholds)
    thresholds = {**thresholds, "metric": metric}
    resolved = _gated_version(model_uri)
    typed_in = any(key.startswith(lineage.METRIC_PREFIX) for key in resolved.tags)
    if lineage.PARENT not in resolved.tags and typed_in:  # no unlearning run recorded them: whoever tagged did
        refusals = [
            f"refused, unrecorded: {resolved.canonical_uri}: no anchored record of an unlearning run (a base model, "
            "or a version not made by `mlflow-selprune prune`); its metric tags are not evidence"
        ]
        return GateResult(False, resolved.canonical_uri, thresholds, {}, refusals)
    # the gate reads the very tags verified here against the run's anchored record, with the weights reloaded
    refusals = [f"refused, {line}" for line in verify.findings(resolved, load_weights=True)]
    if refusals:  # nothing is decided on, or written to, a version that does not verify
        return GateResult(False, resolved.canonical_uri, thresholds, {}, refusals)
    metrics = lineage.metrics_from_tags(resolved.tags)  # the very tags just verified
    measured = [f for f in resolved.tags.get(lineage.QUANTIZED_CHECK, "").split(",") if f]  # tags just verified
    wanted = _metric_thresholds(thresholds, measured, recorded=metrics)
    _require_measured(resolved, wanted, metrics)
    _require_a_fair_relearning_check(resolved, wanted, metrics)
    failures: list[str] = []
    try:
        mlflow_validate(wanted, metrics)
    except ModelValidationFailedException as exc:
        failures = [line.strip() for line in str(exc).splitlines() if line.strip()]
    passed = not failures
    alias_set = set_alias if passed and set_alias and not dry_run else None
    if not dry_run:
        _record_and_move(resolved, thresholds, passed, failures, alias_set, signing_key)
    return GateResult(passed, resolved.canonical_uri, thresholds, {k: metrics[k] for k in wanted}, failures, alias_set)


def _require_measured(resolved, wanted: dict, metrics: dict) -> None:
    """Every metric a threshold reads must be recorded; else one line naming the option that measures it."""
    missing = [name for name in wanted if name not in metrics]
    if missing:
        raise BadInputError(
            f"{resolved.canonical_uri} has no recorded {', '.join(missing)} (not measured, or not meaningful: "
            "a relative change of a value under 0.01); gate a version registered by `mlflow-selprune prune`"
            + (" with --relearn-steps" if "relearn_recovery" in missing else "")
            + (" with --code-tasks" if "forget_code_pass_rate" in missing else "")
            + (" with --quantized-check" if QUANTIZED_ANY in missing else "")
        )


# A relearning recovery counts for the gate only from a check of at least this many fine-tuning steps (the
# demo's and the docs' check; fewer steps bring back less, whatever the version) ...
MIN_RELEARN_STEPS = 20
# ... in which the parent itself did not lose more than this share of the removed forget top-1: a rate that
# damages the parent measures the damage, not relearning (docs/robustness.md#relearning; the demo's parents
# gain 6-14% on that scale at the default rate, the noise between split seeds under 5 points)
MAX_PARENT_LOSS_IN_RELEARNING = 0.1


def _require_a_fair_relearning_check(resolved, wanted: dict, metrics: dict) -> None:
    """A relearning recovery measured with settings its maker chose is read only when those settings were a
    real attack: enough steps (``relearn_steps``, recorded with the result) and a rate the parent survived."""
    if "relearn_recovery" not in wanted:
        return
    steps, parent = metrics.get("relearn_steps"), metrics.get("relearn_parent_recovery")
    reason = None
    if steps is None or steps < MIN_RELEARN_STEPS:
        reason = f"{'an unrecorded number of' if steps is None else int(steps)} fine-tuning steps"
    elif parent is not None and parent < -MAX_PARENT_LOSS_IN_RELEARNING:
        reason = (
            f"a learning rate at which the parent itself lost {-parent:.0%} of the removed top-1 "
            "(relearn_parent_recovery), so it measured damage, not relearning"
        )
    if reason:
        raise BadInputError(
            f"{resolved.canonical_uri}'s relearn_recovery was measured with {reason}; --max-relearn-recovery "
            f"reads only a check of at least {MIN_RELEARN_STEPS} steps at a rate the parent survives: prune again "
            f"with --relearn-steps {MIN_RELEARN_STEPS} (and the default --relearn-lr)"
        )


def check_thresholds(
    max_retain_drop,
    min_forget_drop,
    min_selectivity,
    max_relearn_recovery,
    set_alias,
    max_code_pass_rate=None,
    max_quantized_recovery=None,
) -> None:
    """Every option of ``gate`` in range, before the store is touched (the CLI calls it first)."""
    _check_fraction("--max-retain-drop", max_retain_drop)
    _check_fraction("--min-forget-drop", min_forget_drop)
    if min_selectivity is not None and (math.isnan(min_selectivity) or min_selectivity < 0):
        raise BadInputError(f"--min-selectivity must be >= 0 (forget drop / retain drop), got {min_selectivity}")
    if max_relearn_recovery is not None and (math.isnan(max_relearn_recovery) or max_relearn_recovery < 0):
        raise BadInputError(f"--max-relearn-recovery must be >= 0 (e.g. 0.5), got {max_relearn_recovery}")
    if max_code_pass_rate is not None and (math.isnan(max_code_pass_rate) or not 0 <= max_code_pass_rate <= 1):
        raise BadInputError(
            f"--max-code-pass-rate must be a share of the tasks in [0, 1] (e.g. 0.3), got {max_code_pass_rate}"
        )
    if max_quantized_recovery is not None and (
        math.isnan(max_quantized_recovery) or not 0 <= max_quantized_recovery <= 1
    ):
        raise BadInputError(
            "--max-quantized-recovery must be a share of the forget drop in [0, 1] (e.g. 0.1), got "
            f"{max_quantized_recovery}"
        )
    given = (
        max_retain_drop,
        min_forget_drop,
        min_selectivity,
        max_relearn_recovery,
        max_code_pass_rate,
        max_quantized_recovery,
    )
    if all(t is None for t in given):
        raise BadInputError(
            "give at least one threshold: --max-retain-drop, --min-forget-drop, --min-selectivity, "
            "--max-relearn-recovery, --max-code-pass-rate or --max-quantized-recovery"
        )
    check_alias(set_alias, "--set-alias")


def _gated_version(model_uri: str):
    """The registered, complete version a gate decides on."""
    resolved = resolve(model_uri)
    if not resolved.is_registered:
        raise BadInputError(f"'{model_uri}' is not a registered model version; gate works on models:/NAME/VERSION")
    if evidence.hop_of(resolved).kind == "incomplete":  # (a record that does not verify is refused as tampered)
        raise BadInputError(f"{resolved.canonical_uri} is an incomplete unlearned version; it cannot pass a gate")
    return resolved


# The name a --max-quantized-recovery asks for when the version was measured in no format (prune without
# --quantized-check).
QUANTIZED_ANY = "quantized_<format>_recovery"


def _metric_thresholds(
    thresholds: dict, measured_formats: list[str] | None = None, recorded=()
) -> dict[str, MetricThreshold]:
    """MLflow ``MetricThreshold``s of the thresholds given, on the recorded metric names (``measured_formats``:
    the formats ``prune --quantized-check`` measured the version in, each of which a quantized recovery
    threshold applies to; one whose recovery is not recorded, not meaningful, is then missing). The maximum
    pass rate applies to the three-shot pass rate too wherever the version's verified metrics (``recorded``)
    hold one."""
    from ..evaluation.drops import selectivity_key

    metric = thresholds["metric"]
    wanted = {}
    if thresholds["max_retain_drop"] is not None:
        wanted[f"retain_{metric}_drop"] = MetricThreshold(
            threshold=thresholds["max_retain_drop"], greater_is_better=False
        )
    if thresholds["min_forget_drop"] is not None:
        wanted[f"forget_{metric}_drop"] = MetricThreshold(
            threshold=thresholds["min_forget_drop"], greater_is_better=True
        )
    if thresholds["min_selectivity"] is not None:
        wanted[selectivity_key(metric)] = MetricThreshold(
            threshold=thresholds["min_selectivity"], greater_is_better=True
        )
    if thresholds["max_relearn_recovery"] is not None:
        wanted["relearn_recovery"] = MetricThreshold(
            threshold=thresholds["max_relearn_recovery"], greater_is_better=False
        )
    if thresholds["max_code_pass_rate"] is not None:
        for name in ("forget_code_pass_rate", "forget_code_pass_rate_3shot"):
            if name == "forget_code_pass_rate" or name in recorded:
                wanted[name] = MetricThreshold(threshold=thresholds["max_code_pass_rate"], greater_is_better=False)
    if thresholds.get("max_quantized_recovery") is not None:
        for name in [f"quantized_{fmt}_recovery" for fmt in measured_formats or ()] or [QUANTIZED_ANY]:
            wanted[name] = MetricThreshold(threshold=thresholds["max_quantized_recovery"], greater_is_better=False)
    return wanted


def _record_and_move(
    resolved, thresholds: dict, passed: bool, failures: list[str], alias_set: str | None, signing_key=None
) -> None:
    """Record the decision on the version, then move the alias: the audit trail never claims a move that did
    not happen, and no alias moves without its record.

    MLflow's basic-auth needs EDIT on the registered model for both writes (SetModelVersionTag: update on its
    versions; SetRegisteredModelAlias: update on the model and read on its versions), and MANAGE to delete a
    version tag or an alias, so a written record cannot be taken back by an EDIT user. Hence the order: the
    alias permission is checked first, with a request that writes nothing (``check_edit_permission``); then the
    record, saying the alias is requested and not moved (a refusal there has written nothing); then the alias;
    then the same record, saying it moved. Should the move fail (the permission revoked in between, a finer
    grant on the model's versions, the server gone), the record already says the alias did not move; the
    reason is added where it can still be written. A refusal is one permission line (exit 2).
    """
    from mlflow.exceptions import MlflowException

    from .resolve import check_edit_permission, permission_denied, tracking_user

    name, version = resolved.registered_name, resolved.version
    if alias_set:
        check_edit_permission(
            name,
            f"move alias '{alias_set}' of",
            "ask an admin, or a user with MANAGE on the model, to grant EDIT, or decide without writing (--dry-run)",
        )
    # written before the move, the record says only what is true then: the alias asked for has not moved yet
    key, record = _new_record(
        verdict="pass" if passed else "fail",
        thresholds=thresholds,
        failures=failures,
        **({"alias_requested": alias_set} if alias_set else {}),
    )
    _sign(resolved, key, record, signing_key)
    try:
        client().set_model_version_tag(name, version, key, _tag_value(resolved, key, record))
    except MlflowException as exc:
        if not permission_denied(exc):
            raise
        raise BadInputError(
            f"permission denied: {tracking_user()} may not record a gate decision on {resolved.canonical_uri}: "
            f"MLflow needs EDIT on registered model '{name}' to tag its versions and the user does not have it; "
            "nothing was written; ask an admin, or a user with MANAGE on the model, to grant EDIT, or decide "
            "without writing (--dry-run)"
        ) from None
    if alias_set:
        _move_alias(resolved, key, record, alias_set)
    describe.append_gate_line(name, version, describe.gate_line(record, thresholds))


def _new_record(**fields) -> tuple[str, dict]:
    """``(tag key, record)`` of a new decision, made now, that has moved no alias yet."""
    # microseconds in the key: two decisions within one second still sort in the order they were made
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {"time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "user": acting_user(), "alias_moved": None, **fields}
    return f"{lineage.GATE_RECORD_PREFIX}{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:8]}", record


def _sign(resolved, key: str, record: dict, signing_key) -> None:
    """With a key, sign the decision, its envelope in the version's run and its path and digest in the record."""
    if signing_key is None:
        return
    from . import attest

    subject = resolved.tags.get(lineage.MANIFEST_SHA) or resolved.tags.get(lineage.WEIGHTS_SHA, "")
    record.update(attest.log_gate_decision(resolved.run_id, resolved.canonical_uri, subject, key, record, signing_key))


def record_registration(model_uri: str, alias: str, signing_key=None) -> None:
    """Record that ``prune``/``materialize --alias`` moved ``alias`` to the version it registered: a decision
    record like the gate's (verdict ``registered``), signed with ``signing_key`` when given, because the audit
    explains each alias on an unlearned version by the latest recorded move of it. Written only where the
    alias does point at the version; a record that cannot be written is a warning (the audit then names the
    alias as unexplained). The version exists by then: anything that fails here, resolving it included, is a
    warning that names it, never an error that would end the command after it was made."""
    from .tracking import after_registration

    def write_record() -> None:
        resolved = resolve(model_uri)
        name, version = resolved.registered_name, resolved.version
        if name is None or version is None:
            raise ValueError("it is not a registered version")
        if str(client().get_registered_model(name).aliases.get(alias)) != str(version):
            return  # the move failed, and said so: there is no move to record
        key, record = _new_record(verdict=lineage.REGISTERED, alias_requested=alias)
        record["alias_moved"] = alias  # not among the signed fields (attest.DECISION_FIELDS)
        _write_record(resolved, key, record, signing_key)

    what = f"record the move of alias '{alias}' to it (`lineage --verify` reports the alias until a gate moves it)"
    after_registration(model_uri, what, write_record)


def move_alias_recorded(resolved, alias: str, verdict: str, signing_key=None, **fields) -> None:
    """Move ``alias`` to ``resolved`` as the gate moves one: the permission checked first, then a decision record
    of ``verdict`` (``fields``: e.g. the policy and the reason) saying the move is requested, then the move, then
    the record saying it moved. ``reconcile`` moves protected aliases this way."""
    from .resolve import check_edit_permission

    check_edit_permission(
        resolved.registered_name,
        f"move alias '{alias}' of",
        "ask an admin, or a user with MANAGE on the model, to grant EDIT, or run without --fix",
    )
    key, record = _new_record(verdict=verdict, alias_requested=alias, **fields)
    _write_record(resolved, key, record, signing_key)
    _move_alias(resolved, key, record, alias)


def record_observation(resolved, alias: str, seen_by: str, signing_key=None) -> None:
    """Record that ``alias`` was found on ``resolved`` where no recorded move put it (a move by hand, seen by a
    webhook delivery or by ``reconcile``): the alias history keeps it; it never explains the alias."""
    key, record = _new_record(verdict=lineage.OBSERVED, alias_seen=alias, seen_by=seen_by)
    _write_record(resolved, key, record, signing_key)


def _write_record(resolved, key: str, record: dict, signing_key=None) -> None:
    """Sign the decision (with a key) and write it as its own tag ``key`` on the version, never over another."""
    _sign(resolved, key, record, signing_key)
    client().set_model_version_tag(resolved.registered_name, resolved.version, key, _tag_value(resolved, key, record))


def _move_alias(resolved, key: str, record: dict, alias_set: str) -> None:
    """Move the alias, then update the decision record to say it moved; a refused move is said in the record
    where it can still be written, and in one permission line."""
    from .resolve import permission_denied, tracking_user

    name, version = resolved.registered_name, resolved.version
    try:
        client().set_registered_model_alias(name, alias_set, version)
    except Exception as exc:
        reason = (
            "permission denied" if permission_denied(exc) else (str(exc)[:200].split("\n")[0] or type(exc).__name__)
        )
        record.update(alias_not_moved=f"{alias_set}: {reason}")
        try:  # the why, where it can still be written; the record already says the alias did not move
            client().set_model_version_tag(name, version, key, _tag_value(resolved, key, record))
        except Exception:  # noqa: BLE001 - the original failure is what the user must see
            logger.debug("could not add the reason to decision record %s", key, exc_info=True)
        if permission_denied(exc):
            raise BadInputError(
                f"permission denied: {tracking_user()} may not move alias '{alias_set}' of registered model '{name}'; "
                f"the decision is recorded on {resolved.canonical_uri} without the move; ask an admin, or a user "
                "with MANAGE on the model, for EDIT on it and its versions"
            ) from None
        raise
    record["alias_moved"] = alias_set
    try:
        client().set_model_version_tag(name, version, key, _tag_value(resolved, key, record))
    except Exception:  # noqa: BLE001 - the alias moved; the record under-claims, which an audit can see
        logger.warning(
            "alias '%s' now points to %s, but its decision record %s could not be updated to say so "
            "(it names the alias as requested)",
            alias_set,
            resolved.canonical_uri,
            key,
        )


# MLflow caps a model version tag's value at 5000 characters; a record never is cut to fit
TAG_VALUE_LIMIT = 5000


def _tag_value(resolved, key: str, record: dict) -> str:
    """The decision record as the tag's value; one too long for a tag goes whole to an artifact of the version's
    run (``selprune/gate/KEY.json``), and the tag keeps the verdict with the artifact's path and sha256."""
    text = json.dumps(record, sort_keys=True)
    if len(text) <= TAG_VALUE_LIMIT:
        return text
    path = f"{lineage.GATE_ARTIFACT_DIR}/{key}.json"
    client().log_text(resolved.run_id, text, path)
    summary = {
        k: record.get(k)
        for k in ("time", "verdict", "user", "alias_moved", "alias_requested", "alias_not_moved")
        if k in record
    }
    summary.update(record_artifact=path, record_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
    return json.dumps(summary, sort_keys=True)


def mlflow_validate(thresholds: dict[str, MetricThreshold], metrics: dict) -> None:
    """MLflow's validation against absolute thresholds on a hand-built result (raises on failure)."""
    import mlflow

    candidate = EvaluationResult(metrics={k: metrics[k] for k in thresholds}, artifacts={})
    mlflow.validate_evaluation_results(thresholds, candidate)
