"""The manifest of a logged model: the sha256 of every file in its directory, so nothing loaded goes unchecked.

The weights digest covers the tensors only; a model also loads its
``config.json`` (change ``hidden_act`` and it computes something else), its
generation config, tokenizer or image processor files, ``MLmodel``, and the
pruning record, masks and scores copied beside them. The manifest lists every
file of the logged model directory with its sha256, in path order; its own
digest (of the canonical JSON) is tagged on the version and anchored in the
run's lineage record like every other lineage tag, and the manifest itself is
a run artifact.

Each model byte is read once per use: the manifest of a new model is taken of
the directory MLflow uploads, as it is saved (``log_and_hash``), never by
fetching the upload back; verifying hashes the copy that is then loaded
(``one_copy``), never a second download.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

MANIFEST_ARTIFACT = "selprune/manifest.json"
# Written by MLflow into the model directory when a version is registered (its name and number), after the
# manifest is taken; nothing loads it.
REGISTRY_WRITTEN = frozenset({"registered_model_meta"})


def directory_files(root: Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``root``, in path order (but MLflow's own
    ``registered_model_meta``)."""
    from .lineage import file_sha256

    files = (p for p in root.rglob("*") if p.is_file())
    return {
        path.relative_to(root).as_posix(): file_sha256(path)
        for path in sorted(files)
        if path.relative_to(root).as_posix() not in REGISTRY_WRITTEN
    }


def encode(files: dict[str, str]) -> bytes:
    """The manifest's bytes: canonical JSON (sorted keys, no spaces), what its digest is taken of."""
    return json.dumps({"files": dict(sorted(files.items()))}, sort_keys=True, separators=(",", ":")).encode()


def digest(files: dict[str, str]) -> str:
    return hashlib.sha256(encode(files)).hexdigest()


# ----------------------------------------------------------------------------- one copy, hashed once


@dataclass
class Copy:
    """A downloaded copy of a model's files; its directory is removed once nothing refers to the copy."""

    directory: tempfile.TemporaryDirectory
    path: Path
    files: dict[str, str] | None = None  # its manifest, once hashed

    def manifest(self) -> dict[str, str]:
        if self.files is None:
            self.files = directory_files(self.path)
        return self.files


_copies: ContextVar[dict[str, Copy] | None] = ContextVar("selprune_model_copies", default=None)


@contextlib.contextmanager
def one_copy():
    """Within it, each model URI is downloaded once and hashed once, by whichever asks first (the manifest check
    or the loader): the files verified are the files loaded, with no second copy fetched in between."""
    if _copies.get() is not None:
        yield
        return
    token = _copies.set({})
    try:
        yield
    finally:
        _copies.reset(token)


def fetched(artifact_uri: str) -> Copy:
    """The files of ``artifact_uri`` on local disk: downloaded now, or the copy this ``one_copy`` already holds."""
    import mlflow

    copies = _copies.get()
    if copies is not None and artifact_uri in copies:
        return copies[artifact_uri]
    directory = tempfile.TemporaryDirectory(prefix="selprune-model-", ignore_cleanup_errors=True)
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=directory.name))
    except BaseException:
        directory.cleanup()
        raise
    copy = Copy(directory, path)
    if copies is not None:
        copies[artifact_uri] = copy
    return copy


def share(artifact_uri: str, copy: Copy) -> None:
    """Hand a copy fetched earlier to the active ``one_copy``: the checks that follow read that copy (the one
    about to be loaded), not another."""
    copies = _copies.get()
    if copies is not None:
        copies[artifact_uri] = copy


def of_artifacts(artifact_uri: str) -> dict[str, str]:
    """The manifest of a logged or registered model's files as stored now (``models:/...``)."""
    from .lineage import refuse_if_denied

    try:
        copy = fetched(artifact_uri)
    except Exception as exc:  # noqa: BLE001 - a refusal is one permission line; anything else as it is
        refuse_if_denied(exc)
        raise
    return copy.manifest()


# ----------------------------------------------------------------------------- a new model's manifest

# logged model URI -> the manifest of the directory this process uploaded as that model, until ``log`` writes it
_taken: dict[str, dict[str, str]] = {}


class _Hashing:
    """A flavor as ``Model.log`` uses it (``__name__``, ``save_model``) that hashes the directory it saved: the
    very directory MLflow uploads next."""

    def __init__(self, flavor) -> None:
        self.flavor, self.__name__ = flavor, flavor.__name__
        self.files: dict[str, str] = {}

    def save_model(self, path, **kwargs) -> None:
        self.flavor.save_model(path=path, **kwargs)
        for cache in Path(path).rglob("__pycache__"):  # Model.log drops these before the upload
            shutil.rmtree(cache, ignore_errors=True)
        self.files = directory_files(Path(path))


def log_and_hash(flavor, **kwargs):
    """``Model.log`` with ``flavor`` (a flavor module; ``kwargs`` as ``Model.log`` takes them), keeping the
    manifest of what it uploaded for ``log``; returns the ``ModelInfo``."""
    from mlflow.models import Model

    hashing = _Hashing(flavor)
    info = Model.log(artifact_path=None, flavor=hashing, **kwargs)
    _taken[info.model_uri] = hashing.files
    return info


def log(run_id: str, model_uri: str) -> str:
    """Write the manifest of the logged model ``model_uri`` into run ``run_id``; returns its digest (the tag).

    The manifest taken when this process uploaded it (``log_and_hash``); a model it did not upload (a resumed
    run's) is fetched and hashed."""
    from .resolve import client

    files = _taken.pop(model_uri, None)
    if files is None:
        files = of_artifacts(model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(MANIFEST_ARTIFACT).name
        path.write_bytes(encode(files))
        client().log_artifact(run_id, str(path), artifact_path=str(Path(MANIFEST_ARTIFACT).parent))
    return digest(files)


def differences(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    """One phrase per file changed, added or removed since the manifest was recorded."""
    out = []
    for path in sorted(recorded.keys() | now.keys()):
        if path not in now:
            out.append(f"file {path} removed")
        elif path not in recorded:
            out.append(f"file {path} added")
        elif recorded[path] != now[path]:
            out.append(f"file {path} changed: sha256 {now[path][:16]}, recorded {recorded[path][:16]}")
    return out
