"""DATA specs load offline in every form; splitting, chunking, batching and digests behave."""

import ast
import copy
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import tokenize

import datasets
import pandas as pd
import pytest
import torch

from mlflow_selprune.data import corpora
from mlflow_selprune.errors import ConfigError
from mlflow_selprune.data import DataError, load_documents, prepare_data, split_documents

_letters = torch.Generator().manual_seed(1)
WORDS = [
    "".join(chr(97 + c) for c in torch.randint(26, (int(n),), generator=_letters).tolist())
    for n in torch.randint(2, 8, (300,), generator=_letters)
]


def make_docs(n, words_per_doc=12, seed=0):
    """``n`` distinct prose-like documents."""
    rng = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        picks = torch.randint(len(WORDS), (words_per_doc,), generator=rng).tolist()
        docs.append(f"Document {i}: " + " ".join(WORDS[p] for p in picks) + ".")
    return docs


def texts(dataset):
    assert dataset.column_names == ["text"]
    return list(dataset["text"])


# --------------------------------------------------------------------------- input forms


def test_txt_whole_file_and_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph,\ntwo lines.\n\nSecond one.\n\nThird.\n")
    assert texts(load_documents(str(path))) == [path.read_text()]
    assert [t.strip() for t in texts(load_documents(str(path), paragraphs=True))] == [
        "First paragraph,\ntwo lines.",
        "Second one.",
        "Third.",
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_structured_files(tmp_path, suffix):
    frame = pd.DataFrame({"id": [1, 2, 3], "text": ["one doc", "two doc", "three doc"]})
    path = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    assert texts(load_documents(str(path))) == ["one doc", "two doc", "three doc"]


def test_directory_recursive_with_glob(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "README.md").write_text("# Read me\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x01")
    (tmp_path / ".git" / "hook.py").write_text("hidden = True\n")
    assert texts(load_documents(str(tmp_path))) == ["# Read me\n", "x = 1\n", "y = 2\n"]
    assert texts(load_documents(str(tmp_path), glob="*.py")) == ["x = 1\n", "y = 2\n"]
    with pytest.raises(DataError, match=r"no files matching '\*\.rs'"):
        load_documents(str(tmp_path), glob="*.rs")


def test_directory_of_mixed_formats_needs_a_glob(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "from json"}\n')
    (tmp_path / "b.txt").write_text("from text")
    with pytest.raises(DataError, match="mixes file formats"):
        load_documents(str(tmp_path), glob="*")
    assert texts(load_documents(str(tmp_path), glob="*.jsonl")) == ["from json"]


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_dict({"content": ["saved a", "saved b"]}).save_to_disk(str(tmp_path / "ds"))
    assert texts(load_documents(str(tmp_path / "ds"))) == ["saved a", "saved b"]

    splits = datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"text": ["val doc"]}),
            "train": datasets.Dataset.from_dict({"text": ["train doc"]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert texts(load_documents(str(tmp_path / "dd"))) == ["train doc"]
    assert texts(load_documents(str(tmp_path / "dd"), split="validation")) == ["val doc"]
    with pytest.raises(DataError, match="no split 'test'; available splits: validation, train"):
        load_documents(str(tmp_path / "dd"), split="test")

    datasets.DatasetDict({"b": splits["validation"], "a": splits["train"]}).save_to_disk(str(tmp_path / "nt"))
    assert texts(load_documents(str(tmp_path / "nt"))) == ["val doc"]  # no train: the first split


def test_builtin_corpora():
    code = texts(load_documents("builtin:stdlib-code"))
    prose = texts(load_documents("builtin:stdlib-prose"))
    assert len(code) > 200 and len(prose) > 500
    assert code == corpora.builtin_documents("stdlib-code")  # deterministic, cached
    for doc in code[::20]:  # valid Python without docstrings or comments
        tree = ast.parse(doc)
        nodes = [n for n in ast.walk(tree) if isinstance(n, corpora._DOC_OWNERS)]
        assert all(ast.get_docstring(n, clean=False) is None for n in nodes)
        assert not [t for t in tokenize.generate_tokens(io.StringIO(doc).readline) if t.type == tokenize.COMMENT]
    for doc in prose[::20]:
        assert len(doc) >= corpora._MIN_PROSE_CHARS
        assert not any(line.lstrip().startswith(">>>") for line in doc.splitlines())
    assert any("identifier" in doc.lower() for doc in prose)  # pydoc topics are in
    with pytest.raises(DataError, match="builtin:stdlib-code, builtin:stdlib-prose"):
        load_documents("builtin:stdlib-poetry")


def test_code_stripping_keeps_strings_and_layout():
    source = (
        '"""Module docstring."""\n'
        "import re  # trailing comment\n"
        'HASH = "# not a comment"\n'
        "def f():\n"
        '    """Only a docstring."""\n'
        "class A:\n"
        "    r'''Doc\n    on two lines.'''\n"
        '    tmpl = f"{HASH!r} # kept"\n'
        "    # a full-line comment\n"
        "    x = '''tri # kept'''\n"
    )
    tree = ast.parse(source)
    stripped = corpora._strip_code(source, list(corpora._docstrings(tree)))
    assert stripped == (
        "import re\n"
        'HASH = "# not a comment"\n'
        "def f():\n"
        "    pass\n"
        "class A:\n"
        '    tmpl = f"{HASH!r} # kept"\n'
        "\n"
        "    x = '''tri # kept'''"
    )


def test_mlflow_artifact_uri_is_downloaded_then_loaded(tmp_path, monkeypatch):
    import mlflow

    """A real sqlite store: the DATA is an artifact logged to a run, read back through its runs:/ URI."""
    monkeypatch.chdir(tmp_path)  # the run's artifacts go to ./mlruns here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        (tmp_path / "forget.txt").write_text("logged text")
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(tmp_path / "forget.txt"), artifact_path="data")
        assert texts(load_documents(f"runs:/{run.info.run_id}/data/forget.txt")) == ["logged text"]
        with pytest.raises(DataError, match="could not download DATA"):
            load_documents(f"runs:/{run.info.run_id}/data/missing.txt")
    finally:
        mlflow.set_tracking_uri(None)


# --------------------------------------------------------------------------- columns and errors


@pytest.mark.parametrize(
    "columns, expected",
    [
        ({"id": [1, 2], "content": ["c1", "c2"], "text": ["t1", "t2"]}, ["t1", "t2"]),
        ({"title": ["a", "b"], "body": ["b1", "b2"]}, ["b1", "b2"]),
        ({"id": [1, 2], "snippet": ["s1", "s2"]}, ["s1", "s2"]),
    ],
)
def test_text_column_detection(tmp_path, columns, expected):
    path = tmp_path / "d.jsonl"
    pd.DataFrame(columns).to_json(path, orient="records", lines=True)
    assert texts(load_documents(str(path))) == expected


def test_text_column_option_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    pd.DataFrame({"question": ["q1", "q2"], "answer": ["a1", "a2"], "n": [1, 2]}).to_json(
        path, orient="records", lines=True
    )
    assert texts(load_documents(str(path), text_column="answer")) == ["a1", "a2"]
    with pytest.raises(DataError, match=r"available columns: question, answer, n.*--text-column"):
        load_documents(str(path))
    with pytest.raises(DataError, match=r"no column 'prompt'; available columns: question, answer, n"):
        load_documents(str(path), text_column="prompt")
    with pytest.raises(DataError, match="column 'n' .* not text"):
        load_documents(str(path), text_column="n")


def test_empty_documents_are_dropped_and_all_empty_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    pd.DataFrame({"text": ["kept", "", "  \n", None]}).to_json(path, orient="records", lines=True)
    assert texts(load_documents(str(path))) == ["kept"]
    pd.DataFrame({"text": ["", "   "]}).to_json(path, orient="records", lines=True)
    with pytest.raises(DataError, match="no non-empty text documents"):
        load_documents(str(path))


@pytest.mark.parametrize("spec", ["./nope.txt", "nope.jsonl", "/no/such/dir", "some/deep/path"])
def test_missing_local_path(spec):
    with pytest.raises(DataError, match="no such file or directory"):
        load_documents(spec)


def test_hub_dataset_offline_fails_fast_with_one_clear_line():
    assert datasets.config.HF_HUB_OFFLINE  # conftest sets HF_DATASETS_OFFLINE=1
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_documents("someone/some-dataset")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "hub dataset 'someone/some-dataset'" in message and "not reachable (offline)" in message
    assert "builtin:stdlib-code" in message and "\n" not in message


def test_hub_unreachable_online_fails_fast(monkeypatch):
    """Not offline but no network: one quick metadata request decides, no 25 s of retries."""
    import huggingface_hub

    def no_network(self, *args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    with pytest.raises(DataError, match=r"the Hugging Face hub is not reachable \(OSError\)"):
        load_documents("someone/some-dataset")


# --------------------------------------------------------------------------- splitting


def keys_of(docs):
    return [hashlib.sha256(d.encode()).digest() for d in docs]


def test_split_is_by_document_disjoint_and_deterministic():
    docs = make_docs(400)
    collect, evaluation = split_documents(keys_of(docs), 0.2)
    assert not set(collect) & set(evaluation)
    assert sorted(collect + evaluation) == list(range(400))
    assert 0.12 < len(evaluation) / 400 < 0.28
    assert (collect, evaluation) == split_documents(keys_of(docs), 0.2)
    # A document's part depends on its own text only, not on the rest of the data.
    sub_collect, sub_eval = split_documents(keys_of(docs[:100]), 0.2)
    assert {docs[i] for i in sub_eval} == {docs[i] for i in evaluation if i < 100}


def test_tiny_data_gets_both_parts_or_a_clear_error():
    docs = make_docs(2)
    for fraction in (0.001, 0.999):
        collect, evaluation = split_documents(keys_of(docs), fraction)
        assert len(collect) == len(evaluation) == 1
    with pytest.raises(DataError, match="need at least 2 distinct documents"):
        split_documents(keys_of(["same", "same"]), 0.5)


def test_prepared_parts_share_no_document(tiny_tokenizer):
    docs = make_docs(60)  # each document is shorter than max_length: one chunk each
    prepared = prepare_data(docs, tiny_tokenizer, max_length=128, collect_tokens=10**6, eval_tokens=10**6)

    def decoded(batches):
        return {
            tiny_tokenizer.decode(row[mask.bool()])
            for b in batches
            for row, mask in zip(b["input_ids"], b["attention_mask"])
        }

    collect, evaluation = decoded(prepared.collect_batches), decoded(prepared.eval_batches)
    assert collect and evaluation and not collect & evaluation
    assert collect | evaluation == set(docs)
    assert prepared.n_documents == 60 and prepared.spec == "<list of 60 documents>"
    assert sorted(texts(prepared.documents)) == sorted(docs)


def test_prepare_is_deterministic(tiny_tokenizer):
    docs = make_docs(80, words_per_doc=40)
    a = prepare_data(docs, tiny_tokenizer, max_length=32, batch_size=4, collect_tokens=800, eval_tokens=300)
    b = prepare_data(
        list(reversed(docs)), tiny_tokenizer, max_length=32, batch_size=4, collect_tokens=800, eval_tokens=300
    )
    assert a.digest == b.digest  # order of the input does not matter: hash order does
    for x, y in zip(a.collect_batches + a.eval_batches, b.collect_batches + b.eval_batches, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["attention_mask"], y["attention_mask"])
    assert a.skip_token_ids == b.skip_token_ids
    assert (a.collect_tokens, a.eval_tokens, a.n_documents) == (b.collect_tokens, b.eval_tokens, b.n_documents)


# --------------------------------------------------------------------------- digests


def test_digest_is_sensitive_to_one_character(tiny_tokenizer):
    docs = make_docs(30)
    base = prepare_data(docs, tiny_tokenizer, collect_tokens=10**6, eval_tokens=10**6).digest
    changed = list(docs)
    changed[7] = changed[7].replace("Document", "Docvment")
    assert prepare_data(changed, tiny_tokenizer, collect_tokens=10**6, eval_tokens=10**6).digest != base
    assert prepare_data(docs, tiny_tokenizer, collect_tokens=10**6, eval_tokens=10**6).digest == base


def test_digest_is_stable_across_processes(tiny_tokenizer, tmp_path):
    docs = make_docs(30)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tiny_tokenizer.save_pretrained(str(tmp_path / "tok"))
    here = prepare_data(
        str(tmp_path / "docs.jsonl"), tiny_tokenizer, max_length=16, collect_tokens=200, eval_tokens=100
    )
    script = (
        "import sys\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "from mlflow_selprune.data import prepare_data\n"
        "tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[2])\n"
        "print(prepare_data(sys.argv[1], tok, max_length=16, collect_tokens=200, eval_tokens=100).digest)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "docs.jsonl"), str(tmp_path / "tok")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == here.digest


# --------------------------------------------------------------------------- chunking and batching


def test_chunking_keeps_every_token_and_pads_only_with_pad(tiny_tokenizer):
    docs = make_docs(25, words_per_doc=60)
    max_length = 16
    prepared = prepare_data(
        docs, tiny_tokenizer, max_length=max_length, batch_size=5, collect_tokens=10**6, eval_tokens=10**6
    )
    lengths = {d: len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs}
    _, eval_idx = split_documents(keys_of(docs), 0.2)
    eval_docs = {docs[i] for i in eval_idx}
    # Eval drops a final 1-token chunk (it predicts nothing); collect keeps everything.
    expected_eval = sum(n - (n % max_length == 1) for d, n in lengths.items() if d in eval_docs)
    expected_collect = sum(n for d, n in lengths.items() if d not in eval_docs)
    assert prepared.collect_tokens == expected_collect
    assert prepared.eval_tokens == expected_eval
    assert prepared.n_documents == len(docs)

    for batches, count in (
        (prepared.collect_batches, prepared.collect_tokens),
        (prepared.eval_batches, prepared.eval_tokens),
    ):
        assert sum(int(b["attention_mask"].sum()) for b in batches) == count
        lengths_in_order = []
        for b in batches:
            ids, mask = b["input_ids"], b["attention_mask"]
            assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
            assert ids.shape[0] <= 5 and ids.shape[1] <= max_length
            row_lengths = mask.sum(1)
            assert int(row_lengths.max()) == ids.shape[1]  # padded to the longest row only
            positions = torch.arange(ids.shape[1])
            assert torch.equal(mask.bool(), positions < row_lengths[:, None])  # right padding
            assert (ids[~mask.bool()] == tiny_tokenizer.pad_token_id).all()
            lengths_in_order += row_lengths.tolist()
        assert lengths_in_order == sorted(lengths_in_order, reverse=True)


def test_budget_takes_whole_chunks_in_hash_order(tiny_tokenizer):
    docs = make_docs(50, words_per_doc=60)
    prepared = prepare_data(docs, tiny_tokenizer, max_length=16, collect_tokens=300, eval_tokens=120)
    assert 300 <= prepared.collect_tokens < 300 + 16
    assert 120 <= prepared.eval_tokens < 120 + 16
    assert not [w for w in prepared.warnings if "asked for" in w]  # each budget met
    bigger = prepare_data(docs, tiny_tokenizer, max_length=16, collect_tokens=600, eval_tokens=120)
    assert bigger.n_documents > prepared.n_documents
    assert bigger.digest != prepared.digest  # the digest covers the documents actually used


def _texts_of(prepared, tokenizer, part: str) -> set[str]:
    """The documents behind a part's batches (decoded rows), to compare parts without trusting the code's labels."""
    rows = set()
    for batch in getattr(prepared, f"{part}_batches"):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            rows.add(tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip())
    return rows


@pytest.mark.parametrize("eval_fraction", [0.2, 0.5])
def test_a_budget_run_gets_a_third_part_disjoint_from_the_other_two(tiny_tokenizer, eval_fraction):
    """Collect, select (what a budget stops on) and eval (what is reported): no document in two of them."""
    docs = make_docs(80, words_per_doc=12)
    docs += docs[:6]  # identical documents share a part
    options = dict(max_length=64, collect_tokens=10_000, eval_tokens=10_000, eval_fraction=eval_fraction)
    three = prepare_data(docs, tiny_tokenizer, select_part=True, **options)
    two = prepare_data(docs, tiny_tokenizer, **options)
    parts = {part: _texts_of(three, tiny_tokenizer, part) for part in ("collect", "select", "eval")}
    assert all(parts.values())
    assert not parts["collect"] & parts["select"] and not parts["collect"] & parts["eval"]
    assert not parts["select"] & parts["eval"]
    assert parts["collect"] == _texts_of(two, tiny_tokenizer, "collect")  # the collect part does not change
    assert parts["select"] | parts["eval"] == _texts_of(two, tiny_tokenizer, "eval")  # eval is shared out
    assert abs(len(parts["select"]) - len(parts["eval"])) <= 6
    assert three.select_tokens > 0 and two.select_batches is None
    assert three.digest != two.digest  # which part a document is in is part of the digest


def test_skip_token_ids_are_the_most_frequent_collect_tokens(tiny_tokenizer):
    prepared = prepare_data(make_docs(40, words_per_doc=30), tiny_tokenizer, max_length=32)
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in prepared.collect_batches])
    counts = torch.bincount(ids)
    expected = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))
    expected = [i for i in expected if counts[i] > 0][:50]
    assert prepared.skip_token_ids == expected and len(expected) == 50


