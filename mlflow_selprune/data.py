"""DATA specs to token batches: load documents, split them by document, tokenize, chunk, batch.

A DATA spec is a local file (``.txt``, ``.jsonl``/``.json``, ``.csv``,
``.parquet``), a directory (of text/source files, or saved with
``save_to_disk``), ``builtin:stdlib-code`` / ``builtin:stdlib-prose``, an
MLflow artifact URI (``runs:/...``, ``mlflow-artifacts:/...``), or a Hugging
Face hub dataset name. Everything goes through the ``datasets`` library.

Documents are split into a *collect* part (activation statistics for
pruning) and an *eval* part (metrics) by a hash of their text, so the split is
the same on every machine and run, and no document is in both parts.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import datasets
import torch

from mlflow_selprune.corpora import BUILTIN_PREFIX, builtin_documents

logger = logging.getLogger(__name__)

TEXT_COLUMN_CANDIDATES = ("text", "content", "code", "document", "body", "sentence")
# Files a directory contributes by default (one document each); pass ``glob`` for others.
TEXT_EXTENSIONS = frozenset(
    ".txt .md .rst .tex .py .pyi .c .h .cc .cpp .hpp .java .js .ts .go .rs .rb .php .cs .kt "
    ".scala .swift .sh .sql .r .jl .lua .pl .html .css .xml .yaml .yml .toml .ini .cfg".split()
)
_STRUCTURED_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_MLFLOW_URI = re.compile(r"^(runs|mlflow-artifacts):/", re.IGNORECASE)
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
_TOKENIZE_GROUP = 32  # documents per batched tokenizer call


class DataError(ValueError):
    """A DATA spec that cannot be used; the message says what is wrong and what to do."""


@dataclass
class PreparedData:
    """Token batches of one DATA spec, split by document into collect and eval parts."""

    spec: str
    digest: str
    collect_batches: list[dict]
    eval_batches: list[dict]
    collect_tokens: int
    eval_tokens: int
    skip_token_ids: list[int]
    n_documents: int
    warnings: list[str] = field(default_factory=list)
    documents: datasets.Dataset | None = None


# --------------------------------------------------------------------------- loading


def load_documents(
    spec: str,
    *,
    text_column: str | None = None,
    config: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    glob: str | None = None,
    paragraphs: bool = False,
    trust_remote_code: bool = False,
) -> datasets.Dataset:
    """Return a datasets.Dataset with exactly one column 'text' (non-empty strings), one row per document.

    ``paragraphs=True`` makes each blank-line-separated block of a text file a
    document. ``config``, ``revision`` and ``trust_remote_code`` apply to hub
    datasets; ``split`` to hub datasets and saved DatasetDicts.
    """
    raw = _load_raw(spec, config=config, split=split, revision=revision, glob=glob,
                    paragraphs=paragraphs, trust_remote_code=trust_remote_code)
    return _text_documents(raw, spec, text_column)


def _load_raw(spec, *, config, split, revision, glob, paragraphs, trust_remote_code) -> datasets.Dataset:
    if spec.startswith(BUILTIN_PREFIX):
        try:
            return datasets.Dataset.from_dict({"text": builtin_documents(spec)})
        except ValueError as exc:
            raise DataError(str(exc)) from None
    if _MLFLOW_URI.match(spec):
        local = _download_mlflow_artifacts(spec)
        return _load_raw(local, config=config, split=split, revision=revision, glob=glob,
                         paragraphs=paragraphs, trust_remote_code=trust_remote_code)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path, split=split, glob=glob, paragraphs=paragraphs)
    if path.is_file():
        return _load_files([path], spec, paragraphs=paragraphs)
    if _looks_like_path(spec):
        raise DataError(f"no such file or directory: {spec!r}")
    return _load_hub(spec, config=config, split=split, revision=revision,
                     trust_remote_code=trust_remote_code)


def _looks_like_path(spec: str) -> bool:
    """True for specs that cannot be a hub name ``[owner/]name``: ./x, /x, ~/x, a/b/c, x.txt."""
    suffix = Path(spec).suffix.lower()
    return (
        spec.startswith((".", "~"))
        or suffix in TEXT_EXTENSIONS
        or suffix in _STRUCTURED_BUILDERS
        or not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", spec)
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
        p for p in path.rglob(glob or "*")
        if p.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts)
        and (glob is not None or p.suffix.lower() in TEXT_EXTENSIONS)
    )
    root = path.resolve()
    escaping = [f for f in files if not f.resolve().is_relative_to(root)]
    if escaping:
        raise DataError(f"{str(escaping[0])!r} in DATA directory {str(path)!r} links outside it; "
                        "remove the link or copy the file into the directory")
    if not files:
        wanted = f"files matching {glob!r}" if glob else "text or source files"
        raise DataError(f"no {wanted} under directory {str(path)!r}; pass a glob such as '*.py'")
    return _load_files(files, str(path), paragraphs=paragraphs)


def _load_files(files: list[Path], spec: str, *, paragraphs: bool) -> datasets.Dataset:
    """Load files of one format: structured ones by their builder, anything else as text."""
    builders = {_STRUCTURED_BUILDERS.get(f.suffix.lower(), "text") for f in files}
    if len(builders) > 1:
        raise DataError(f"DATA {spec!r} mixes file formats ({', '.join(sorted(builders))}); "
                        "select one kind with a glob such as '*.jsonl'")
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
    unreachable = (f"could not load hub dataset {name!r}: the Hugging Face hub is not reachable "
                   "({why}); use a local file, a directory, or builtin:stdlib-code / builtin:stdlib-prose")
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
        raise DataError(f"could not load hub dataset {name!r}: no such dataset on the Hugging Face hub "
                        "(or it is private/gated and you are not logged in)") from None
    except Exception as exc:  # network errors come from the HTTP client, whichever it is
        raise DataError(unreachable.format(why=type(exc).__name__)) from None


def _text_documents(dataset: datasets.Dataset, spec: str, text_column: str | None) -> datasets.Dataset:
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
            raise DataError(f"cannot tell which column of DATA {spec!r} holds the text; "
                            f"{available} (choose one with --text-column)")
    if not _is_string_feature(dataset.features[text_column]):
        raise DataError(f"column {text_column!r} of DATA {spec!r} holds {dataset.features[text_column]}, "
                        f"not text; {available} (choose one with --text-column)")
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    keep = [i for i, text in enumerate(_iter_texts(dataset)) if text and text.strip()]
    if not keep:
        raise DataError(f"DATA {spec!r} holds no non-empty text documents")
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def _is_string_feature(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _iter_texts(dataset: datasets.Dataset):
    for batch in dataset.iter(batch_size=1000):
        yield from batch["text"]


# --------------------------------------------------------------------------- preparing


class _TokenCache:
    """LRU of token ids per (tokenizer, document hash), bounded by the total number of tokens.

    Keyed per document, so calls with other budgets, fractions or chunk
    lengths on the same data reuse the tokenization too.
    """

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self.size = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        ids = self.entries.get(key)
        if ids is not None:
            self.entries.move_to_end(key)
        return ids

    def put(self, key: tuple, ids: torch.Tensor) -> None:
        if key in self.entries:
            return
        self.entries[key] = ids
        self.size += len(ids)
        while self.size > self.max_tokens and len(self.entries) > 1:
            _, evicted = self.entries.popitem(last=False)
            self.size -= len(evicted)


_TOKEN_CACHE = _TokenCache(max_tokens=4_000_000)


def prepare_data(
    spec_or_dataset,
    tokenizer,
    *,
    max_length: int = 128,
    batch_size: int = 16,
    collect_tokens: int = 20_000,
    eval_tokens: int = 10_000,
    eval_fraction: float = 0.2,
    text_column: str | None = None,
    config: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    glob: str | None = None,
    paragraphs: bool = False,
    min_tokens: int | None = None,
    trust_remote_code: bool = False,
) -> PreparedData:
    """Load, split by document, tokenize, chunk and batch one DATA spec.

    Each part takes whole documents in hash order until its token budget is
    met; long documents are cut into chunks of at most ``max_length`` tokens
    and every token of a taken document is kept, except that the last taken
    document stops at the first chunk boundary that meets the budget (so a
    part may exceed its budget by less than ``max_length`` tokens). Eval
    chunks of fewer than 2 tokens predict nothing and are dropped.
    ``min_tokens`` (default 1) is the fewest tokens each part may end with.
    """
    if max_length < 2 or batch_size < 1 or collect_tokens < 1 or eval_tokens < 1:
        raise ValueError("max_length must be >= 2; batch_size, collect_tokens and eval_tokens >= 1")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction}")
    spec, documents = _as_documents(spec_or_dataset, text_column, config=config, split=split,
                                    revision=revision, glob=glob, paragraphs=paragraphs,
                                    trust_remote_code=trust_remote_code)
    pad_id = _pad_token_id(tokenizer)
    keys = [hashlib.sha256(text.encode("utf-8")).digest() for text in _iter_texts(documents)]
    collect_order, eval_order = split_documents(keys, eval_fraction, spec)
    tokenizer_key = _tokenizer_key(tokenizer)
    min_tokens = 1 if min_tokens is None else min_tokens

    warnings: list[str] = []

    def take(part: str, order: list[int], budget: int, min_chunk: int):
        used, chunks = _take_chunks(documents, order, keys, tokenizer, tokenizer_key,
                                    budget=budget, max_length=max_length, min_chunk=min_chunk)
        n_tokens = sum(len(c) for c in chunks)
        if n_tokens < min_tokens:
            raise DataError(f"DATA {spec!r} gives only {n_tokens} {part} tokens, fewer than the "
                            f"{min_tokens} needed; add more documents")
        if n_tokens < budget:
            message = (f"DATA {spec!r}: the {part} part has only {n_tokens} tokens "
                       f"({len(used)} documents), fewer than the {budget} asked for")
            logger.warning(message)
            warnings.append(message)
        return used, chunks, n_tokens

    collect_used, collect_chunks, n_collect = take("collect", collect_order, collect_tokens, 1)
    eval_used, eval_chunks, n_eval = take("eval", eval_order, eval_tokens, 2)
    texts = {"collect": documents[collect_used]["text"], "eval": documents[eval_used]["text"]}
    prepared = PreparedData(
        spec=spec,
        digest=documents_digest(texts["collect"], texts["eval"]),
        collect_batches=make_batches(collect_chunks, batch_size, pad_id),
        eval_batches=make_batches(eval_chunks, batch_size, pad_id),
        collect_tokens=n_collect,
        eval_tokens=n_eval,
        skip_token_ids=most_frequent_tokens(collect_chunks, 50),
        n_documents=len(collect_used) + len(eval_used),
        warnings=warnings,
        documents=datasets.Dataset.from_dict({"text": texts["collect"] + texts["eval"]}),
    )
    logger.info("DATA %r: %d collect tokens (%d documents), %d eval tokens (%d documents), digest %s",
                spec, n_collect, len(collect_used), n_eval, len(eval_used), prepared.digest[:12])
    return prepared


def _as_documents(spec_or_dataset, text_column, **load_options) -> tuple[str, datasets.Dataset]:
    """(spec name, documents) for a DATA spec string, a Dataset or a list of strings."""
    if isinstance(spec_or_dataset, (str, os.PathLike)):
        spec = os.fspath(spec_or_dataset)
        return spec, load_documents(spec, text_column=text_column, **load_options)
    if isinstance(spec_or_dataset, datasets.Dataset):
        spec = f"<Dataset of {len(spec_or_dataset)} rows>"
        return spec, _text_documents(spec_or_dataset, spec, text_column)
    if isinstance(spec_or_dataset, (list, tuple)) and all(isinstance(t, str) for t in spec_or_dataset):
        spec = f"<list of {len(spec_or_dataset)} documents>"
        return spec, _text_documents(datasets.Dataset.from_dict({"text": list(spec_or_dataset)}), spec, None)
    raise TypeError(f"DATA must be a spec string, a datasets.Dataset or a list of strings, "
                    f"not {type(spec_or_dataset).__name__}")


def _pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        logger.info("the tokenizer has no pad token; padding with its EOS token (id %d)", tokenizer.eos_token_id)
        return tokenizer.eos_token_id
    raise DataError("the tokenizer has neither a pad token nor an EOS token to pad batches with")


def split_documents(keys: Sequence[bytes], eval_fraction: float, spec: str = "DATA") -> tuple[list[int], list[int]]:
    """(collect indices, eval indices), each in hash order, from the documents' sha256 digests.

    A document goes to eval when the first 4 bytes of its hash, read as a
    fraction of 2**32, are below ``eval_fraction``. Identical documents share
    a hash, hence a part. If a part would be empty, the documents nearest the
    threshold move over, so both parts get at least one document.
    """
    order = sorted(range(len(keys)), key=lambda i: (keys[i], i))
    threshold = eval_fraction * 2**32
    n_eval = sum(1 for i in order if int.from_bytes(keys[i][:4], "big") < threshold)
    if n_eval == 0:
        n_eval = _group_end(order, keys, 0)  # the lowest-hash document(s) move to eval
    elif n_eval == len(order):
        n_eval = _group_start(order, keys, len(order) - 1)  # the highest-hash ones move to collect
    if n_eval == 0 or n_eval == len(order):
        raise DataError(f"{spec!r}: need at least 2 distinct documents (one to collect statistics "
                        f"on, one to evaluate on); found {len(set(keys))}")
    return order[n_eval:], order[:n_eval]


def _group_end(order, keys, position) -> int:
    """End of the run of identical documents starting at ``position`` in ``order``."""
    end = position + 1
    while end < len(order) and keys[order[end]] == keys[order[position]]:
        end += 1
    return end


def _group_start(order, keys, position) -> int:
    """Start of the run of identical documents ending at ``position`` in ``order``."""
    start = position
    while start > 0 and keys[order[start - 1]] == keys[order[position]]:
        start -= 1
    return start


def _tokenizer_key(tokenizer) -> tuple:
    """Identifies a tokenizer's behaviour for the token cache (name alone is not enough)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer),
            hashlib.sha256(definition.encode("utf-8")).hexdigest())


