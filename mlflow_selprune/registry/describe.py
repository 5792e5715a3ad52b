"""What a person reads on the version page: a Markdown description of what was removed, from what, how well.

Tags are for machines (and verified); the description is for the compliance
reviewer or ML lead who opens the MLflow UI: the forget and retain data in
plain words with their digests shortened, the recipe, a table of the six
headline numbers (parent, unlearned, change, the random control's change),
the selectivity, the relearning recovery when measured, and the command that
verifies it all. The run gets the same text as its description. Every gate
decision appends one line to the version's description (bounded: the newest
``MAX_GATE_LINES``; the full record stays in its tag or artifact).

Every user-supplied string (DATA specs, paths, names, the user) is shown in a
code span it cannot close, with its line breaks written as escapes
(``code``): it never renders as Markdown and never starts a line, so the gate
heading (a line of its own) and the decision lines under it cannot be forged
by data.
"""

from __future__ import annotations

import logging
import math
import re

from ..evaluation.drops import relative_drop
from . import lineage

logger = logging.getLogger(__name__)

GATE_HEADING = "### Gate decisions"
MAX_GATE_LINES = 20
ROWS = (
    ("forget", "top1", "forget top-1"),
    ("forget", "skip50_top1", "forget top-1, frequent tokens skipped"),
    ("forget", "loss", "forget loss"),
    ("retain", "top1", "retain top-1"),
    ("retain", "skip50_top1", "retain top-1, frequent tokens skipped"),
    ("retain", "loss", "retain loss"),
)

# --code-tasks: shares of the task sets (evaluation.functional), shown beside the token metrics
FUNCTIONAL_ROWS = (
    ("forget_code_pass_rate", "forget: Python tasks solved"),
    ("forget_code_pass_rate_3shot", "forget: Python tasks solved, 3 solved examples shown first"),
    ("retain_cloze_accuracy", "retain: English prompts answered"),
)
TASKS_PER_SET = 40  # evaluation.task_sets: each set has forty


