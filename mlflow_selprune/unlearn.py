"""One unlearning job end to end: registry model in, pruned and registered version out.

The data flow, in order: check every input (options, aliases, names, data
paths, the model URI, and on a tracking server the user's EDIT permission on
the registered model the version goes to) → load the parent and the data → open the MLflow run →
prune (steps logged live) → the random control and the relearning check →
log the model and artifacts → anchor the lineage tags in the run (an
artifact and an immutable param) → the description and ``report.html`` →
register the version with all of its lineage tags and its description in one
request → move the alias. Anything that fails before the run opens writes
nothing; anything after it leaves a FAILED run and no version (a registration
the server refuses for lack of permission deletes that run and its logged
model, or names them where the server refuses that too). Once the version
exists it is complete: what follows (the alias, its number in its
description) is a warning naming it, and the job succeeds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .config import SIDES, DataOptions, EvidenceOptions, PruneConfig
from .errors import BadInputError
from .evaluation.functional import CHECKS_ARTIFACT
from .evaluation.samples import SAMPLES_ARTIFACT

logger = logging.getLogger(__name__)

STORAGES = ("full", "delta")


@dataclass
class UnlearnResult:
    """What a finished job produced (``model_uri`` is None when nothing was registered)."""

    run_id: str | None
    model_uri: str | None
    parent_uri: str
    metrics: dict
    pruning: object | None = None  # engine.PruneResult
    tags: dict = field(default_factory=dict)
    alias: str | None = None
    seconds: dict = field(default_factory=dict)  # wall time per phase: reported, never decides anything


class _Phases:
    """Wall time per phase of a job, for the record and the benchmarks."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._start, 3)
        self._start = now

    def add_steps(self, steps: list[dict]) -> None:
        """The pruning steps' own collect, evaluate and total seconds, summed."""
        for key, name in (("seconds_collect", "collect"), ("seconds_evaluate", "evaluate"), ("seconds", "total")):
            self.seconds[f"steps_{name}"] = round(sum(r.get(key, 0.0) for r in steps), 3)


def _is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def check_data_specs(forget: str, retain: str | None, data: DataOptions) -> None:
    """Fail on a missing --retain, a missing file or an unknown built-in corpus in seconds, before any model
    is loaded (the CLI calls it before importing anything heavy)."""
    from .data.specs import check_spec

    if retain is None and data.forget_classes is None:
        raise BadInputError("--retain is required (it may be left out only with --forget-classes)")
    for side, spec in zip(SIDES, (forget, retain)):
        if spec is not None:
            check_spec(spec, side)


def load_datasets(
    tokenizer,
    forget: str,
    retain: str | None,
    data: DataOptions,
    trust_remote_code: bool = False,
    model=None,
    select_part: bool = False,
):
    """Prepare forget and retain data (each with its own source options); refuse the same data on both sides.

    The model's kind decides the preparation: token batches for language models, image batches
    (``data.images``) for image classifiers, whose ``tokenizer`` is the model's image processor.
    ``model=None``: a language model. ``select_part``: a third part for a budget to stop on (budget runs).
    """
    from .kinds import BY_NAME, CAUSAL_LM, kind_of

    kind = kind_of(model) if model is not None else BY_NAME[CAUSAL_LM]
    prepared = kind.prepare_data(
        forget, retain, tokenizer, model, data, trust_remote_code=trust_remote_code, select_part=select_part
    )
    if prepared[0].digest == prepared[1].digest:
        raise BadInputError(
            f"forget and retain are the same data ({forget} and {retain} have digest {prepared[0].digest[:12]}); "
            "pass different datasets"
        )
    return prepared[0], prepared[1]


def make_evaluate_fn(forget, retain, accelerator=None, progress: bool = True, sides=SIDES, part: str = "eval"):
    """Metrics on the eval parts (documents that never feed the statistics), prefixed ``forget_``/``retain_``;
    ``part="select"``: on the select parts a budget stops on instead."""
    from .evaluation.model_metrics import evaluate_model

    prepared = {"forget": forget, "retain": retain}

    def evaluate_fn(model) -> dict:
        logger.debug("evaluating %s metrics", " and ".join(sides))
        metrics = {}
        for side in sides:
            metrics.update(
                evaluate_model(
                    model,
                    getattr(prepared[side], f"{part}_batches"),
                    skip_token_ids=prepared[side].skip_token_ids,
                    prefix=f"{side}_",
                    accelerator=accelerator,
                    progress=progress,
                    masking=getattr(prepared[side], "masking", None),
                )
            )
        return metrics

    return evaluate_fn