def test_too_few_tokens_warns_and_min_tokens_errors(tiny_tokenizer, caplog):
    docs = make_docs(10)
    with caplog.at_level(logging.WARNING, logger="mlflow_selprune.data.batching"):
        prepared = prepare_data(docs, tiny_tokenizer, collect_tokens=5000, eval_tokens=5000)
    shortfalls = [w for w in prepared.warnings if "asked for" in w]
    assert len(shortfalls) == 2
    assert f"the collect part has only {prepared.collect_tokens} tokens" in shortfalls[0]
    assert "fewer than the 5000 asked for" in shortfalls[0]
    assert any("eval part has only" in r.getMessage() for r in caplog.records)
    # ten documents are too few for either part: said, not refused
    few = [w for w in prepared.warnings if "drops follow those documents" in w]
    assert len(few) == 2 and "the eval part has" in few[1]
    with pytest.raises(DataError, match="fewer than the 1000 needed"):
        prepare_data(docs, tiny_tokenizer, collect_tokens=5000, eval_tokens=5000, min_tokens=1000)
    with pytest.raises(DataError, match="need at least 2 distinct documents"):
        prepare_data(docs[:1], tiny_tokenizer)


def test_enough_documents_give_no_data_size_warning(tiny_tokenizer):
    from mlflow_selprune.data.batching import ADVISED_EVAL_TOKENS

    docs = make_docs(600, words_per_doc=12)
    prepared = prepare_data(
        docs, tiny_tokenizer, max_length=32, collect_tokens=3 * ADVISED_EVAL_TOKENS, eval_tokens=ADVISED_EVAL_TOKENS
    )
    assert prepared.warnings == []


