"""The ``mlflow-selprune`` command line: prune, evaluate, gate, lineage, demo.

Exit codes: 0 success, 1 gate failed, 2 bad input (one line on stderr saying
what is wrong and what to do; the registry is untouched), 3 unexpected error.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click

from . import __version__

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_ERROR = 0, 1, 2, 3
logger = logging.getLogger("mlflow_selprune")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def _accelerator():
    """An Accelerator when launched with several processes (torchrun / accelerate launch), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def _maybe_relaunch(num_processes: int) -> None:
    """With --num-processes N > 1 outside a launcher, run this very command on N processes and exit with their code."""
    if num_processes < 1:
        raise click.BadParameter("must be >= 1", param_hint="--num-processes")
    if num_processes == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from .launch import launch, strip_option

    sys.exit(launch(num_processes, strip_option(sys.argv[1:], "--num-processes")))


def _rank_prefix() -> str:
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _bad_input_types():
    from .architecture import UnsupportedArchitectureError
    from .data import DataError
    from .lineage import LineageError
    from .registry import BadInputError

    return (BadInputError, DataError, UnsupportedArchitectureError, LineageError, ValueError, TypeError,
            FileNotFoundError, FloatingPointError)


def _connection_message(exc: BaseException) -> str | None:
    """A tracking server that is down or refuses us, in one line."""
    from mlflow.exceptions import MlflowException

    text = str(exc)
    if isinstance(exc, MlflowException):
        if "401" in text or "403" in text or "PERMISSION_DENIED" in text or "Unauthorized" in text:
            return (f"the MLflow server refused the request (permission denied): {text.splitlines()[0][:300]}; "
                    "check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD and the user's permissions")
        if "Max retries exceeded" in text or "Connection refused" in text or "Failed to establish" in text:
            import mlflow

            return (f"the MLflow tracking server at {mlflow.get_tracking_uri()} is not reachable; "
                    "start it or set MLFLOW_TRACKING_URI to a running server")
    return None


