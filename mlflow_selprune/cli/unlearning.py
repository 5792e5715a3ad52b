"""Unlearning: ``prune``, ``evaluate`` and the demos."""

from __future__ import annotations

import dataclasses
import os
import sys

import click

from ..config import EvidenceOptions, PruneConfig
from .common import (
    SIGNING_KEY,
    NO_PROGRESS,
    _job_accelerator,
    _maybe_relaunch,
    _no_progress_bars,
    _say_store,
    config_from,
    config_options,
    data_from,
    data_options,
    handle_errors,
    main,
)


@main.command()
@click.option(
    "--model-uri", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/..., or a model directory."
)
@click.option(
    "--forget", required=True, help="DATA to forget: file, directory, builtin:..., hub dataset, or MLflow dataset URI."
)
@click.option(
    "--retain", default=None, help="DATA to keep (required, except with --forget-classes: then the --forget DATA)."
)
@config_options(PruneConfig)
@config_options(EvidenceOptions)
@click.option("--register-as", default=None, help="Registered model name for the result (default: the parent's).")
@click.option("--no-register", is_flag=True, help="Log the run and model but register nothing.")
@click.option("--alias", default=None, help="Set this alias on the new version.")
@click.option(
    "--storage",
    type=click.Choice(["full", "delta"]),
    default="full",
    show_default=True,
    help="full: the whole weights (transformers flavor); delta: only the masks, against the registered parent.",
)
@SIGNING_KEY
@data_options
@handle_errors
def prune(**kw):
    """Prune a model so it forgets FORGET data and keeps RETAIN data; register the result."""
    if int(os.environ.get("RANK", "0")) == 0:
        _say_store()  # first, so even a refused option's line follows the store it would have used
    config = config_from(PruneConfig, kw).validate()
    data = data_from(kw).validate()
    evidence = config_from(EvidenceOptions, kw).validate()
    from ..unlearn import check_data_specs

    check_data_specs(kw["forget"], kw["retain"], data)  # in milliseconds, before anything heavy is imported
    from ..registry.resolve import check_alias, check_registered_name

    check_alias(kw["alias"] or None)
    check_registered_name(kw["register_as"] or None)
    from ..registry.attest import load_signing_key

    load_signing_key(kw["signing_key"])  # a bad key answers before anything is loaded
    _maybe_relaunch(kw["num_processes"])
    from ..report import format_summary
    from ..unlearn import run_prune

    accelerator = _job_accelerator()
    result = run_prune(
        kw["model_uri"],
        kw["forget"],
        kw["retain"],
        config=config,
        data=data,
        evidence=evidence,
        register=not kw["no_register"],
        register_as=kw["register_as"] or None,
        alias=kw["alias"] or None,
        storage=kw["storage"],
        device=kw["device"],
        dtype=kw["dtype"],
        run_name=kw["run_name"],
        trust_remote_code=kw["trust_remote_code"],
        accelerator=accelerator,
        progress=_no_progress_bars(kw["no_progress"]),
        signing_key=kw["signing_key"],
    )
    if accelerator is None or accelerator.is_main_process:
        click.echo(format_summary(result.metrics, result.model_uri, result.run_id))


@main.command()
@click.option("--model-uri", required=True)
@click.option("--forget", required=True)
@click.option("--retain", default=None, help="DATA to keep (required, except with --forget-classes).")
@click.option("--parent-model-uri", default=None, help="Report drops (and relearning recovery) against this model.")
@config_options(
    EvidenceOptions,
    only=(
        "relearn_steps",
        "relearn_curve",
        "relearn_lr",
        "relearn_batch_size",
        "code_tasks",
        "quantized_check",
        "allow_unsandboxed_code",
    ),
)
@config_options(PruneConfig, only=("seed",))
@data_options
@handle_errors
def evaluate(**kw):
    """Forget/retain metrics of a model, logged to an MLflow run (nothing registered)."""
    if int(os.environ.get("RANK", "0")) == 0:
        _say_store()
    data = data_from(kw).validate()
    evidence = dataclasses.replace(config_from(EvidenceOptions, kw), control=False).validate()
    from ..unlearn import check_data_specs

    check_data_specs(kw["forget"], kw["retain"], data)
    _maybe_relaunch(kw["num_processes"])
    from ..unlearn import run_evaluate

    accelerator = _job_accelerator()
    result = run_evaluate(
        kw["model_uri"],
        kw["forget"],
        kw["retain"],
        data=data,
        evidence=evidence,
        parent_model_uri=kw["parent_model_uri"],
        seed=kw["seed"],
        device=kw["device"],
        dtype=kw["dtype"],
        run_name=kw["run_name"],
        trust_remote_code=kw["trust_remote_code"],
        accelerator=accelerator,
        progress=_no_progress_bars(kw["no_progress"]),
    )
    if accelerator is None or accelerator.is_main_process:
        for key, value in sorted(result.metrics.items()):
            click.echo(f"{key:<34}{value:.4f}")
        click.echo(f"run: {result.run_id}")