@dataclass
class PrunePlan:
    """Every input of a prune job, checked and resolved; making one writes nothing (``plan_prune``)."""

    parent: Any  # registry.ResolvedModel
    forget: str
    retain: str | None
    config: PruneConfig
    data: DataOptions
    evidence: EvidenceOptions
    target_name: str | None  # None: register nothing
    alias: str | None = None
    storage: str = "full"
    device: str | None = None
    dtype: str | None = None
    run_name: str | None = None
    trust_remote_code: bool = False
    signing_key: str | None = None  # an Ed25519 key's path, else $SELPRUNE_SIGNING_KEY's: a signed attestation
    policy: str | None = None  # NAME@SHA256 of the policy it is made under (registry.policy), in its lineage

    def load_signer(self):
        """The private key (None: no signature), read from disk only when publishing signs: it is never held in
        memory before the code checks, which run generated programs."""
        from .registry import attest

        return attest.load_signing_key(self.signing_key)

    def default_run_name(self, new_version: str | None = None) -> str:
        """What the run did, to tell runs apart in a list: ``unlearn tiny-lm v1→v4 code.jsonl/prose.txt``."""
        parent = self.parent
        source = f"{parent.registered_name} v{parent.version}" if parent.is_registered else _short_spec(parent.uri)
        arrow = f"→v{new_version}" if new_version else ""
        retain = _short_spec(self.retain) if self.retain else f"all but {self.data.forget_classes}"
        forget = _short_spec(self.forget) + (f" [{self.data.forget_classes}]" if self.data.forget_classes else "")
        return f"unlearn {source}{arrow} {forget}/{retain}"

    def full_config(self) -> dict:
        return recipe_config(self.config, self.data, self.evidence, self.trust_remote_code)


def recipe_config(config: PruneConfig, data: DataOptions, evidence: EvidenceOptions, trust_remote_code: bool) -> dict:
    """Every setting that decides a prune's result, as its ``selprune.config_sha256`` digests them (a policy
    recomputes it from its recipe)."""
    return {
        "prune": config.to_dict(),
        "data": data.to_dict(),
        "evidence": evidence.to_dict(),
        "trust_remote_code": trust_remote_code,
    }


@dataclass
class Loaded:
    """What a job works on, loaded before any run exists: the parent model, its digest, the data."""

    model: Any
    tokenizer: Any
    parent_digest: str | None
    forget: Any  # data.batching.PreparedData, or the model kind's own prepared data
    retain: Any


def _short_spec(spec: str) -> str:
    """A DATA spec or model path as a short name: its last path component (``builtin:...`` as it is)."""
    return spec if ":" in spec and not spec.startswith("/") else (spec.rstrip("/").rsplit("/", 1)[-1] or spec)


