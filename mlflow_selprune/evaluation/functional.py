"""Did the capability go away, as a person means it: does the model's Python still run, does it still know
its English? (``--code-tasks``, causal LMs.)

Two offline checks on fixed task sets (``task_sets``), greedy, for the parent, the unlearned model and the
random control alike:

* ``forget_code_pass_rate``: the share of the forty ``python_functions`` tasks whose generated function passes
  its ``assert`` lines, executed in a sandbox apart from this process (the ``code_pass`` metric module, pass@1
  with the semantics of Hugging Face's ``code_eval``); an outcome is ``passed``, ``timed out`` or ``failed:
  <exception type>``, never the program's own output. A model with a chat template is asked, as a user, to
  complete the function and its first fenced code block is run; a model without one continues the prompt
  itself (HumanEval's form), cut at the first line that leaves the function.
* ``forget_code_pass_rate_3shot``: the same tasks with three solved functions (``python_examples``, none of
  them a task) shown first, as earlier turns of the chat or as code before the prompt: a skill that was only
  suppressed comes back when the prompt shows it.
* ``retain_cloze_accuracy``: the share of the forty ``english_cloze`` prompts whose greedy continuation starts
  with an accepted word (the ``cloze_match`` metric module).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .generation import greedy
from .task_sets.python_functions import TASKS

CHECKS_ARTIFACT = "selprune/functional_checks.json"
CODE_TOKENS = 96  # the longest reference solution is under 40 tokens; room for a chat answer's fence
CLOZE_TOKENS = 6
_STOP_LINES = ("\ndef ", "\nclass ", "\nif ", "\nprint", "\n#", "\n```", "\nassert")
_FENCED = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", re.S)


@dataclass
class CheckedModel:
    """One model's outcomes: a pass rate, an accuracy, and a short outcome per task and prompt."""

    code_pass_rate: float
    cloze_accuracy: float
    code_outcomes: list[str]
    cloze_outcomes: list[str]
    code_pass_rate_3shot: float
    code_outcomes_3shot: list[str]

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}forget_code_pass_rate": self.code_pass_rate,
            f"{prefix}forget_code_pass_rate_3shot": self.code_pass_rate_3shot,
            f"{prefix}retain_cloze_accuracy": self.cloze_accuracy,
        }


def refuse_without_sandbox(allow_unsandboxed: bool = False, asked_by: str = "--code-tasks", skip: str = "") -> None:
    """Generated code runs only in the OS sandbox (bubblewrap), unless the user allows it without one
    (``--allow-unsandboxed-code``): refused where it cannot start, before anything runs or is written.
    ``asked_by`` names what the user typed that runs the code; ``skip``, an option that leaves it out."""
    from ..errors import BadInputError
    from .metrics.code_pass.sandbox import INSTALL, unavailable

    why = None if allow_unsandboxed else unavailable()
    if why is not None:
        instead = f"pass {skip} to leave the Python tasks out, or " if skip else "or "
        raise BadInputError(
            f"{asked_by} runs generated Python in a bubblewrap sandbox, which cannot run here ({why}): install "
            f"it with `{INSTALL}`, {instead}pass --allow-unsandboxed-code to run the code without one"
        )


def check_model(model, tokenizer, allow_unsandboxed: bool = False) -> CheckedModel:
    """Both checks on ``model`` as it is now, the Python tasks without and with the three solved examples."""
    from .packaged import packaged_metric
    from .task_sets.english_cloze import PROMPTS
    from .task_sets.python_examples import EXAMPLES

    zero_shot = _passed(code_programs(model, tokenizer, TASKS), allow_unsandboxed)
    three_shot = _passed(code_programs(model, tokenizer, TASKS, examples=EXAMPLES), allow_unsandboxed)
    completions = greedy(model, tokenizer, [p["prompt"] for p in PROMPTS], CLOZE_TOKENS, stop=None)
    cloze = packaged_metric("cloze_match").compute(predictions=completions, references=[p["answers"] for p in PROMPTS])
    return CheckedModel(
        code_pass_rate=zero_shot[0],
        cloze_accuracy=cloze["exact_match"],
        code_outcomes=zero_shot[1],
        cloze_outcomes=[
            ("✓ " if ok else "✗ ") + c.strip().split("\n")[0] for ok, c in zip(cloze["matched"], completions)
        ],
        code_pass_rate_3shot=three_shot[0],
        code_outcomes_3shot=three_shot[1],
    )


