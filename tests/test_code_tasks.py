"""The functional checks (``--code-tasks``): the Python tasks and their executed tests, the English cloze
prompts, what a prune records of them, and the gate on the pass rate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_helpers import SMALL, TINY_NAME, invoke, recorded, registry_snapshot
from mlflow_selprune.evaluation.functional import CHECKS_ARTIFACT, check_model, code_programs, functional_checks
from mlflow_selprune.evaluation.metrics.code_pass.code_pass import estimate_pass_at_k, run_program
from mlflow_selprune.evaluation.packaged import packaged_metric
from mlflow_selprune.evaluation.task_sets.english_cloze import PROMPTS
from mlflow_selprune.evaluation.task_sets.python_functions import TASKS


def test_every_task_passes_with_its_reference_solution_and_fails_with_a_stub():
    """40 distinct tasks; the tests accept the canonical body and reject ``return None`` and a wrong body."""
    metric = packaged_metric("code_pass")
    tests = [t["test"] for t in TASKS]
    assert len(TASKS) == 40 and len({t["entry_point"] for t in TASKS}) == 40
    good, results = metric.compute(
        predictions=[[t["prompt"] + t["canonical_solution"]] for t in TASKS], references=tests
    )
    assert good == {"pass@1": 1.0}, [r[0][1]["result"] for r in results.values() if not r[0][1]["passed"]]
    stub, _ = metric.compute(predictions=[[t["prompt"] + "    return None\n"] for t in TASKS], references=tests)
    assert stub == {"pass@1": 0.0}
    wrong, _ = metric.compute(predictions=[[t["prompt"] + "    return 0\n"] for t in TASKS], references=tests)
    assert wrong == {"pass@1": 0.0}


def test_generated_code_cannot_hang_reach_the_network_spawn_or_write_outside_its_directory(tmp_path):
    """Each program runs in its own process: a busy loop stops on its CPU limit, a sleep on the wall limit,
    and sockets, child processes, deleting and writing outside the program's own directory fail (escape
    attempts past these guards: test_sandbox.py)."""
    outside = tmp_path / "written"
    assert run_program("while True:\n    pass", timeout=1) == "timed out"
    assert run_program("import time\ntime.sleep(60)", timeout=1) == "timed out"
    for program in (
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')",
        "import socket\nsocket.socket()",
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        f"open({str(outside)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(outside)!r}).write_text('x')",
        f"import os\nos.remove({str(tmp_path)!r})",
    ):
        outcome = run_program(program, timeout=3)
        assert outcome in {f"failed: {error}" for error in ("PermissionError", "OSError", "FileNotFoundError")}, outcome
    assert not outside.exists()
    assert run_program("open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'", timeout=3) == "passed"
    assert run_program("assert 1 == 2", timeout=3) == "failed: AssertionError"


def test_pass_at_k_is_the_unbiased_estimate_of_code_eval():
    """Two candidates of which one passes: pass@1 = 1/2, pass@2 = 1; in general 1 - C(n-c, k) / C(n, k)."""
    metric = packaged_metric("code_pass")
    candidates = [["def f():\n    return 2", "def f():\n    return 1"], ["def f():\n    return 3", "def f(): return 0"]]
    scores, results = metric.compute(predictions=candidates, references=["assert f() == 1"] * 2, k=[1, 2])
    assert scores == {"pass@1": 0.25, "pass@2": 0.5}
    assert [r["passed"] for _, r in results[0]] == [False, True]
    for n, c, k in ((10, 3, 1), (10, 3, 5), (7, 0, 2), (5, 5, 3)):
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert estimate_pass_at_k([n], [c], k)[0] == pytest.approx(expected, abs=1e-12)


def test_cloze_match_compares_first_words_without_case_or_punctuation():
    metric = packaged_metric("cloze_match")
    out = metric.compute(
        predictions=[" Paris.\n\nThe answer", " paris", " a city", "", " 4 apples", " Four"],
        references=[["Paris"], ["Paris"], ["Paris"], ["Paris"], ["four", "4"], ["four", "4"]],
    )
    assert out["matched"] == [True, True, False, False, True, True]
    assert out["exact_match"] == pytest.approx(4 / 6)
    assert len(PROMPTS) == 40 and all(p["answers"] for p in PROMPTS)


def test_programs_are_the_continued_prompt_without_a_chat_template_and_the_code_block_with_one(tiny_tokenizer):
    """A model without a chat template continues the task's prompt (cut where the function ends); with one,
    it is asked as a user and its first code block is the program. The tokenizer is left as it was."""
    from mlflow_helpers import tiny_model

    model = tiny_model(tiny_tokenizer)
    before = (tiny_tokenizer.padding_side, tiny_tokenizer.pad_token)
    programs = code_programs(model, tiny_tokenizer, TASKS[:3])
    assert all(p.startswith(t["prompt"]) for p, t in zip(programs, TASKS))
    assert (tiny_tokenizer.padding_side, tiny_tokenizer.pad_token) == before
    chat = tiny_tokenizer.__class__.from_pretrained(_saved(tiny_tokenizer))
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}```python\ndef "
    programs = code_programs(model, chat, TASKS[:3])
    assert not any(p.startswith(t["prompt"]) for p, t in zip(programs, TASKS))


def test_three_shot_inputs_show_three_solved_functions_that_are_not_tasks_before_the_task(tiny_tokenizer):
    """The examples are disjoint from the forty tasks and their solutions pass their own tests; the model is
    shown them, solved, before each task: as code before the prompt, or as earlier chat turns."""
    from mlflow_selprune.evaluation.functional import code_inputs
    from mlflow_selprune.evaluation.task_sets.python_examples import EXAMPLES

    assert len(EXAMPLES) == 3 and not {e["entry_point"] for e in EXAMPLES} & {t["entry_point"] for t in TASKS}
    passed, _ = packaged_metric("code_pass").compute(
        predictions=[[e["prompt"] + e["canonical_solution"]] for e in EXAMPLES],
        references=[e["test"] for e in EXAMPLES],
    )
    assert passed["pass@1"] == 1.0
    chat = tiny_tokenizer.__class__.from_pretrained(_saved(tiny_tokenizer))
    chat.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    for tokenizer in (tiny_tokenizer, chat):
        (plain,) = code_inputs(tokenizer, TASKS[:1])
        (shown,) = code_inputs(tokenizer, TASKS[:1], EXAMPLES)
        assert shown.endswith(plain)
        for example in EXAMPLES:
            assert example["prompt"] + example["canonical_solution"] in shown
            assert example["canonical_solution"] not in plain
        assert shown.index(EXAMPLES[-1]["canonical_solution"]) < shown.index(TASKS[0]["prompt"])
    assert code_inputs(chat, TASKS[:1], EXAMPLES)[0].count("<assistant>```python") == 3


def _saved(tokenizer) -> str:
    import tempfile

    directory = tempfile.mkdtemp(prefix="tok-")
    tokenizer.save_pretrained(directory)
    return directory


def test_the_checks_run_on_the_parent_the_unlearned_model_and_the_control(tiny_tokenizer):
    """Each view is measured as itself: a parent view that restores other weights gives its own outcomes."""
    import contextlib

    from mlflow_helpers import tiny_model

    model, other = tiny_model(tiny_tokenizer, seed=0), tiny_model(tiny_tokenizer, seed=1)

    @contextlib.contextmanager
    def other_weights():
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(other.state_dict())
        try:
            yield
        finally:
            model.load_state_dict(saved)

    metrics, table = functional_checks(model, tiny_tokenizer, parent_view=other_weights, control_view=None)
    assert set(metrics) == {
        "forget_code_pass_rate",
        "parent_forget_code_pass_rate",
        "forget_code_pass_rate_3shot",
        "parent_forget_code_pass_rate_3shot",
        "retain_cloze_accuracy",
        "parent_retain_cloze_accuracy",
    }
    assert all(0 <= v <= 1 for v in metrics.values())
    assert table["check"] == ["code"] * 40 + ["code 3-shot"] * 40 + ["cloze"] * 40
    assert table["control"] == ["(no control)"] * 120
    assert table["parent"][80:] == check_model(other, tiny_tokenizer).cloze_outcomes
    assert table["unlearned"][80:] == check_model(model, tiny_tokenizer).cloze_outcomes


@pytest.fixture(scope="module")
def checked(store):
    """tiny-lm@base pruned with --code-tasks through the CLI."""
    out = invoke(
        "prune", "--model-uri", f"models:/{TINY_NAME}@base", "--forget", store["forget"], "--retain", store["retain"],
        "--code-tasks", "--samples", "0", *SMALL,
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    version = max(MlflowClient().search_model_versions(f"name='{TINY_NAME}'"), key=lambda v: int(v.version))
    return {"uri": f"models:/{TINY_NAME}/{version.version}", "version": recorded(version)}


@pytest.mark.slow
def test_a_prune_with_code_tasks_records_the_three_models_pass_rates_for_the_gate(store, checked):
    """Six numbers in the run and as verified tags, the outcomes table, two rows of the version page, the
    report's section; the gate reads the pass rate, refuses one out of range before the store, and names the
    flag when a version has none."""
    client = MlflowClient()
    version = checked["version"]
    run = client.get_run(version.run_id)
    for key in ("forget_code_pass_rate", "retain_cloze_accuracy"):
        history = {m.step: m.value for m in client.get_metric_history(version.run_id, key)}
        assert float(version.tags[f"selprune.metric.parent_{key}"]) == history[0]  # step 0: the parent
        assert float(version.tags[f"selprune.metric.{key}"]) == run.data.metrics[key] == history[max(history)]
        assert float(version.tags[f"selprune.metric.control_{key}"]) == run.data.metrics[f"control_{key}"]
        assert all(0 <= v <= 1 for v in history.values())
    path = client.download_artifacts(version.run_id, CHECKS_ARTIFACT, str(store["root"] / "checks"))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["check", "item", "parent", "unlearned", "control"]
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == 120 and rows[0]["item"] == rows[40]["item"] == TASKS[0]["task_id"]
    assert rows[80]["item"] == PROMPTS[0]["prompt"]
    for name, shown in (("forget_code_pass_rate", rows[:40]), ("forget_code_pass_rate_3shot", rows[40:80])):
        passed = sum(r["unlearned"].startswith("passed — ") for r in shown) / 40
        assert passed == run.data.metrics[name] == float(version.tags[f"selprune.metric.{name}"])
    parent_solved = round(40 * float(version.tags["selprune.metric.parent_forget_code_pass_rate"]))
    assert f"| forget: Python tasks solved | {parent_solved} of 40 |" in version.description
    report = Path(client.download_artifacts(version.run_id, "selprune/report.html", str(store["root"] / "rep")))
    assert "Python tasks and English cloze prompts" in report.read_text()

    assert invoke("gate", "--model-uri", checked["uri"], "--max-code-pass-rate", "1", "--dry-run").exit_code == 0
    refused = invoke("gate", "--model-uri", checked["uri"], "--max-code-pass-rate", "1.5")
    assert refused.exit_code == 2 and "--max-code-pass-rate must be a share" in refused.output
    without = invoke("gate", "--model-uri", f"models:/{TINY_NAME}/1", "--max-code-pass-rate", "0.5")
    assert without.exit_code == 2 and "with --code-tasks" in without.output, without.output


def test_the_gate_fails_a_version_that_still_passes_more_python_tasks_than_allowed():
    """MLflow's own threshold check on the recorded pass rate: above the maximum fails, at or below passes."""
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    from mlflow_selprune.registry.gate import _metric_thresholds, mlflow_validate

    thresholds = dict.fromkeys(("max_retain_drop", "min_forget_drop", "min_selectivity", "max_relearn_recovery"))
    wanted = _metric_thresholds({**thresholds, "max_code_pass_rate": 0.2, "metric": "top1"})
    with pytest.raises(ModelValidationFailedException, match="forget_code_pass_rate"):
        mlflow_validate(wanted, {"forget_code_pass_rate": 0.3})
    mlflow_validate(wanted, {"forget_code_pass_rate": 0.2})
    # where the version records a three-shot pass rate, the same maximum applies to it
    recorded = {"forget_code_pass_rate": 0.2, "forget_code_pass_rate_3shot": 0.35}
    wanted = _metric_thresholds({**thresholds, "max_code_pass_rate": 0.2, "metric": "top1"}, recorded=recorded)
    with pytest.raises(ModelValidationFailedException, match="forget_code_pass_rate_3shot"):
        mlflow_validate(wanted, recorded)
    mlflow_validate(wanted, recorded | {"forget_code_pass_rate_3shot": 0.1})