def plan_prune(
    model_uri: str,
    forget: str,
    retain: str | None,
    *,
    config: PruneConfig | None = None,
    data: DataOptions | None = None,
    evidence: EvidenceOptions | None = None,
    register: bool = True,
    register_as: str | None = None,
    alias: str | None = None,
    storage: str = "full",
    device: str | None = None,
    dtype: str | None = None,
    run_name: str | None = None,
    trust_remote_code: bool = False,
    signing_key: str | None = None,
    policy: str | None = None,
) -> PrunePlan:
    """Plan: every check and resolution of a prune job (options, names, key, data paths, the parent and its
    verification, the permission to register); reads the registry, writes nothing. Bad input raises here."""
    from .registry import attest, loading
    from .registry.resolve import check_alias, check_can_add_versions, check_registered_name, resolve

    config = (config or PruneConfig()).validate(has_evaluate=True)
    data = (data or DataOptions()).validate()
    evidence = (evidence or EvidenceOptions()).validate()
    check_alias(alias)
    check_registered_name(register_as)
    attest.load_signing_key(signing_key)  # a bad key answers here; it is read again only to sign
    if storage not in STORAGES:
        raise BadInputError(f"--storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    check_data_specs(forget, retain, data)
    parent = resolve(model_uri)
    loading.fetch_verified(parent, "prune")  # downloaded once, verified; load_inputs loads this very copy
    if storage == "delta" and not parent.is_registered:
        raise BadInputError(
            f"--storage delta needs a registered parent (models:/NAME/VERSION or @ALIAS) that stays "
            f"addressable; '{model_uri}' is not one: use --storage full"
        )
    target_name = _target_name(parent, register_as, register)
    if target_name:
        check_can_add_versions(target_name)  # a user who could not register is refused before the run exists
    return PrunePlan(
        parent,
        forget,
        retain,
        config,
        data,
        evidence,
        target_name,
        alias,
        storage,
        device,
        dtype,
        run_name,
        trust_remote_code,
        signing_key,
        policy,
    )


def load_inputs(plan: PrunePlan, accelerator=None, phases: "_Phases | None" = None) -> Loaded:
    """Execute, first part: load the parent (its weights checked against its verified digest) and the data.
    Still before any run: a failure here writes nothing."""
    from .engine.architecture import check_kinds, find_architecture
    from .registry import lineage, verify

    phases = phases or _Phases()
    if _is_main(accelerator):
        logger.info("loading %s", plan.parent.canonical_uri)
    model, tokenizer = _load(plan.parent, plan.device, plan.dtype, plan.trust_remote_code, accelerator)
    check_kinds(find_architecture(model), plan.config)
    check_code_tasks(plan.evidence, model)
    phases.lap("load")
    # the parent as loaded, before pruning: every version records it, so a later change to the parent shows
    parent_digest = lineage.weights_sha256(model) if _is_main(accelerator) else None
    if parent_digest is not None and plan.dtype is None:
        verify.require_weights(plan.parent, parent_digest, "prune")
    phases.lap("digest")
    forget_data, retain_data = load_datasets(
        tokenizer,
        plan.forget,
        plan.retain,
        plan.data,
        plan.trust_remote_code,
        model=model,
        select_part=plan.config.budget_mode,
    )
    phases.lap("data")
    return Loaded(model, tokenizer, parent_digest, forget_data, retain_data)


def run_prune(
    model_uri: str,
    forget: str,
    retain: str | None,
    *,
    accelerator=None,
    progress: bool = True,
    **options,
) -> UnlearnResult:
    """Pull ``model_uri``, prune it to forget ``forget`` while keeping ``retain``, log and register the result.

    Three stages: ``plan_prune`` (``options`` are its keywords: ``config``, ``data``, ``evidence``,
    ``register``, ``register_as``, ``alias``, ``storage``, ``device``, ``dtype``, ``run_name``,
    ``trust_remote_code``, ``signing_key``), execute (``load_inputs``, then ``execute_prune`` inside the
    run) and ``publish``. ``storage="delta"`` logs only the masks (and changed biases) against the registered
    parent; a ``signing_key`` (PEM Ed25519 path, default ``$SELPRUNE_SIGNING_KEY``) signs an attestation.
    """
    from .registry import tracking

    plan = plan_prune(model_uri, forget, retain, **options)
    phases = _Phases()
    loaded = load_inputs(plan, accelerator, phases)
    with tracking.job_run(plan.run_name or plan.default_run_name(), "prune", enabled=_is_main(accelerator)) as run:
        if run is not None:
            tracking.log_inputs(
                parent=plan.parent,
                forget=loaded.forget,
                retain=loaded.retain,
                params=_params(plan.parent, plan.forget, plan.retain, plan.full_config(), loaded.model),
            )
        on_step = None
        if run is not None:
            on_step = functools.partial(tracking.log_step, prefix="select_" if plan.config.budget_mode else "")
        result, metrics = execute_prune(plan, loaded, accelerator, progress, on_step)
        phases.lap("prune_and_evidence")
        phases.add_steps(result.steps)
        if run is None:
            return UnlearnResult(None, None, plan.parent.canonical_uri, metrics, result)
        tables = {SAMPLES_ARTIFACT: behaviour_samples(plan, loaded, result)}
        phases.lap("samples")
        if plan.evidence.code_tasks:
            checked, tables[CHECKS_ARTIFACT] = functional_evidence(plan, loaded, result)
            metrics.update(checked)
            phases.lap("code_tasks")
        return publish(plan, loaded, result, metrics, run.info.run_id, phases, tables)


def execute_prune(plan: PrunePlan, loaded: Loaded, accelerator=None, progress: bool = True, on_step=None):
    """Execute: prune, then the random control and the relearning check; ``(PruneResult, metrics)``. A budget
    run that cannot meet its target raises here, before anything is published."""
    result, metrics = _prune_with_evidence(
        loaded.model, loaded.forget, loaded.retain, plan.config, plan.evidence, accelerator, progress, on_step=on_step
    )
    _check_budget_met(plan.config, result)
    return result, metrics


def behaviour_samples(plan: PrunePlan, loaded: Loaded, result) -> dict | None:
    """Execute, last part: what the parent, the unlearned model and the control answer on ``--samples`` eval
    examples a side (``evaluation.samples``); None with ``--samples 0``."""
    if not plan.evidence.samples:
        return None
    from .evaluation.samples import sample_table

    logger.info(
        "samples: what the parent, the unlearned model and the control answer (%d a side)", plan.evidence.samples
    )
    return sample_table(
        loaded.model,
        {"forget": loaded.forget, "retain": loaded.retain},
        loaded.tokenizer,
        n=plan.evidence.samples,
        seed=plan.config.seed,
        max_new_tokens=plan.evidence.sample_tokens,
        **_views(plan, loaded, result),
    )


def _views(plan: PrunePlan, loaded: Loaded, result) -> dict:
    """``parent_view`` and ``control_view`` (None with ``--no-control``) of the plan's model: see ``model_views``."""
    return model_views(loaded.model, result, plan.config.seed, plan.evidence.control)


def model_views(model, result, seed: int, control: bool) -> dict:
    """``parent_view`` and ``control_view`` (None without a control): context managers that turn the unlearned
    ``model`` into its parent or into the random control, for the evidence measured on all three."""
    from .engine import parent_restored, randomly_pruned

    return {
        "parent_view": lambda: parent_restored(model, result),
        "control_view": (lambda: randomly_pruned(model, result, seed=seed)) if control else None,
    }


def check_code_tasks(evidence: EvidenceOptions, model) -> None:
    """``--code-tasks`` needs a model that writes text, and the sandbox its code runs in (unless the user allows
    it without one); ``--quantized-check``, a weight GGUF would quantize: refused, before any run, otherwise."""
    from .evaluation.functional import refuse_without_sandbox
    from .kinds import kind_of

    kind = kind_of(model)
    if evidence.code_tasks and not kind.writes_text:
        raise BadInputError(
            f"--code-tasks applies to causal language models (they write code); {type(model).__name__} is a "
            f"{kind.name}: drop --code-tasks"
        )
    if evidence.code_tasks:
        refuse_without_sandbox(evidence.allow_unsandboxed_code)
    if evidence.quantized_formats():
        from .engine.architecture import find_architecture
        from .evaluation.quantized import quantizable_weights

        quantized = {id(weight) for weight, _ in quantizable_weights(model)}
        arch = find_architecture(model)
        if not any(id(p.weight) in quantized for kind in ("ff", "attn") for p in arch.projections(kind)):
            raise BadInputError(
                f"--quantized-check: no weight that pruning edits in this {type(model).__name__} would be quantized "
                "(GGUF quantizes Linear weights whose rows are a multiple of 32 long; convolutions stay in floating "
                "point), so the check would measure nothing of the unlearning: drop --quantized-check"
            )


def functional_evidence(plan: PrunePlan, loaded: Loaded, result) -> tuple[dict, dict]:
    """Execute, ``--code-tasks``: the Python tasks and the English cloze prompts on the parent, the unlearned
    model and the control (``evaluation.functional``); ``(metrics, table)``."""
    from .evaluation.functional import functional_checks

    logger.info("code tasks and cloze prompts: the parent, the unlearned model and the control")
    return functional_checks(
        loaded.model,
        loaded.tokenizer,
        **_views(plan, loaded, result),
        allow_unsandboxed=plan.evidence.allow_unsandboxed_code,
    )


def _describe(plan: PrunePlan, run_id: str, tags: dict, metrics: dict, result, tables, model_uri: str) -> str:
    """What a person reads, written before the version exists (so nothing that can fail is left for after it):
    the description the version is created with, the run's note and ``selprune/report.html``. The version's
    number is not known yet: they call it ``models:/NAME/<this version>``, the report's lineage starts with the
    logged model (the files the version will point at), and ``_number_the_version`` writes the number in."""
    import mlflow

    from .registry import describe, lineage

    description = describe.version_markdown(_unnumbered(plan), tags, metrics, plan.full_config())
    mlflow.set_tag("mlflow.note.content", description)
    _log_report(
        f"{_unnumbered(plan)}: what was unlearned",
        description,
        result,
        metrics,
        tables,
        [model_uri, plan.parent.canonical_uri, tags[lineage.ROOT]],
    )
    return description


def _unnumbered(plan: PrunePlan) -> str:
    return f"models:/{plan.target_name}/<this version>"


def _number_the_version(plan: PrunePlan, registered: str, run_id: str, tags: dict, metrics: dict) -> None:
    """Once the version exists: its number into its description, the run's note and the run's name. The
    version is complete without them, so a failure here is a warning naming it."""
    import mlflow

    from .registry import describe
    from .registry.tracking import after_registration

    name, version = registered.removeprefix("models:/").rsplit("/", 1)
    describe.write(name, version, run_id, describe.version_markdown(registered, tags, metrics, plan.full_config()))
    active = mlflow.active_run()
    if plan.run_name is None and active is not None and active.info.run_name == plan.default_run_name():
        named = plan.default_run_name(version)
        after_registration(registered, f"name its run {named!r}", lambda: mlflow.set_tag("mlflow.runName", named))


def _log_report(title: str, description: str, result, metrics: dict, tables: dict, chain: list[str]):
    """``selprune/report.html``: the description, the frontier with the control, the tables and the chain."""
    import tempfile
    from pathlib import Path

    import mlflow

    from .report import html_report, plot_pruning, plot_relearning

    with tempfile.TemporaryDirectory() as tmp:
        plot = plot_pruning(result, metrics, Path(tmp) / "plot.png").read_bytes()
        relearning = None
        if result.relearn_curve is not None:
            relearning = plot_relearning(result.relearn_curve, Path(tmp) / "relearning.png").read_bytes()
    mlflow.log_text(
        html_report(
            title=title,
            description=description,
            plot_png=plot,
            samples=tables.get(SAMPLES_ARTIFACT),
            checks=tables.get(CHECKS_ARTIFACT),
            relearning_png=relearning,
            chain=[uri for i, uri in enumerate(chain) if uri not in chain[:i]],
        ),
        "selprune/report.html",
    )


def publish(
    plan: PrunePlan, loaded: Loaded, result, metrics: dict, run_id: str, phases: "_Phases", tables: dict | None = None
) -> UnlearnResult:
    """Publish: log the model and the evidence, the manifest, the lineage tags (anchored), the signed
    attestation, the description and the report, then register the version (with its tags and description in
    one request) and move the alias. Whatever fails before the version exists leaves no version; whatever
    follows it is a warning naming it."""
    import mlflow

    from .registry import lineage, manifest, tracking

    logger.info("logging the unlearned model to run %s", run_id)
    weights_digest = lineage.weights_sha256(loaded.model)
    phases.lap("digest")
    model_info, artifacts = tracking.log_unlearned_model(
        loaded.model,
        loaded.tokenizer,
        result,
        metrics,
        extra_record=_extra_record(metrics, plan.evidence, result),
        delta=_delta_record(plan, loaded, weights_digest),
    )
    if result.relearn_curve is not None:
        tracking.log_relearn_curve(result.relearn_curve)
    manifest_digest = manifest.log(run_id, model_info.model_uri)
    tables = {path: table for path, table in (tables or {}).items() if table is not None}
    for path, table in tables.items():
        mlflow.log_table(data=table, artifact_file=path)
    phases.lap("log_model")
    tags = _publish_tags(plan, loaded, result, metrics, run_id, weights_digest, artifacts, manifest_digest)
    signer = plan.load_signer()  # read once, now that the code checks are done
    if signer is not None:
        tags[lineage.ATTESTATION_SHA] = _attest(plan, run_id, model_info.model_uri, tags, signer)
    mlflow.set_tags({lineage.CONFIG_SHA: tags[lineage.CONFIG_SHA], lineage.WEIGHTS_SHA: tags[lineage.WEIGHTS_SHA]})
    registered = None
    if plan.target_name:
        registered = _register(plan, plan.target_name, model_info, run_id, tags, metrics, result, tables, signer)
    phases.lap("register")
    return UnlearnResult(
        run_id, registered, plan.parent.canonical_uri, metrics, result, tags, plan.alias, phases.seconds
    )


def _delta_record(plan: PrunePlan, loaded: Loaded, weights_digest: str) -> dict | None:
    """What a delta keeps to be rebuilt and checked against its parent; None for a full copy."""
    if plan.storage != "delta":
        return None
    return {
        "parent_uri": plan.parent.canonical_uri,
        "parent_weights_sha256": loaded.parent_digest,
        "weights_sha256": weights_digest,
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
    }


def _publish_tags(
    plan: PrunePlan, loaded: Loaded, result, metrics: dict, run_id: str, weights_digest: str, artifacts, manifest_digest
) -> dict:
    """The lineage tags of the new version: what it was made from, how, and the digests of what was logged."""
    from .registry import lineage

    return lineage.build_tags(
        parent=plan.parent,
        run_id=run_id,
        forget=loaded.forget,
        retain=loaded.retain,
        config=plan.full_config(),
        weights_digest=weights_digest,
        ff_pruned=result.ff_pruned,
        attn_pruned=result.attn_pruned,
        ff_pruned_total=result.ff_pruned_total,
        attn_pruned_total=result.attn_pruned_total,
        metrics=metrics,
        plugin_version=__version__,
        trust_remote_code=plan.trust_remote_code,
        storage=plan.storage,
        parent_weights_digest=loaded.parent_digest,
        artifacts=artifacts,
        manifest_digest=manifest_digest,
        policy=plan.policy,
    )


def _attest(plan: PrunePlan, run_id: str, model_uri: str, tags: dict, signer) -> str:
    """Sign what the tags say, before the version exists; returns the statement's digest for its tag."""
    from .registry import attest, lineage

    return attest.log_unlearning(run_id, model_uri, tags, plan.parent.tags.get(lineage.MANIFEST_SHA), signer)


def _register(
    plan: PrunePlan, name: str, model_info, run_id: str, tags: dict, metrics: dict, result, tables: dict, signer
) -> str:
    """Describe, register a version of ``name`` (with its tags and description), record the alias move (signed
    with ``signer`` when there is one) and number the version: what follows the registration is a warning
    naming the version, never a failure."""
    from .registry import tracking

    description = _describe(plan, run_id, tags, metrics, result, tables, model_info.model_uri)
    registered = tracking.register(model_info, name, run_id, tags, plan.alias, description)
    if plan.alias:  # recorded as a gate records its move: the audit explains each alias by such a record
        from .registry.gate import record_registration

        record_registration(registered, plan.alias, signer)
    _number_the_version(plan, registered, run_id, tags, metrics)
    return registered


def _prune_with_evidence(model, forget_data, retain_data, config, evidence, accelerator, progress, on_step):
    """Prune, then measure the random control and (opt-in) the relearning check beside the result.

    A budget run stops on the select parts; its reported metrics (parent and result alike) are then
    measured on the eval parts, which no choice has seen.
    """
    from .engine import parent_restored, prune
    from .evaluation.drops import control_metrics, summary_metrics

    evaluate_fn = make_evaluate_fn(forget_data, retain_data, accelerator, progress)
    stop_fn = (
        make_evaluate_fn(forget_data, retain_data, accelerator, progress, part="select")
        if config.budget_mode
        else evaluate_fn
    )
    result = prune(
        model,
        forget_data.collect_batches,
        retain_data.collect_batches,
        config,
        evaluate_fn=stop_fn,
        on_step=on_step,
        accelerator=accelerator,
        progress=progress,
    )
    if config.budget_mode:
        result.select_metrics = {"baseline": result.baseline_metrics, "final": result.final_metrics}
        result.final_metrics = evaluate_fn(model)
        with parent_restored(model, result):
            result.baseline_metrics = evaluate_fn(model)
    metrics = summary_metrics(result.baseline_metrics, result.final_metrics)
    say = logger.info if _is_main(accelerator) else logger.debug
    seen_as = model_views(model, result, config.seed, evidence.control)
    views = {"unlearned": (model, contextlib.nullcontext), "parent": (model, seen_as["parent_view"])}
    start = {"unlearned": metrics["forget_top1"], "parent": metrics["parent_forget_top1"]}  # before fine-tuning
    if evidence.control:
        say("the random control: as many neurons per kind and layer, at random, measured on the eval data")
        with seen_as["control_view"]():
            control = evaluate_fn(model)
        metrics.update(control_metrics(result.baseline_metrics, control))
        views["control"], start["control"] = (model, seen_as["control_view"]), control["forget_top1"]
    if evidence.quantized_formats():
        from .evaluation.quantized import quantized_metrics

        metrics.update(quantized_metrics(evaluate_fn, evidence.quantized_formats(), metrics, views))
    if evidence.relearn_steps:
        say(f"relearning check: {evidence.relearn_steps} fine-tuning steps on each of the {', '.join(views)}")
        result.relearn_curve, relearned = relearning_check(
            views, start, forget_data, retain_data, evidence, config.seed, accelerator, progress
        )
        metrics.update(relearned)
    return result, metrics


def _extra_record(metrics: dict, evidence: EvidenceOptions, result) -> dict:
    """The evidence, and for a budget run which split each number comes from."""
    record: dict[str, dict] = {
        "evidence": {
            "options": evidence.to_dict(),
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("control_", "relearn_", "quantized_"))},
        }
    }
    if result.relearn_curve is not None:
        record["evidence"]["relearn_curve"] = result.relearn_curve
    if result.select_metrics is not None:
        record["splits"] = {
            "steps": "select",
            "baseline_metrics": "eval",
            "final_metrics": "eval",
            "select_metrics": result.select_metrics,
        }
    return record