def code(value) -> str:
    """``value`` as a Markdown code span that shows it verbatim: fenced by more backticks than any run inside
    (so it cannot close early), every character that is not printable (line breaks included) as an escape (so
    it cannot start a line), padded where it begins or ends with a backtick or a space."""
    text = "".join(
        ch if ch.isprintable() else (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        for ch in str(value)
    )
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if not text or text[0] in "` " or text[-1] in "` " else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def split_gate_section(text: str) -> tuple[str, list[str]]:
    """``(the description above its gate heading, the decision lines under it)``. The heading is the last line
    that is exactly ``GATE_HEADING``: a whole line, which no user string (always inside one line) can make."""
    lines = text.splitlines()
    marks = [i for i, line in enumerate(lines) if line == GATE_HEADING]
    if not marks:
        return text, []
    return "\n".join(lines[: marks[-1]]), [line for line in lines[marks[-1] + 1 :] if line.startswith("- ")]


def _number(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _of_tasks(share) -> str:
    """A share of a task set as a person counts it: 30 of 40."""
    return "–" if share is None else f"{round(share * TASKS_PER_SET)} of {TASKS_PER_SET}"


def _task_row(key: str, label: str, metrics: dict) -> str:
    """A task set's row: tasks solved by the parent and the unlearned model, and both changes."""
    parent, ours, control = metrics.get("parent_" + key), metrics[key], metrics.get("control_" + key)
    ours_change = None if parent is None else relative_drop(parent, ours)
    control_change = None if parent is None or control is None else relative_drop(parent, control)
    return f"| {label} | {_of_tasks(parent)} | {_of_tasks(ours)} | {_change(ours_change)} | {_change(control_change)} |"


def _quantized_rows(metrics: dict) -> list[str]:
    """``--quantized-check``: forget and retain top-1 of the three models after each format's round trip."""
    from ..config import QUANTIZED_FORMATS

    rows = []
    for fmt, gguf_name in QUANTIZED_FORMATS.items():
        prefix = f"quantized_{fmt}_"
        for side in ("forget", "retain"):
            if f"{prefix}{side}_top1" not in metrics:
                continue
            cells = (
                _number(metrics.get(f"{prefix}parent_{side}_top1")),
                _number(metrics[f"{prefix}{side}_top1"]),
                _change(metrics.get(f"{prefix}{side}_top1_drop")),
                _change(metrics.get(f"{prefix}control_{side}_top1_drop")),
            )
            rows.append(f"| {side} top-1, weights {fmt} (GGUF {gguf_name}) | " + " | ".join(cells) + " |")
    return rows


def _quantized_evidence(metrics: dict) -> list[str]:
    """How much of the forget drop each format keeps, from its recovery."""
    from ..config import QUANTIZED_FORMATS

    kept = []
    for fmt in QUANTIZED_FORMATS:
        recovery = metrics.get(f"quantized_{fmt}_recovery")
        if recovery is not None and not math.isnan(recovery):
            kept.append(f"{fmt} weights keep {1 - recovery:.0%} of the forget drop")
    return kept


def _change(drop) -> str:
    """A relative drop as the change a reader expects: -33.3% for a drop of 0.333."""
    return "–" if drop is None or (isinstance(drop, float) and math.isnan(drop)) else f"{-drop:+.1%}"


def _changes(metrics: dict, side: str, name: str) -> tuple[str, str]:
    """(the unlearned model's change, the random control's) of one metric, relative to the parent."""
    if name == "loss":  # recorded as increases
        ours, control = metrics.get(f"{side}_loss_increase"), metrics.get(f"control_{side}_loss_increase")
        return _change(None if ours is None else -ours), _change(None if control is None else -control)
    return _change(metrics.get(f"{side}_{name}_drop")), _change(metrics.get(f"control_{side}_{name}_drop"))


def _recipe(config: dict) -> str:
    prune, data = config.get("prune", {}), config.get("data", {})
    if prune.get("target_forget_drop") is not None or prune.get("max_retain_drop") is not None:
        steps = (
            f"a budget (forget target {prune.get('target_forget_drop')}, retain at most "
            f"{prune.get('max_retain_drop')}, at most {prune.get('max_steps')} steps)"
        )
    else:
        steps = f"{prune.get('steps') or 1} step(s)"
    return (
        f"{steps} of {prune.get('ff_frac', 0):.1%} feed-forward and {prune.get('attn_frac', 0):.1%} attention "
        f"neurons, scored by {code(prune.get('scoring'))}; {data.get('collect_tokens')} collect and "
        f"{data.get('eval_tokens')} eval tokens a side"
    )


def version_markdown(uri: str, tags: dict, metrics: dict, config: dict) -> str:
    """The description of an unlearned version ``uri`` from its lineage ``tags``, ``metrics`` and ``config``."""
    t = tags
    lines = [
        f"**Unlearned by selective pruning.** From {code(t.get(lineage.PARENT))}, the capability shown by "
        f"{code(t.get(lineage.FORGET_DATA))} (forget data, digest {code(str(t.get(lineage.FORGET_DIGEST))[:12])}) "
        f"was removed while keeping {code(t.get(lineage.RETAIN_DATA))} (retain data, digest "
        f"{code(str(t.get(lineage.RETAIN_DIGEST))[:12])}).",
        "",
        f"Recipe: {_recipe(config)}. Removed {t.get(lineage.FF_PRUNED)} feed-forward and "
        f"{t.get(lineage.ATTN_PRUNED)} attention neurons ({t.get(lineage.FF_PRUNED_TOTAL)} and "
        f"{t.get(lineage.ATTN_PRUNED_TOTAL)} dead in this version, its parent's included).",
        "",
        "| metric | parent | unlearned | change | random control's change |",
        "|---|---|---|---|---|",
    ]
    for side, name, label in ROWS:
        key = f"{side}_{name}"
        if key not in metrics:
            continue
        lines.append(
            f"| {label} | {_number(metrics.get('parent_' + key))} | {_number(metrics.get(key))} | "
            + " | ".join(_changes(metrics, side, name))
            + " |"
        )
    lines += [_task_row(key, label, metrics) for key, label in FUNCTIONAL_ROWS if key in metrics]
    lines += _quantized_rows(metrics)
    lines.append("")
    evidence = [f"Selectivity (forget drop / retain drop): {_number(metrics.get('selectivity'))}"]
    if "control_selectivity" in metrics:
        evidence.append(f"the random control's: {_number(metrics.get('control_selectivity'))}")
    if "relearn_recovery" in metrics:
        line = (
            f"fine-tuning on forget documents brings back {_change(-metrics['relearn_recovery'])} of the removed top-1"
        )
        if "relearn_control_recovery" in metrics:
            line += (
                f" (the random control, fine-tuned alike, gains {_change(-metrics['relearn_control_recovery'])} of it)"
            )
        evidence.append(line)
    evidence += _quantized_evidence(metrics)
    lines += [
        "; ".join(evidence) + ".",
        "",
        f"Verify it: {code(f'mlflow-selprune lineage {uri} --verify')} (add `--trusted-key PUB.pem` to require "
        "signatures).",
        "",
        GATE_HEADING,
        "",
        "Not gated yet.",
    ]
    return "\n".join(lines)


def materialized(delta) -> str:
    """A materialized version's description: the delta's, without its gate decisions (they were the delta's)."""
    from .resolve import client

    try:
        source = client().get_model_version(delta.registered_name, delta.version).description or ""
    except Exception:  # noqa: BLE001 - the description is for people
        source = ""
    body = split_gate_section(source)[0].rstrip()
    return (
        f"**Materialized** from the delta version {code(delta.canonical_uri)}: the same model, stored whole.\n\n"
        f"{body}\n\n{GATE_HEADING}\n\nNot gated yet."
    )


def write(name: str, version: str, run_id: str, text: str) -> None:
    """The version's and the run's description, once the version exists: a refusal leaves the (complete)
    version as it is, with a warning naming it."""
    from .resolve import client
    from .tracking import after_registration

    def update():
        client().update_model_version(name, version, description=text)
        client().set_tag(run_id, "mlflow.note.content", text)

    after_registration(f"models:/{name}/{version}", "write its description", update)


def gate_line(record: dict, thresholds: dict) -> str:
    """One line for a gate decision: when, the thresholds, the verdict, the alias, the user, the signature."""
    given = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in thresholds.items() if v is not None and k != "metric")
    alias = (
        f"; {code('@' + record['alias_moved'])} moved here"
        if record.get("alias_moved")
        else (f"; {code('@' + record['alias_requested'])} not moved" if record.get("alias_requested") else "")
    )
    signed = "; signed" if record.get("attestation_sha256") else ""
    return (
        f"- {record['time'][:19].replace('T', ' ')} UTC: **{record['verdict']}** ({given}, metric "
        f"{thresholds.get('metric')}) by {code(record.get('user'))}{alias}{signed}"
    )


def append_gate_line(name: str, version: str, line: str) -> None:
    """Add a decision line under the description's gate heading, keeping the newest ``MAX_GATE_LINES``."""
    from .resolve import client

    try:
        current = client().get_model_version(name, version).description or ""
        head, past = split_gate_section(current)
        decisions = past[-(MAX_GATE_LINES - 1) :]
        text = f"{head.rstrip()}\n\n{GATE_HEADING}\n\n" + "\n".join([*decisions, line])
        client().update_model_version(name, version, description=text.lstrip())
    except Exception as exc:  # noqa: BLE001 - the decision is recorded in its tag; this line is for people
        logger.warning(
            "could not add the gate decision to the description of %s version %s: %s",
            name,
            version,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )


STATUS_HEADING = "### Forget policies"


def set_status_section(name: str, table: str) -> bool:
    """The registered model's description ends with its policies' status table (``reconcile --fix`` writes it; the
    text above the heading is the owner's and is kept). Written only when it changed, so a second pass writes
    nothing; returns whether it wrote."""
    from .resolve import client

    current = client().get_registered_model(name).description or ""
    lines = current.splitlines()
    marks = [i for i, line in enumerate(lines) if line == STATUS_HEADING]
    head = "\n".join(lines[: marks[-1]]) if marks else current
    text = f"{head.rstrip()}\n\n{STATUS_HEADING}\n\n{table}\n".lstrip()
    if text.strip() == current.strip():
        return False
    client().update_registered_model(name, description=text)
    return True