def handle_errors(func):
    """Turn known failures into one clear line and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            return func(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except MlflowException as exc:
            message = _connection_message(exc)
            if message is None and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                message = exc.message.splitlines()[0]
            if message is None:
                click.echo(f"{_rank_prefix()}error: MLflow failed: {str(exc).splitlines()[0]}", err=True)
                sys.exit(EXIT_ERROR)
            click.echo(f"{_rank_prefix()}error: {message}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except _bad_input_types() as exc:
            click.echo(f"{_rank_prefix()}error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was registered", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the last line of defence prints one line, not a traceback
            if os.environ.get("SELPRUNE_DEBUG"):
                raise
            click.echo(f"{_rank_prefix()}error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                       "(set SELPRUNE_DEBUG=1 for the traceback)", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper


def data_options(func):
    """Options that turn forget/retain DATA into token batches."""
    options = [
        click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per sequence; longer documents are cut into chunks."),
        click.option("--batch-size", type=int, default=16, show_default=True),
        click.option("--collect-tokens", type=int, default=20_000, show_default=True, help="Token budget per dataset for statistics (paper: 100000)."),
        click.option("--eval-tokens", type=int, default=10_000, show_default=True, help="Token budget per dataset for metrics (paper: 100000)."),
        click.option("--text-column", default=None, help="Column holding the text (default: detect text/content/code/...)."),
        click.option("--glob", "glob_pattern", default=None, help="For a directory DATA: which files to read, e.g. '*.py'."),
        click.option("--paragraphs", is_flag=True, help="For .txt DATA: one document per blank-line-separated block."),
        click.option("--split", default=None, help="Dataset split (hub datasets, DatasetDicts)."),
        click.option("--data-config", default=None, help="Hub dataset configuration, e.g. Python-all."),
        click.option("--revision", default=None, help="Hub dataset revision."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, or auto (shard a big model across GPUs)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="Load the model in this dtype (statistics stay float64)."),
        click.option("--trust-remote-code", is_flag=True, help="Allow model/dataset code from the source (off by default)."),
        click.option("--run-name", default=None, help="MLflow run name."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
        click.option("--num-processes", type=int, default=1, show_default=True,
                     help="Data-parallel processes (launched like torchrun; ignored inside a torchrun/accelerate launch)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _data(kwargs):
    from .unlearn import DataOptions

    return DataOptions(
        max_length=kwargs["max_length"], batch_size=kwargs["batch_size"],
        collect_tokens=kwargs["collect_tokens"], eval_tokens=kwargs["eval_tokens"],
        text_column=kwargs["text_column"], glob=kwargs["glob_pattern"], paragraphs=kwargs["paragraphs"],
        split=kwargs["split"], config=kwargs["data_config"], revision=kwargs["revision"],
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlflow-selprune")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose):
    """Machine unlearning by selective pruning for models in the MLflow Model Registry."""
    _setup_logging(verbose)


@main.command()
@click.option("--model-uri", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/..., or a model directory.")
@click.option("--forget", required=True, help="DATA to forget: file, directory, builtin:..., hub dataset, or MLflow dataset URI.")
@click.option("--retain", required=True, help="DATA to keep.")
@click.option("--ff-frac", type=float, default=0.02, show_default=True, help="Fraction of all FF neurons pruned per step.")
@click.option("--attn-frac", type=float, default=0.0, show_default=True, help="Fraction of all attention neurons pruned per step.")
@click.option("--steps", type=int, default=None, help="Fixed number of steps (default 1 unless a budget is given).")
@click.option("--target-forget-drop", type=float, default=None, help="Budget mode: stop once forget top1 dropped this much (relative).")
@click.option("--max-retain-drop", type=float, default=None, help="Budget mode: never keep a step past this retain top1 drop.")
@click.option("--max-steps", type=int, default=50, show_default=True, help="Budget mode: give up after this many steps.")
@click.option("--scoring", default="abs", show_default=True, help="Importance: abs, freq, rms, std, sqrt, mean, random.")
@click.option("--attn-scoring", default=None, help="Importance for attention neurons (default: --scoring).")
@click.option("--selection", type=click.Choice(["global", "per-layer"]), default="global", show_default=True)
@click.option("--ff-eps", type=float, default=1e-3, show_default=True)
@click.option("--attn-eps", type=float, default=1e-4, show_default=True)
@click.option("--attn-mean-offset", is_flag=True, help="Fold pruned attention neurons' mean into the bias.")
@click.option("--eval-every", type=int, default=1, show_default=True, help="Evaluate every k steps (the last step always).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--register-as", default=None, help="Registered model name for the result (default: the parent's).")
@click.option("--no-register", is_flag=True, help="Log the run and model but register nothing.")
@click.option("--alias", default=None, help="Set this alias on the new version.")
@data_options
@handle_errors
def prune(**kw):
    """Prune a model so it forgets FORGET data and keeps RETAIN data; register the result."""
    from .pruning import PruneConfig
    from .unlearn import format_summary, run_prune

    _maybe_relaunch(kw["num_processes"])
    config = PruneConfig(
        ff_frac=kw["ff_frac"], attn_frac=kw["attn_frac"], steps=kw["steps"], scoring=kw["scoring"],
        attn_scoring=kw["attn_scoring"], selection=kw["selection"], ff_eps=kw["ff_eps"], attn_eps=kw["attn_eps"],
        attn_mean_offset=kw["attn_mean_offset"], target_forget_drop=kw["target_forget_drop"],
        max_retain_drop=kw["max_retain_drop"], max_steps=kw["max_steps"], eval_every=kw["eval_every"], seed=kw["seed"],
    )
    accelerator = _accelerator()
    result = run_prune(
        kw["model_uri"], kw["forget"], kw["retain"], config=config, data=_data(kw),
        register=not kw["no_register"], register_as=kw["register_as"] or None, alias=kw["alias"] or None,
        device=kw["device"], dtype=kw["dtype"], run_name=kw["run_name"],
        trust_remote_code=kw["trust_remote_code"], accelerator=accelerator, progress=not kw["no_progress"],
    )
    if accelerator is None or accelerator.is_main_process:
        click.echo(format_summary(result))


@main.command()
@click.option("--model-uri", required=True)
@click.option("--forget", required=True)
@click.option("--retain", required=True)
@data_options
@handle_errors
def evaluate(**kw):
    """Forget/retain metrics of a model, logged to an MLflow run (nothing registered)."""
    from .unlearn import run_evaluate

    _maybe_relaunch(kw["num_processes"])
    accelerator = _accelerator()
    result = run_evaluate(kw["model_uri"], kw["forget"], kw["retain"], data=_data(kw), device=kw["device"],
                          dtype=kw["dtype"], run_name=kw["run_name"], trust_remote_code=kw["trust_remote_code"],
                          accelerator=accelerator, progress=not kw["no_progress"])
    if accelerator is None or accelerator.is_main_process:
        for key, value in sorted(result.metrics.items()):
            click.echo(f"{key:<24}{value:.4f}")
        click.echo(f"run: {result.run_id}")


@main.command()
@click.option("--model-uri", required=True, help="models:/NAME/VERSION (or @ALIAS) of an unlearned version.")
@click.option("--max-retain-drop", type=float, default=None, help="Highest acceptable relative retain drop, e.g. 0.05.")
@click.option("--min-forget-drop", type=float, default=None, help="Lowest acceptable relative forget drop, e.g. 0.2.")
@click.option("--min-selectivity", type=float, default=None, help="Lowest acceptable forget drop / retain drop, e.g. 3.")
@click.option("--metric", type=click.Choice(["top1", "top10", "skip50_top1"]), default="top1", show_default=True)
@click.option("--set-alias", default=None, help="Point this alias at the version if the gate passes.")
@handle_errors
def gate(model_uri, max_retain_drop, min_forget_drop, min_selectivity, metric, set_alias):
    """Pass (exit 0) or fail (exit 1) a version on its recorded metrics; the verdict is tagged either way."""
    from .gate import gate as run_gate

    result = run_gate(model_uri, max_retain_drop=max_retain_drop, min_forget_drop=min_forget_drop,
                      min_selectivity=min_selectivity, metric=metric, set_alias=set_alias or None)
    for name, value in result.metrics.items():
        click.echo(f"{name} = {value:.4f}")
    if result.passed:
        click.echo(f"gate PASSED for {result.model_uri}" + (f"; alias '{result.alias_set}' now points to it" if result.alias_set else ""))
        sys.exit(EXIT_OK)
    click.echo(f"gate FAILED for {result.model_uri}: " + "; ".join(result.failures), err=True)
    sys.exit(EXIT_GATE_FAILED)


@main.command(name="lineage")
@click.argument("model_uri")
@click.option("--json", "as_json", is_flag=True, help="Print the chain as JSON.")
@click.option("--verify", is_flag=True, help="Recompute each unlearned version's weights digest.")
@handle_errors
def lineage_command(model_uri, as_json, verify):
    """The chain from MODEL_URI back to its root model: data, digests, neurons pruned, metrics, gate verdicts."""
    from . import lineage

    hops = lineage.chain(model_uri)
    rows = [hop.to_dict() for hop in hops]
    mismatches = 0
    if verify:
        for hop, row in zip(hops, rows):
            if hop.is_unlearned:
                ok, recorded, actual = lineage.verify(hop)
                row["verified"] = ok
                row["actual_weights_sha256"] = actual
                mismatches += not ok
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for i, row in enumerate(rows):
            head = "root" if not row["unlearned"] else f"hop {i}"
            click.echo(f"{head}: {row['model_uri']}  (run {row['run_id']})")
            if row["unlearned"]:
                click.echo(f"  parent:  {row['parent_model_uri']}")
                click.echo(f"  forget:  {row['forget_data']}  sha256 {row['forget_digest'][:16]}")
                click.echo(f"  retain:  {row['retain_data']}  sha256 {row['retain_digest'][:16]}")
                click.echo(f"  pruned:  {row['ff_pruned']} FF, {row['attn_pruned']} attention neurons")
                m = row["metrics"]
                if m:
                    click.echo("  metrics: " + ", ".join(f"{k}={m[k]:.4f}" for k in
                                                         ("forget_top1_drop", "retain_top1_drop", "selectivity") if k in m))
                click.echo(f"  gate:    {row['gate_verdict'] or 'not gated'}")
                if "verified" in row:
                    click.echo(f"  weights: {'verified' if row['verified'] else 'MISMATCH: recorded ' + str(row['weights_sha256'])[:16] + ', actual ' + row['actual_weights_sha256'][:16]}")
    if mismatches:
        click.echo(f"error: {mismatches} version(s) do not match their recorded weights digest", err=True)
        sys.exit(EXIT_GATE_FAILED)


@main.command()
@click.option("--train-seconds", type=float, default=180, show_default=True, help="Wall-time cap for training the demo model.")
@click.option("--retrain", is_flag=True, help="Train a new base model even if 'selprune-demo@base' exists.")
@click.option("--no-progress", is_flag=True)
@handle_errors
def demo(train_seconds, retrain, no_progress):
    """Offline end to end: train a small LM, register it, unlearn Python code, gate, promote."""
    from .demo import run_demo

    sys.exit(run_demo(train_seconds=train_seconds, retrain=retrain, progress=not no_progress))


if __name__ == "__main__":
    main()