def _target_name(parent, register_as: str | None, register: bool) -> str | None:
    if not register:
        return None
    name = register_as or parent.registered_name
    if not name:
        raise BadInputError(
            f"'{parent.uri}' is not a registered model, so there is no name to register the result under; "
            "pass --register-as NAME (or --no-register)"
        )
    return name


def _check_budget_met(config: PruneConfig, result) -> None:
    """A budget run that stopped short of its forget target (on the select parts it stops on) registers nothing."""
    if config.target_forget_drop is None:
        return
    kept = [step["forget_drop"] for step in result.steps if step.get("kept") and "forget_drop" in step]
    reached = kept[-1] if kept else 0.0
    if not reached >= config.target_forget_drop:
        raise BadInputError(
            f"the budget cannot be met: forget {config.budget_metric} dropped {reached:.1%} "
            f"(target {config.target_forget_drop:.1%}) when pruning stopped ({result.stop_reason}); "
            "raise --max-retain-drop or --max-steps, or lower --target-forget-drop"
        )


def _load(parent, device, dtype, trust_remote_code, accelerator):
    """The parent's model and tokenizer; an unsupported architecture fails here, before any run exists."""
    from .engine.architecture import find_architecture
    from .registry.loading import load_components

    def load():
        return load_components(
            parent,
            device=device or (str(accelerator.device) if accelerator else None),
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )

    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.main_process_first():
            model, tokenizer = load()
    else:
        model, tokenizer = load()
    find_architecture(model)
    return model, tokenizer


