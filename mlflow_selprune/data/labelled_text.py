"""Labelled text DATA for a text classifier: load, pick classes, split by text, tokenize, batch.

A side is a table with a text column (``--text-column``, default ``text``) and
a label column (``--label-column``, default ``label``): a ``.jsonl``/``.json``
or ``.csv`` file, a ``save_to_disk`` directory, a hub dataset, or an MLflow
dataset URI. ``--forget-classes`` (names or ids) makes the forget side the
rows of those classes and the retain side the other rows (``--retain`` may
then be left out: both sides come from the forget DATA). Rows are split into
collect and eval parts by the sha256 of their text, as documents are
(``batching.split_documents``); each part takes texts in hash order until its
token budget is met, each text truncated to ``--max-length`` tokens.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from ..config import DataOptions, SourceOptions
from .batching import documents_digest, split_documents, split_select
from .labels import label_ids, resolve_classes
from .sources import DataError, _download_mlflow_artifacts, _load_hub, _pick_split
from .specs import _MLFLOW_URI, looks_like_path

logger = logging.getLogger(__name__)

TABLE_READERS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataclass
class PreparedTexts:
    """Token batches with labels of one side, split by text into collect and eval (and select) parts; shaped like
    ``batching.PreparedData`` for the engine (``collect_tokens``/``eval_tokens`` count tokens)."""

    spec: str
    digest: str
    collect_batches: list[dict]
    eval_batches: list[dict]
    collect_tokens: int
    eval_tokens: int
    n_documents: int
    classes: list[int]
    skip_token_ids: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    documents: datasets.Dataset | None = None
    select_batches: list[dict] | None = None
    select_tokens: int = 0
    masking: None = None


def load_table(spec: str, source: SourceOptions, flag: str, trust_remote_code: bool = False) -> datasets.Dataset:
    """The raw rows (all columns) behind a labelled text DATA spec."""
    if _MLFLOW_URI.match(spec):
        return load_table(_download_mlflow_artifacts(spec), source, flag, trust_remote_code)
    path = Path(spec).expanduser()
    if path.is_file():
        reader = TABLE_READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{flag}: {spec!r} is not a table of texts and labels; give a .jsonl, .json or .csv file")
        return datasets.load_dataset(reader, data_files=str(path), split="train")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - any unreadable directory is the same one line
            raise DataError(f"{flag}: could not load a saved dataset from {spec!r}: {exc}") from None
        return _pick_split(loaded, source.split, spec) if isinstance(loaded, datasets.DatasetDict) else loaded
    if looks_like_path(spec):
        raise DataError(f"{flag}: no such file or directory: {spec!r}")
    return _load_hub(
        spec,
        config=source.data_config,
        split=source.split,
        revision=source.revision,
        trust_remote_code=trust_remote_code,
    )


def _columns(dataset: datasets.Dataset, spec: str, source: SourceOptions, flag: str) -> tuple[str, str]:
    text_column, label_column = source.text_column or "text", source.label_column or "label"
    available = f"its columns: {', '.join(dataset.column_names) or '(none)'}"
    for option, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column not in dataset.column_names:
            raise DataError(f"{option}: DATA {spec!r} ({flag}) has no column {column!r} ({available})")
    return text_column, label_column


def _take(order: list[int], lengths: list[int], budget: int) -> list[int]:
    """Rows in ``order`` until their tokens meet ``budget``."""
    taken, total = [], 0
    for row in order:
        if total >= budget:
            break
        taken.append(row)
        total += lengths[row]
    return taken


def _batches(ids: list[list[int]], labels: list[int], rows: list[int], batch_size: int, pad_id: int) -> list[dict]:
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids[r]) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            input_ids[i, : len(ids[r])] = torch.tensor(ids[r], dtype=torch.long)
            mask[i, : len(ids[r])] = 1
        out.append(
            {
                "input_ids": input_ids,
                "attention_mask": mask,
                "labels": torch.tensor([labels[r] for r in chunk], dtype=torch.long),
            }
        )
    return out


def prepare_side(
    texts: list[str],
    labels: list[int],
    spec: str,
    tokenizer,
    options: DataOptions,
    flag: str,
    select_part: bool = False,
) -> PreparedTexts:
    """One side's rows split by text hash, tokenized (truncated to ``max_length``), budgeted and batched."""
    if not texts:
        raise DataError(f"{flag}: DATA {spec!r} has no rows of the classes asked for")
    keys = [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]
    collect_order, eval_order = split_documents(keys, options.eval_fraction, f"{flag} {spec}")
    select_order, eval_order = split_select(keys, eval_order, f"{flag} {spec}") if select_part else ([], eval_order)
    ids = tokenizer(texts, truncation=True, max_length=options.max_length)["input_ids"]
    lengths = [len(i) for i in ids]
    parts = {
        "collect": _take(collect_order, lengths, options.collect_tokens),
        "eval": _take(eval_order, lengths, options.eval_tokens),
        "select": _take(select_order, lengths, options.eval_tokens),
    }
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = {part: _batches(ids, labels, rows, options.batch_size, pad) for part, rows in parts.items()}
    lines = {part: [f"{keys[r].hex()} {labels[r]}" for r in rows] for part, rows in parts.items()}
    used = parts["collect"] + parts["eval"] + parts["select"]
    return PreparedTexts(
        spec=spec,
        digest=documents_digest(lines["collect"], lines["eval"], lines["select"]),
        collect_batches=batches["collect"],
        eval_batches=batches["eval"],
        collect_tokens=sum(lengths[r] for r in parts["collect"]),
        eval_tokens=sum(lengths[r] for r in parts["eval"]),
        n_documents=len(used),
        classes=sorted({labels[r] for r in used}),
        documents=datasets.Dataset.from_dict(
            {
                "text": [texts[r] for r in used],
                "label": [labels[r] for r in used],
                "part": [part for part, rows in parts.items() for _ in rows],
            }
        ),
        select_batches=batches["select"] if select_part else None,
        select_tokens=sum(lengths[r] for r in parts["select"]),
    )


