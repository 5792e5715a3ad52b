"""Shared helpers for the benchmarks: model and batch construction, timing, tables.

Everything is offline: models are built from configs (random init) and token
batches are random ids, unless a script says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def cpu_name() -> str:
    """lscpu's model name, else platform.processor()."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def header(title: str, args=None) -> None:
    """What ran where: the hardware, library versions, threads and the load average."""
    import transformers

    print(f"== {title}")
    print(
        f"   cpu: {cpu_name()} ({os.cpu_count()} logical cores), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}"
    )
    if torch.cuda.is_available():
        print(f"   cuda: {torch.cuda.get_device_name(0)}")
    print(f"   load average (1/5/15 min) at start: {load_average()}")
    if args is not None:
        print("   options: " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()))


def footer() -> None:
    print(f"   load average (1/5/15 min) at end: {load_average()}")


def build_neox(
    layers: int = 4,
    hidden: int = 256,
    intermediate: int = 1024,
    heads: int = 4,
    vocab: int = 4096,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised GPT-NeoX causal LM in eval mode (the demo model's shape by default)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=512,
        rotary_pct=0.25,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).to(dtype).eval()
    return model


def make_batches(
    n_batches: int,
    batch_size: int = 16,
    seq_len: int = 128,
    vocab: int = 4096,
    pad_fraction: float = 0.25,
    seed: int = 0,
    pad_id: int = 1,
    low: int = 2,
    high: int | None = None,
) -> list[dict]:
    """Right-padded batches of random token ids in [low, high) (default [2, vocab)).

    ``pad_fraction`` of the rows are shorter than ``seq_len``: such a row
    keeps between 25% and 100% of ``seq_len`` tokens, so roughly 10% of the
    positions are padding with the default fraction.
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(low, high or vocab, (batch_size, seq_len), generator=g)
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        for row in range(batch_size):
            if torch.rand((), generator=g) < pad_fraction:
                length = int(torch.randint(seq_len // 4, seq_len, (), generator=g))
                mask[row, length:] = 0
                ids[row, length:] = pad_id
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def n_real_tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def n_positions(batches) -> int:
    return sum(b["input_ids"].numel() for b in batches)


def batches_for_tokens(tokens: int, batch_size: int = 16, seq_len: int = 128, **kwargs) -> list[dict]:
    """About ``tokens`` positions (including padding) in full batches (at least one)."""
    return make_batches(max(1, round(tokens / (batch_size * seq_len))), batch_size, seq_len, **kwargs)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


class Timings:
    """Seconds per call of several contenders, measured in interleaved rounds."""

    def __init__(self, names):
        self.wall: dict[str, list[float]] = {name: [] for name in names}
        self.cpu: dict[str, list[float]] = {name: [] for name in names}

    def median(self, name: str, cpu: bool = False) -> float:
        return statistics.median((self.cpu if cpu else self.wall)[name])

    def ratio(self, name: str, baseline: str, cpu: bool = False) -> float:
        """Median over rounds of (name's time / baseline's time in the same round).

        Pairing by round cancels most of a shared machine's slow spells, which
        hit both contenders of a round alike.
        """
        values = self.cpu if cpu else self.wall
        return statistics.median(a / b for a, b in zip(values[name], values[baseline]))


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Timings:
    """Time every function once per round, ``repeats`` rounds, after ``warmup`` untimed rounds.

    The order inside a round rotates, so a slow spell of a shared machine hits
    every contender alike; compare medians (``Timings.ratio``), never single runs.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    timings = Timings(names)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            wall, cpu = timed(fns[name])
            timings.wall[name].append(wall)
            timings.cpu[name].append(cpu)
    return timings


def median(values) -> float:
    return statistics.median(values)


def spread(values) -> str:
    """min-max of a list of seconds, for the table."""
    return f"{min(values):.3f}-{max(values):.3f}"


def table(rows: list[list], headers: list[str]) -> None:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("   " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("   " + "  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def plain_forward(model, batches, body: bool = False):
    """The baseline: ``model(input_ids=..., attention_mask=...)`` under ``torch.no_grad()``.

    ``body=True`` runs the model without its LM head (``model.<base_model_prefix>``),
    as ``collect_statistics`` does.
    """
    from mlflow_selprune.engine.statistics import forward_body

    target = forward_body(model) if body else model

    def run():
        with torch.no_grad():
            for batch in batches:
                target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    return run


def pruned_demo(directory, split_seed: int, collect_tokens: int | None = None, eval_tokens: int | None = None):
    """``(model, tokenizer, forget, retain, result, metrics, views, start)``: the demo's recipe applied to the
    model saved in ``directory`` at ``split_seed``, with the random control measured; ``views`` turn the pruned
    model into the unlearned model, the parent or the control (``unlearn.model_views``), ``start`` holds their
    forget top-1. ``metrics["prune_seconds"]``: the time the pruning took."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_selprune import prepare_data, prune
    from mlflow_selprune.demo import RECIPE
    from mlflow_selprune.engine import randomly_pruned
    from mlflow_selprune.evaluation.drops import control_metrics, summary_metrics
    from mlflow_selprune.unlearn import make_evaluate_fn, model_views

    tokenizer = AutoTokenizer.from_pretrained(directory)
    data = dataclasses.replace(
        RECIPE.data,
        split_seed=split_seed,
        collect_tokens=collect_tokens or RECIPE.data.collect_tokens,
        eval_tokens=eval_tokens or RECIPE.data.eval_tokens,
    )
    forget = prepare_data(RECIPE.forget, tokenizer, data)
    retain = prepare_data(RECIPE.retain, tokenizer, data)
    evaluate_fn = make_evaluate_fn(forget, retain, progress=False)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    config = dataclasses.replace(RECIPE.prune, seed=split_seed)
    began = time.perf_counter()
    result = prune(
        model, forget.collect_batches, retain.collect_batches, config, evaluate_fn=evaluate_fn, progress=False
    )
    metrics = summary_metrics(result.baseline_metrics, result.final_metrics)
    metrics["prune_seconds"] = time.perf_counter() - began
    with randomly_pruned(model, result, seed=split_seed):
        control = evaluate_fn(model)
    metrics.update(control_metrics(result.baseline_metrics, control))
    seen_as = model_views(model, result, split_seed, control=True)
    views = {
        "unlearned": (model, contextlib.nullcontext),
        "parent": (model, seen_as["parent_view"]),
        "control": (model, seen_as["control_view"]),
    }
    start = {
        "unlearned": metrics["forget_top1"],
        "parent": metrics["parent_forget_top1"],
        "control": control["forget_top1"],
    }
    return model, tokenizer, forget, retain, result, metrics, views, start
