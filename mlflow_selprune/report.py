"""What a person sees: the terminal summary table and the forget-vs-retain plot."""

from __future__ import annotations

import math
from pathlib import Path

from .evaluation.drops import format_change


def format_summary(metrics: dict, model_uri: str | None = None, run_id: str | None = None) -> str:
    """Parent vs unlearned vs random control, per metric, plus the evidence lines."""
    m = metrics
    has_control = any(k.startswith("control_") for k in m)
    header = f"{'metric':<22}{'parent':>10}{'unlearned':>11}{'change':>12}"
    lines = [header + (f"{'random control':>16}" if has_control else "")]
    for name in ("top1", "top5", "top10", "skip50_top1", "loss"):
        for side in ("forget", "retain"):
            key = f"{side}_{name}"
            if key not in m:
                continue
            before, after = m.get(f"parent_{key}"), m[key]
            parent_cell = "" if before is None else f"{before:.4f}"
            row = f"{key:<22}{parent_cell:>10}{after:>11.4f}{format_change(before, after):>12}"
            if has_control:
                drop_key = f"control_{side}_{name}_drop" if name != "loss" else f"control_{side}_loss_increase"
                value = m.get(drop_key)
                if value is not None and not math.isnan(value):
                    value = -value if name != "loss" else value
                    row += f"{value:>+15.1%} "
                else:
                    row += f"{'n/a':>16}"
            lines.append(row)
    if "selectivity" in m:
        line = f"selectivity (forget top-1 drop / max(retain top-1 drop, 1%)): {_number(m['selectivity'])}"
        if "control_selectivity" in m:
            line += f"; random control: {_number(m['control_selectivity'])}"
        lines.append(line)
    if "relearn_forget_top1" in m:
        lines.append(
            f"relearning: forget top-1 back to {m['relearn_forget_top1']:.4f} "
            f"(recovery {_number(m.get('relearn_recovery', math.nan), '.0%')}); "
            f"the parent after the same fine-tuning: {m.get('relearn_parent_forget_top1', math.nan):.4f}"
        )
    if model_uri:
        lines.append(f"registered: {model_uri} (run {run_id})")
    return "\n".join(lines)


def _number(value: float, spec: str = ".2f") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def plot_forget_vs_retain(baseline: dict, steps: list[dict], path: Path) -> Path:
    """Forget and retain top-1 after each kept step (step 0: the parent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, forget, retain = [0], [baseline.get("forget_top1")], [baseline.get("retain_top1")]
    for record in steps:
        if "metrics" in record and record["kept"]:
            xs.append(record["step"])
            forget.append(record["metrics"]["forget_top1"])
            retain.append(record["metrics"]["retain_top1"])
    fig, ax = plt.subplots(figsize=(6, 4))
    # a missing value (None) is a gap in the line, as matplotlib draws it
    ax.plot(xs, forget, "o-", color="tab:red", label="forget top-1")  # type: ignore[arg-type]
    ax.plot(xs, retain, "s-", color="tab:blue", label="retain top-1")  # type: ignore[arg-type]
    ax.set_xlabel("pruning step")
    ax.set_ylabel("next-token top-1 accuracy")
    ax.set_title("Selective pruning: forget vs retain")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
