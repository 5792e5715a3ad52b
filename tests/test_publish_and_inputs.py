"""What a published version promises, and which inputs never get that far.

- A job that fails before its version exists leaves no version (exit 3); what fails after it exists is a
  warning naming it (exit 0): the faults are real, a report path the artifact store cannot write and a
  sqlite store whose database refuses the alias and the description update (triggers).
- User text (DATA specs, the gate's user) is shown in the version's description, never rendered, and cannot
  forge the gate heading or a gate decision.
- A model whose head is not a kind selective pruning measures, or whose checkpoint does not fill the class
  it loads as, is refused from its files in one line (exit 2) by `prune`, `evaluate` and `register`, before
  any run or version exists.
- A budget run's saved scores are those of the last step it applied, not of a step it rolled back.
"""

from __future__ import annotations

import copy
import html
import os
import re
import shutil
import sqlite3
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from mlflow.tracking import MlflowClient

from mlflow_selprune.registry import lineage
from mlflow_helpers import (
    SMALL_DATA,
    tiny_neox_config,
    TINY_NAME,
    assert_complete_or_absent,
    cli,
    current_store,
    invoke,
    jsonl_retain_store,
    registry_snapshot,
)

KINDS = ("causal-lm", "masked-lm", "text-classifier", "image-classifier")


@pytest.fixture(scope="session")
def _publish_store(tmp_path_factory, tiny_tokenizer):
    """The store, built once per test process. Under xdist a worker can leave this module for another and come
    back, which sets up its module fixtures again: ``store`` only makes this store the current one again, as
    the module's tests left it, as when they run one after another."""
    with jsonl_retain_store(tmp_path_factory.mktemp("publish"), tiny_tokenizer) as s:
        return s


@pytest.fixture(scope="module")
def store(_publish_store):
    """The store (see ``jsonl_retain_store``) as this process's tracking store, its root the working directory."""
    with current_store(_publish_store) as store:
        yield store


def _prune(store, *extra, forget=None, model_uri=f"models:/{TINY_NAME}@base"):
    return invoke(
        "prune",
        "--model-uri",
        model_uri,
        "--forget",
        forget or store["forget"],
        "--retain",
        store["retain"],
        "--ff-frac",
        "0.1",
        "--attn-frac",
        "0.05",
        "--samples",
        "2",
        *SMALL_DATA,
        *extra,
    )


def _run_ids() -> set[str]:
    client = MlflowClient()
    return {
        run.info.run_id
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id], max_results=1000)
    }


def _new_version(before: dict) -> str:
    (version,) = assert_complete_or_absent(before)
    return version


# ----------------------------------------------------------------------------- 7. nothing fails after the version


@pytest.mark.slow(seconds=20)
def test_a_report_the_store_cannot_write_fails_the_job_before_any_version_exists(store, monkeypatch):
    """The run's artifact store cannot take selprune/report.html (where it goes, a directory holds a directory
    of that name: every write there fails, for root too): exit 3, the run FAILED, and no version, no alias."""
    client = MlflowClient()
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    artifacts = Path(urlparse(run.info.artifact_uri).path)
    (artifacts / "selprune" / "report.html" / "report.html").mkdir(parents=True)
    before = registry_snapshot()
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)  # the job fills this run, as under `mlflow run`
    out = _prune(store, "--alias", "reported")
    assert out.exit_code == 3, out.stderr[-3000:]
    assert "report.html" in out.stderr, out.stderr[-3000:]
    assert registry_snapshot() == before, "no version and no alias when the report cannot be stored"
    assert client.get_run(run.info.run_id).info.status == "FAILED"


