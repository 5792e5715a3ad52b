"""Delta versions: store only what pruning changed, against a registered parent.

A delta model directory holds the bit-packed masks, the final biases of any
projection whose bias ``--attn-mean-offset`` changed, and a ``selprune``
flavor entry naming the parent (``models:/NAME/VERSION``), the parent's
``weights_sha256`` and the version's own. Loading fetches the parent (itself
possibly a delta: the chain resolves down to the first full version), checks
the parent's digest before touching anything, applies the masks, and checks
that the result has the version's own digest. Any mismatch or missing link is
one clear error, never a silently different model.

It is also a ``python_function`` model (``mlflow.pyfunc.load_model`` and
``mlflow models serve`` work): prediction is greedy text generation.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME

from .._version import __version__
from ..config import ATTN

logger = logging.getLogger(__name__)

from .delta_format import (  # noqa: E402,F401 - the format, re-exported for the flavor's users
    BIASES_FILE,
    DELTA_DIR,
    FLAVOR_NAME,
    MASKS_FILE,
    MAX_CHAIN,
    DeltaError,
    apply_delta,
    is_delta,
    pack_masks,
    unpack_masks,
)


def changed_biases(model, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The biases of the attention projections that had neurons pruned (the mean offset changes them)."""
    from ..engine.architecture import find_architecture

    arch = find_architecture(model)
    return {
        p.name: p.bias.detach().cpu().clone()
        for p, row in zip(arch.attn, masks[ATTN])
        if row.any() and p.bias is not None
    }


def save_model(
    path,
    *,
    parent_uri: str,
    parent_weights_sha256: str,
    weights_sha256: str,
    masks: dict[str, torch.Tensor],
    biases: dict[str, torch.Tensor],
    pruning_files: dict | None = None,
    dtype: str | None = None,
    mlflow_model: Model | None = None,
    pip_requirements=None,
) -> None:
    """Write a delta model directory (MLflow model with the ``selprune`` and ``python_function`` flavors).

    ``dtype``: the dtype the parent was loaded in when it was pruned (``prune --dtype``); both digests are of
    weights in that dtype, so the parent is loaded in it again to rebuild the version."""
    from safetensors.torch import save_file

    from .flavor import RECORD_DIR, default_pip_requirements

    path = Path(path)
    (path / DELTA_DIR).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in pack_masks(masks).items()}, str(path / DELTA_DIR / MASKS_FILE))
    save_file({k: v.contiguous() for k, v in biases.items()}, str(path / DELTA_DIR / BIASES_FILE))
    files = {}
    if pruning_files:
        (path / RECORD_DIR).mkdir(exist_ok=True)
        for name, source in pruning_files.items():
            target = path / RECORD_DIR / Path(source).name
            shutil.copyfile(source, target)
            files[name] = f"{RECORD_DIR}/{target.name}"
    mlflow_model = mlflow_model or Model()
    import mlflow.pyfunc

    mlflow.pyfunc.add_to_model(mlflow_model, loader_module="mlflow_selprune.registry.delta")
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        plugin_version=__version__,
        storage="delta",
        parent_model_uri=parent_uri,
        parent_weights_sha256=parent_weights_sha256,
        weights_sha256=weights_sha256,
        masks=f"{DELTA_DIR}/{MASKS_FILE}",
        biases=f"{DELTA_DIR}/{BIASES_FILE}",
        files=files,
        **({"dtype": dtype} if dtype else {}),
    )
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))
    (path / "requirements.txt").write_text("\n".join(pip_requirements or default_pip_requirements()) + "\n")


def log_model(name: str = "model", **kwargs):
    """Log a delta model to the active run (``Model.log`` with this module as the flavor); its manifest is taken
    of the directory uploaded (``manifest.log_and_hash``)."""
    import mlflow_selprune.registry.delta as flavor

    from .manifest import log_and_hash

    return log_and_hash(flavor, name=name, **kwargs)


class _GreedyGenerator:
    """pyfunc model of a delta version: greedy text generation from the rebuilt weights."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def predict(self, model_input, params=None):
        import pandas as pd

        params = dict(params or {})
        max_new_tokens = int(params.get("max_new_tokens", 20))
        if isinstance(model_input, pd.DataFrame):
            prompts = [str(v) for v in model_input.iloc[:, 0]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(v) for v in model_input]
        outputs = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt")
            with torch.inference_mode():
                generated = self.model.generate(
                    **ids,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
            outputs.append(self.tokenizer.decode(generated[0], skip_special_tokens=True))
        return outputs


def _load_pyfunc(path):
    """MLflow's pyfunc entry point (``loader_module``)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    while not (path / MLMODEL_FILE_NAME).is_file() and path != path.parent:
        path = path.parent
    from .loading import rebuild_delta

    model, tokenizer = rebuild_delta(path, str(path))
    return _GreedyGenerator(model, tokenizer)
