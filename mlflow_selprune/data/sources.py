"""Where documents come from: a DATA spec to a ``datasets.Dataset`` with one ``text`` column.

A DATA spec is a local file (``.txt``, ``.jsonl``/``.json``, ``.csv``,
``.parquet``), a directory (of text/source files, or saved with
``save_to_disk``), ``builtin:stdlib-code`` / ``builtin:stdlib-prose``, an
MLflow artifact URI (``runs:/...``, ``mlflow-artifacts:/...``), or a Hugging
Face hub dataset name. Everything goes through the ``datasets`` library.
How a spec is read (text column, glob, split, ...) is a ``SourceOptions``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from ..config import SourceOptions
from ..errors import BadInputError
from .corpora import BUILTIN_PREFIX, builtin_documents
from .specs import _MLFLOW_URI, _STRUCTURED_BUILDERS, TEXT_EXTENSIONS, looks_like_path  # noqa: F401

logger = logging.getLogger(__name__)

TEXT_COLUMN_CANDIDATES = ("text", "content", "code", "document", "body", "sentence")
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


class DataError(BadInputError):
    """A DATA spec that cannot be used; the message says what is wrong and what to do."""


# --------------------------------------------------------------------------- loading


def load_documents(
    spec: str, source: SourceOptions | None = None, *, trust_remote_code: bool = False, **source_fields
) -> datasets.Dataset:
    """A datasets.Dataset with exactly one column 'text' (non-empty strings), one row per document.

    ``source`` (or its fields as keywords: ``paragraphs=True``, ``glob="*.py"``,
    ...) says how to read ``spec``: ``paragraphs`` makes each blank-line block
    of a text file a document; ``data_config`` and ``revision`` apply to hub
    datasets; ``split`` to hub datasets and saved DatasetDicts.
    """
    source = source or SourceOptions(**source_fields)
    raw = _load_raw(spec, source, trust_remote_code)
    return text_documents(raw, spec, source.text_column)


def _load_raw(spec: str, source: SourceOptions, trust_remote_code: bool) -> datasets.Dataset:
    if spec.startswith(BUILTIN_PREFIX):
        try:
            return datasets.Dataset.from_dict({"text": builtin_documents(spec)})
        except ValueError as exc:
            raise DataError(str(exc)) from None
    if _MLFLOW_URI.match(spec):
        return _load_raw(_download_mlflow_artifacts(spec), source, trust_remote_code)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path, split=source.split, glob=source.glob, paragraphs=bool(source.paragraphs))
    if path.is_file():
        return _load_files([path], spec, paragraphs=bool(source.paragraphs))
    if looks_like_path(spec):
        raise DataError(f"no such file or directory: {spec!r}")
    return _load_hub(
        spec,
        config=source.data_config,
        split=source.split,
        revision=source.revision,
        trust_remote_code=trust_remote_code,
    )


def _download_mlflow_artifacts(uri: str) -> str:
    import mlflow

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as exc:  # MLflow raises several types; all mean "not available"
        raise DataError(f"could not download DATA {uri!r} from MLflow: {exc}") from exc


def _load_directory(path: Path, *, split, glob, paragraphs) -> datasets.Dataset:
    """A ``save_to_disk`` folder, or the files under ``path`` (recursively), one document each."""
    if any((path / marker).exists() for marker in _SAVED_DATASET_MARKERS):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"could not load the saved dataset in {str(path)!r}: {exc}") from exc
        return _pick_split(loaded, split, str(path)) if isinstance(loaded, datasets.DatasetDict) else loaded
    files = sorted(
        p
        for p in path.rglob(glob or "*")
        if p.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts)
        and (glob is not None or p.suffix.lower() in TEXT_EXTENSIONS)
    )
    root = path.resolve()
    escaping = [f for f in files if not f.resolve().is_relative_to(root)]
    if escaping:
        raise DataError(
            f"{str(escaping[0])!r} in DATA directory {str(path)!r} links outside it; "
            "remove the link or copy the file into the directory"
        )
    if not files:
        wanted = f"files matching {glob!r}" if glob else "text or source files"
        raise DataError(f"no {wanted} under directory {str(path)!r}; pass a glob such as '*.py'")
    return _load_files(files, str(path), paragraphs=paragraphs)


def _load_files(files: list[Path], spec: str, *, paragraphs: bool) -> datasets.Dataset:
    """Load files of one format: structured ones by their builder, anything else as text."""
    builders = {_STRUCTURED_BUILDERS.get(f.suffix.lower(), "text") for f in files}
    if len(builders) > 1:
        raise DataError(
            f"DATA {spec!r} mixes file formats ({', '.join(sorted(builders))}); "
            "select one kind with a glob such as '*.jsonl'"
        )
    builder = builders.pop()
    options = {}
    if builder == "text":
        options = {"sample_by": "paragraph" if paragraphs else "document", "encoding_errors": "replace"}
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    except Exception as exc:
        raise DataError(f"could not read DATA {spec!r} as {builder}: {exc}") from exc


def _pick_split(dataset_dict: datasets.DatasetDict, split: str | None, spec: str) -> datasets.Dataset:
    """``split`` if given, else 'train', else the first split."""
    names = list(dataset_dict)
    if split is not None and split not in dataset_dict:
        raise DataError(f"DATA {spec!r} has no split {split!r}; available splits: {', '.join(names)}")
    if not names:
        raise DataError(f"DATA {spec!r} holds no splits")
    return dataset_dict[split or ("train" if "train" in dataset_dict else names[0])]


def _load_hub(name, *, config, split, revision, trust_remote_code) -> datasets.Dataset:
    """A hub dataset; offline or unreachable hub gives one clear DataError, fast."""
    unreachable = (
        f"could not load hub dataset {name!r}: the Hugging Face hub is not reachable "
        "({why}); use a local file, a directory, or builtin:stdlib-code / builtin:stdlib-prose"
    )
    if not datasets.config.HF_HUB_OFFLINE:
        # One quick request first: the dataset loader retries for ~25 s when there is no network.
        _check_hub_dataset(name, revision, unreachable)
    if trust_remote_code:
        logger.warning("trust_remote_code is ignored: datasets %s runs no dataset scripts", datasets.__version__)
    try:
        loaded = datasets.load_dataset(name, config, split=split or "train", revision=revision)
    except ConnectionError as exc:
        why = "offline" if "offline" in str(exc).lower() or datasets.config.HF_HUB_OFFLINE else str(exc)
        raise DataError(unreachable.format(why=why)) from None
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DataError(f"could not load hub dataset {name!r}: {exc}") from None
    except (ValueError, FileNotFoundError) as exc:  # bad config or split, missing files
        raise DataError(f"could not load hub dataset {name!r}: {exc}") from None
    return loaded


def _check_hub_dataset(name, revision, unreachable: str) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().dataset_info(name, revision=revision, timeout=10)
    except RevisionNotFoundError:
        raise DataError(f"could not load hub dataset {name!r}: it has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise DataError(
            f"could not load hub dataset {name!r}: no such dataset on the Hugging Face hub "
            "(or it is private/gated and you are not logged in)"
        ) from None
    except Exception as exc:  # network errors come from the HTTP client, whichever it is
        raise DataError(unreachable.format(why=type(exc).__name__)) from None


def text_documents(dataset: datasets.Dataset, spec: str, text_column: str | None) -> datasets.Dataset:
    """Only the text column, renamed 'text', without empty or missing documents."""
    columns = list(dataset.column_names)
    available = f"available columns: {', '.join(columns) or '(none)'}"
    if text_column is not None and text_column not in columns:
        raise DataError(f"DATA {spec!r} has no column {text_column!r}; {available} (choose one with --text-column)")
    if text_column is None:
        strings = [c for c in columns if _is_string_feature(dataset.features[c])]
        text_column = next((c for c in TEXT_COLUMN_CANDIDATES if c in columns), None)
        if text_column is None and len(strings) == 1:
            text_column = strings[0]
        if text_column is None:
            raise DataError(
                f"cannot tell which column of DATA {spec!r} holds the text; {available} (choose one with --text-column)"
            )
    if not _is_string_feature(dataset.features[text_column]):
        raise DataError(
            f"column {text_column!r} of DATA {spec!r} holds {dataset.features[text_column]}, "
            f"not text; {available} (choose one with --text-column)"
        )
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    keep = [i for i, text in enumerate(iter_texts(dataset)) if text and text.strip()]
    if not keep:
        raise DataError(f"DATA {spec!r} holds no non-empty text documents")
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def _is_string_feature(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def iter_texts(dataset: datasets.Dataset):
    for batch in dataset.iter(batch_size=1000):
        yield from batch["text"]