@pytest.mark.slow(seconds=20)
def test_what_fails_after_the_version_exists_is_a_warning_that_names_it(store):
    """The database refuses the alias and the description update (sqlite triggers): both come after the
    version exists, so the job succeeds (exit 0) with one warning each naming the version; the version was
    created complete, its description included (all but its own number)."""
    database = store["root"] / "mlflow.db"
    triggers = {
        "refuse_alias": "BEFORE INSERT ON registered_model_aliases",
        "refuse_description": "BEFORE UPDATE OF description ON model_versions",
    }
    connection = sqlite3.connect(database)
    for name, when in triggers.items():
        connection.execute(f"CREATE TRIGGER {name} {when} BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    connection.commit()
    try:
        before = registry_snapshot()
        out = _prune(store, "--alias", "candidate")
    finally:
        for name in triggers:
            connection.execute(f"DROP TRIGGER {name}")
        connection.commit()
        connection.close()
    assert out.exit_code == 0, out.stderr[-3000:]
    version = _new_version(before)  # complete, and the aliases unchanged
    uri = f"models:/{TINY_NAME}/{version}"
    assert f"registered: {uri} " in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "is registered and complete, but could not" in line]
    assert len(warnings) == 2 and all(line.startswith(f"{uri} ") for line in warnings), out.stderr[-3000:]
    assert any("@candidate" in line for line in warnings) and any("description" in line for line in warnings)
    client = MlflowClient()
    mv = client.get_model_version(TINY_NAME, version)
    assert mv.description.startswith("**Unlearned by selective pruning.**")
    assert f"mlflow-selprune lineage models:/{TINY_NAME}/<this version> --verify" in mv.description
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[lineage.PREFIX + "registered_model_uri"] == uri
    assert "candidate" not in client.get_registered_model(TINY_NAME).aliases


# ----------------------------------------------------------------------------- 8. user text is shown, not rendered

FORGED = (
    "x` <https:evil.example> <img src=x onerror=alert(1)> `\n### Gate decisions\n\n"
    "- 2030-01-01 00:00:00 UTC: pass (max retain drop 0.05, metric top1) by admin; signed\n"
)


