"""Documents to token batches: split by document, tokenize, chunk, batch.

Documents are split into a *collect* part (activation statistics for
pruning) and an *eval* part (metrics) by a hash of their text, so the split is
the same on every machine and run, and no document is in both parts. A budget
run needs a third part: it reads a *select* part to decide where to stop, and
reports (and gates) on the eval part, which then never influenced a choice.
The select documents are every other eval document in hash order, so the
three parts stay disjoint at any ``--eval-fraction``. Each
chunk is wrapped in the special tokens the model's tokenizer puts around a
text (a BOS before it for OPT or Llama, ``[CLS]`` ... ``[SEP]`` for BERT,
nothing for GPT-2), so the model sees inputs shaped like those it was trained
on.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import datasets
import torch

from ..config import DataOptions, SourceOptions
from . import token_cache
from .masking import MaskingIds, masking_ids
from .sources import DataError, iter_texts, load_documents, text_documents

logger = logging.getLogger(__name__)

_TOKENIZE_GROUP = 32  # documents per batched tokenizer call
# Below these, a part follows its few documents more than the capability (docs/data.md: how much data a side
# needs): 12 files a side gave no selectivity at all on a real model, and 2,000 eval tokens put the standard
# error of a top-1 near 1 point, as large as the retain drops a gate allows. A warning, never a refusal.
ADVISED_DOCUMENTS = 20
ADVISED_EVAL_TOKENS = 2_000


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
    masking: MaskingIds | None = None  # the tokenizer's mask/special ids, for masked LMs (None: no mask token)
    select_batches: list[dict] | None = None  # budget runs: what the budget reads to stop (None: two parts only)
    select_tokens: int = 0


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
    options: DataOptions | None = None,
    *,
    source: SourceOptions | None = None,
    min_tokens: int | None = None,
    eval_only: bool = False,
    select_part: bool = False,
    trust_remote_code: bool = False,
    **option_fields,
) -> PreparedData:
    """Load, split by document, tokenize, chunk and batch one DATA spec.

    ``options`` (or its fields as keywords: ``max_length=64``, ...) sets the
    budgets; ``source`` (default ``options.source``, or source fields as
    keywords: ``paragraphs=True``) says how to read the spec. Each part takes
    whole documents in hash order until its token budget is met; long
    documents are cut into chunks of at most ``max_length`` tokens and every
    token of a taken document is kept (only its first ``options.chunks_per_document`` chunks when that is
    set, so a budget spans more documents), except that the last taken document
    stops at the first chunk boundary that meets the budget (so a part may
    exceed its budget by less than ``max_length`` tokens). Eval chunks of
    fewer than 2 tokens predict nothing and are dropped. ``min_tokens``
    (default 1) is the fewest tokens each part may end with. ``eval_only``:
    every document is evaluated (nothing is held back for statistics); the
    skip-50 tokens then come from the eval part itself. ``select_part``: the
    eval documents alternate (in hash order) between a *select* part and the
    eval part, each with the eval budget (budget runs: one to stop on, one to
    report).
    """
    source_names = set(SourceOptions.__dataclass_fields__)
    source_fields = {k: option_fields.pop(k) for k in list(option_fields) if k in source_names}
    options = (options or DataOptions(**option_fields)).validate()
    source = source or (SourceOptions(**source_fields) if source_fields else options.source)
    spec, documents = _as_documents(spec_or_dataset, source, trust_remote_code)
    keys = [hashlib.sha256(text.encode("utf-8")).digest() for text in iter_texts(documents)]
    orders = _part_orders(seeded_keys(keys, options.split_seed), options, spec, eval_only, select_part)
    taker = _Taker(documents, keys, tokenizer, options, spec, 1 if min_tokens is None else min_tokens)
    stored = taker.load_disk_cache()
    parts = {part: taker.take(part, order) for part, order in orders.items()}
    taker.save_disk_cache(stored)
    return _assemble(spec, documents, parts, tokenizer, options, taker, eval_only, select_part)


def _part_orders(split_keys, options: DataOptions, spec: str, eval_only: bool, select_part: bool) -> dict:
    """Each part's documents in hash order: collect (none when ``eval_only``), eval, and select if asked."""
    if eval_only:
        collect_order: list[int] = []
        eval_order = sorted(range(len(split_keys)), key=lambda i: (split_keys[i], i))
    else:
        collect_order, eval_order = split_documents(split_keys, options.eval_fraction, spec)
    select_order: list[int] = []
    if select_part:
        select_order, eval_order = split_select(split_keys, eval_order, spec)
    orders = {"collect": collect_order, "eval": eval_order}
    return {**orders, "select": select_order} if select_part else orders


