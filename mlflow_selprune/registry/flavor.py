"""The ``selprune`` MLflow flavor.

An unlearned model is saved with MLflow's standard ``transformers`` flavor (so
``mlflow.transformers.load_model``, ``mlflow.pyfunc.load_model`` and ``mlflow
models serve`` work unchanged) plus a ``selprune`` flavor entry that points at
its pruning record, masks and scores inside the model directory.

Follows MLflow's flavor conventions: ``save_model``, ``log_model``,
``load_model``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME

from .._version import __version__

FLAVOR_NAME = "selprune"
RECORD_DIR = "selprune"


def task_for(model) -> str:
    """The pipeline task MLflow needs so it never asks the hub: the model kind's (``ModelKind.task``)."""
    from ..kinds import kind_of

    return kind_of(model).task


def components(model, preprocessor) -> dict:
    """The transformers-flavor components of a model and what prepares its inputs (a tokenizer, or an image
    classifier's image processor), as its kind names them."""
    from ..kinds import kind_of

    return kind_of(model).components(model, preprocessor)


def default_pip_requirements() -> list[str]:
    """Pinned to what is running, so MLflow never has to infer them (slow, and it imports the model)."""
    import tokenizers
    import torch
    import transformers

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"tokenizers=={tokenizers.__version__}",
        "safetensors",
        "accelerate",
    ]


# Served generation is greedy and short unless a request says otherwise: the same request, the same answer.
GENERATION_DEFAULTS = {"max_new_tokens": 20, "do_sample": False, "temperature": 1.0}


def model_card(model, license: str = "unknown"):
    """A model card from what we know, so MLflow never asks the hub for one (offline registries)."""
    from huggingface_hub import ModelCard

    name = type(model).__name__
    return ModelCard(
        f"---\nlicense: {license}\nlibrary_name: transformers\n---\n\n# {name}\n\n"
        "Logged by mlflow-selprune. See the selprune/ record for what was pruned and why.\n"
    )


def signature_for(task: str):
    """Text in, text out, with the inference params a serving request may set (greedy by default)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    if task != "text-generation":
        return None
    params = ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", GENERATION_DEFAULTS["max_new_tokens"]),
            ParamSpec("do_sample", "boolean", GENERATION_DEFAULTS["do_sample"]),
            ParamSpec("temperature", "double", GENERATION_DEFAULTS["temperature"]),
        ]
    )
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]), params=params)


def serving_options(task: str) -> dict:
    """What a served model of ``task`` needs to honour a request's params: for text generation, the signature
    with ``max_new_tokens``/``do_sample``/``temperature`` and greedy defaults. Base versions get it too."""
    if task != "text-generation":
        return {}
    return {"signature": signature_for(task), "model_config": dict(GENERATION_DEFAULTS)}


def save_model(
    transformers_model,
    path,
    *,
    pruning_files: dict[str, str | Path] | None = None,
    task: str | None = None,
    mlflow_model: Model | None = None,
    pip_requirements=None,
    **kwargs,
) -> None:
    """Save ``{"model": ..., "tokenizer": ...}`` with the transformers flavor plus the selprune entry.

    ``pruning_files``: name -> local file (``record``, ``masks``, ``scores``,
    ...) copied under ``selprune/`` and listed in the flavor entry.
    """
    model = transformers_model["model"] if isinstance(transformers_model, dict) else transformers_model
    if mlflow_model is None:
        mlflow_model = Model()
    task = task or task_for(model)
    kwargs.setdefault("model_card", model_card(model))
    for key, value in serving_options(task).items():
        kwargs.setdefault(key, value)
    mlflow.transformers.save_model(
        transformers_model,
        path,
        task=task,
        mlflow_model=mlflow_model,
        pip_requirements=pip_requirements or default_pip_requirements(),
        **kwargs,
    )
    record_dir = Path(path) / RECORD_DIR
    record_dir.mkdir(exist_ok=True)
    files = {}
    for name, source in (pruning_files or {}).items():
        target = record_dir / Path(source).name
        shutil.copyfile(source, target)
        files[name] = f"{RECORD_DIR}/{target.name}"
    mlflow_model.add_flavor(FLAVOR_NAME, plugin_version=__version__, files=files)
    mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))


def log_model(
    transformers_model, name: str = "model", *, pruning_files=None, task=None, pip_requirements=None, **kwargs
):
    """Log an unlearned model to the active run (``Model.log`` with this module as the flavor); its manifest is
    taken of the directory uploaded (``manifest.log_and_hash``)."""
    import mlflow_selprune.registry.flavor as flavor

    from .manifest import log_and_hash

    return log_and_hash(
        flavor,
        name=name,
        transformers_model=transformers_model,
        pruning_files=pruning_files,
        task=task,
        pip_requirements=pip_requirements,
        **kwargs,
    )


def load_model(model_uri: str, dst_path: str | None = None, device=None, **kwargs) -> dict:
    """``{"model", "tokenizer", "record"}`` (plus ``"image_processor"`` for an image classifier, whose
    ``"tokenizer"`` is None): the weights through the transformers flavor, the pruning record if any."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path))
    components = mlflow.transformers.load_model(str(local), return_type="components", device=device, **kwargs)
    flavors = Model.load(str(local / MLMODEL_FILE_NAME)).flavors
    record = None
    record_file = flavors.get(FLAVOR_NAME, {}).get("files", {}).get("record")
    if record_file:
        from .loading import inside

        record = json.loads(inside(local, record_file, model_uri).read_text())
    loaded = {"model": components["model"], "tokenizer": components.get("tokenizer"), "record": record}
    if components.get("image_processor") is not None:
        loaded["image_processor"] = components["image_processor"]
    return loaded