def _passed(programs: list[str], allow_unsandboxed: bool) -> tuple[float, list[str]]:
    """``(pass@1, one outcome per task)`` of the programs generated for ``TASKS``, run in the sandbox."""
    from .packaged import packaged_metric

    pass_at_k, results = packaged_metric("code_pass").compute(
        predictions=[[p] for p in programs],
        references=[t["test"] for t in TASKS],
        k=[1],
        allow_unsandboxed=allow_unsandboxed,
    )
    outcomes = [f"{results[i][0][1]['result']} — {_gist(p, t)}" for i, (p, t) in enumerate(zip(programs, TASKS))]
    return pass_at_k["pass@1"], outcomes


def functional_checks(
    model, tokenizer, parent_view, control_view=None, allow_unsandboxed: bool = False
) -> tuple[dict, dict]:
    """``(metrics, table)``: ``{parent_,, control_}forget_code_pass_rate{,_3shot}`` and ``..retain_cloze_accuracy``, and
    the table of outcomes per task and prompt (check | item | parent | unlearned | control)."""
    with parent_view():
        checked = {"parent": check_model(model, tokenizer, allow_unsandboxed)}  # the table's columns in this order
    checked["unlearned"] = check_model(model, tokenizer, allow_unsandboxed)
    if control_view is not None:
        with control_view():
            checked["control"] = check_model(model, tokenizer, allow_unsandboxed)
    metrics = {}
    for name, prefix in (("parent", "parent_"), ("unlearned", ""), ("control", "control_")):
        if name in checked:
            metrics.update(checked[name].metrics(prefix))
    table = outcomes_table(checked)
    if control_view is None:
        table["control"] = ["(no control)"] * len(table["item"])
    return metrics, table


def outcomes_table(checked: dict[str, CheckedModel]) -> dict[str, list[str]]:
    """check | item | one column per model (``checked``'s keys): each task's and prompt's outcome."""
    from .task_sets.english_cloze import PROMPTS

    table: dict[str, list[str]] = {
        "check": ["code"] * len(TASKS) + ["code 3-shot"] * len(TASKS) + ["cloze"] * len(PROMPTS),
        "item": [t["task_id"] for t in TASKS] * 2 + [p["prompt"] for p in PROMPTS],
    }
    for name, outcome in checked.items():
        table[name] = outcome.code_outcomes + outcome.code_outcomes_3shot + outcome.cloze_outcomes
    return table


def code_programs(model, tokenizer, tasks: list[dict], examples: Sequence[dict] = ()) -> list[str]:
    """The program each task's generated code makes: the chat form when the tokenizer has a chat template,
    the completion form otherwise (see the module docstring); ``examples`` as ``code_inputs`` shows them."""
    inputs = code_inputs(tokenizer, tasks, examples)
    shared = bool(examples)  # the examples are the same before every task: read once (generation.greedy)
    if getattr(tokenizer, "chat_template", None):
        answers = greedy(model, tokenizer, inputs, CODE_TOKENS, _fence_closed, special_tokens=False, shared=shared)
        return [_first_code_block(answer) for answer in answers]
    completions = greedy(model, tokenizer, inputs, CODE_TOKENS, stop=_left_function, shared=shared)
    return [t["prompt"] + _cut_at_stop_line(c) for t, c in zip(tasks, completions)]


def code_inputs(tokenizer, tasks: list[dict], examples: Sequence[dict] = ()) -> list[str]:
    """What the model is given for each task: with a chat template, the request as a user's turn, after the
    ``examples`` (solved tasks) as earlier turns answered in a fenced block; without one, the task's prompt
    after the examples' code."""
    if getattr(tokenizer, "chat_template", None):
        shown = []
        for example in examples:
            answer = f"```python\n{example['prompt']}{example['canonical_solution']}```"
            shown += [{"role": "user", "content": _request(example)}, {"role": "assistant", "content": answer}]
        return [
            tokenizer.apply_chat_template(
                [*shown, {"role": "user", "content": _request(t)}], tokenize=False, add_generation_prompt=True
            )
            for t in tasks
        ]
    before = "".join(f"{e['prompt']}{e['canonical_solution']}\n\n" for e in examples)
    return [before + t["prompt"] for t in tasks]


def _request(task: dict) -> str:
    return f"Complete this Python function:\n```python\n{task['prompt']}```"


def _gist(program: str, task: dict) -> str:
    """What the model wrote, on one line: the program without the task's own prompt, whitespace collapsed."""
    body = program.removeprefix(task["prompt"])
    text = " ".join(body.split())
    return text[:120] + ("…" if len(text) > 120 else "")


def _first_code_block(answer: str) -> str:
    match = _FENCED.search(answer)
    return match.group(1) if match else answer


def _cut_at_stop_line(completion: str) -> str:
    cuts = [completion.find(s) for s in _STOP_LINES if s in completion]
    return completion[: min(cuts)] if cuts else completion


def _fence_closed(text: str) -> bool:
    return text.count("```") >= 2


def _left_function(text: str) -> bool:
    return any(s in text for s in _STOP_LINES)
