"""Every loaded byte is verified, once: a version is downloaded once, checked in that very directory, loaded from it.

A real sqlite store holds `guarded` v1, a root registered with `mlflow-selprune register` (so it has a manifest
of its files), and v2, a delta of it. The root's stored `config.json` is then changed (gelu -> relu: another
computation, the same weights). Downloads are counted by wrapping MLflow's own `download_artifacts` (the real
function still runs), and the store's files are changed from that wrapper, right after a copy was fetched: the
race between verifying one copy and loading another.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from mlflow_helpers import SMALL, current_store, invoke, registry_snapshot, sqlite_store, tiny_model

NAME = "guarded"
ROOT = f"models:/{NAME}/1"
PRUNE = ["--ff-frac", "0.1", "--attn-frac", "0.05", "--steps", "1", "--no-control"]


def _prune(store, *extra: str) -> str:
    out = invoke(
        "prune", "--model-uri", ROOT, "--forget", store["forget"], "--retain", store["retain"], *PRUNE, *SMALL, *extra
    )
    assert out.exit_code == 0, out.stderr[-3000:]
    versions = MlflowClient().search_model_versions(f"name='{NAME}'")
    return f"models:/{NAME}/{max(int(v.version) for v in versions)}"


@pytest.fixture(scope="session")
def _guarded_store(tmp_path_factory, tiny_tokenizer):
    """The store with `guarded` v1 and its delta v2, built once per test process. Under xdist a worker can leave
    this module for another and come back, which sets up its module fixtures again: ``store`` only makes this
    store the current one again, as the module's tests left it, as when they run one after another."""
    with sqlite_store(tmp_path_factory.mktemp("store"), tiny_tokenizer) as store:
        directory = tmp_path_factory.mktemp("hf-model")
        tiny_model(tiny_tokenizer).save_pretrained(directory)
        tiny_tokenizer.save_pretrained(directory)
        out = invoke("register", str(directory), "--name", NAME)
        assert out.exit_code == 0, out.output
        return {"store": store, "chain": (ROOT, _prune(store, "--storage", "delta"))}


@pytest.fixture(scope="module")
def store(_guarded_store):
    """The sqlite store (see ``sqlite_store``) as this process's tracking store, its root the working directory."""
    with current_store(_guarded_store["store"]) as store:
        yield store


@pytest.fixture(scope="module")
def chain(store, _guarded_store):
    """``(root, delta)``: the root registered with its manifest, and a delta of it."""
    return _guarded_store["chain"]


def _stored_config(uri: str) -> Path:
    """Where the store keeps the ``config.json`` of version ``uri``."""
    location = MlflowClient().get_model_version_download_uri(NAME, uri.rsplit("/", 1)[1])
    return next(Path(local_file_uri_to_path(location)).rglob("config.json"))


@contextlib.contextmanager
def _relu(uri: str):
    """The stored config of ``uri`` says relu (its weights untouched) until the block ends."""
    path = _stored_config(uri)
    original = path.read_bytes()
    assert json.loads(original)["hidden_act"] == "gelu"
    path.write_text(json.dumps({**json.loads(original), "hidden_act": "relu"}))
    try:
        yield
    finally:
        path.write_bytes(original)


@contextlib.contextmanager
def _downloads(after_first=None):
    """The artifact URIs MLflow downloads inside the block (the real download runs); ``after_first(uri)`` runs
    once a URI has been fetched for the first time."""
    calls: list[str] = []
    real = mlflow.artifacts.download_artifacts

    def counted(*args, **kwargs):
        path = real(*args, **kwargs)
        uri = kwargs.get("artifact_uri")
        if uri is not None:
            if after_first is not None and uri not in calls:
                after_first(uri)
            calls.append(uri)
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlflow.artifacts, "download_artifacts", counted)
        yield calls


def _runs() -> set[str]:
    client = MlflowClient()
    return {
        run.info.run_id
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id], max_results=1000)
    }


