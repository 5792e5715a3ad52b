"""The manifest of a logged model: the sha256 of every file in its directory, so nothing loaded goes unchecked.

The weights digest covers the tensors only; a model also loads its
``config.json`` (change ``hidden_act`` and it computes something else), its
generation config, tokenizer or image processor files, ``MLmodel``, and the
pruning record, masks and scores copied beside them. The manifest lists every
file of the logged model directory with its sha256, in path order; its own
digest (of the canonical JSON) is tagged on the version and anchored in the
run's lineage record like every other lineage tag, and the manifest itself is
a run artifact. Verifying downloads the version's files again and names each
file changed, added or removed.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
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


def of_artifacts(artifact_uri: str) -> dict[str, str]:
    """The manifest of a logged or registered model's files as stored now (``models:/...``)."""
    import mlflow

    from .lineage import refuse_if_denied

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp))
        except Exception as exc:  # noqa: BLE001 - a refusal is one permission line; anything else as it is
            refuse_if_denied(exc)
            raise
        return directory_files(local)


def log(run_id: str, model_uri: str) -> str:
    """Write the manifest of the logged model ``model_uri`` into run ``run_id``; returns its digest (the tag)."""
    from .resolve import client

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