def _params(parent, forget: str, retain: str | None, full_config: dict, model=None) -> dict:
    """Run params: the inputs as typed, the version an alias resolved to, and every setting that applies to the
    model's kind (no image budgets for a language model, no token budgets for an image classifier)."""
    from .kinds import kind_of

    unused = kind_of(model).unused_data_options if model is not None else ()
    params = {
        "model_uri": parent.uri,
        "model_version_uri": parent.canonical_uri,
        "forget": forget,
        "retain": retain,
        "trust_remote_code": full_config["trust_remote_code"],
    }
    params.update(full_config["prune"])
    for key, value in full_config["data"].items():
        if key in unused:
            continue
        if isinstance(value, dict):
            params.update({f"data_{key}_{k}": v for k, v in value.items() if v is not None})
        else:
            params[f"data_{key}"] = value
    params.update({f"evidence_{k}": v for k, v in full_config["evidence"].items()})
    return params


def run_evaluate(
    model_uri: str,
    forget: str,
    retain: str,
    *,
    data: DataOptions | None = None,
    evidence: EvidenceOptions | None = None,
    parent_model_uri: str | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    run_name: str | None = None,
    trust_remote_code: bool = False,
    accelerator=None,
    progress: bool = True,
) -> UnlearnResult:
    """Forget/retain metrics of one model, logged to a run; nothing is registered.

    With ``evidence.relearn_steps``, the relearning check runs too (against
    ``parent_model_uri`` when given, for the recovery figure); with ``evidence.code_tasks``, the Python tasks
    and the cloze prompts (of the parent too, when given).
    """
    import mlflow

    from .registry import loading, tracking
    from .registry.resolve import resolve

    data = (data or DataOptions()).validate()
    evidence = (evidence or EvidenceOptions(control=False)).validate()
    check_data_specs(forget, retain, data)
    resolved = resolve(model_uri)
    parent = resolve(parent_model_uri) if parent_model_uri else None
    for version in (resolved, parent):
        if version is not None:
            loading.fetch_verified(version, "evaluate")  # downloaded once, verified; loaded from this copy
    model, tokenizer = _load_verified(resolved, device, dtype, trust_remote_code, accelerator)
    check_code_tasks(evidence, model)
    parent_model = _load_verified(parent, device, dtype, trust_remote_code, accelerator)[0] if parent else None
    forget_data, retain_data = load_datasets(tokenizer, forget, retain, data, trust_remote_code, model=model)
    evaluate_fn = make_evaluate_fn(forget_data, retain_data, accelerator, progress)
    with tracking.job_run(run_name, "evaluate", enabled=_is_main(accelerator)) as run:
        if run is not None:
            mlflow.set_tag("selprune.evaluated_model_uri", resolved.canonical_uri)
            full_config = {
                "data": data.to_dict(),
                "evidence": evidence.to_dict(),
                "trust_remote_code": trust_remote_code,
                "prune": {"seed": seed},
            }
            tracking.log_inputs(
                parent=resolved,
                forget=forget_data,
                retain=retain_data,
                params=_params(resolved, forget, retain, full_config, model),
            )
        metrics = _measured(model, parent_model, evaluate_fn, evidence)
        curve = None
        if evidence.relearn_steps:
            data_sides = (forget_data, retain_data)
            curve = _relearned(model, parent_model, metrics, data_sides, evidence, seed, accelerator, progress)
        if run is not None:
            metrics.update(_code_tasks_only(model, parent_model, tokenizer, evidence) if evidence.code_tasks else {})
            mlflow.log_metrics(tracking.finite(metrics))
            if curve is not None:
                tracking.log_relearn_curve(curve)
                mlflow.log_dict(curve, "selprune/relearning.json")
    return UnlearnResult(run.info.run_id if run is not None else None, None, resolved.canonical_uri, metrics)