class _Taker:
    """Takes one part's chunks until its budget is met, and says when a part is short or small."""

    def __init__(self, documents, keys, tokenizer, options: DataOptions, spec: str, min_tokens: int):
        self.documents, self.keys, self.tokenizer, self.options = documents, keys, tokenizer, options
        self.spec, self.min_tokens = spec, min_tokens
        self.tokenizer_key = _tokenizer_key(tokenizer)
        self.prefix, self.suffix = special_affixes(tokenizer)
        self.use_disk = token_cache.enabled(options.token_cache)
        self.warnings: list[str] = []

    def load_disk_cache(self) -> dict:
        stored = token_cache.load(self.tokenizer_key, self.keys) if self.use_disk else {}
        for key, ids in stored.items():
            _TOKEN_CACHE.put((self.tokenizer_key, key), ids)
        return stored

    def save_disk_cache(self, stored: dict) -> None:
        if not self.use_disk:
            return
        cached = {key: _TOKEN_CACHE.get((self.tokenizer_key, key)) for key in self.keys}
        entries = {key: ids for key, ids in cached.items() if ids is not None}
        if set(entries) - set(stored):
            token_cache.save(self.tokenizer_key, self.keys, entries)

    def take(self, part: str, order: list[int]) -> tuple[list[int], list, int]:
        """``(documents used, chunks, tokens)`` of one part (collect chunks may be 1 token, eval chunks 2)."""
        if part == "collect" and not order:
            return [], [], 0
        budget = self.options.collect_tokens if part == "collect" else self.options.eval_tokens
        used, chunks = _take_chunks(
            self.documents,
            order,
            self.keys,
            self.tokenizer,
            self.tokenizer_key,
            prefix=self.prefix,
            suffix=self.suffix,
            budget=budget,
            max_length=self.options.max_length,
            min_chunk=1 if part == "collect" else 2,
            chunks_per_document=self.options.chunks_per_document,
        )
        n_tokens = sum(len(c) for c in chunks)
        if n_tokens < self.min_tokens:
            raise DataError(
                f"DATA {self.spec!r} gives only {n_tokens} {part} tokens, fewer than the "
                f"{self.min_tokens} needed; add more documents"
            )
        if n_tokens < budget:
            self.warn(
                f"DATA {self.spec!r}: the {part} part has only {n_tokens} tokens ({len(used)} documents), "
                f"fewer than the {budget} asked for"
            )
        if len(used) < ADVISED_DOCUMENTS or (part == "eval" and n_tokens < ADVISED_EVAL_TOKENS):
            self.warn(
                f"DATA {self.spec!r}: the {part} part has {len(used)} documents and {n_tokens} tokens; with "
                f"fewer than {ADVISED_DOCUMENTS} documents (or {ADVISED_EVAL_TOKENS} eval tokens) a side, "
                "drops follow those documents more than the capability: add data (docs/data.md)"
            )
        return used, chunks, n_tokens

    def warn(self, message: str) -> None:
        logger.warning(message)
        self.warnings.append(message)


