"""NEEDS THE HUGGING FACE HUB (model and dataset downloads); not run by the tests.

The paper's main experiment (Pochinkov & Schoots, arXiv 2403.01267): make a
Pythia (or OPT/Galactica) model forget Python code while keeping general
text, pruning 2% of feed-forward neurons per step.

    python examples/paper_experiment.py --hub-model EleutherAI/pythia-160m --steps 5

It registers the hub model in the MLflow Model Registry first (so the
unlearned version has a parent to point at), samples documents from
`codeparrot/github-code-clean` (config `Python-all`, forget) and `wikitext`
(`wikitext-103-raw-v1`, retain) into local `save_to_disk` folders, and runs
`mlflow-selprune prune` on them at the paper's budgets (100,000 tokens each
for statistics and for metrics).
"""

import argparse
import subprocess
import sys

import mlflow
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_selprune.registry.flavor import default_pip_requirements


def save_samples(n_documents: int) -> tuple[str, str]:
    """Stream the first documents of each hub dataset and save them locally (the full sets are huge)."""
    from datasets import Dataset, load_dataset

    sources = {
        "forget-code": ("codeparrot/github-code-clean", "Python-all", "code"),
        "retain-text": ("wikitext", "wikitext-103-raw-v1", "text"),
    }
    paths = []
    for directory, (name, config, column) in sources.items():
        stream = load_dataset(name, config, split="train", streaming=True)
        rows = []
        for row in stream:
            if len(row[column].strip()) > 200:
                rows.append({"text": row[column]})
            if len(rows) >= n_documents:
                break
        Dataset.from_list(rows).save_to_disk(directory)
        paths.append(directory)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description="selective pruning: the paper's code-vs-text experiment")
    parser.add_argument("--hub-model", default="EleutherAI/pythia-160m")
    parser.add_argument("--registered-name", default="pythia-160m")
    parser.add_argument("--steps", default="5")
    parser.add_argument("--ff-frac", default="0.02")
    parser.add_argument("--device", default=None)
    parser.add_argument("--documents", type=int, default=5000, help="documents sampled from each hub dataset")
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.hub_model)
    tokenizer = AutoTokenizer.from_pretrained(args.hub_model)
    with mlflow.start_run(run_name=f"register {args.hub_model}"):
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=default_pip_requirements(),
        )
    version = mlflow.register_model(info.model_uri, args.registered_name).version
    forget_dir, retain_dir = save_samples(args.documents)
    command = [
        sys.executable,
        "-m",
        "mlflow_selprune",
        "prune",
        "--model-uri",
        f"models:/{args.registered_name}/{version}",
        "--forget",
        forget_dir,
        "--retain",
        retain_dir,
        "--ff-frac",
        args.ff_frac,
        "--steps",
        args.steps,
        "--max-length",
        "512",
        "--collect-tokens",
        "100000",
        "--eval-tokens",
        "100000",
    ]
    if args.device:
        command += ["--device", args.device]
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