def test_code_tasks_on_a_masked_lm_are_refused_before_anything_is_written(store, tmp_path):
    """One line naming the flag, exit 2, no run and no version."""
    import inspect

    from model_zoo import tiny_masked_lm, wordpiece_tokenizer

    texts = [" ".join(p.split()) for p in inspect.getsource(inspect).split("\n\n") if len(p.strip()) > 60]
    tokenizer = wordpiece_tokenizer(texts)
    tiny_masked_lm(tokenizer).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    client = MlflowClient()

    def runs() -> int:
        return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))

    before = registry_snapshot(), runs()
    out = invoke(
        "prune", "--model-uri", str(tmp_path / "bert"), "--forget", store["forget"], "--retain", store["retain"],
        "--register-as", "tiny-bert-code", "--code-tasks", *SMALL,
    )  # fmt: skip
    assert out.exit_code == 2, out.output
    assert "--code-tasks applies to causal language models" in out.output and "drop --code-tasks" in out.output
    assert (registry_snapshot(), runs()) == before


@pytest.mark.slow
def test_evaluate_with_code_tasks_reproduces_what_the_prune_recorded(store, checked):
    """`evaluate --code-tasks` of the unlearned version against its parent measures the same pass rates and
    cloze accuracies the prune recorded: the same greedy answers, executed again."""
    out = invoke(
        "evaluate", "--model-uri", checked["uri"], "--parent-model-uri", f"models:/{TINY_NAME}/1",
        "--forget", store["forget"], "--retain", store["retain"], "--code-tasks", *SMALL,
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    printed = dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) == 2)
    tags = checked["version"].tags
    for key in ("forget_code_pass_rate", "retain_cloze_accuracy"):
        for prefix in ("", "parent_"):
            assert float(printed[prefix + key]) == pytest.approx(float(tags[f"selprune.metric.{prefix}{key}"]))