def _measured(model, parent_model, evaluate_fn, evidence: EvidenceOptions) -> dict:
    """``evaluate``'s metrics of the model (with drops against the parent when there is one) and, with
    ``--quantized-check``, of both again after each round trip."""
    from .evaluation.drops import summary_metrics
    from .evaluation.quantized import quantized_metrics

    metrics = evaluate_fn(model)
    views = {"unlearned": (model, contextlib.nullcontext)}
    if parent_model is not None:
        metrics = summary_metrics(evaluate_fn(parent_model), metrics)
        views["parent"] = (parent_model, contextlib.nullcontext)
    return metrics | quantized_metrics(evaluate_fn, evidence.quantized_formats(), metrics, views)


def _code_tasks_only(model, parent_model, tokenizer, evidence: EvidenceOptions) -> dict:
    """``evaluate --code-tasks``: the pass rate and cloze accuracy of the model (and of the parent as
    ``parent_*``), each task's outcome in the run's table."""
    import mlflow

    from .evaluation.functional import check_model, outcomes_table

    logger.info("code tasks and cloze prompts")
    models = {"model": model} if parent_model is None else {"parent": parent_model, "model": model}
    checked = {name: check_model(m, tokenizer, evidence.allow_unsandboxed_code) for name, m in models.items()}
    mlflow.log_table(data=outcomes_table(checked), artifact_file=CHECKS_ARTIFACT)
    return {
        key: value
        for name, outcome in checked.items()
        for key, value in outcome.metrics("parent_" if name == "parent" else "").items()
    }


