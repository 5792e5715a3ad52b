"""Derived numbers, each with one written definition (the README quotes these docstrings).

Relative changes of near-zero values and ratios with near-zero denominators
mislead: a top-1 of 0.0002 falling to 0 is not a "-100%" effect, and a retain
set that improved does not make pruning "infinitely selective". The floors
below say where a number stops meaning something; under them the value is
NaN (not logged, shown as an absolute change, refused by the gate).
"""

from __future__ import annotations

import math

# Each model kind reports the accuracies it has (language models top1/top10/skip50_top1, image
# classifiers top1/top5); drops and selectivities are derived for those present.
ACCURACY_METRICS = ("top1", "top5", "top10", "skip50_top1")
# A parent accuracy under this (absolute, 0.1%) gives no meaningful relative change.
RELATIVE_FLOOR = 0.001
# Unlearning must have removed at least this share of the parent's forget top-1 for a recovery ratio.
RECOVERY_GAP_FLOOR = 0.05
# A retain drop under this (relative) counts as this in a selectivity: smaller drops,
# and gains, are within evaluation noise (~1% relative at 10k eval tokens).
RETAIN_DROP_FLOOR = 0.01


def relative_drop(parent: float, new: float) -> float:
    """``(parent - new) / parent``; NaN where the parent value is under ``RELATIVE_FLOOR``."""
    if math.isnan(parent) or math.isnan(new) or abs(parent) < RELATIVE_FLOOR:
        return float("nan")
    return (parent - new) / parent


def relative_drops(parent: dict, new: dict, prefix: str) -> dict[str, float]:
    """``{prefix}{m}_drop`` for the accuracies and ``{prefix}loss_increase = (new - parent) / parent``.

    Keys of ``parent``/``new`` may carry ``prefix`` or not.
    """

    def value(metrics: dict, name: str) -> float:
        return float(metrics[prefix + name] if prefix + name in metrics else metrics[name])

    def has(metrics: dict, name: str) -> bool:
        return prefix + name in metrics or name in metrics

    drops = {
        f"{prefix}{m}_drop": relative_drop(value(parent, m), value(new, m))
        for m in ACCURACY_METRICS
        if has(parent, m) and has(new, m)
    }
    drops[f"{prefix}loss_increase"] = -relative_drop(value(parent, "loss"), value(new, "loss")) + 0.0
    return drops


def selectivity(forget_drop: float, retain_drop: float) -> float:
    """``forget_drop / max(retain_drop, RETAIN_DROP_FLOOR)``.

    A retain drop under 1% (or a retain gain) counts as 1%, so the ratio can
    never be inflated by noise or a retain improvement: with forget -3.6% and
    retain +0.4% it is 3.6, not 36. NaN when either drop is.
    """
    if math.isnan(forget_drop) or math.isnan(retain_drop):
        return float("nan")
    return forget_drop / max(retain_drop, RETAIN_DROP_FLOOR)


def selectivity_key(metric: str = "top1") -> str:
    """``selectivity`` for top-1 (the headline), ``<metric>_selectivity`` for the others."""
    return "selectivity" if metric == "top1" else f"{metric}_selectivity"


def summary_metrics(baseline: dict, final: dict) -> dict:
    """Final metrics, the parent's (``parent_*``), relative drops and one selectivity per accuracy."""
    out = dict(final)
    out.update({f"parent_{k}": v for k, v in baseline.items()})
    out.update(relative_drops(baseline, final, "forget_"))
    out.update(relative_drops(baseline, final, "retain_"))
    for metric in ACCURACY_METRICS:
        if f"forget_{metric}_drop" not in out or f"retain_{metric}_drop" not in out:
            continue
        out[selectivity_key(metric)] = selectivity(out[f"forget_{metric}_drop"], out[f"retain_{metric}_drop"])
    return out


def control_metrics(baseline: dict, control: dict) -> dict:
    """The random control's drops and selectivity, as ``control_*``."""
    drops = relative_drops(baseline, control, "forget_") | relative_drops(baseline, control, "retain_")
    out = {f"control_{k}": v for k, v in drops.items()}
    out["control_selectivity"] = selectivity(drops["forget_top1_drop"], drops["retain_top1_drop"])
    return out


def relearn_recovery(parent: float, unlearned: float, relearned: float) -> float:
    """``(relearned - unlearned) / (parent - unlearned)``: the share of the forgotten top-1 that
    fine-tuning on forget data brings back. NaN where unlearning removed less than
    5% (``RECOVERY_GAP_FLOOR``) of the parent's value: the ratio would divide by noise."""
    gap = parent - unlearned
    if any(math.isnan(v) for v in (parent, unlearned, relearned)) or gap < RECOVERY_GAP_FLOOR * abs(parent) or gap <= 0:
        return float("nan")
    return (relearned - unlearned) / gap


def format_change(parent: float | None, new: float) -> str:
    """A relative change in percent, or an absolute one (``abs``) for a parent value under the floor."""
    if parent is None or math.isnan(parent):
        return ""
    if abs(parent) < RELATIVE_FLOOR:
        return f"{new - parent:+.4f} abs"
    return f"{(new - parent) / parent:+.1%}"
