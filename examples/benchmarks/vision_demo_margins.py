"""The vision demo's recipe across seeds and torch thread counts: the margins its gate is set from.

Another CPU rounds floats differently, so the same seed trains a different model; the torch thread
count changes the order of float reductions the same way. For every seed x thread count this trains
the demo model of ``--arch`` (``train_demo_model(..., threads=T)``), prepares the digits exactly as the demo's
``run_prune`` does (``load_datasets`` on the model's image processor and config), prunes it with the
recipe (``mlflow_selprune.prune``, same threads) and measures the random control beside it: the
numbers the demo's gate sees (``summary_metrics``). No MLflow, no clock: steps and seeds decide.

    python examples/benchmarks/vision_demo_margins.py                      # the ViT demo's recipe, 3 x 3 runs
    python examples/benchmarks/vision_demo_margins.py --arch resnet        # the ResNet demo's
    python examples/benchmarks/vision_demo_margins.py --intermediate-size 256 --frontier-steps 8

``--frontier-steps N`` prunes N steps and prints every step's drops (a step's pruning does not depend
on how many follow it), so one run per model shows the whole frontier; the control is then of step N.
Trained models are cached under ``--cache`` (keyed by the recipe's model and training fields, seed, threads,
torch and plugin versions); delete it after changing training code.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlflow_selprune import __version__  # noqa: E402
from mlflow_selprune.demo_cnn import recipe_for  # noqa: E402
from mlflow_selprune.demo_vision import train_demo_model, write_digits  # noqa: E402
from mlflow_selprune.evaluation.drops import RETAIN_DROP_FLOOR  # noqa: E402


VIT_FIELDS = ("patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
CNN_FIELDS = ("image_size", "embedding_size")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit", help="the demo's model: vit, resnet or convnext (its recipe's defaults)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", default="1,2,4")
    for name in VIT_FIELDS + CNN_FIELDS + ("train_steps", "batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--hidden-sizes", default=None, help="CNN: stage widths, e.g. 32,64")
    p.add_argument("--depths", default=None, help="CNN: blocks per stage, e.g. 1,1")
    p.add_argument("--layer-type", default=None, help="ResNet: basic or bottleneck")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--layer-scale-init-value", type=float, default=None, help="ConvNeXt")
    for name in ("ff_frac", "attn_frac", "ff_eps", "attn_eps"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--scoring", default=None)
    p.add_argument("--selection", default=None)
    p.add_argument("--frontier-steps", type=int, default=None, help="prune this many steps, print each step")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "selprune-vision-margins"))
    p.add_argument("--data-dir", default=None, help="where the digits are written (default: under --cache)")
    return p.parse_args()


def recipe_from(args):
    """The ``--arch`` demo recipe with every flag given replacing its field."""
    recipe = recipe_for(args.arch)
    given = lambda names: {n: getattr(args, n) for n in names if getattr(args, n) is not None}  # noqa: E731
    prune = dataclasses.replace(
        recipe.prune, **given(("ff_frac", "attn_frac", "ff_eps", "attn_eps", "steps", "scoring", "selection"))
    )
    if args.frontier_steps:
        prune = dataclasses.replace(prune, steps=args.frontier_steps)
    cnn = CNN_FIELDS + ("layer_type", "layer_scale_init_value")
    model = given(("train_steps", "batch_size", "lr") + (VIT_FIELDS if args.arch == "vit" else cnn))
    for name in ("hidden_sizes", "depths"):
        if getattr(args, name):
            model[name] = tuple(int(x) for x in getattr(args, name).split(","))
    return dataclasses.replace(recipe, prune=prune, **model)


def trained(data_dir: Path, recipe, seed: int, threads: int, cache: Path):
    """The demo model for (recipe's model and training, seed, threads), from the cache when it was trained
    before."""
    from transformers import AutoModelForImageClassification

    key = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("prune", "data", "gate_thresholds")}
    key.update(seed=seed, threads=threads, torch=torch.__version__, selprune=__version__)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"{recipe.arch}-{digest}"
    if (path / "accuracy.json").is_file():
        model = AutoModelForImageClassification.from_pretrained(path).eval()
        return model, json.loads((path / "accuracy.json").read_text())["accuracy"]
    model, _, accuracy = train_demo_model(data_dir, recipe, seed=seed, progress=False, threads=threads)
    model.save_pretrained(path)
    (path / "accuracy.json").write_text(json.dumps({"accuracy": accuracy, "key": key}))
    return model, accuracy


def measure(data_dir: Path, recipe, seed: int, threads: int, cache: Path) -> dict:
    import mlflow_selprune
    from mlflow_selprune.demo_vision import image_processor
    from mlflow_selprune.engine import randomly_pruned
    from mlflow_selprune.evaluation.drops import control_metrics, summary_metrics
    from mlflow_selprune.unlearn import load_datasets, make_evaluate_fn

    model, accuracy = trained(data_dir, recipe, seed, threads, cache)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = dataclasses.replace(recipe.data, forget_classes=recipe.forget_class).validate()
        forget, retain = load_datasets(image_processor(recipe), str(data_dir), None, data, model=model)
        config = dataclasses.replace(recipe.prune, seed=seed)  # the demo passes its --seed to the pruning too
        evaluate_fn = make_evaluate_fn(forget, retain, progress=False)
        result = mlflow_selprune.prune(
            model, forget.collect_batches, retain.collect_batches, config, evaluate_fn=evaluate_fn, progress=False
        )
        metrics = summary_metrics(result.baseline_metrics, result.final_metrics)
        with randomly_pruned(model, result, seed=config.seed):
            metrics.update(control_metrics(result.baseline_metrics, evaluate_fn(model)))
    finally:
        torch.set_num_threads(previous)
    per_step = [
        summary_metrics(result.baseline_metrics, r["metrics"])
        for r in result.steps
        if r.get("step", 0) > 0 and "metrics" in r and r.get("kept", True)
    ]
    return {
        "seed": seed,
        "threads": threads,
        "accuracy": accuracy,
        "metrics": metrics,
        "per_step": per_step,
        "n_forget": forget.eval_images,
        "n_retain": retain.eval_images,
    }


def _points(metrics: dict, drop: str, side: str) -> str:
    """A relative top-1 drop as accuracy points lost (the CNN demos' targets are in points)."""
    return f"{100 * metrics[drop] * metrics[f'parent_{side}_top1']:.1f}"


def main() -> None:
    args = parse_args()
    recipe = recipe_from(args)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    data_dir = write_digits(Path(args.data_dir) if args.data_dir else cache / "digits")
    print(
        "recipe:", json.dumps({k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("data",)}, default=str)
    )
    print(f"torch {torch.__version__}; seeds {args.seeds}; threads {args.threads}")
    head = (
        f"{'seed':>4} {'thr':>3} {'test acc':>8} {'parent fgt':>10} {'parent ret':>10} {'fgt drop':>8} "
        f"{'ret drop':>8} {'select.':>7} {'ctl fgt':>8} {'ctl ret':>8}   points lost: retain, control forget/retain"
    )
    print(head)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for threads in (int(t) for t in args.threads.split(",")):
            start = time.perf_counter()
            row = measure(data_dir, recipe, seed, threads, cache)
            m = row["metrics"]
            rows.append(row)
            print(
                f"{seed:>4} {threads:>3} {row['accuracy']:>8.4f} {m['parent_forget_top1']:>10.4f} "
                f"{m['parent_retain_top1']:>10.4f} {m['forget_top1_drop']:>8.1%} {m['retain_top1_drop']:>8.1%} "
                f"{m['selectivity']:>7.2f} {m['control_forget_top1_drop']:>8.1%} "
                f"{m['control_retain_top1_drop']:>8.1%}   {_points(m, 'retain_top1_drop', 'retain')} "
                f"{_points(m, 'control_forget_top1_drop', 'forget')}/{_points(m, 'control_retain_top1_drop', 'retain')}"
                f"   ({time.perf_counter() - start:.0f}s, not a result)",
                flush=True,
            )
    print(f"eval images: forget {rows[0]['n_forget']}, retain {rows[0]['n_retain']}")
    forget_drops = [r["metrics"]["forget_top1_drop"] for r in rows]
    retain_drops = [r["metrics"]["retain_top1_drop"] for r in rows]
    selectivities = [r["metrics"]["selectivity"] for r in rows]
    worst_f, worst_r, worst_s = min(forget_drops), max(retain_drops), min(selectivities)
    print(
        f"worst over {len(rows)} runs: forget top-1 drop {worst_f:.4f}, retain top-1 drop {worst_r:.4f}, "
        f"selectivity {worst_s:.2f}"
    )
    print(
        f"gate by the rule (1/2 worst forget, 2x worst retain with drops under RETAIN_DROP_FLOOR counted as "
        f"{RETAIN_DROP_FLOOR}, 1/2 worst selectivity): min_forget_drop <= {worst_f / 2:.4f}, "
        f"max_retain_drop >= {2 * max(worst_r, RETAIN_DROP_FLOOR):.4f}, min_selectivity <= {worst_s / 2:.2f}"
    )
    if args.frontier_steps:
        print("frontier: worst (min forget drop / max retain drop / min selectivity) over the runs after each step")
        for i in range(args.frontier_steps):
            steps = [r["per_step"][i] for r in rows if len(r["per_step"]) > i]
            if not steps:
                break
            f = [s["forget_top1_drop"] for s in steps]
            r = [s["retain_top1_drop"] for s in steps]
            sel = [s["selectivity"] for s in steps]
            print(
                f"  step {i + 1}: forget {min(f):6.1%} (mean {sum(f) / len(f):6.1%})  retain {max(r):6.1%} "
                f"(mean {sum(r) / len(r):6.1%})  selectivity {min(sel):6.2f}   "
                f"per run retain: {' '.join(f'{x:.3f}' for x in r)}",
                flush=True,
            )
    if any(math.isnan(x) for x in forget_drops + retain_drops):
        print("warning: a drop is NaN (parent value under the floor)")


if __name__ == "__main__":
    main()