def prepare_labelled_text(
    forget: str,
    retain: str | None,
    tokenizer,
    model_config,
    options: DataOptions,
    *,
    trust_remote_code: bool = False,
    select_part: bool = False,
) -> tuple[PreparedTexts, PreparedTexts]:
    """(forget, retain) labelled text for a text classifier (``--forget-classes`` splits one DATA by class)."""
    items = options.forget_class_list()
    if retain is None:
        if items is None:
            raise DataError("--retain is required unless --forget-classes splits one dataset by class")
        retain = forget
    sides = {}
    for side, spec in (("forget", forget), ("retain", retain)):
        source, flag = options.source_for(side), f"--{side}"
        table = load_table(spec, source, flag, trust_remote_code)
        text_column, label_column = _columns(table, spec, source, flag)
        labels, names = label_ids(table, spec, label_column, model_config)
        sides[side] = (spec, flag, [str(t) for t in table[text_column]], labels, names)
    keep: dict[str, set[int] | None] = {"forget": None, "retain": None}
    if items is not None:
        spec, _, _, labels, names = sides["forget"]
        forget_ids = set(resolve_classes(items, set(labels), names, model_config, spec))
        left = set(sides["retain"][3]) - forget_ids
        if not left:
            raise DataError(
                f"--forget-classes {options.forget_classes} covers every class of the retain DATA "
                f"{sides['retain'][0]!r}: nothing would be retained; forget fewer classes"
            )
        keep = {"forget": forget_ids, "retain": left}
    prepared = []
    for side in ("forget", "retain"):
        spec, flag, texts, labels, _ = sides[side]
        wanted = keep[side]
        rows = [i for i, label in enumerate(labels) if wanted is None or label in wanted]
        if items is not None:
            spec = f"{spec} [{'classes' if side == 'forget' else 'without classes'} {options.forget_classes}]"
        prepared.append(
            prepare_side(
                [texts[i] for i in rows], [labels[i] for i in rows], spec, tokenizer, options, flag, select_part
            )
        )
    return prepared[0], prepared[1]