def _load_verified(version, device, dtype, trust_remote_code, accelerator):
    """``(model, preprocessor)`` whose weights, as loaded in their stored dtype, are the verified ones (with
    another ``dtype`` they are not compared), before any run exists."""
    from .registry import verify
    from .registry.lineage import weights_sha256

    model, preprocessor = _load(version, device, dtype, trust_remote_code, accelerator)
    if dtype is None and _is_main(accelerator):
        verify.require_weights(version, weights_sha256(model), "evaluate")
    return model, preprocessor


def _relearned(model, parent_model, metrics: dict, data: tuple, evidence, seed: int, accelerator, progress) -> dict:
    """``evaluate --relearn-steps``: the curve of the model (and of the parent, when given), its last point
    added to ``metrics``."""
    models = {"unlearned": (model, contextlib.nullcontext)}
    start = {"unlearned": metrics["forget_top1"]}
    if parent_model is not None:
        models["parent"] = (parent_model, contextlib.nullcontext)
        start["parent"] = metrics["parent_forget_top1"]
    forget_data, retain_data = data
    curve, relearned = relearning_check(models, start, forget_data, retain_data, evidence, seed, accelerator, progress)
    metrics.update(relearned)
    return curve


def relearning_check(models, start, forget_data, retain_data, evidence, seed, accelerator, progress):
    """``(curve, metrics)``: the relearning curve (``evaluation.relearning``) of ``models`` on the forget collect
    documents, measured on the forget eval split, and its last point with the check's steps and rate beside it
    (``relearn_steps``, ``relearn_lr``: what the gate reads a recovery with)."""
    from .evaluation.relearning import curve_metrics, relearning_curve

    forget_only = make_evaluate_fn(forget_data, retain_data, accelerator, progress, sides=("forget",))
    settings = dict(
        steps=evidence.relearn_steps,
        lr=evidence.relearn_lr,
        seed=seed,
        masking=getattr(forget_data, "masking", None),
        batch_size=evidence.relearn_batch_size,
    )
    curve = relearning_curve(
        forget_only, models, forget_data.collect_batches, start, evidence.relearn_points(), settings
    )
    return curve, curve_metrics(curve) | {"relearn_steps": evidence.relearn_steps, "relearn_lr": evidence.relearn_lr}


