"""The iterative selective-pruning loop.

Each step re-collects statistics on the already-pruned model (the paper's
default), scores every neuron forget-vs-retain, prunes the top ones in the
weights, and optionally evaluates. It stops after a fixed number of steps, or
by a budget: once the forget drop reaches its target, or — rolling that step
back — as soon as a step would push the retain drop past its budget.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..config import ATTN, FF, KINDS, PruneConfig
from ..errors import BadInputError
from ..evaluation.drops import relative_drop
from .architecture import check_kinds, find_architecture
from .result import PruneResult
from .scoring import required_sums, score
from .selection import select
from .statistics import collect_statistics
from .surgery import pruned_columns, prune_neurons

logger = logging.getLogger(__name__)

EvaluateFn = Callable[[torch.nn.Module], dict]
StepCallback = Callable[[dict], None]


@dataclass
class _Pruning:
    """One pruning run's state: what it works on, what it chose so far, and what the parent already had dead."""

    model: Any
    arch: Any
    config: PruneConfig
    kinds: tuple
    forget_batches: list
    retain_batches: list
    accelerator: Any
    progress: bool
    masks: dict = field(default_factory=dict)
    dead: dict = field(default_factory=dict)
    last_scores: dict = field(default_factory=dict)
    parent_means: dict = field(default_factory=dict)  # the retain means the first step folded in (the control's)
    records: list = field(default_factory=list)
    kept_undos: list = field(default_factory=list)


def prune(
    model,
    forget_batches: Sequence[dict],
    retain_batches: Sequence[dict],
    config: PruneConfig | None = None,
    *,
    evaluate_fn: EvaluateFn | None = None,
    on_step: StepCallback | None = None,
    accelerator=None,
    progress: bool = True,
    **legacy_options,
) -> PruneResult:
    """Selectively prune ``model`` in place so it forgets what ``forget_batches`` show.

    ``forget_batches``/``retain_batches``: dicts with ``input_ids`` and
    ``attention_mask`` (used for statistics only). ``evaluate_fn(model)``
    returns metrics such as ``forget_top1``/``retain_top1``; it runs before
    the first step (the baseline) and after every ``config.eval_every`` steps,
    and budget mode reads ``forget_<budget_metric>``/``retain_<budget_metric>``
    from it. ``on_step(record)`` sees the baseline (step 0) and each kept step as it
    finishes (live logging). Passing ``PruneConfig`` fields as keywords (``ff_frac=...``) is
    deprecated: pass ``config=PruneConfig(...)``.
    """
    config = _config_from(config, legacy_options, has_evaluate=evaluate_fn is not None)
    run = _start(model, forget_batches, retain_batches, config, accelerator, progress)
    if evaluate_fn is not None:
        _say(run, "measuring the parent on the eval data (step 0)")
    baseline = _baseline(run, evaluate_fn, on_step)
    latest_metrics = dict(baseline)
    stop_reason = f"completed {config.n_steps} step(s)"
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    bar = tqdm(total=config.n_steps, desc="pruning", unit="step", disable=not show)
    for step in range(1, config.n_steps + 1):
        _say(run, f"step {step}{'' if config.budget_mode else f' of {config.n_steps}'}: scoring neurons, pruning")
        record, chosen, undos, exhausted, scores = _step(run, step, evaluate_fn)
        if config.budget_mode:
            record["forget_drop"], record["retain_drop"] = _budget_drops(config, baseline, record["metrics"])
            if config.max_retain_drop is not None and record["retain_drop"] > config.max_retain_drop:
                stop_reason = _roll_back(run, record, chosen, undos)
                break
        run.last_scores.update(scores)  # only a kept step's: the saved scores describe the masks applied
        run.records.append(record)
        run.kept_undos.extend(undos)
        latest_metrics = record.get("metrics", latest_metrics)
        _log_step(record)
        bar.update(1)
        bar.set_postfix_str(_headline(baseline, latest_metrics), refresh=True)
        if on_step is not None:
            on_step(record)
        budget_stop = _budget_stop(config, record, step)
        if budget_stop is not None:
            stop_reason = budget_stop
            if budget_stop.startswith("forget"):
                break
        if exhausted:
            stop_reason = f"no neurons left to prune after step {step}"
            break
    bar.close()
    _say(run, f"stopped: {stop_reason}")
    return _result(run, baseline, latest_metrics, stop_reason)


def _say(run: _Pruning, line: str) -> None:
    """One line as a slow phase starts (so a run without bars is never silent), from the main process only."""
    if run.accelerator is None or run.accelerator.is_main_process:
        logger.info(line)


def _config_from(config: PruneConfig | None, legacy_options: dict, has_evaluate: bool) -> PruneConfig:
    if legacy_options:
        if config is not None:
            raise TypeError("pass either config=PruneConfig(...) or its fields as keywords, not both")
        warnings.warn(
            "prune(..., ff_frac=...) is deprecated; pass config=PruneConfig(ff_frac=...)",
            DeprecationWarning,
            stacklevel=3,
        )
        config = PruneConfig(**legacy_options)
    return (config or PruneConfig()).validate(has_evaluate=has_evaluate)