def _token_ids(tokenizer, tokenizer_key, texts: list[str], keys: list[bytes]) -> list[torch.Tensor]:
    """Token ids of each text, from the in-process cache or one batched tokenizer call."""
    ids = [_TOKEN_CACHE.get((tokenizer_key, key)) for key in keys]
    missing = [i for i, cached in enumerate(ids) if cached is None]
    if missing:
        encoded = tokenizer([texts[i] for i in missing], add_special_tokens=False,
                            return_attention_mask=False, verbose=False)["input_ids"]
        for i, new in zip(missing, encoded):
            ids[i] = torch.tensor(new, dtype=torch.long)
            _TOKEN_CACHE.put((tokenizer_key, keys[i]), ids[i])
    return ids


def _document_tokens(documents, order, keys, tokenizer, tokenizer_key):
    """(index, token ids) of the documents in ``order``, tokenized lazily a group at a time."""
    for start in range(0, len(order), _TOKENIZE_GROUP):
        group = order[start:start + _TOKENIZE_GROUP]
        texts = documents[group]["text"]
        yield from zip(group, _token_ids(tokenizer, tokenizer_key, texts, [keys[i] for i in group]))


def _take_chunks(documents, order, keys, tokenizer, tokenizer_key, *, budget, max_length, min_chunk):
    """(indices of the documents used, their chunks) until ``budget`` tokens are taken.

    Chunks shorter than ``min_chunk`` are dropped; a document none of whose
    chunks is kept does not count as used.
    """
    used: list[int] = []
    chunks: list[torch.Tensor] = []
    total = dropped = 0
    for index, ids in _document_tokens(documents, order, keys, tokenizer, tokenizer_key):
        if total >= budget:
            break
        n_before = len(chunks)
        for chunk in ids.split(max_length):
            if len(chunk) < min_chunk:
                dropped += 1
                continue
            chunks.append(chunk)
            total += len(chunk)
            if total >= budget:
                break
        if len(chunks) > n_before:
            used.append(index)
    if dropped:
        logger.debug("dropped %d chunk(s) shorter than %d tokens", dropped, min_chunk)
    return used, chunks