def _assemble(
    spec, documents, parts: dict, tokenizer, options: DataOptions, taker: _Taker, eval_only: bool, select_part: bool
) -> PreparedData:
    """The prepared data of the parts taken: batches, digest, skip-50 tokens, the documents used."""
    pad_id = _pad_token_id(tokenizer)
    empty: tuple[list, list, int] = ([], [], 0)
    (c_used, c_chunks, n_collect), (e_used, e_chunks, n_eval) = parts["collect"], parts["eval"]
    s_used, s_chunks, n_select = parts.get("select", empty)
    texts = {
        name: documents[used]["text"] if used else []
        for name, used in (("collect", c_used), ("eval", e_used), ("select", s_used))
    }
    frequent_from = e_chunks if eval_only else c_chunks
    prefix, suffix = taker.prefix, taker.suffix
    prepared = PreparedData(
        spec=spec,
        digest=documents_digest(texts["collect"], texts["eval"], texts["select"]),
        collect_batches=make_batches(c_chunks, options.batch_size, pad_id),
        eval_batches=make_batches(e_chunks, options.batch_size, pad_id),
        collect_tokens=n_collect,
        eval_tokens=n_eval,
        skip_token_ids=most_frequent_tokens([c[len(prefix) : len(c) - len(suffix)] for c in frequent_from], 50),
        n_documents=len(c_used) + len(e_used) + len(s_used),
        warnings=taker.warnings,
        documents=datasets.Dataset.from_dict({"text": texts["collect"] + texts["eval"] + texts["select"]}),
        masking=masking_ids(tokenizer) if getattr(tokenizer, "mask_token_id", None) is not None else None,
        select_batches=make_batches(s_chunks, options.batch_size, pad_id) if select_part else None,
        select_tokens=n_select,
    )
    logger.debug(
        "DATA %r: %d collect tokens (%d documents), %d eval tokens (%d documents), digest %s",
        spec,
        n_collect,
        len(c_used),
        n_eval,
        len(e_used),
        prepared.digest[:12],
    )
    return prepared


_AFFIXES: dict[tuple, tuple[list[int], list[int]]] = {}


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """(ids before, ids after) a text: ``([bos], [])`` for OPT/Llama, ``([cls], [sep])`` for BERT, none for GPT-2."""
    key = _tokenizer_key(tokenizer)
    if key not in _AFFIXES:
        _AFFIXES[key] = _probe_affixes(tokenizer)
    prefix, suffix = _AFFIXES[key]
    return list(prefix), list(suffix)


def special_prefix(tokenizer) -> list[int]:
    """The token ids the tokenizer puts before a text."""
    return special_affixes(tokenizer)[0]


def _probe_affixes(tokenizer) -> tuple[list[int], list[int]]:
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def _as_documents(spec_or_dataset, source: SourceOptions, trust_remote_code: bool) -> tuple[str, datasets.Dataset]:
    """(spec name, documents) for a DATA spec string, a Dataset or a list of strings."""
    if isinstance(spec_or_dataset, (str, os.PathLike)):
        spec = os.fspath(spec_or_dataset)
        return spec, load_documents(spec, source, trust_remote_code=trust_remote_code)
    if isinstance(spec_or_dataset, datasets.Dataset):
        spec = f"<Dataset of {len(spec_or_dataset)} rows>"
        return spec, text_documents(spec_or_dataset, spec, source.text_column)
    if isinstance(spec_or_dataset, (list, tuple)) and all(isinstance(t, str) for t in spec_or_dataset):
        spec = f"<list of {len(spec_or_dataset)} documents>"
        return spec, text_documents(datasets.Dataset.from_dict({"text": list(spec_or_dataset)}), spec, None)
    raise DataError(
        f"DATA must be a spec string, a datasets.Dataset or a list of strings, not {type(spec_or_dataset).__name__}"
    )


def _pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        logger.info("the tokenizer has no pad token; padding with its EOS token (id %d)", tokenizer.eos_token_id)
        return tokenizer.eos_token_id
    raise DataError("the tokenizer has neither a pad token nor an EOS token to pad batches with")


def seeded_keys(keys: Sequence[bytes], split_seed: int) -> list[bytes]:
    """The documents' split keys: their sha256 digests (seed 0), or digests salted with the seed, so another
    seed draws another collect/eval split and another document order, as reproducibly as the first."""
    if split_seed == 0:
        return list(keys)
    salt = split_seed.to_bytes(8, "big", signed=True)
    return [hashlib.sha256(salt + key).digest() for key in keys]


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
        raise DataError(
            f"{spec!r}: need at least 2 distinct documents (one to collect statistics "
            f"on, one to evaluate on); found {len(set(keys))}"
        )
    return order[n_eval:], order[:n_eval]


