"""One unlearning run end to end: registry model in, pruned and registered version out.

Order matters for the registry's integrity: every input is checked and
loaded before a run starts; the model, its artifacts and metrics are logged
before anything is registered; the version is created with all of its lineage
tags in one request; the alias moves last. A failure at any point leaves no
version, or a complete one.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelInput

from . import __version__, lineage
from .data import PreparedData, prepare_data
from .evaluation import evaluate_model, relative_drops, selectivity
from .pruning import PruneConfig, PruneResult, prune
from .registry import BadInputError, ResolvedModel, client, load_components, resolve

logger = logging.getLogger(__name__)


@dataclass
class DataOptions:
    """How forget/retain DATA become token batches (shared by both datasets)."""

    max_length: int = 128
    batch_size: int = 16
    collect_tokens: int = 20_000
    eval_tokens: int = 10_000
    text_column: str | None = None
    glob: str | None = None
    paragraphs: bool = False
    split: str | None = None
    config: str | None = None
    revision: str | None = None

    def validate(self) -> None:
        for name in ("max_length", "batch_size", "collect_tokens", "eval_tokens"):
            if getattr(self, name) < 1:
                raise BadInputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise BadInputError("max-length must be >= 2: next-token metrics need two tokens")


@dataclass
class UnlearnResult:
    """What a finished run produced (``model_uri`` is None when nothing was registered)."""

    run_id: str | None
    model_uri: str | None
    parent_uri: str
    metrics: dict
    pruning: PruneResult | None = None
    tags: dict = field(default_factory=dict)
    alias: str | None = None


def _is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def load_datasets(tokenizer, forget: str, retain: str, options: DataOptions, trust_remote_code: bool = False):
    """Prepare forget and retain data; refuse the same data on both sides."""
    kwargs = dict(
        max_length=options.max_length, batch_size=options.batch_size,
        collect_tokens=options.collect_tokens, eval_tokens=options.eval_tokens,
        text_column=options.text_column, glob=options.glob, paragraphs=options.paragraphs,
        split=options.split, config=options.config, revision=options.revision,
        trust_remote_code=trust_remote_code,
        # fewer tokens than one full batch cannot give meaningful statistics or metrics
        min_tokens=min(options.batch_size * options.max_length, options.collect_tokens, options.eval_tokens),
    )
    forget_data = prepare_data(forget, tokenizer, **kwargs)
    retain_data = prepare_data(retain, tokenizer, **kwargs)
    if forget_data.digest == retain_data.digest:
        raise BadInputError(
            f"forget and retain are the same data ({forget} and {retain} have digest {forget_data.digest[:12]}); "
            "pass different datasets"
        )
    return forget_data, retain_data


def make_evaluate_fn(forget: PreparedData, retain: PreparedData, accelerator=None, progress: bool = True):
    """Forget and retain metrics on the eval parts (documents that never feed the statistics)."""

    def evaluate_fn(model) -> dict:
        logger.info("evaluating forget and retain metrics")
        metrics = evaluate_model(model, forget.eval_batches, skip_token_ids=forget.skip_token_ids,
                                 prefix="forget_", accelerator=accelerator, progress=progress)
        metrics.update(evaluate_model(model, retain.eval_batches, skip_token_ids=retain.skip_token_ids,
                                      prefix="retain_", accelerator=accelerator, progress=progress))
        return metrics

    return evaluate_fn


def summary_metrics(baseline: dict, final: dict) -> dict:
    """Final metrics plus relative drops vs the parent and the selectivity figure."""
    out = {k: v for k, v in final.items()}
    out.update({f"parent_{k}": v for k, v in baseline.items()})
    out.update(relative_drops(baseline, final, "forget_"))
    out.update(relative_drops(baseline, final, "retain_"))
    out["selectivity"] = selectivity(out["forget_top1_drop"], out["retain_top1_drop"])
    return out


def _log_dataset(data: PreparedData, context: str) -> None:
    dataset = mlflow.data.from_huggingface(data.documents, name=data.spec, digest=data.digest[:32])
    mlflow.log_input(dataset, context=context, tags={"selprune.digest": data.digest})


def _plot(result: PruneResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, forget, retain = [0], [result.baseline_metrics.get("forget_top1")], [result.baseline_metrics.get("retain_top1")]
    for record in result.steps:
        if "metrics" in record and record["kept"]:
            steps.append(record["step"])
            forget.append(record["metrics"]["forget_top1"])
            retain.append(record["metrics"]["retain_top1"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, forget, "o-", color="tab:red", label="forget top-1")
    ax.plot(steps, retain, "s-", color="tab:blue", label="retain top-1")
    ax.set_xlabel("pruning step")
    ax.set_ylabel("next-token top-1 accuracy")
    ax.set_title("Selective pruning: forget vs retain")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _existing_version(name: str, run_id: str):
    """A version this run already registered (a retried job must not register twice)."""
    for mv in client().search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if mv.tags.get(lineage.COMPLETE) == "true" and mv.tags.get(lineage.RUN_ID) == run_id:
            return mv
    return None


def _target_name(parent: ResolvedModel, register_as: str | None, register: bool) -> str | None:
    if not register:
        return None
    name = register_as or parent.registered_name
    if not name:
        raise BadInputError(
            f"'{parent.uri}' is not a registered model, so there is no name to register the result under; "
            "pass --register-as NAME (or --no-register)"
        )
    return name


def run_prune(
    model_uri: str,
    forget: str,
    retain: str,
    *,
    config: PruneConfig | None = None,
    data: DataOptions | None = None,
    register: bool = True,
    register_as: str | None = None,
    alias: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    run_name: str | None = None,
    trust_remote_code: bool = False,
    accelerator=None,
    progress: bool = True,
) -> UnlearnResult:
    """Pull ``model_uri``, prune it to forget ``forget`` while keeping ``retain``, log and register the result."""
    config = config or PruneConfig()
    data = data or DataOptions()
    config.validate(has_evaluate=True)
    data.validate()
    parent = resolve(model_uri)
    target_name = _target_name(parent, register_as, register)
    model, tokenizer = _load(parent, device, dtype, trust_remote_code, accelerator)
    from .architecture import find_architecture

    find_architecture(model)  # an unsupported architecture fails here, before any run exists
    forget_data, retain_data = load_datasets(tokenizer, forget, retain, data, trust_remote_code)

    evaluate_fn = make_evaluate_fn(forget_data, retain_data, accelerator, progress)
    result = prune(model, forget_data.collect_batches, retain_data.collect_batches,
                   evaluate_fn=evaluate_fn, accelerator=accelerator, progress=progress, **asdict(config))
    metrics = summary_metrics(result.baseline_metrics, result.final_metrics)
    _check_budget_met(config, metrics, result)
    if not _is_main(accelerator):
        return UnlearnResult(None, None, parent.canonical_uri, metrics, result)
    return _log_and_register(model, tokenizer, parent, forget_data, retain_data, result, metrics, config, data,
                             target_name, alias, run_name)


def _check_budget_met(config: PruneConfig, metrics: dict, result: PruneResult) -> None:
    """A budget run that stopped short of its forget target registers nothing."""
    if config.target_forget_drop is None:
        return
    reached = metrics[f"forget_{config.budget_metric}_drop"]
    if reached < config.target_forget_drop:
        raise BadInputError(
            f"the budget cannot be met: forget {config.budget_metric} dropped {reached:.1%} "
            f"(target {config.target_forget_drop:.1%}) when pruning stopped ({result.stop_reason}); "
            "raise --max-retain-drop or --max-steps, or lower --target-forget-drop"
        )


def _load(parent, device, dtype, trust_remote_code, accelerator):
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.main_process_first():
            model, tokenizer = load_components(parent, device=device or str(accelerator.device), dtype=dtype,
                                               trust_remote_code=trust_remote_code)
        return model, tokenizer
    return load_components(parent, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def _params(model_uri, forget, retain, config: PruneConfig, data: DataOptions) -> dict:
    params = {"model_uri": model_uri, "forget": forget, "retain": retain}
    params.update({k: v for k, v in config.to_dict().items()})
    params.update({f"data_{k}": v for k, v in asdict(data).items()})
    return {k: ("None" if v is None else v) for k, v in params.items()}


def _log_and_register(model, tokenizer, parent, forget_data, retain_data, result, metrics, config, data,
                      target_name, alias, run_name) -> UnlearnResult:
    with mlflow.start_run(run_name=run_name) as run:
        run_id = run.info.run_id
        mlflow.set_tags({"selprune.parent_model_uri": parent.canonical_uri, "selprune.kind": "prune"})
        mlflow.log_params(_params(parent.uri, forget_data.spec, retain_data.spec, config, data))
        _log_dataset(forget_data, "forget")
        _log_dataset(retain_data, "retain")
        if parent.model_id:
            mlflow.log_input(model=LoggedModelInput(model_id=parent.model_id))
        warnings = forget_data.warnings + retain_data.warnings
        if warnings:
            mlflow.set_tag("selprune.data_warnings", " | ".join(warnings)[:4000])
        if result.baseline_metrics:
            mlflow.log_metrics(_finite(result.baseline_metrics), step=0)
        kept = [record for record in result.steps if record["kept"]]
        for record in kept[:-1]:  # the last kept step is logged below, with the summary and the model
            step_metrics = {"ff_pruned_total": record["ff_pruned_total"], "attn_pruned_total": record["attn_pruned_total"]}
            step_metrics.update(record.get("metrics", {}))
            mlflow.log_metrics(_finite(step_metrics), step=record["step"])
        logger.info("logging the unlearned model to run %s", run_id)
        with tempfile.TemporaryDirectory() as tmp:
            files = result.save(tmp)
            files["plot"] = _plot(result, Path(tmp) / "forget_vs_retain.png")
            for path in files.values():
                mlflow.log_artifact(str(path), artifact_path="selprune")
            from .flavor import log_model

            model_info = log_model({"model": model, "tokenizer": tokenizer}, name="model",
                                   pruning_files={k: str(v) for k, v in files.items() if k != "plot"})
        final = {"ff_pruned_total": result.ff_pruned, "attn_pruned_total": result.attn_pruned}
        final.update({k: v for k, v in metrics.items() if not k.startswith("parent_")})
        mlflow.log_metrics(_finite(final), step=kept[-1]["step"] if kept else 0, model_id=model_info.model_id)
        full_config = {"prune": config.to_dict(), "data": asdict(data)}
        tags = lineage.build_tags(
            parent=parent, run_id=run_id, forget=forget_data, retain=retain_data, config=full_config,
            weights_digest=lineage.weights_sha256(model), ff_pruned=result.ff_pruned,
            attn_pruned=result.attn_pruned, metrics=metrics, plugin_version=__version__,
        )
        mlflow.set_tags({lineage.CONFIG_SHA: tags[lineage.CONFIG_SHA], lineage.WEIGHTS_SHA: tags[lineage.WEIGHTS_SHA]})
        model_uri = None
        if target_name:
            mv = _existing_version(target_name, run_id)
            if mv is None:
                logger.info("registering a new version of '%s' with its lineage tags", target_name)
                mv = mlflow.register_model(model_info.model_uri, target_name, tags=tags)
            else:
                logger.info("run %s already registered %s version %s; not registering again", run_id, target_name, mv.version)
            model_uri = f"models:/{mv.name}/{mv.version}"
            mlflow.set_tag("selprune.registered_model_uri", model_uri)
            if alias:
                client().set_registered_model_alias(mv.name, alias, mv.version)
    return UnlearnResult(run_id, model_uri, parent.canonical_uri, metrics, result, tags, alias)


def _finite(metrics: dict) -> dict:
    import math

    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def run_evaluate(model_uri: str, forget: str, retain: str, *, data: DataOptions | None = None,
                 device: str | None = None, dtype: str | None = None, run_name: str | None = None,
                 trust_remote_code: bool = False, accelerator=None, progress: bool = True) -> UnlearnResult:
    """Forget/retain metrics of one model, logged to a run; nothing is registered."""
    data = data or DataOptions()
    data.validate()
    resolved = resolve(model_uri)
    model, tokenizer = _load(resolved, device, dtype, trust_remote_code, accelerator)
    forget_data, retain_data = load_datasets(tokenizer, forget, retain, data, trust_remote_code)
    metrics = make_evaluate_fn(forget_data, retain_data, accelerator, progress)(model)
    if not _is_main(accelerator):
        return UnlearnResult(None, None, resolved.canonical_uri, metrics)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({"selprune.kind": "evaluate", "selprune.evaluated_model_uri": resolved.canonical_uri})
        mlflow.log_params(_params(resolved.uri, forget_data.spec, retain_data.spec, PruneConfig(), data))
        _log_dataset(forget_data, "forget")
        _log_dataset(retain_data, "retain")
        if resolved.model_id:
            mlflow.log_input(model=LoggedModelInput(model_id=resolved.model_id))
        mlflow.log_metrics(_finite(metrics))
    return UnlearnResult(run.info.run_id, None, resolved.canonical_uri, metrics)


def format_summary(result: UnlearnResult) -> str:
    """A small table of parent vs unlearned metrics for the terminal."""
    m = result.metrics
    lines = [f"{'metric':<22}{'parent':>10}{'unlearned':>11}{'change':>10}"]
    for name in ("top1", "top10", "skip50_top1", "loss"):
        for side in ("forget", "retain"):
            key = f"{side}_{name}"
            if key not in m:
                continue
            before, after = m.get(f"parent_{key}"), m[key]
            change = "" if not before else f"{(after - before) / before:+.1%}"
            lines.append(f"{key:<22}{'' if before is None else f'{before:.4f}':>10}{after:>11.4f}{change:>10}")
    if "selectivity" in m:
        lines.append(f"selectivity (forget top1 drop / retain top1 drop): {m['selectivity']:.2f}")
    if result.model_uri:
        lines.append(f"registered: {result.model_uri} (run {result.run_id})")
    return "\n".join(lines)
