"""Unlearn with the Python API: load from the registry, prune, register — no hub needed.

    python examples/python_api.py --model-uri models:/selprune-demo@base \
        --forget builtin:stdlib-code --retain builtin:stdlib-prose

Runs against whatever MLFLOW_TRACKING_URI points at (default: ./mlflow.db).
The two halves show the library layers: the engine on plain token batches,
then the whole registry round trip in one call.
"""

import argparse

import mlflow

import mlflow_selprune as sp
from mlflow_selprune.registry.loading import load_components
from mlflow_selprune.registry.resolve import resolve
from mlflow_selprune.report import format_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--forget", default="builtin:stdlib-code")
    parser.add_argument("--retain", default="builtin:stdlib-prose")
    parser.add_argument("--ff-frac", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4000, help="collect tokens per dataset (eval: half)")
    parser.add_argument(
        "--register-as",
        default="selprune-api-example",
        help="registered model of the result (its own, so the demo model gets no versions from here)",
    )
    args = parser.parse_args()
    print(f"tracking/registry: {mlflow.get_tracking_uri()}")

    # 1. The engine on its own: a model, token batches, masks. Nothing is logged.
    model, tokenizer = load_components(resolve(args.model_uri))
    data = sp.DataOptions(collect_tokens=args.tokens, eval_tokens=args.tokens // 2)
    forget = sp.prepare_data(args.forget, tokenizer, data)
    retain = sp.prepare_data(args.retain, tokenizer, data)
    print("architecture:", sp.find_architecture(model).describe())
    before = sp.evaluate_model(model, forget.eval_batches, prefix="forget_", progress=False)
    config = sp.PruneConfig(ff_frac=args.ff_frac, steps=args.steps)
    result = sp.prune(model, forget.collect_batches, retain.collect_batches, config, progress=False)
    after = sp.evaluate_model(model, forget.eval_batches, prefix="forget_", progress=False)
    print(
        f"engine only: pruned {result.ff_pruned} FF neurons; forget top1 {before['forget_top1']:.4f} -> "
        f"{after['forget_top1']:.4f}"
    )

    # 2. The MLflow round trip: pull, prune, log, register with lineage.
    out = sp.run_prune(
        args.model_uri, args.forget, args.retain, config=config, data=data, register_as=args.register_as, progress=False
    )
    print(format_summary(out.metrics, out.model_uri, out.run_id))


if __name__ == "__main__":
    main()