def test_chunks_per_document_spreads_a_budget_over_more_documents(tiny_tokenizer):
    docs = make_docs(200, words_per_doc=120)
    whole = prepare_data(docs, tiny_tokenizer, max_length=16, collect_tokens=600, eval_tokens=300)
    first = prepare_data(
        docs, tiny_tokenizer, max_length=16, collect_tokens=600, eval_tokens=300, chunks_per_document=1
    )
    assert first.n_documents > 3 * whole.n_documents
    for batch in first.collect_batches + first.eval_batches:  # one chunk per document: the first 16 tokens
        assert batch["input_ids"].shape[1] <= 16
    assert first.digest != whole.digest
    with pytest.raises(ConfigError, match="--chunks-per-document must be an integer >= 1"):
        prepare_data(docs, tiny_tokenizer, chunks_per_document=0)


def test_another_split_seed_draws_another_split_as_reproducibly(tiny_tokenizer):
    docs = make_docs(100)
    default = prepare_data(docs, tiny_tokenizer, max_length=16, collect_tokens=200, eval_tokens=100)
    seeded = [
        prepare_data(docs, tiny_tokenizer, max_length=16, collect_tokens=200, eval_tokens=100, split_seed=s)
        for s in (1, 1, 2)
    ]
    assert seeded[0].digest == seeded[1].digest  # the same seed, the same split
    assert len({default.digest, seeded[0].digest, seeded[2].digest}) == 3