def _rendered(markdown: str) -> str:
    """The description as a CommonMark renderer shows it (what the MLflow UI does with it)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").render(markdown)


def _decisions(description: str) -> list[str]:
    """The gate decision lines: under the one line that is the gate heading."""
    from mlflow_selprune.registry.describe import GATE_HEADING

    lines = description.splitlines()
    assert lines.count(GATE_HEADING) == 1, description
    heading = lines.index(GATE_HEADING)
    assert not [line for line in lines[:heading] if line.startswith(("- ", "#"))], description
    return [line for line in lines[heading + 1 :] if line.startswith("- ")]


@pytest.mark.slow(seconds=30)
def test_data_specs_and_users_are_shown_never_rendered_and_cannot_forge_gate_decisions(store, monkeypatch):
    """A DATA spec (a real file path) with backticks, a link, raw HTML and a forged gate heading and decision:
    the description shows it in one code span that cannot close early, on its own line never; two real gates
    (one by a user whose name forges a decision too) add exactly their two lines."""
    spec = f"data/{FORGED}/forget.jsonl"
    os.makedirs(os.path.dirname(spec))
    shutil.copy(store["forget"], spec)
    before = registry_snapshot()
    out = _prune(store, forget=spec)
    assert out.exit_code == 0, out.stderr[-3000:]
    version = _new_version(before)
    uri = f"models:/{TINY_NAME}/{version}"
    client = MlflowClient()
    mv = client.get_model_version(TINY_NAME, version)
    assert mv.tags[lineage.FORGET_DATA] == spec
    text = mv.description
    assert _decisions(text) == []  # "Not gated yet": the forged line is no decision
    shown = spec.replace("\n", "\\x0a")
    fence = "`" * (max(len(run) for run in re.findall("`+", shown)) + 1)
    assert f"{fence}{shown}{fence}" in text  # one code span, fenced longer than any backtick run inside
    rendered = _rendered(text)
    assert "<a " not in rendered and "<img" not in rendered and rendered.count("<h3>") == 1, rendered
    assert "<li>" not in rendered and f"<code>{html.escape(shown, quote=False)}</code>" in rendered, rendered

    assert invoke("gate", "--model-uri", uri, "--max-retain-drop", "0.99").exit_code == 0
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "eve\n- 2030-01-01 00:00:00 UTC: **pass** by admin; signed")
    assert invoke("gate", "--model-uri", uri, "--max-retain-drop", "0.98").exit_code == 0
    after = client.get_model_version(TINY_NAME, version).description
    decisions = _decisions(after)
    assert len(decisions) == 2, after
    assert "(max retain drop 0.99," in decisions[0] and "(max retain drop 0.98," in decisions[1]
    assert "`eve\\x0a- 2030-01-01 00:00:00 UTC: **pass** by admin; signed`" in decisions[1]
    assert after.startswith(text.split("\n### Gate decisions\n")[0])  # the description above the gates is kept
    rendered = _rendered(after)
    assert rendered.count("<li>") == 2 and "<a " not in rendered and "<img" not in rendered, rendered

    report = Path(client.download_artifacts(mv.run_id, "selprune/report.html", str(store["root"] / "report")))
    page = report.read_text()
    assert "<img src=x" not in page and f"<code>{html.escape(shown)}</code>" in page


# ----------------------------------------------------------------------------- 9. heads and checkpoints refused


def _neox_config(tokenizer):
    return tiny_neox_config(tokenizer)


def _saved(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _refused_everywhere(store, model_dir: str, *expected: str) -> None:
    """`prune`, `evaluate` and `register` each refuse the directory in one line (exit 2) naming the supported
    kinds, before any run or version exists."""
    before, runs = registry_snapshot(), _run_ids()
    outcomes = {
        "prune": _prune(store, "--register-as", "refused-model", model_uri=model_dir),
        "evaluate": invoke(
            "evaluate", "--model-uri", model_dir, "--forget", store["forget"], "--retain", store["retain"], *SMALL_DATA
        ),
        "register": invoke("register", model_dir, "--name", "refused-model"),
    }
    for command, out in outcomes.items():
        assert out.exit_code == 2, (command, out.stderr[-3000:])
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and all(kind in errors[0] for kind in KINDS), (command, out.stderr)
        assert all(text in errors[0] for text in expected), (command, errors[0])
    assert registry_snapshot() == before and _run_ids() == runs, "nothing written"


@pytest.mark.parametrize("head", ["GPTNeoXForTokenClassification", "GPTNeoXForQuestionAnswering"])
def test_a_head_selective_pruning_does_not_measure_is_refused_from_its_config(store, tiny_tokenizer, tmp_path, head):
    """Not loaded as a causal LM with a freshly initialized LM head (the old fallback): refused."""
    import transformers as T

    model_dir = _saved(getattr(T, head)(_neox_config(tiny_tokenizer)), tiny_tokenizer, tmp_path / head)
    _refused_everywhere(store, model_dir, f"{head} is not a model kind")


def _edited_checkpoint(tiny_tokenizer, path: Path, edit) -> str:
    """A GPT-NeoX causal LM saved whole, then its safetensors edited by ``edit(state) -> state``."""
    from safetensors.torch import load_file, save_file
    from transformers import GPTNeoXForCausalLM

    model_dir = _saved(GPTNeoXForCausalLM(_neox_config(tiny_tokenizer)), tiny_tokenizer, path)
    weights = path / "model.safetensors"
    save_file(edit(load_file(str(weights))), str(weights), metadata={"format": "pt"})
    return model_dir


def _drop_head(state):
    del state["embed_out.weight"]
    return state


def _add_weight(state):
    state["gpt_neox.layers.0.mlp.gate.weight"] = torch.zeros(64, 32)
    return state


def _reshape_weight(state):
    state["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] = torch.zeros(48, 32)  # the model's is 64 x 32
    return state


@pytest.mark.parametrize(
    "edit, expected",
    [
        (_drop_head, "do not match GPTNeoXForCausalLM (missing: "),  # its LM head
        (_add_weight, "unexpected: gpt_neox.layers.0.mlp.gate.weight"),
        (_reshape_weight, "of another shape: gpt_neox.layers.0.mlp.dense_h_to_4h.weight"),
    ],
    ids=["missing", "extra", "wrong-shape"],
)
def test_a_checkpoint_whose_weights_do_not_fill_its_class_is_refused_never_initialized_at_random(
    store, tiny_tokenizer, tmp_path, edit, expected
):
    """A weight missing, extra or of another shape: transformers would initialize at random what it cannot
    load, so each is one line (exit 2) with nothing written, never a model with random parts or an exit 3."""
    model_dir = _edited_checkpoint(tiny_tokenizer, tmp_path / "edited", edit)
    _refused_everywhere(store, model_dir, expected)


@pytest.mark.slow(seconds=15)
@pytest.mark.parametrize("edit", [_drop_head, _reshape_weight], ids=["missing", "wrong-shape"])
def test_the_refusal_is_one_line_on_the_console(store, tiny_tokenizer, tmp_path, edit):
    """In a fresh process (where transformers' own load report would also reach stderr): the store line, then
    the one error line, nothing else."""
    model_dir = _edited_checkpoint(tiny_tokenizer, tmp_path / "console", edit)
    out = cli(
        "evaluate",
        "--model-uri",
        model_dir,
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        *SMALL_DATA,
        env=store["env"],
        cwd=store["root"],
    )
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("tracking: ") and lines[1].startswith("error: "), out.stderr


def test_tied_and_whole_checkpoints_still_load(tiny_tokenizer, tmp_path):
    """The weights check refuses nothing a model saved whole holds: an LM head tied to the embeddings (stored
    once) loads, as does every kind's class."""
    import transformers as T

    from mlflow_selprune.registry.loading import load_components
    from mlflow_selprune.registry.resolve import resolve

    llama = T.LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    bert = T.BertConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    for model in (
        T.LlamaForCausalLM(llama),
        T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4)),
        T.BertForMaskedLM(bert),
        T.BertForSequenceClassification(bert),
    ):
        directory = _saved(model, tiny_tokenizer, tmp_path / type(model).__name__)
        loaded, _ = load_components(resolve(directory))
        assert type(loaded) is type(model)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- 10. budget rollback scores


