"""What every command group shares: the ``main`` group, exit codes, error handling, options from the configs.

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
import logging
import os
import sys

import click

from .._version import __version__
from ..config import GATE_METRICS, DataOptions, SourceOptions

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


def _job_accelerator():
    """The job's Accelerator (None on one process); the main process says which store it uses."""
    accelerator = _accelerator()
    if accelerator is None or accelerator.is_main_process:
        _announce_store()
    return accelerator


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


SIGNING_KEY = click.option(
    "--signing-key",
    default=None,
    metavar="KEY.pem",
    help="Sign an in-toto attestation with this Ed25519 private key (default: $SELPRUNE_SIGNING_KEY).",
)


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
    click.option("--metric", type=click.Choice(GATE_METRICS), default="top1", show_default=True),
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