def test_one_token_documents_cannot_be_evaluated(tiny_tokenizer):
    with pytest.raises(DataError, match="only 0 eval tokens"):
        prepare_data(["a", "b", "c", "d"], tiny_tokenizer, eval_fraction=0.5)


def test_dataset_input_and_missing_pad_token(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    dataset = datasets.Dataset.from_dict({"body": make_docs(20, words_per_doc=30)})
    prepared = prepare_data(dataset, tokenizer, max_length=64, batch_size=8)
    assert prepared.spec == "<Dataset of 20 rows>"
    padded = [b for b in prepared.collect_batches if not b["attention_mask"].all()]
    assert padded and all((b["input_ids"][~b["attention_mask"].bool()] == tokenizer.eos_token_id).all() for b in padded)


def test_repeated_calls_reuse_the_tokenization(tiny_tokenizer, monkeypatch):
    docs = make_docs(30, words_per_doc=25)
    prepare_data(docs, tiny_tokenizer, max_length=32, collect_tokens=400, eval_tokens=200)
    calls = _counting(monkeypatch, tiny_tokenizer)
    prepare_data(docs, tiny_tokenizer, max_length=32, collect_tokens=400, eval_tokens=200)
    prepare_data(docs, tiny_tokenizer, max_length=16, collect_tokens=300, eval_tokens=100)
    assert calls == []


def _counting(monkeypatch, tokenizer):
    calls = []
    original = type(tokenizer).__call__

    def counting_call(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting_call)
    return calls


def test_a_rerun_reads_token_ids_from_the_disk_cache(tiny_tokenizer, monkeypatch, tmp_path):
    """A new process has an empty in-process cache: the ids come from disk, and are the same ids."""
    from mlflow_selprune.data import batching, token_cache

    monkeypatch.setenv("SELPRUNE_CACHE_DIR", str(tmp_path))
    docs = make_docs(30, words_per_doc=25, seed=7)
    first = prepare_data(docs, tiny_tokenizer, max_length=32, collect_tokens=400, eval_tokens=200)
    files = list((tmp_path / "tokens").glob("*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(batching, "_TOKEN_CACHE", batching._TokenCache(max_tokens=4_000_000))  # "a new process"
    calls = _counting(monkeypatch, tiny_tokenizer)
    again = prepare_data(docs, tiny_tokenizer, max_length=32, collect_tokens=400, eval_tokens=200)
    assert calls == []
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first.collect_batches, again.collect_batches)
    )
    assert again.digest == first.digest

    files[0].write_bytes(b"not a safetensors file")  # damaged: ignored, rebuilt, never trusted
    monkeypatch.setattr(batching, "_TOKEN_CACHE", batching._TokenCache(max_tokens=4_000_000))
    rebuilt = prepare_data(docs, tiny_tokenizer, max_length=32, collect_tokens=400, eval_tokens=200)
    assert calls and rebuilt.digest == first.digest
    assert token_cache.load(
        batching._tokenizer_key(tiny_tokenizer), [__import__("hashlib").sha256(d.encode()).digest() for d in docs]
    )

    monkeypatch.setenv("SELPRUNE_CACHE_MAX_BYTES", "1")  # the cap: everything old goes
    prepare_data(
        make_docs(30, words_per_doc=25, seed=8), tiny_tokenizer, max_length=32, collect_tokens=400, eval_tokens=200
    )
    assert list((tmp_path / "tokens").glob("*.safetensors")) == []


def test_no_token_cache_writes_nothing(tiny_tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("SELPRUNE_CACHE_DIR", str(tmp_path))
    prepare_data(
        make_docs(30, words_per_doc=25, seed=9),
        tiny_tokenizer,
        max_length=32,
        collect_tokens=400,
        eval_tokens=200,
        token_cache=False,
    )
    assert not (tmp_path / "tokens").exists()


def _bos_tokenizers():
    from transformers import GPT2TokenizerFast, LlamaTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    llama = LlamaTokenizerFast(
        vocab={"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(letters + "▁ .:0123456789D")}},
        merges=[],
        add_bos_token=True,
    )
    # OPT's tokenizer is GPT-2's byte-level BPE with </s> put before every text
    opt = GPT2TokenizerFast(
        vocab={"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(letters + "Ġ.:0123456789D")}},
        merges=[],
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
    )
    return {"llama": llama, "opt": opt}


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_inputs_start_with_bos_where_the_model_expects_one(family):
    """Models trained with a BOS (OPT, Llama) see one at the start of every chunk, as in training."""
    import transformers as T

    from mlflow_selprune import evaluate_model, prune
    from mlflow_selprune.config import PruneConfig
    from mlflow_selprune.data.batching import special_prefix

    tokenizer = _bos_tokenizers()[family]
    bos = tokenizer.bos_token_id
    assert special_prefix(tokenizer) == [bos]
    docs = [d.lower() for d in make_docs(40, words_per_doc=30, seed=3)]
    prepared = prepare_data(docs, tokenizer, max_length=32, batch_size=4, collect_tokens=600, eval_tokens=300)
    for batch in prepared.collect_batches + prepared.eval_batches:
        assert torch.all(batch["input_ids"][:, 0] == bos)
        assert batch["input_ids"].shape[1] <= 32
        real = batch["attention_mask"].bool()
        assert int((batch["input_ids"][real] == bos).sum()) == batch["input_ids"].shape[0]  # one BOS a chunk
    assert bos not in prepared.skip_token_ids
    if family == "opt":
        config = T.OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=bos,
            eos_token_id=bos,
        )
        model = T.OPTForCausalLM(config)
    else:
        config = T.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=bos,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = T.LlamaForCausalLM(config)
    torch.manual_seed(0)
    metrics = evaluate_model(model, prepared.eval_batches, progress=False)
    # every chunk of n tokens (BOS included) gives n - 1 predictions: BOS is an input, never a target
    pairs = sum(int(b["attention_mask"].sum()) - b["attention_mask"].shape[0] for b in prepared.eval_batches)
    assert metrics["n_tokens"] == pairs
    result = prune(
        model, prepared.collect_batches, prepared.eval_batches, PruneConfig(ff_frac=0.1, steps=1), progress=False
    )
    assert result.ff_pruned == round(0.1 * result.ff_mask.numel())


def test_gpt2_style_tokenizers_get_no_prefix(tiny_tokenizer):
    from mlflow_selprune.data.batching import special_prefix

    assert special_prefix(tiny_tokenizer) == []
