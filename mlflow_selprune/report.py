"""What a person sees: the terminal summary table, the forget-vs-retain plot, and the version's HTML report."""

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
    lines += _quantized_lines(m, has_control)
    if "selectivity" in m:
        line = f"selectivity (forget top-1 drop / max(retain top-1 drop, 1%)): {_number(m['selectivity'])}"
        if "control_selectivity" in m:
            line += f"; random control: {_number(m['control_selectivity'])}"
        lines.append(line)
    if "relearn_forget_top1" in m:
        line = (
            f"relearning: forget top-1 back to {m['relearn_forget_top1']:.4f} "
            f"(recovery {_number(m.get('relearn_recovery', math.nan), '.0%')} of the removed top-1)"
        )
        for who in ("control", "parent"):
            if f"relearn_{who}_forget_top1" in m:
                line += (
                    f"; the {who} after the same fine-tuning: {m[f'relearn_{who}_forget_top1']:.4f} "
                    f"({_number(m.get(f'relearn_{who}_recovery', math.nan), '+.0%')} on that scale)"
                )
        lines.append(line)
    for key, what in (
        ("forget_code_pass_rate", "Python tasks passed"),
        ("forget_code_pass_rate_3shot", "Python tasks passed with 3 solved examples first"),
        ("retain_cloze_accuracy", "cloze answered"),
    ):
        if key in m:
            control = f", random control {m['control_' + key]:.0%}" if "control_" + key in m else ""
            lines.append(f"{what}: parent {m['parent_' + key]:.0%}, unlearned {m[key]:.0%}{control}")
    if model_uri:
        lines.append(f"registered: {model_uri} (run {run_id})")
    return "\n".join(lines)


def _quantized_lines(m: dict, has_control: bool) -> list[str]:
    """``--quantized-check``: one row per format and side (the parent quantized the same way), then the share
    of the forget drop each format keeps."""
    from .config import QUANTIZED_FORMATS

    lines, kept = [], []
    for fmt in QUANTIZED_FORMATS:
        prefix = f"quantized_{fmt}_"
        for side in ("forget", "retain"):
            if f"{prefix}{side}_top1" not in m:
                continue
            before, after = m.get(f"{prefix}parent_{side}_top1"), m[f"{prefix}{side}_top1"]
            parent_cell = "" if before is None else f"{before:.4f}"
            row = f"{side + '_top1 ' + fmt:<22}{parent_cell:>10}{after:>11.4f}{format_change(before, after):>12}"
            control = m.get(f"{prefix}control_{side}_top1_drop")
            if has_control:
                row += f"{-control:>+15.1%} " if control is not None and not math.isnan(control) else f"{'n/a':>16}"
            lines.append(row)
        recovery = m.get(f"{prefix}recovery")
        if recovery is not None and not math.isnan(recovery):
            kept.append(f"{fmt} keeps {1 - recovery:.0%}")
    if kept:
        lines.append(f"quantized (GGUF round trip of the Linear weights): of the forget drop, {', '.join(kept)}")
    return lines


def _number(value: float, spec: str = ".2f") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def plot_forget_vs_retain(baseline: dict, steps: list[dict], path: Path, metrics: dict | None = None) -> Path:
    """Forget and retain top-1 after each kept step (step 0: the parent); with ``metrics`` holding the random
    control's drops, the control as one more point (x) at the last step."""
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
    if metrics and "control_forget_top1_drop" in metrics and "parent_forget_top1" in metrics:
        for side, color in (("forget", "tab:red"), ("retain", "tab:blue")):
            value = metrics[f"parent_{side}_top1"] * (1 - metrics[f"control_{side}_top1_drop"])
            ax.plot([xs[-1]], [value], "x", color=color, markersize=10, label=f"random control: {side}")
    return _saved(fig, ax, ("pruning step", "top-1 accuracy", "Selective pruning: forget vs retain"), path)