def _start(model, forget_batches, retain_batches, config: PruneConfig, accelerator, progress) -> _Pruning:
    """Checks before any surgery, empty masks, and what is already dead in the parent (an unlearned version
    pruned again: its zero columns still show activity at the projection's input, so without this a chain
    would score and "prune" them again)."""
    arch = find_architecture(model)
    check_kinds(arch, config)
    kinds = config.active_kinds()
    run = _Pruning(
        model,
        arch,
        config,
        kinds,
        _check_batches(forget_batches, "forget"),
        _check_batches(retain_batches, "retain"),
        accelerator,
        progress,
    )
    if config.attn_mean_offset and ATTN in kinds:
        no_bias = [p.name for p in arch.attn if p.bias is None]
        if no_bias:
            raise BadInputError(
                f"the attention mean offset folds into the projection bias, but {no_bias[0]} has none; "
                "prune without --attn-mean-offset for this model"
            )
    run.masks = {kind: torch.zeros(arch.shape(kind), dtype=torch.bool) for kind in KINDS}
    run.dead = {kind: pruned_columns(arch, kind) for kind in KINDS}
    run.last_scores = {kind: None for kind in KINDS}
    return run


def _baseline(run: _Pruning, evaluate_fn, on_step) -> dict:
    """The parent's metrics (step 0), reported to ``on_step``; a missing budget metric fails here."""
    if evaluate_fn is None:
        return {}
    start = time.perf_counter()
    baseline = dict(evaluate_fn(run.model))
    logger.debug("baseline metrics (%.1fs): %s", time.perf_counter() - start, _brief(baseline))
    if run.config.budget_mode:
        _budget_drops(run.config, baseline, baseline)
    if on_step is not None:
        on_step(
            {
                "step": 0,
                "ff_pruned_total": int(run.dead[FF].sum()),
                "attn_pruned_total": int(run.dead[ATTN].sum()),
                "kept": True,
                "metrics": baseline,
            }
        )
    return baseline


def _step(run: _Pruning, step: int, evaluate_fn):
    """One step: prune, record, and evaluate when due; ``(record, chosen, undos, exhausted, scores)``. The last
    state (no neurons left) is measured whatever --eval-every says."""
    config = run.config
    step_start = time.perf_counter()
    chosen, thresholds, undos, collect_seconds, scores = _prune_step(run, step)
    record = _step_record(step, chosen, thresholds, run.masks, run.dead, collect_seconds)
    exhausted = not any(chosen[k].any() for k in KINDS)
    due = config.budget_mode or step % config.eval_every == 0 or step == config.n_steps or exhausted
    if evaluate_fn is not None and due:
        eval_start = time.perf_counter()
        record["metrics"] = dict(evaluate_fn(run.model))
        record["seconds_evaluate"] = round(time.perf_counter() - eval_start, 3)
    record["seconds"] = round(time.perf_counter() - step_start, 3)
    return record, chosen, undos, exhausted, scores


def _roll_back(run: _Pruning, record: dict, chosen: dict, undos: list) -> str:
    """Undo a step that broke the retain budget; it stays in the records, marked not kept."""
    for undo in reversed(undos):
        undo.restore()
    for kind in KINDS:
        run.masks[kind] &= ~chosen[kind]
    record["kept"] = False
    run.records.append(record)
    config = run.config
    return (
        f"step {record['step']} rolled back: retain {config.budget_metric} drop "
        f"{record['retain_drop']:.4f} exceeds the budget {config.max_retain_drop}"
    )


def _budget_stop(config: PruneConfig, record: dict, step: int) -> str | None:
    """Why a budget run stops after this kept step (the target reached: stop now; the last step: say so)."""
    if not config.budget_mode:
        return None
    if config.target_forget_drop is not None and record["forget_drop"] >= config.target_forget_drop:
        return (
            f"forget {config.budget_metric} drop {record['forget_drop']:.4f} reached the target "
            f"{config.target_forget_drop} after {step} step(s)"
        )
    if step == config.n_steps:
        return f"max_steps ({config.max_steps}) reached before the forget target"
    return None


def _result(run: _Pruning, baseline: dict, latest_metrics: dict, stop_reason: str) -> PruneResult:
    return PruneResult(
        ff_mask=run.masks[FF],
        attn_mask=run.masks[ATTN],
        ff_scores=run.last_scores[FF],
        attn_scores=run.last_scores[ATTN],
        steps=run.records,
        config=run.config,
        architecture=run.arch.describe(),
        baseline_metrics=baseline,
        final_metrics=latest_metrics,
        stop_reason=stop_reason,
        parent_undos=run.kept_undos,
        ff_dead=run.dead[FF],
        attn_dead=run.dead[ATTN],
        attn_parent_means=run.parent_means.get(ATTN),
    )


