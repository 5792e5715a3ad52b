"""Is it gone? Selective pruning beside a gradient-based unlearning baseline, on the demo's model and data.

For each split seed: the demo's selective step (``mlflow_selprune.demo.RECIPE``) and **gradient difference**
(AdamW ascent on the forget collect documents and descent on the retain ones, at once, from the same parent)
tuned to the same retain cost: the baseline is measured every ``--every`` steps and the last checkpoint whose
retain top-1 drop is within the selective step's is kept (steps decide, never the clock). Both are then
measured alike: forget and retain top-1 drops, the seconds it took, the share of the forget drop that
GGUF int8/int4 round trips take back, the relearning curve (the parent and the random control beside it), and
the Python tasks' pass rate without and with three solved examples. Every model is logged as a run of the
MLflow experiment ``selprune-robustness`` (``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``); the table is printed
and the curves plotted (``--plot``).

    python examples/benchmarks/robustness.py --data-seed 0 --plot docs/images/robustness-relearning.png
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from common import header, pruned_demo  # noqa: E402

EXPERIMENT = "selprune-robustness"


def gradient_difference(model, forget, retain, evaluate_fn, parent: dict, max_retain_drop: float, args) -> dict:
    """Fine-tune ``model`` in place by gradient difference; returns what was kept: ``steps``, ``seconds``
    (training steps only, not the checkpoints' evaluations) and the checkpoints measured (step, forget drop,
    retain drop); a checkpoint every ``--every`` steps and at ``--max-steps``. The model ends as the last
    checkpoint whose retain top-1 drop is at most ``max_retain_drop`` (or the first one measured, when none)."""
    import torch

    from mlflow_selprune.engine.control import rebatched
    from mlflow_selprune.evaluation.drops import relative_drop
    from mlflow_selprune.kinds import kind_of

    torch.manual_seed(args.baseline_seed)
    kind = kind_of(model)
    sides = {
        "forget": rebatched(forget.collect_batches, args.batch_size),
        "retain": rebatched(retain.collect_batches, args.batch_size),
    }
    rng = random.Random(args.baseline_seed)
    orders: dict[str, list[int]] = {"forget": [], "retain": []}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.baseline_lr, weight_decay=0.0)
    kept, checkpoints, seconds = None, [], 0.0
    model.train()
    for step in range(1, args.max_steps + 1):
        began = time.perf_counter()
        losses = {}
        for side, batches in sides.items():
            if not orders[side]:
                orders[side] = list(range(len(batches)))
                rng.shuffle(orders[side])
            inputs, labels = kind.training_batch(batches[orders[side].pop()], masking=None, seed=step)
            losses[side] = model(**inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        (losses["retain"] - losses["forget"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds += time.perf_counter() - began
        if step % args.every and step != args.max_steps:
            continue
        model.eval()
        m = evaluate_fn(model)
        model.train()
        drops = {side: relative_drop(parent[f"{side}_top1"], m[f"{side}_top1"]) for side in ("forget", "retain")}
        checkpoints.append((step, drops["forget"], drops["retain"]))
        print(
            f"   gradient difference, step {step}: forget {-drops['forget']:+.1%}, retain {-drops['retain']:+.1%}",
            flush=True,
        )
        if drops["retain"] <= max_retain_drop or kept is None:
            kept = {
                "steps": step,
                "seconds": seconds,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
        if drops["retain"] > max_retain_drop:
            break
    model.eval()
    model.load_state_dict(kept.pop("state"))
    return kept | {"checkpoints": checkpoints}


@dataclasses.dataclass
class Setup:
    """What every model of one split seed is measured with."""

    evaluate_fn: object
    parent: dict  # the parent's metrics
    views: dict  # {"parent": (model, view), "control": ...}: unlearn.model_views of the pruned model
    start: dict  # forget top-1 of the parent and the control, measured with the pruning (common.pruned_demo)
    tokenizer: object
    forget: object
    retain: object
    seed: int
    args: argparse.Namespace


def measured(name: str, model, setup: Setup, parent_curve: list | None = None) -> dict:
    """One unlearned model measured as the module docstring says, beside the parent (and the control, when
    ``setup.views`` holds it, on the relearning curve). ``parent_curve``: the parent's relearning curve when it
    was measured already (the same parent, documents, seed and settings give the same curve), else measured."""
    from mlflow_selprune.config import EvidenceOptions
    from mlflow_selprune.evaluation.drops import summary_metrics
    from mlflow_selprune.evaluation.functional import check_model
    from mlflow_selprune.evaluation.quantized import quantized_metrics
    from mlflow_selprune.evaluation.relearning import curve_metrics
    from mlflow_selprune.unlearn import relearning_check

    args, evaluate_fn = setup.args, setup.evaluate_fn
    metrics = summary_metrics(setup.parent, evaluate_fn(model))
    if not args.no_code_tasks:
        metrics.update(check_model(model, setup.tokenizer).metrics())
    models = {"unlearned": (model, contextlib.nullcontext), **setup.views}
    formats = tuple(f for f in args.formats.split(",") if f)
    quantized_models = {k: v for k, v in models.items() if k != "control"}
    metrics.update(quantized_metrics(evaluate_fn, formats, metrics, quantized_models))
    evidence = EvidenceOptions(
        relearn_steps=args.relearn_steps,
        relearn_curve=args.relearn_curve,
        relearn_lr=args.relearn_lr if args.relearn_lr is not None else EvidenceOptions().relearn_lr,
        relearn_batch_size=args.batch_size,
    ).validate()
    start = {**setup.start, "unlearned": metrics["forget_top1"]}
    if parent_curve is not None:
        models.pop("parent")
    curve, relearned = relearning_check(models, start, setup.forget, setup.retain, evidence, setup.seed, None, False)
    if parent_curve is not None:
        curve["forget_top1"] = {"unlearned": curve["forget_top1"]["unlearned"], "parent": parent_curve}
        relearned |= curve_metrics(curve)  # the recoveries, on the scale of the parent's curve
    metrics.update(relearned)
    return {"name": name, "metrics": metrics, "curve": curve, "seed": setup.seed}


def log_run(row: dict, seed: int, params: dict) -> None:
    import mlflow

    from mlflow_selprune.registry.tracking import finite, log_relearn_curve

    with mlflow.start_run(run_name=f"{row['name']} seed {seed}"):
        mlflow.log_params({**params, "method": row["name"], "split_seed": seed})
        mlflow.log_metrics(finite(row["metrics"]))
        log_relearn_curve(row["curve"])
        mlflow.log_dict(row["curve"], "relearning.json")


def main() -> None:
    from mlflow_selprune.demo import RECIPE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-seed", type=int, nargs="+", default=[0])
    parser.add_argument("--source", default=RECIPE.source, help="the model SOURCE (as for `register`)")
    parser.add_argument("--model-dir", default=None, help="a saved transformers model instead of --source")
    parser.add_argument("--baseline-lr", type=float, default=1e-5, help="gradient difference's AdamW learning rate")
    parser.add_argument("--baseline-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per side and step (baseline, relearning)")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5, help="baseline steps between its checkpoints")
    parser.add_argument("--formats", default="int8,int4")
    parser.add_argument("--relearn-steps", type=int, default=20)
    parser.add_argument("--relearn-curve", default="0,5,10,20")
    parser.add_argument("--relearn-lr", type=float, default=None, help="default: prune --relearn-lr's")
    parser.add_argument("--no-code-tasks", action="store_true")
    parser.add_argument("--collect-tokens", type=int, default=None, help="a smaller budget for a quick look")
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default=None, help="write the relearning curves here (PNG)")
    args = parser.parse_args()

    import mlflow
    import torch

    from mlflow_selprune.demo import ensure_tracking_uri

    torch.set_num_threads(args.threads)
    header("robustness: selective pruning beside gradient difference", args)
    directory = args.model_dir
    if directory is None:
        from mlflow_selprune.registry.model_sources import prepare

        directory = prepare(args.source).directory
    print(f"MLflow: {ensure_tracking_uri()}, experiment {EXPERIMENT}")
    mlflow.set_experiment(EXPERIMENT)
    rows = []
    for seed in args.data_seed:
        model, tokenizer, forget, retain, result, selective, seen_as, start = pruned_demo(
            directory, seed, args.collect_tokens, args.eval_tokens
        )
        from mlflow_selprune.unlearn import make_evaluate_fn

        evaluate_fn = make_evaluate_fn(forget, retain, progress=False)
        views = {name: seen_as[name] for name in ("parent", "control")}
        setup = Setup(evaluate_fn, result.baseline_metrics, views, start, tokenizer, forget, retain, seed, args)
        ours = measured("selective pruning", model, setup)
        # the step's scoring and pruning, without the evaluations prune() runs around it: as the baseline's
        # seconds count its training steps, not its checkpoints' evaluations
        kept = [step for step in result.steps if step.get("kept")]
        ours["metrics"]["seconds"] = sum(step["seconds"] - step.get("seconds_evaluate", 0.0) for step in kept)
        with views["parent"][1]():
            baseline = copy.deepcopy(model)
        cost = selective["retain_top1_drop"]
        tuned = gradient_difference(baseline, forget, retain, evaluate_fn, setup.parent, cost, args)
        only_parent = dataclasses.replace(setup, views={"parent": views["parent"]})
        theirs = measured("gradient difference", baseline, only_parent, ours["curve"]["forget_top1"]["parent"])
        theirs["metrics"] |= {"seconds": tuned["seconds"], "steps": tuned["steps"]}
        params = {"baseline_lr": args.baseline_lr, "batch_size": args.batch_size, "relearn_steps": args.relearn_steps}
        for row in (ours, theirs):
            log_run(row, seed, params)
            rows.append(row)
        del model, baseline
    print_table(rows)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


def print_table(rows: list[dict]) -> None:
    def pct(m, key, sign="-"):
        value = m.get(key)
        return "n/a" if value is None or value != value else f"{(-value if sign == '-' else value):+.1%}"

    print(
        "seed | method | forget top-1 | retain top-1 | seconds | int8 takes back | int4 takes back | "
        "relearned (control gains) | Python tasks 0-shot / 3-shot (parent)"
    )
    for row in rows:
        m = row["metrics"]
        tasks = (
            f"{m['forget_code_pass_rate']:.0%} / {m['forget_code_pass_rate_3shot']:.0%}"
            if "forget_code_pass_rate" in m
            else "n/a"
        )
        print(
            f"{row['seed']} | {row['name']} | {pct(m, 'forget_top1_drop')} | {pct(m, 'retain_top1_drop')} | "
            f"{m['seconds']:.0f} | {pct(m, 'quantized_int8_recovery', '+')} | "
            f"{pct(m, 'quantized_int4_recovery', '+')} | "
            f"{pct(m, 'relearn_recovery', '+')} ({pct(m, 'relearn_control_recovery', '+')}) | {tasks}",
            flush=True,
        )


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    seed = rows[0]["seed"]
    shown = [row for row in rows if row["seed"] == seed]
    curve = shown[0]["curve"]
    ax.plot(curve["steps"], curve["forget_top1"]["parent"], "s-", color="tab:gray", label="parent")
    if "control" in curve["forget_top1"]:
        ax.plot(curve["steps"], curve["forget_top1"]["control"], "x--", color="tab:green", label="random control")
    for row, style in zip(shown, ("o-", "^-")):
        ax.plot(row["curve"]["steps"], row["curve"]["forget_top1"]["unlearned"], style, label=row["name"])
    ax.set_xlabel("fine-tuning step on forget documents")
    ax.set_ylabel("forget top-1 accuracy")
    ax.set_title(f"Relearning after unlearning (split seed {seed})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