def run_materialize(
    model_uri: str,
    *,
    register_as: str | None = None,
    alias: str | None = None,
    run_name: str | None = None,
    signing_key: str | None = None,
) -> UnlearnResult:
    """Turn a delta version into a full one: rebuilt and checked, logged whole, registered with the same lineage.

    For anyone about to delete a delta's parent. The new version's tags are the delta's (parent, root,
    data, digests, metrics), with ``selprune.storage=full``, its own run, and ``selprune.materialized_from``;
    its run holds its own lineage record and copies of the masks, scores and record, with their digests.
    """
    import mlflow

    from .registry import attest, describe, lineage, manifest, tracking
    from .registry.flavor import components, log_model
    from .registry.loading import fetch_verified, load_components
    from .registry.resolve import check_alias, check_can_add_versions, check_registered_name, resolve

    check_alias(alias)
    check_registered_name(register_as)
    signer = attest.load_signing_key(signing_key)
    resolved = _delta_version(model_uri)
    local = fetch_verified(resolved, "materialize")  # its lineage and record files are copied: never edited ones
    target = register_as or resolved.registered_name or ""  # a delta is always a registered version
    check_can_add_versions(target)
    model, tokenizer = load_components(resolved)  # rebuilt from its parent (verified first), both digests checked
    with tracking.job_run(run_name, "materialize") as run:
        mlflow.set_tag(lineage.PREFIX + "materialized_from", resolved.canonical_uri)
        files = _log_record_files(local)
        model_info = log_model(components(model, tokenizer), name="model", pruning_files=files)
        manifest_digest = manifest.log(run.info.run_id, model_info.model_uri)
        tags = _materialized_tags(resolved, run.info.run_id, files, manifest_digest)
        if signer is not None:
            parent_manifest = resolve(tags[lineage.PARENT]).tags.get(lineage.MANIFEST_SHA)
            tags[lineage.ATTESTATION_SHA] = attest.log_unlearning(
                run.info.run_id, model_info.model_uri, tags, parent_manifest, signer
            )
        description = describe.materialized(resolved)
        mlflow.set_tag("mlflow.note.content", description)  # before the version, which is created with it
        registered = tracking.register(model_info, target, run.info.run_id, tags, alias, description)
        if alias:
            from .registry.gate import record_registration

            record_registration(registered, alias, signer)
    return UnlearnResult(run.info.run_id, registered, tags.get(lineage.PARENT, ""), {}, None, tags, alias)


def _delta_version(model_uri: str):
    """The version to materialize, which must be a registered delta (a full copy has nothing to rebuild)."""
    from .registry import lineage
    from .registry.resolve import resolve

    resolved = resolve(model_uri)
    if not resolved.is_registered or resolved.tags.get(lineage.STORAGE) != "delta":
        raise BadInputError(
            f"'{model_uri}' is not a delta version (selprune.storage=delta); only deltas are materialized"
        )
    return resolved


def _log_record_files(local) -> dict[str, str]:
    """Copy the delta's record, masks and scores (those it has) from its verified download into this run,
    where `lineage --verify` checks them against their digests; returns ``{name: local path}``."""
    import mlflow

    record_files = {"record": "pruning_record.json", "masks": "masks.safetensors", "scores": "scores.safetensors"}
    files = {
        name: str(local / "selprune" / file)
        for name, file in record_files.items()
        if (local / "selprune" / file).is_file()
    }
    for path in files.values():
        mlflow.log_artifact(path, artifact_path="selprune")
    return files


def _materialized_tags(resolved, run_id: str, files: dict[str, str], manifest_digest: str) -> dict:
    """The delta's lineage tags, made the full version's: its own run, manifest and record digests, and the
    delta it was made from; the delta's statement is dropped, for it names the delta's files, not these."""
    from .registry import lineage

    tags = lineage.lineage_tags(resolved.tags)
    tags.pop(lineage.ARTIFACTS_SHA, None)
    if files:
        tags[lineage.ARTIFACTS_SHA] = lineage.canonical_json(lineage.artifact_digests(files))
    tags[lineage.MANIFEST_SHA] = manifest_digest
    tags.update(
        {
            lineage.STORAGE: "full",
            lineage.RUN_ID: run_id,
            lineage.PREFIX + "materialized_from": resolved.canonical_uri,
            lineage.COMPLETE: "true",
        }
    )
    tags.pop(lineage.ATTESTATION_SHA, None)
    return tags
