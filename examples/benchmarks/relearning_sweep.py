"""The relearning check on the real pretrained model (SmolLM2-135M), swept over learning rates and batch sizes.

The demo's recipe prunes the parent once per split seed; then, for each learning rate and batch size, the
unlearned model, the parent and the random control are fine-tuned alike on the forget collect documents
(``prune --relearn-steps``) and their forget top-1 is measured along the curve. Prints, per point, the three
top-1s, the recovery of the unlearned model and the control's gain on the same scale
(``mlflow_selprune.evaluation.relearning``), and the seconds the check took. No MLflow.

    python examples/benchmarks/relearning_sweep.py --lr 1e-5 3e-5 1e-4 3e-4 --curve 0,5,10,20
    python examples/benchmarks/relearning_sweep.py --lr 1e-4 --batch-size 4 8 16 --curve 0,5,10,20,50
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from common import header, pruned_demo  # noqa: E402


def main() -> None:
    from mlflow_selprune.demo import RECIPE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8])
    parser.add_argument("--curve", default="0,5,10,20", help="steps measured; the last is the number of steps")
    parser.add_argument("--data-seed", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--source", default=RECIPE.source, help="the model SOURCE (as for `register`)")
    parser.add_argument("--model-dir", default=None, help="a saved transformers model instead of --source")
    parser.add_argument("--collect-tokens", type=int, default=None, help="a smaller budget for a quick look")
    parser.add_argument("--eval-tokens", type=int, default=None)
    args = parser.parse_args()

    import torch

    from mlflow_selprune.config import EvidenceOptions
    from mlflow_selprune.evaluation.relearning import curve_history
    from mlflow_selprune.unlearn import relearning_check

    torch.set_num_threads(args.threads)
    directory = args.model_dir
    if directory is None:
        from mlflow_selprune.registry.model_sources import prepare

        directory = prepare(args.source).directory
    header("relearning check on a real pretrained model: learning rate and batch size", args)
    steps = max(int(part) for part in args.curve.split(","))
    print("data seed | lr | batch | step | unlearned | parent | control | recovery | control gain | parent change")
    for data_seed in args.data_seed:
        _, _, forget, retain, _, _, views, start = pruned_demo(
            directory, data_seed, args.collect_tokens, args.eval_tokens
        )
        for lr in args.lr:
            for batch_size in args.batch_size:
                evidence = EvidenceOptions(
                    relearn_steps=steps, relearn_curve=args.curve, relearn_lr=lr, relearn_batch_size=batch_size
                ).validate()
                began = time.perf_counter()
                curve, _ = relearning_check(views, start, forget, retain, evidence, data_seed, None, False)
                seconds = time.perf_counter() - began
                for step, m in curve_history(curve):
                    print(
                        f"{data_seed} | {lr:g} | {batch_size} | {step} | {m['relearn_curve_forget_top1']:.4f} | "
                        f"{m['relearn_curve_parent_forget_top1']:.4f} | {m['relearn_curve_control_forget_top1']:.4f} | "
                        f"{m['relearn_curve_recovery']:+.1%} | {m['relearn_curve_control_recovery']:+.1%} | "
                        f"{m['relearn_curve_parent_recovery']:+.1%}",
                        flush=True,
                    )
                print(f"{data_seed} | {lr:g} | {batch_size} | check of three models: {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
