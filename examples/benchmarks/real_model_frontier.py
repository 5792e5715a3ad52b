"""The frontier of selective pruning on the real pretrained model (SmolLM2-135M), step by step.

For each recipe: forget/retain top-1 and skip50 top-1 drops after every step, and the random
control at the end (the same neuron counts per kind and layer, drawn from the same parent).
No MLflow: the engine and the data layer only, so the numbers are the pruning's alone.

    python examples/benchmarks/real_model_frontier.py --ff-frac 0.01 --steps 3 --data-seed 0 1 2
    python examples/benchmarks/real_model_frontier.py --threads 1 2 4 --data-seed 0 1 2   # the demo's recipe
    python examples/benchmarks/real_model_frontier.py --code-tasks --data-seed 0 1 2      # + its code and cloze checks

Without recipe flags it runs the demo's recipe (``mlflow_selprune.demo.RECIPE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from common import header  # noqa: E402


def top1_standard_error(model, batches) -> tuple[float, float]:
    """(top-1, its standard error) over ``batches``, with each sequence as a cluster: tokens of one text are not
    independent, so the plain binomial error would understate it."""
    import torch

    correct, counts = [], []
    with torch.inference_mode():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mask = batch["attention_mask"].bool()
            valid = mask[:, :-1] & mask[:, 1:]
            hits = (logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]) & valid
            correct += hits.sum(1).tolist()
            counts += valid.sum(1).tolist()
    c, n = torch.tensor(correct, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)
    p = float(c.sum() / n.sum())
    k = len(c)
    se = float(((c - p * n) ** 2).sum().sqrt() / n.sum() * (k / (k - 1)) ** 0.5)
    return p, se


def main() -> None:
    from mlflow_selprune.demo import RECIPE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ff-frac", type=float, default=RECIPE.prune.ff_frac)
    parser.add_argument("--attn-frac", type=float, default=RECIPE.prune.attn_frac)
    parser.add_argument("--steps", type=int, default=RECIPE.prune.steps)
    parser.add_argument("--scoring", default=RECIPE.prune.scoring)
    parser.add_argument("--collect-tokens", type=int, default=RECIPE.data.collect_tokens)
    parser.add_argument("--eval-tokens", type=int, default=RECIPE.data.eval_tokens)
    parser.add_argument("--max-length", type=int, default=RECIPE.data.max_length)
    parser.add_argument("--batch-size", type=int, default=RECIPE.data.batch_size)
    parser.add_argument("--forget", default=RECIPE.forget)
    parser.add_argument("--retain", default=RECIPE.retain)
    parser.add_argument("--chunks-per-document", type=int, default=RECIPE.data.chunks_per_document)
    parser.add_argument("--data-seed", type=int, nargs="+", default=[RECIPE.data.split_seed])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--source", default=RECIPE.source, help="the model SOURCE (as for `register`)")
    parser.add_argument(
        "--code-tasks",
        action="store_true",
        help="also the Python tasks' pass rate and the cloze accuracy of the parent, the result and the control",
    )
    parser.add_argument(
        "--stderr-only",
        action="store_true",
        help="print only the parent's top-1 with its standard error, per side and split seed",
    )
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_selprune import prepare_data, prune
    from mlflow_selprune.engine import randomly_pruned
    from mlflow_selprune.evaluation.drops import relative_drop
    from mlflow_selprune.registry.model_sources import prepare
    from mlflow_selprune.unlearn import make_evaluate_fn

    header("selective pruning frontier on a real pretrained model", args)
    directory = prepare(args.source).directory
    tokenizer = AutoTokenizer.from_pretrained(directory)
    recipe = dataclasses.replace(
        RECIPE.prune, ff_frac=args.ff_frac, attn_frac=args.attn_frac, steps=args.steps, scoring=args.scoring
    )
    keys = ("top1", "skip50_top1")
    print("threads | data seed | step | forget top1 | forget skip50 | retain top1 | retain skip50 | seconds")
    for data_seed in args.data_seed:
        config = dataclasses.replace(recipe, seed=data_seed)  # as the demo's --seed: the split and the control
        data = dataclasses.replace(
            RECIPE.data,
            collect_tokens=args.collect_tokens,
            eval_tokens=args.eval_tokens,
            max_length=args.max_length,
            batch_size=args.batch_size,
            split_seed=data_seed,
            chunks_per_document=args.chunks_per_document,
        )
        forget = prepare_data(args.forget, tokenizer, data)
        retain = prepare_data(args.retain, tokenizer, data)
        evaluate_fn = make_evaluate_fn(forget, retain, progress=False)
        if args.stderr_only:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
            for side, prepared in (("forget", forget), ("retain", retain)):
                p, se = top1_standard_error(model, prepared.eval_batches)
                print(
                    f"split seed {data_seed}: {side} top-1 {p:.4f} +- {se:.4f} (standard error; "
                    f"{prepared.eval_tokens} eval tokens, {len(prepared.eval_batches)} batches); relative "
                    f"error {se / p:.1%}"
                )
            continue
        for threads in args.threads:
            torch.set_num_threads(threads)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
            start = time.perf_counter()
            baseline = {}

            def show(record, data_seed=data_seed, threads=threads, start=start, baseline=baseline):
                metrics = record.get("metrics", {})
                if record["step"] == 0:
                    baseline.update(metrics)
                    print(
                        f"{threads} | {data_seed} | parent | "
                        + " | ".join(f"{metrics[f'{side}_{k}']:.4f}" for side in ("forget", "retain") for k in keys)
                        + " |",
                        flush=True,
                    )
                elif metrics:
                    drops = [
                        relative_drop(baseline[f"{side}_{k}"], metrics[f"{side}_{k}"])
                        for side in ("forget", "retain")
                        for k in keys
                    ]
                    print(
                        f"{threads} | {data_seed} | {record['step']} | "
                        + " | ".join(f"{-d:+.1%}" for d in drops)
                        + f" | {time.perf_counter() - start:.0f}",
                        flush=True,
                    )

            result = prune(
                model,
                forget.collect_batches,
                retain.collect_batches,
                config,
                evaluate_fn=evaluate_fn,
                on_step=show,
                progress=False,
            )
            base = result.baseline_metrics
            with randomly_pruned(model, result, seed=config.seed):
                m = evaluate_fn(model)
            drops = [
                relative_drop(base[f"{side}_{k}"], m[f"{side}_{k}"]) for side in ("forget", "retain") for k in keys
            ]
            print(f"{threads} | {data_seed} | control | " + " | ".join(f"{-d:+.1%}" for d in drops) + " |", flush=True)
            if args.code_tasks:
                print_functional_checks(model, tokenizer, result, config.seed, f"{threads} | {data_seed}")
            del model


def print_functional_checks(model, tokenizer, result, seed: int, prefix: str) -> None:
    """The demo's --code-tasks numbers: Python tasks passed (0- and 3-shot) and cloze prompts answered, three
    models, and the seconds the checks took."""
    from mlflow_selprune.engine import parent_restored, randomly_pruned
    from mlflow_selprune.evaluation.functional import functional_checks

    began = time.perf_counter()
    metrics, _ = functional_checks(
        model,
        tokenizer,
        parent_view=lambda: parent_restored(model, result),
        control_view=lambda: randomly_pruned(model, result, seed=seed),
    )
    print(f"{prefix} | code tasks and cloze prompts of three models: {time.perf_counter() - began:.0f} s")
    for key, what in (
        ("forget_code_pass_rate", "Python tasks passed"),
        ("forget_code_pass_rate_3shot", "Python tasks passed, 3 solved examples first"),
        ("retain_cloze_accuracy", "cloze answered"),
    ):
        print(
            f"{prefix} | {what}: parent {metrics['parent_' + key]:.1%}, selective {metrics[key]:.1%}, "
            f"control {metrics['control_' + key]:.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
