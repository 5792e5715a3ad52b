"""The iterative selective-pruning loop.

Each step re-collects statistics on the already-pruned model (the paper's
default), scores every neuron forget-vs-retain, prunes the top ones in the
weights, and optionally evaluates. It stops after a fixed number of steps, or
by a budget: once the forget drop reaches its target, or — rolling that step
back — as soon as a step would push the retain drop past its budget.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file

from .architecture import ATTN, FF, KINDS, find_architecture
from .scoring import DEFAULT_EPS, check_scoring, required_sums, score
from .selection import SELECTIONS, select
from .statistics import collect_statistics
from .surgery import prune_neurons

logger = logging.getLogger(__name__)

EvaluateFn = Callable[[torch.nn.Module], dict]


@dataclass
class PruneConfig:
    """Every choice that determines which neurons get pruned (recorded with the result)."""

    ff_frac: float = 0.02
    attn_frac: float = 0.0
    steps: int | None = None
    scoring: str = "abs"
    attn_scoring: str | None = None
    selection: str = "global"
    ff_eps: float = DEFAULT_EPS[FF]
    attn_eps: float = DEFAULT_EPS[ATTN]
    attn_mean_offset: bool = False
    target_forget_drop: float | None = None
    max_retain_drop: float | None = None
    max_steps: int = 50
    budget_metric: str = "top1"
    eval_every: int = 1
    seed: int = 0

    @property
    def budget_mode(self) -> bool:
        return self.target_forget_drop is not None or self.max_retain_drop is not None

    @property
    def n_steps(self) -> int:
        """Steps to run: the fixed count, or the budget mode's ceiling."""
        if self.budget_mode:
            return self.max_steps
        return 1 if self.steps is None else self.steps

    def scoring_for(self, kind: str) -> str:
        return self.scoring if kind == FF else (self.attn_scoring or self.scoring)

    def frac(self, kind: str) -> float:
        return self.ff_frac if kind == FF else self.attn_frac

    def eps(self, kind: str) -> float:
        return self.ff_eps if kind == FF else self.attn_eps

    def active_kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind in KINDS if self.frac(kind) > 0)

    def validate(self, has_evaluate: bool) -> None:
        """Reject bad settings with one clear sentence, before any weight is touched."""
        for name in ("ff_frac", "attn_frac"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1 or math.isnan(value):
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.ff_frac == 0 and self.attn_frac == 0:
            raise ValueError("ff_frac and attn_frac are both 0: nothing would be pruned; set one above 0")
        check_scoring(self.scoring)
        if self.attn_scoring is not None:
            check_scoring(self.attn_scoring)
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection '{self.selection}'; choose 'global' or 'per-layer'")
        for name in ("ff_eps", "attn_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.budget_mode:
            if self.steps is not None:
                raise ValueError("choose either a fixed number of steps or a budget (target forget drop / max retain drop), not both")
            if self.target_forget_drop is not None and not 0 < self.target_forget_drop <= 1:
                raise ValueError(f"target_forget_drop must be in (0, 1], got {self.target_forget_drop}")
            if self.max_retain_drop is not None and not 0 <= self.max_retain_drop < 1:
                raise ValueError(f"max_retain_drop must be in [0, 1), got {self.max_retain_drop}")
            if self.max_steps < 1:
                raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
            if not has_evaluate:
                raise ValueError("budget mode needs an evaluation function to measure forget and retain drops")
        elif self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PruneResult:
    """What a pruning run removed: cumulative masks, last scores, and a record per step."""

    ff_mask: torch.Tensor  # bool [n_layers, d_mlp]
    attn_mask: torch.Tensor  # bool [n_layers, n_heads * d_head]
    ff_scores: torch.Tensor | None
    attn_scores: torch.Tensor | None
    steps: list[dict]
    config: PruneConfig
    architecture: dict
    baseline_metrics: dict = field(default_factory=dict)
    final_metrics: dict = field(default_factory=dict)
    stop_reason: str = ""

    @property
    def ff_pruned(self) -> int:
        return int(self.ff_mask.sum())

    @property
    def attn_pruned(self) -> int:
        return int(self.attn_mask.sum())

    def masks(self) -> dict[str, torch.Tensor]:
        return {"ff_mask": self.ff_mask, "attn_mask": self.attn_mask}

    def scores(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.ff_scores is not None:
            out["ff_scores"] = self.ff_scores.float()
        if self.attn_scores is not None:
            out["attn_scores"] = self.attn_scores.float()
        return out

    def record(self) -> dict:
        """A JSON-serialisable account of the run (no tensors)."""
        return {
            "config": self.config.to_dict(),
            "architecture": self.architecture,
            "ff_pruned": self.ff_pruned,
            "attn_pruned": self.attn_pruned,
            "ff_pruned_per_layer": self.ff_mask.sum(1).tolist(),
            "attn_pruned_per_layer": self.attn_mask.sum(1).tolist(),
            "baseline_metrics": self.baseline_metrics,
            "final_metrics": self.final_metrics,
            "stop_reason": self.stop_reason,
            "steps": self.steps,
        }

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write masks and scores (safetensors) and the record (JSON) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "masks": directory / "masks.safetensors",
            "scores": directory / "scores.safetensors",
            "record": directory / "pruning_record.json",
        }
        save_file({k: v.contiguous() for k, v in self.masks().items()}, str(paths["masks"]))
        save_file({k: v.contiguous() for k, v in self.scores().items()}, str(paths["scores"]))
        record = _finite(self.record())
        paths["record"].write_text(json.dumps(record, indent=2, default=_json_default, allow_nan=False))
        return paths


def _finite(value):
    """Non-finite floats (an infinite perplexity, say) as None: strict JSON has no NaN/Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def relative_drop(parent: float, new: float) -> float:
    """(parent - new) / parent; 0 where the parent scored 0."""
    return 0.0 if parent == 0 else (parent - new) / parent


def _check_batches(batches, label: str) -> list:
    batches = list(batches)
    if not batches:
        raise ValueError(f"the {label} batches are empty: give {label} data with at least one document")
    return batches


def prune(
    model,
    forget_batches: Sequence[dict],
    retain_batches: Sequence[dict],
    *,
    ff_frac: float = 0.02,
    attn_frac: float = 0.0,
    steps: int | None = None,
    scoring: str = "abs",
    attn_scoring: str | None = None,
    selection: str = "global",
    ff_eps: float = DEFAULT_EPS[FF],
    attn_eps: float = DEFAULT_EPS[ATTN],
    attn_mean_offset: bool = False,
    target_forget_drop: float | None = None,
    max_retain_drop: float | None = None,
    max_steps: int = 50,
    budget_metric: str = "top1",
    evaluate_fn: EvaluateFn | None = None,
    eval_every: int = 1,
    seed: int = 0,
    accelerator=None,
    progress: bool = True,
) -> PruneResult:
    """Selectively prune ``model`` in place so it forgets what ``forget_batches`` show.

    ``forget_batches``/``retain_batches``: dicts with ``input_ids`` and
    ``attention_mask`` (used for statistics only). ``evaluate_fn(model)``
    returns metrics such as ``forget_top1``/``retain_top1``; it runs before
    the first step (the baseline) and after every ``eval_every`` steps, and
    budget mode reads ``forget_<budget_metric>``/``retain_<budget_metric>``
    from it. Returns a ``PruneResult`` with cumulative masks and per-step
    records.
    """
    config = PruneConfig(
        ff_frac=ff_frac, attn_frac=attn_frac, steps=steps, scoring=scoring, attn_scoring=attn_scoring,
        selection=selection, ff_eps=ff_eps, attn_eps=attn_eps, attn_mean_offset=attn_mean_offset,
        target_forget_drop=target_forget_drop, max_retain_drop=max_retain_drop, max_steps=max_steps,
        budget_metric=budget_metric, eval_every=eval_every, seed=seed,
    )
    config.validate(has_evaluate=evaluate_fn is not None)
    arch = find_architecture(model)
    forget_batches = _check_batches(forget_batches, "forget")
    retain_batches = _check_batches(retain_batches, "retain")
    kinds = config.active_kinds()
    if attn_mean_offset and ATTN in kinds:
        no_bias = [p.name for p in arch.attn if p.module.bias is None]
        if no_bias:
            raise ValueError(
                f"the attention mean offset folds into the projection bias, but {no_bias[0]} has none; "
                "prune without --attn-mean-offset for this model"
            )
    masks = {kind: torch.zeros(arch.shape(kind), dtype=torch.bool) for kind in KINDS}
    last_scores: dict[str, torch.Tensor | None] = {kind: None for kind in KINDS}
    records: list[dict] = []

    baseline: dict = {}
    if evaluate_fn is not None:
        start = time.perf_counter()
        baseline = dict(evaluate_fn(model))
        logger.info("baseline metrics (%.1fs): %s", time.perf_counter() - start, _brief(baseline))
        if config.budget_mode:
            _budget_drops(config, baseline, baseline)  # a missing budget metric fails now, before any surgery
    latest_metrics = dict(baseline)
    stop_reason = f"completed {config.n_steps} step(s)"

    for step in range(1, config.n_steps + 1):
        step_start = time.perf_counter()
        forget_stats, retain_stats, collect_seconds = _collect_both(
            model, forget_batches, retain_batches, config, kinds, accelerator, progress, step
        )
        chosen, thresholds, undos = {}, {}, []
        for kind in KINDS:
            if kind not in kinds:
                chosen[kind] = torch.zeros(arch.shape(kind), dtype=torch.bool)
                continue
            scores = score(
                forget_stats[kind], retain_stats[kind], config.scoring_for(kind),
                eps=config.eps(kind), seed=config.seed * 1_000_003 + step * 2 + (kind == ATTN),
            ).cpu()
            last_scores[kind] = scores
            chosen[kind] = select(scores, masks[kind], config.frac(kind), selection=config.selection)
            thresholds[kind] = float(scores[chosen[kind]].min()) if chosen[kind].any() else None
            offset = None
            if kind == ATTN and config.attn_mean_offset:
                stats = retain_stats[kind]
                offset = stats.sums["sum"] / stats.n_tokens
            undos.append(prune_neurons(arch, kind, chosen[kind], mean_offset=offset))
        for kind in KINDS:
            masks[kind] |= chosen[kind]

        record = {
            "step": step,
            "ff_pruned": int(chosen[FF].sum()),
            "attn_pruned": int(chosen[ATTN].sum()),
            "ff_pruned_per_layer": chosen[FF].sum(1).tolist(),
            "attn_pruned_per_layer": chosen[ATTN].sum(1).tolist(),
            "ff_threshold": thresholds.get(FF),
            "attn_threshold": thresholds.get(ATTN),
            "ff_pruned_total": int(masks[FF].sum()),
            "attn_pruned_total": int(masks[ATTN].sum()),
            "kept": True,
            "seconds_collect": round(collect_seconds, 3),
        }
        evaluate_now = evaluate_fn is not None and (
            config.budget_mode or step % config.eval_every == 0 or step == config.n_steps
        )
        if evaluate_now:
            eval_start = time.perf_counter()
            metrics = dict(evaluate_fn(model))
            record["seconds_evaluate"] = round(time.perf_counter() - eval_start, 3)
            record["metrics"] = metrics
            latest_metrics = metrics
        record["seconds"] = round(time.perf_counter() - step_start, 3)
        nothing_new = not any(chosen[k].any() for k in KINDS)

        if config.budget_mode:
            forget_drop, retain_drop = _budget_drops(config, baseline, record["metrics"])
            record["forget_drop"], record["retain_drop"] = forget_drop, retain_drop
            if config.max_retain_drop is not None and retain_drop > config.max_retain_drop:
                for undo in reversed(undos):
                    undo.restore()
                for kind in KINDS:
                    masks[kind] &= ~chosen[kind]
                record["kept"] = False
                records.append(record)
                latest_metrics = records[-2]["metrics"] if len(records) > 1 else baseline
                stop_reason = (
                    f"step {step} rolled back: retain {config.budget_metric} drop {retain_drop:.4f} "
                    f"exceeds the budget {config.max_retain_drop}"
                )
                logger.info(stop_reason)
                break
            records.append(record)
            _log_step(record)
            if config.target_forget_drop is not None and forget_drop >= config.target_forget_drop:
                stop_reason = (
                    f"forget {config.budget_metric} drop {forget_drop:.4f} reached the target "
                    f"{config.target_forget_drop} after {step} step(s)"
                )
                break
            if step == config.n_steps:
                stop_reason = f"max_steps ({config.max_steps}) reached before the forget target"
        else:
            records.append(record)
            _log_step(record)
        if nothing_new:
            stop_reason = f"no neurons left to prune after step {step}"
            break

    logger.info("stopped: %s", stop_reason)
    return PruneResult(
        ff_mask=masks[FF],
        attn_mask=masks[ATTN],
        ff_scores=last_scores[FF],
        attn_scores=last_scores[ATTN],
        steps=records,
        config=config,
        architecture=arch.describe(),
        baseline_metrics=baseline,
        final_metrics=latest_metrics,
        stop_reason=stop_reason,
    )


def _collect_both(model, forget_batches, retain_batches, config, kinds, accelerator, progress, step):
    start = time.perf_counter()
    names = [config.scoring_for(kind) for kind in kinds]
    sums = set(required_sums(*names))
    if config.attn_mean_offset and ATTN in kinds:
        sums.add("sum")
    common = dict(sums=tuple(sorted(sums)), kinds=kinds, accelerator=accelerator, progress=progress)
    forget_stats = collect_statistics(model, forget_batches, desc=f"step {step}: forget", **common)
    retain_stats = collect_statistics(model, retain_batches, desc=f"step {step}: retain", **common)
    return forget_stats, retain_stats, time.perf_counter() - start


def _budget_drops(config: PruneConfig, baseline: dict, metrics: dict) -> tuple[float, float]:
    key_f, key_r = f"forget_{config.budget_metric}", f"retain_{config.budget_metric}"
    for key in (key_f, key_r):
        if key not in baseline or key not in metrics:
            raise ValueError(f"budget mode needs '{key}' from the evaluation function; it returned {sorted(metrics)}")
    return (
        relative_drop(baseline[key_f], metrics[key_f]),
        relative_drop(baseline[key_r], metrics[key_r]),
    )


def _brief(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _log_step(record: dict) -> None:
    logger.info(
        "step %d: pruned %d FF and %d attention neurons (%.1fs)%s",
        record["step"], record["ff_pruned"], record["attn_pruned"], record["seconds"],
        f"; {_brief(record['metrics'])}" if "metrics" in record else "",
    )