@main.command()
@click.option(
    "--tiny",
    is_flag=True,
    help="The self-trained demo: train a ~5M-parameter LM here, then unlearn (quick; its effect is small).",
)
@click.option(
    "--vision",
    is_flag=True,
    help="The image demo: a small ViT on handwritten digits forgets one digit (needs scikit-learn).",
)
@click.option(
    "--arch",
    type=click.Choice(["vit", "resnet", "convnext"]),
    default=None,
    help="--vision: the model trained and unlearned (default: vit; resnet and convnext prune convolutional "
    "blocks' channels).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="The collect/eval split of the documents and the random control (--tiny/--vision: also the training).",
)
@click.option(
    "--train-steps",
    type=int,
    default=None,
    help="--tiny/--vision: optimizer steps for the demo model (default: the recipe's).",
)
@click.option("--retrain", is_flag=True, help="--tiny/--vision: train a new base model even if '@base' exists.")
@click.option(
    "--collect-tokens",
    type=int,
    default=None,
    help="Text demos: statistics tokens per side (default: the recipe's; smaller for a quick look).",
)
@click.option(
    "--eval-tokens",
    type=int,
    default=None,
    help="Text demos: eval tokens per side (default: the recipe's; its measured numbers need the default).",
)
@click.option(
    "--code-tasks/--no-code-tasks",
    default=None,
    help="The real-model demo: run the 40 Python tasks and 40 cloze prompts on the three models and gate on "
    "the pass rate (default: on; about a minute on 2 cores).",
)
@click.option(
    "--allow-unsandboxed-code",
    is_flag=True,
    help="The real-model demo where bubblewrap is not available: run its generated Python without the sandbox.",
)
@click.option(
    "--relearn",
    is_flag=True,
    help="The real-model demo: also fine-tune the unlearned model, the parent and the control 20 steps on Python "
    "and show how much comes back (the relearning curve; about 5 minutes more on 2 cores).",
)
@NO_PROGRESS
@handle_errors
def demo(
    tiny,
    vision,
    arch,
    seed,
    train_steps,
    retrain,
    collect_tokens,
    eval_tokens,
    code_tasks,
    allow_unsandboxed_code,
    relearn,
    no_progress,
):
    """Offline end to end: register SmolLM2-135M, unlearn Python while keeping English, gate, promote.

    --tiny trains a small LM here instead; --vision a ViT (or --arch resnet/convnext) that forgets one
    handwritten digit.
    """
    from ..errors import ConfigError

    _no_progress_bars(no_progress)
    if tiny and vision:
        raise ConfigError("--tiny and --vision are two demos; choose one")
    if (code_tasks is not None or allow_unsandboxed_code or relearn) and (tiny or vision):
        raise ConfigError(
            "--code-tasks/--no-code-tasks, --allow-unsandboxed-code and --relearn apply to the real-model demo "
            "(mlflow-selprune demo)"
        )
    if arch is not None and not vision:
        raise ConfigError("--arch applies to the vision demo: mlflow-selprune demo --vision --arch " + arch)
    if vision:
        _vision_demo(arch, seed, train_steps, retrain, collect_tokens, eval_tokens, no_progress)
    if tiny:
        from ..demo_tiny import run_demo as run_tiny_demo

        sys.exit(
            run_tiny_demo(
                train_steps=train_steps,
                seed=seed,
                retrain=retrain,
                progress=not no_progress,
                collect_tokens=collect_tokens,
                eval_tokens=eval_tokens,
            )
        )
    if train_steps is not None or retrain:
        raise ConfigError("--train-steps/--retrain apply to --tiny and --vision; the demo's model is pretrained")
    from ..demo import run_demo

    sys.exit(
        run_demo(
            seed=seed,
            progress=not no_progress,
            collect_tokens=collect_tokens,
            eval_tokens=eval_tokens,
            code_tasks=code_tasks is not False,
            allow_unsandboxed_code=allow_unsandboxed_code,
            relearn=relearn,
        )
    )


def _vision_demo(arch, seed, train_steps, retrain, collect_tokens, eval_tokens, no_progress) -> None:
    from ..demo_cnn import recipe_for
    from ..demo_vision import run_vision_demo
    from ..errors import ConfigError

    if collect_tokens is not None or eval_tokens is not None:
        raise ConfigError("--collect-tokens/--eval-tokens apply to the text demos; the vision demo counts images")
    recipe = recipe_for(arch or "vit")
    sys.exit(
        run_vision_demo(train_steps=train_steps, seed=seed, retrain=retrain, progress=not no_progress, recipe=recipe)
    )
