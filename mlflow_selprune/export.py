"""``mlflow-selprune export``: a registered version written as one GGUF file, recorded on the version.

The version is verified first (its recorded evidence, every file, its weights against their digest), and the
file is written from what was verified (``gguf_export``), then logged to the version's run with its record
(``registry.exports``, which ``lineage --verify`` checks).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import BadInputError
from .registry.exports import FORMATS

logger = logging.getLogger(__name__)


def check_request(out: str, fmt: str, quantization: str) -> Path:
    """Every option in range and the output path free, before anything is loaded or written."""
    from .gguf_export import QUANTIZATIONS

    if fmt not in FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if quantization not in QUANTIZATIONS:
        raise BadInputError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    path = Path(out)
    if path.is_symlink():
        raise BadInputError(f"OUT '{out}' is a symbolic link: give the path of a new file")
    if path.suffix != ".gguf":
        raise BadInputError(f"OUT must be a .gguf file path, got '{out}'")
    if path.exists():
        raise BadInputError(f"OUT '{out}' exists: give a new path, or remove it first")
    if not path.parent.is_dir():
        raise BadInputError(f"OUT '{out}': its directory does not exist")
    return path


def export(model_uri: str, out: str, fmt: str = "gguf", quantization: str = "Q8_0", signing_key=None):
    """Write the verified version ``model_uri`` to ``out``, log it to the version's run and record it there."""
    from .gguf_export import unsupported, write_gguf
    from .registry import loading, verify
    from .registry.exports import record_export
    from .registry.lineage import weights_sha256
    from .registry.resolve import check_edit_permission, resolve

    path = check_request(out, fmt, quantization)
    resolved = resolve(model_uri)
    if not resolved.is_registered:
        raise BadInputError(f"'{model_uri}' is not a registered model version; export works on models:/NAME/VERSION")
    check_edit_permission(
        str(resolved.registered_name),
        "record an export on",
        "ask an admin, or a user with MANAGE on the model, to grant EDIT",
    )
    loading.fetch_verified(resolved, "export")
    model, tokenizer = loading.load_components(resolved)
    weights = weights_sha256(model)
    verify.require_weights(resolved, weights, "export")
    why = unsupported(model, tokenizer)
    if why is not None:
        raise BadInputError(f"{resolved.canonical_uri} cannot be exported as GGUF: {why}")
    logger.info(f"writing {path} ({quantization})")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644))
    except FileExistsError:
        raise BadInputError(f"OUT '{out}' exists: give a new path, or remove it first") from None
    try:
        write_gguf(model, tokenizer, path, quantization, name=resolved.canonical_uri)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return record_export(resolved, path, fmt, quantization, weights, signing_key)