def make_batches(chunks: Sequence[torch.Tensor], batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded batches of chunks sorted by length (longest first), to waste little on padding."""
    by_length = sorted(range(len(chunks)), key=lambda i: (-len(chunks[i]), i))
    batches = []
    for start in range(0, len(by_length), batch_size):
        rows = [chunks[i] for i in by_length[start:start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def most_frequent_tokens(chunks: Sequence[torch.Tensor], k: int = 50) -> list[int]:
    """The ``k`` most frequent token ids in ``chunks`` (ties broken by lower id)."""
    if not chunks:
        return []
    counts = torch.bincount(torch.cat(list(chunks)))
    ids = torch.sort(counts, descending=True, stable=True).indices  # stable: equal counts keep id order
    return ids[:min(k, int((counts > 0).sum()))].tolist()


def documents_digest(collect_texts: Sequence[str], eval_texts: Sequence[str]) -> str:
    """sha256 of the documents used, part by part, each length-prefixed UTF-8.

    Independent of the tokenizer and of the machine; any change to a used
    document, or to which part it is in, changes it.
    """
    digest = hashlib.sha256()
    for part, texts in (("collect", collect_texts), ("eval", eval_texts)):
        digest.update(part.encode("ascii"))
        digest.update(len(texts).to_bytes(8, "big"))
        for text in texts:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()