def split_select(keys: Sequence[bytes], eval_order: list[int], spec: str = "DATA") -> tuple[list[int], list[int]]:
    """(select, eval): the eval documents alternately, in hash order, so both span the same hash range.
    Identical documents (one hash) stay together, in one part."""
    select: list[int] = []
    report: list[int] = []
    position = 0
    while position < len(eval_order):
        end = _group_end(eval_order, keys, position)
        (report if len(select) > len(report) else select).extend(eval_order[position:end])
        position = end
    if not report:
        raise DataError(
            f"{spec!r}: a budget run needs at least 2 distinct eval documents (one part to stop on, "
            "one to report on): add documents or raise --eval-fraction"
        )
    return select, report


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
    return (
        type(tokenizer).__name__,
        tokenizer.name_or_path,
        len(tokenizer),
        hashlib.sha256(definition.encode("utf-8")).hexdigest(),
    )


def _token_ids(tokenizer, tokenizer_key, texts: list[str], keys: list[bytes]) -> list[torch.Tensor]:
    """Token ids of each text, from the in-process cache or one batched tokenizer call."""
    found = [_TOKEN_CACHE.get((tokenizer_key, key)) for key in keys]
    missing = [i for i, cached in enumerate(found) if cached is None]
    if missing:
        encoded = tokenizer(
            [texts[i] for i in missing], add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        for i, new in zip(missing, encoded):
            found[i] = ids = torch.tensor(new, dtype=torch.long)
            _TOKEN_CACHE.put((tokenizer_key, keys[i]), ids)
    return [ids for ids in found if ids is not None]


def _document_tokens(documents, order, keys, tokenizer, tokenizer_key):
    """(index, token ids) of the documents in ``order``, tokenized lazily a group at a time."""
    for start in range(0, len(order), _TOKENIZE_GROUP):
        group = order[start : start + _TOKENIZE_GROUP]
        texts = documents[group]["text"]
        yield from zip(group, _token_ids(tokenizer, tokenizer_key, texts, [keys[i] for i in group]))


def _take_chunks(
    documents,
    order,
    keys,
    tokenizer,
    tokenizer_key,
    *,
    prefix,
    suffix=(),
    budget,
    max_length,
    min_chunk,
    chunks_per_document=None,
):
    """(indices of the documents used, their chunks) until ``budget`` tokens are taken.

    Each chunk is ``prefix``, up to ``max_length - len(prefix) - len(suffix)``
    document tokens, then ``suffix``; a document gives at most ``chunks_per_document`` chunks (its first).
    Chunks shorter than ``min_chunk`` are dropped; a document none of whose chunks is kept does not count
    as used.
    """
    used: list[int] = []
    chunks: list[torch.Tensor] = []
    total = dropped = 0
    head = torch.tensor(prefix, dtype=torch.long)
    tail = torch.tensor(list(suffix), dtype=torch.long)
    body_length = max(1, max_length - len(prefix) - len(suffix))
    for index, ids in _document_tokens(documents, order, keys, tokenizer, tokenizer_key):
        if total >= budget:
            break
        n_before = len(chunks)
        for piece in ids.split(body_length)[:chunks_per_document]:
            chunk = torch.cat([head, piece, tail]) if (prefix or suffix) else piece
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
        rows = [chunks[i] for i in by_length[start : start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def most_frequent_tokens(chunks: Sequence[torch.Tensor], k: int = 50) -> list[int]:
    """The ``k`` most frequent token ids in ``chunks`` (ties broken by lower id)."""
    if not chunks:
        return []
    counts = torch.bincount(torch.cat(list(chunks)))
    ids = torch.sort(counts, descending=True, stable=True).indices  # stable: equal counts keep id order
    return ids[: min(k, int((counts > 0).sum()))].tolist()


def documents_digest(collect_texts: Sequence[str], eval_texts: Sequence[str], select_texts: Sequence[str] = ()) -> str:
    """sha256 of the documents used, part by part, each length-prefixed UTF-8.

    Independent of the tokenizer and of the machine; any change to a used
    document, or to which part it is in, changes it. A select part (budget runs) is a third part; without
    one the digest is the two-part digest.
    """
    digest = hashlib.sha256()
    parts = [("collect", collect_texts), ("eval", eval_texts)] + ([("select", select_texts)] if select_texts else [])
    for part, texts in parts:
        digest.update(part.encode("ascii"))
        digest.update(len(texts).to_bytes(8, "big"))
        for text in texts:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()
