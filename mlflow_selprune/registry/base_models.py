"""Bring a model into the registry as a base (root) version, with its digests and provenance.

``register(SOURCE, name, alias)`` logs the model with MLflow's transformers flavor in its own run and
registers it in one request with ``selprune.*`` tags: its weights digest, where it came from
(``model_sources``: a directory, a GGUF file, a packaged model, a hub name) and, for GGUF sources,
the GGUF file's sha256 and quantization type. The tags are anchored in the run exactly as an
unlearned version's are (``tracking.record_lineage``), so ``lineage --verify`` checks a base version's
provenance and weights too. Every check (name, alias, SOURCE, permission) runs before the run exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from .._version import __version__
from ..errors import BadInputError
from . import lineage, manifest

logger = logging.getLogger(__name__)

SOURCE_PREFIX = lineage.SOURCE_PREFIX
BASE_KIND = lineage.PREFIX + "base"


@dataclass
class RegisteredBase:
    model_uri: str  # models:/name/version
    run_id: str
    tags: dict


def existing_alias(name: str, alias: str) -> str | None:
    """``models:/name/version`` that ``name@alias`` points at, or None when there is no such model or alias."""
    from .resolve import client

    try:
        mv = client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return f"models:/{name}/{mv.version}"


def provenance_tags(provenance: dict) -> dict[str, str]:
    """``selprune.source.<key>`` for each provenance entry (values cut to the registry's tag limit)."""
    return {SOURCE_PREFIX + key: str(value)[:4900] for key, value in sorted(provenance.items())}


def register(source: str, name: str, alias: str | None = None) -> RegisteredBase:
    """Prepare SOURCE (``model_sources.prepare``), log it whole and register it as a new version of ``name``."""
    from .model_sources import kind_of, prepare
    from .resolve import check_alias, check_can_add_versions, check_registered_name

    check_registered_name(name, flag="--name")
    check_alias(alias)
    kind_of(source)  # a SOURCE that cannot work fails before anything is fetched or written
    check_can_add_versions(name)
    prepared = prepare(source)
    from .loading import load_components
    from .resolve import ResolvedModel

    local = ResolvedModel(
        uri=str(prepared.directory), load_uri=str(prepared.directory), canonical_uri=str(prepared.directory)
    )
    model, tokenizer = load_components(local)
    return register_components(model, tokenizer, name, alias, provenance=prepared.provenance, license=prepared.license)


def register_components(
    model,
    preprocessor,
    name: str,
    alias: str | None = None,
    *,
    provenance: dict,
    license: str = "unknown",
    run_name: str | None = None,
    extra_params: dict | None = None,
    extra_metrics: dict | None = None,
) -> RegisteredBase:
    """Log a loaded model and its tokenizer (or image processor) and register it as a base version."""
    import mlflow

    from .flavor import components, default_pip_requirements, model_card, serving_options, task_for
    from .resolve import client
    from .tracking import job_run, record_lineage, register_version

    tags = {
        BASE_KIND: "true",
        lineage.WEIGHTS_SHA: lineage.weights_sha256(model),
        lineage.PLUGIN_VERSION: __version__,
        **provenance_tags(provenance),
    }
    with job_run(run_name or f"{name}-base", "register") as run:
        if extra_params:
            mlflow.log_params(extra_params)
        if extra_metrics:
            mlflow.log_metrics(extra_metrics)
        task = task_for(model)
        info = manifest.log_and_hash(  # mlflow.transformers.log_model, hashing the directory it uploads
            mlflow.transformers,
            transformers_model=components(model, preprocessor),
            name="model",
            task=task,
            pip_requirements=default_pip_requirements(),
            model_card=model_card(model, license=license),
            **serving_options(task),  # served like an unlearned version: greedy, honouring max_new_tokens
        )
        tags[lineage.RUN_ID] = run.info.run_id
        tags[lineage.MANIFEST_SHA] = manifest.log(run.info.run_id, info.model_uri)
        record_lineage(run.info.run_id, tags)
        mv = register_version(info.model_uri, name, tags)
    if alias:
        client().set_registered_model_alias(name, alias, mv.version)
    return RegisteredBase(f"models:/{name}/{mv.version}", run.info.run_id, tags)


def ensure_registered(source: str, name: str, alias: str) -> tuple[str, bool]:
    """``(models:/name/version, newly registered)``: ``name@alias`` if it exists, else SOURCE registered."""
    existing = existing_alias(name, alias)
    if existing:
        return existing, False
    try:
        return register(source, name, alias).model_uri, True
    except MlflowException as exc:
        raise BadInputError(f"could not register {source} as {name}: {exc.message.splitlines()[0]}") from None