def _saved(fig, ax, labels: tuple[str, str, str], path: Path) -> Path:
    """The figure with its axis labels and title (``labels``), a grid and a legend, written to ``path``."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(labels[2])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pruning(result, metrics: dict, path: Path) -> Path:
    """The frontier of a ``PruneResult``: its steps against the baseline they were measured with, and the random
    control beside them (a budget run's steps are on its select split, the control on the eval split: no
    control point there)."""
    if result.select_metrics is None:
        return plot_forget_vs_retain(result.baseline_metrics, result.steps, path, metrics)
    return plot_forget_vs_retain(result.select_metrics["baseline"], result.steps, path)


def plot_relearning(curve: dict, path: Path) -> Path:
    """Forget top-1 of the unlearned model, the parent and the random control along the relearning check's
    fine-tuning (``evaluation.relearning``): the same steps on the same documents for all three."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"unlearned": ("o-", "tab:red"), "parent": ("s-", "tab:gray"), "control": ("x--", "tab:green")}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curve["forget_top1"].items():
        marker, color = styles[name]
        label = "random control" if name == "control" else name
        ax.plot(curve["steps"], values, marker, color=color, label=label)  # type: ignore[arg-type]
    labels = (
        "fine-tuning step on forget documents",
        "forget top-1 accuracy",
        "Relearning: does the capability come back?",
    )
    return _saved(fig, ax, labels, path)


def markdown_html(text: str) -> str:
    """The description's Markdown (paragraphs, **bold**, `code`, one table, headings, list items) as HTML.

    A code span is closed only by a backtick run as long as its opening one (``describe.code`` fences user text
    that way), and what it holds is shown as text: no bold inside it."""
    import html
    import re

    code_span = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")

    def bold(text: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))

    def inline(line: str) -> str:
        out, start = [], 0
        for match in code_span.finditer(line):
            content = match.group(2)
            if len(content) > 1 and content[0] == content[-1] == " " and content.strip():
                content = content[1:-1]  # the padding around text that begins or ends with a backtick
            out += [bold(line[start : match.start()]), f"<code>{html.escape(content)}</code>"]
            start = match.end()
        return "".join(out) + bold(line[start:])

    out, table, items = [], [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                table.append([inline(cell.strip()) for cell in line.strip().strip("|").split("|")])
            continue
        if table:
            head, *body = table
            out.append(
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
                + "</table>"
            )
            table = []
        if line.startswith("- "):
            items.append(f"<li>{inline(line[2:])}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line.startswith("### "):
            out.append(f"<h3>{inline(line[4:])}</h3>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    return "\n".join(out)


def _cell(value) -> str:
    """A table cell: text escaped, a PIL image as an inline PNG (the page stays self-contained)."""
    import base64
    import html
    import io

    if hasattr(value, "save") and hasattr(value, "resize"):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return f'<img alt="sample" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
    return html.escape(str(value))


def html_report(
    *,
    title: str,
    description: str,
    plot_png: bytes,
    samples: dict | None,
    chain: list[str],
    checks: dict | None = None,
    relearning_png: bytes | None = None,
) -> str:
    """A self-contained page (no external assets): the description, the frontier plot, the relearning curves
    (``--relearn-steps``), the samples table, the code and cloze outcomes (``--code-tasks``) and the lineage
    chain. MLflow's artifact viewer renders it."""
    import base64
    import html

    parts = [
        f"<h1>{html.escape(title)}</h1>",
        markdown_html(description),
        "<h2>Forget and retain, step by step</h2>",
        f'<img alt="forget vs retain" src="data:image/png;base64,{base64.b64encode(plot_png).decode()}">',
    ]
    if relearning_png is not None:
        parts += [
            "<h2>Relearning: the unlearned model, the parent and the random control, fine-tuned alike</h2>",
            f'<img alt="relearning" src="data:image/png;base64,{base64.b64encode(relearning_png).decode()}">',
        ]
    for heading, table in (
        ("What the models say", samples),
        ("Python tasks and English cloze prompts: each model's outcome", checks),
    ):
        if table:
            columns = list(table)
            rows = zip(*(table[c] for c in columns))
            parts += [
                f"<h2>{heading}</h2>",
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in columns)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
                + "</table>",
            ]
    parts += [
        "<h2>Lineage</h2>",
        "<ol>" + "".join(f"<li><code>{html.escape(uri)}</code></li>" for uri in chain) + "</ol>",
    ]
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}img{max-width:100%}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