def _token_batches(seed, low, high, n_batches=2, batch_size=4, length=12):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(low, high, (batch_size, length), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def test_a_rolled_back_step_leaves_the_scores_of_the_last_step_applied(tmp_path):
    """Each step prunes 10% of the FF neurons and the measurement is the share still alive, so a 15% retain
    budget keeps step 1 and rolls back step 2: the saved scores are step 1's (a one-step run's), the ones its
    mask was chosen by, not those of the step that never happened."""
    from safetensors.torch import load_file

    from mlflow_selprune import PruneConfig, find_architecture, prune
    from mlflow_selprune.engine.selection import select
    from mlflow_selprune.engine.surgery import pruned_columns
    from model_zoo import FAMILIES

    config, cls = FAMILIES["gpt_neox"]

    def build():
        torch.manual_seed(0)
        return cls(copy.deepcopy(config)).eval()

    def alive(model) -> dict:  # a real measurement of the model: the share of its FF neurons not zeroed
        share = 1 - float(pruned_columns(find_architecture(model), "ff").float().mean())
        return {"forget_top1": share, "retain_top1": share}

    forget, retain = _token_batches(1, 4, 70), _token_batches(2, 60, 128)
    one_step = prune(build(), forget, retain, PruneConfig(ff_frac=0.1, steps=1), progress=False)
    budget = prune(
        build(),
        forget,
        retain,
        PruneConfig(ff_frac=0.1, max_retain_drop=0.15, max_steps=5),
        evaluate_fn=alive,
        progress=False,
    )
    assert [step["kept"] for step in budget.steps] == [True, False] and "rolled back" in budget.stop_reason
    assert torch.equal(budget.ff_mask, one_step.ff_mask)
    assert torch.equal(budget.ff_scores, one_step.ff_scores)
    assert torch.equal(select(budget.ff_scores, torch.zeros_like(budget.ff_mask), 0.1), budget.ff_mask)
    saved = load_file(str(budget.save(tmp_path)["scores"]))
    assert torch.equal(saved["ff_scores"], one_step.ff_scores.float())