def _prune_step(run: _Pruning, step: int):
    """Collect, score, select (among neurons neither pruned by this run nor dead before it) and zero one step's
    neurons; masks are updated in place, and ``parent_means`` keeps the first step's mean offsets. The step's
    scores are returned, not kept: the caller keeps them once the step is (a budget may roll it back)."""
    config, arch = run.config, run.arch
    forget_stats, retain_stats, collect_seconds = _collect_both(run, step)
    chosen, thresholds, undos, step_scores = {}, {}, [], {}
    for kind in KINDS:
        if kind not in run.kinds:
            chosen[kind] = torch.zeros(arch.shape(kind), dtype=torch.bool)
            continue
        scores = score(
            forget_stats[kind],
            retain_stats[kind],
            config.scoring_for(kind),
            eps=config.eps(kind),
            seed=config.seed * 1_000_003 + step * 2 + (kind == ATTN),
        ).cpu()
        step_scores[kind] = scores
        chosen[kind] = select(
            scores,
            run.masks[kind] | run.dead[kind],
            config.frac(kind),
            selection=config.selection,
            valid=arch.valid(kind),
        )
        thresholds[kind] = float(scores[chosen[kind]].min()) if chosen[kind].any() else None
        offset = None
        if kind == ATTN and config.attn_mean_offset:
            stats = retain_stats[kind]
            offset = stats.sums["sum"] / stats.n_tokens
            run.parent_means.setdefault(kind, offset.cpu())
        undos.append(prune_neurons(arch, kind, chosen[kind], mean_offset=offset))
    for kind in KINDS:
        run.masks[kind] |= chosen[kind]
    return chosen, thresholds, undos, collect_seconds, step_scores


def _step_record(step, chosen, thresholds, masks, dead, collect_seconds) -> dict:
    """This step's choices; ``*_pruned_total``: dead in the model after it (the parent's dead included)."""
    return {
        "step": step,
        "ff_pruned": int(chosen[FF].sum()),
        "attn_pruned": int(chosen[ATTN].sum()),
        "ff_pruned_per_layer": chosen[FF].sum(1).tolist(),
        "attn_pruned_per_layer": chosen[ATTN].sum(1).tolist(),
        "ff_threshold": thresholds.get(FF),
        "attn_threshold": thresholds.get(ATTN),
        "ff_pruned_total": int((masks[FF] | dead[FF]).sum()),
        "attn_pruned_total": int((masks[ATTN] | dead[ATTN]).sum()),
        "kept": True,
        "seconds_collect": round(collect_seconds, 3),
    }


def _check_batches(batches, label: str) -> list:
    batches = list(batches)
    if not batches:
        raise BadInputError(f"the {label} batches are empty: give {label} data with at least one document")
    return batches


def _collect_both(run: _Pruning, step: int):
    start = time.perf_counter()
    config = run.config
    sums = set(required_sums(*(config.scoring_for(kind) for kind in run.kinds)))
    if config.attn_mean_offset and ATTN in run.kinds:
        sums.add("sum")
    common = dict(sums=tuple(sorted(sums)), kinds=run.kinds, accelerator=run.accelerator, progress=run.progress)
    forget_stats = collect_statistics(run.model, run.forget_batches, desc=f"step {step}: forget", **common)
    retain_stats = collect_statistics(run.model, run.retain_batches, desc=f"step {step}: retain", **common)
    return forget_stats, retain_stats, time.perf_counter() - start


def _budget_drops(config: PruneConfig, baseline: dict, metrics: dict) -> tuple[float, float]:
    key_f, key_r = f"forget_{config.budget_metric}", f"retain_{config.budget_metric}"
    for key in (key_f, key_r):
        if key not in baseline or key not in metrics:
            raise BadInputError(
                f"budget mode needs '{key}' from the evaluation function; it returned {sorted(metrics)}"
            )
    return relative_drop(baseline[key_f], metrics[key_f]), relative_drop(baseline[key_r], metrics[key_r])


def _headline(baseline: dict, metrics: dict) -> str:
    """The two numbers a person watches: forget and retain top-1, relative to the parent."""
    if "forget_top1" not in metrics or "forget_top1" not in baseline:
        return ""
    forget = relative_drop(baseline["forget_top1"], metrics["forget_top1"])
    retain = relative_drop(baseline.get("retain_top1", float("nan")), metrics.get("retain_top1", float("nan")))
    return f"forget top-1 {-forget:+.1%}, retain top-1 {-retain:+.1%}"


def _brief(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _log_step(record: dict) -> None:
    logger.debug(
        "step %d: pruned %d FF and %d attention neurons (%.1fs)%s",
        record["step"],
        record["ff_pruned"],
        record["attn_pruned"],
        record["seconds"],
        f"; {_brief(record['metrics'])}" if "metrics" in record else "",
    )