@pytest.mark.slow(seconds=20)
def test_a_delta_whose_root_config_was_changed_is_neither_materialized_nor_gated(chain):
    """The root's config.json edited (hidden_act gelu -> relu, weights intact): the delta's rebuild verifies its
    parent's files first, so `materialize` refuses (exit 1, no run, no version) and `gate --dry-run` refuses."""
    root, delta = chain
    gate = ["gate", "--model-uri", delta, "--max-retain-drop", "1", "--dry-run"]
    assert invoke(*gate).exit_code == 0  # untouched, the delta passes
    with _relu(root):
        before, runs = registry_snapshot(), _runs()
        out = invoke("materialize", delta)
        assert out.exit_code == 1, out.output
        assert f"refusing to rebuild {delta} from {root}: it does not verify" in out.stderr, out.stderr
        assert "config.json changed" in out.stderr, out.stderr
        assert registry_snapshot() == before and _runs() == runs
        gated = invoke(*gate)
        assert gated.exit_code == 1, gated.output
        assert f"from {root}: it does not verify" in gated.stderr, gated.stderr


@pytest.mark.slow(seconds=20)
def test_the_files_verified_are_the_files_loaded(store, chain):
    """The root's stored config is changed right after its first download (the race): `prune` still loads the
    copy it verified, fetched once, so the new version computes with gelu; `gate` fetches the delta and its
    parent once each."""
    root, delta = chain
    with contextlib.ExitStack() as stack:

        def race(uri: str) -> None:
            if uri == root:
                stack.enter_context(_relu(root))

        with _downloads(after_first=race) as calls:
            pruned = _prune(store)
    assert calls.count(root) == 1, calls
    assert json.loads(_stored_config(pruned).read_text())["hidden_act"] == "gelu"
    with _downloads() as calls:
        assert invoke("gate", "--model-uri", delta, "--max-retain-drop", "1", "--dry-run").exit_code == 0
    assert calls.count(delta) == 1 and calls.count(root) == 1, calls


@pytest.mark.slow(seconds=15)
def test_a_new_version_s_manifest_is_taken_before_upload_never_by_downloading_it(store, chain):
    """`prune` hashes the model directory it uploads: the logged model is never fetched back; the manifest it
    recorded is the stored files' (`lineage --verify` passes)."""
    with _downloads() as calls:
        pruned = _prune(store)
    assert [uri for uri in calls if uri.startswith("models:/m-")] == [], calls
    out = invoke("lineage", pruned, "--verify")
    assert out.exit_code == 0, out.output


@pytest.mark.parametrize(
    "raised, expected",
    [
        (
            "403 Client Error: Forbidden for url: http://h/api/2.0/mlflow-artifacts/artifacts?path=0. "
            "Response text: Permission denied",
            "permission denied: the MLflow server at",
        ),
        ("Connection reset by peer", "cannot download 'models:/guarded/9': Connection reset by peer"),
    ],
)
def test_a_download_the_artifact_proxy_refuses_is_the_permission_line(monkeypatch, raised, expected):
    """The proxy's refusal reaches the download as a ``requests.HTTPError`` (an ``OSError``), not an
    ``MlflowException``: it is still the one permission line, naming what the artifacts need."""
    import requests

    from mlflow_selprune.errors import BadInputError
    from mlflow_selprune.registry import loading
    from mlflow_selprune.registry.resolve import ResolvedModel

    def refuse(**_):
        raise requests.HTTPError(raised)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", refuse)
    uri = "models:/guarded/9"
    with pytest.raises(BadInputError) as refused:
        loading.fetch(ResolvedModel(uri, uri, uri, NAME, "9"))
    message = str(refused.value)
    assert message.startswith(expected) and "\n" not in message, message
    if "permission" in expected:
        assert "mlflow-artifacts/artifacts: to read or write artifacts MLflow needs READ on the experiment" in message