@pytest.mark.parametrize("chat", [False, True])
def test_three_shot_answers_are_the_same_with_the_shared_examples_read_once(tiny_tokenizer, chat):
    """The examples every three-shot prompt begins with are read once and reused (generation.greedy): the
    answers are those of reading every prompt whole, and the shared part is long enough to be reused."""
    from mlflow_helpers import tiny_model

    from mlflow_selprune.evaluation.functional import CODE_TOKENS, code_inputs
    from mlflow_selprune.evaluation.generation import MIN_SHARED_TOKENS, _common_prefix, greedy
    from mlflow_selprune.evaluation.task_sets.python_examples import EXAMPLES

    tokenizer = tiny_tokenizer
    if chat:
        tokenizer = tiny_tokenizer.__class__.from_pretrained(_saved(tiny_tokenizer))
        tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    model = tiny_model(tiny_tokenizer)
    inputs = code_inputs(tokenizer, TASKS[:25], EXAMPLES)  # two batches, the second shorter
    rows = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in inputs]
    assert len(_common_prefix(rows)) >= MIN_SHARED_TOKENS
    answers = {
        shared: greedy(model, tokenizer, inputs, CODE_TOKENS, stop=None, special_tokens=not chat, shared=shared)
        for shared in (True, False)
    }
    assert answers[True] == answers[False]
    if not chat:  # the prompts end in different code: the rows' own tokens were read
        assert len(set(answers[True])) > 1
