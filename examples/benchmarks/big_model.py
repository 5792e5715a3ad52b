"""The big-model path on this machine: a Llama-shaped model of about 1.1B parameters, full vs delta versions.

    python examples/benchmarks/big_model.py [--layers 22] [--tokens 512] [--workdir DIR]

Builds the model from a config (random init, bfloat16; no download), registers
it in a sqlite store in a fresh directory, then prunes one step with small
token budgets twice — ``--storage full`` and ``--storage delta`` — each in a
fresh process, and loads each resulting version in a fresh process. Prints the
seconds per phase (load, data, collect, evaluate, score/select/surgery, the
random control, weights digest, log model, register), peak RSS as a multiple
of the model's bytes, the artifact bytes of each version, and the load time of
the delta against the full version. ``--layers 2`` gives a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "big-llama"


def _child(args) -> dict:
    """One measured action in this (fresh) process; returns what it saw."""
    import mlflow
    import torch

    mlflow.set_tracking_uri(f"sqlite:///{Path(args.workdir) / 'mlflow.db'}")
    out: dict = {}
    if args.action == "register":
        from transformers import LlamaConfig, LlamaForCausalLM

        from mlflow_selprune.registry.flavor import default_pip_requirements, model_card
        from mlflow_selprune.training import train_bpe_tokenizer

        texts = [open(torch.__file__).read(), open(json.__file__).read()]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=2048)
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=args.layers,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        with mlflow.start_run(run_name="big-base"):
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer},
                name="model",
                task="text-generation",
                pip_requirements=default_pip_requirements(),
                model_card=model_card(model),
            )
        mv = mlflow.register_model(info.model_uri, NAME)
        out["version"] = mv.version
        out["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["parameters"] = sum(p.numel() for p in model.parameters())
    elif args.action == "prune":
        from mlflow_selprune import DataOptions, EvidenceOptions, PruneConfig, run_prune

        result = run_prune(
            f"models:/{NAME}/1",
            "builtin:stdlib-code",
            "builtin:stdlib-prose",
            config=PruneConfig(ff_frac=0.02, attn_frac=0.02, steps=1),
            data=DataOptions(max_length=128, batch_size=4, collect_tokens=args.tokens, eval_tokens=args.tokens),
            evidence=EvidenceOptions(control=True),
            storage=args.storage,
            dtype="bfloat16",
            progress=False,
        )
        out["version_uri"] = result.model_uri
        out["seconds"] = result.seconds
    elif args.action == "load":
        from mlflow_selprune.registry.loading import load_components
        from mlflow_selprune.registry.resolve import resolve

        start = time.perf_counter()
        load_components(resolve(args.uri), dtype="bfloat16")
        out["seconds"] = round(time.perf_counter() - start, 2)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=args.uri))
        out["artifact_bytes"] = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _run(workdir: str, *extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, __file__, "--workdir", workdir, *extra], capture_output=True, text=True, cwd=workdir, env=env
    )
    if proc.returncode != 0:
        sys.exit(f"{extra} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="22 layers: about 1.1B parameters")
    parser.add_argument("--tokens", type=int, default=512, help="collect and eval tokens per side")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--action", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--storage", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--uri", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.action:
        print(json.dumps(_child(args)))
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="selprune-big-")
    common = ["--layers", str(args.layers), "--tokens", str(args.tokens)]
    base = _run(workdir, *common, "--action", "register")
    model_bytes = base["model_bytes"]
    print(
        f"model: Llama-shaped, {base['parameters'] / 1e9:.2f}B parameters, {model_bytes / 2**30:.2f} GiB in "
        f"bfloat16; {args.tokens} collect + {args.tokens} eval tokens per side; CPU threads {os.cpu_count()}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rows = {}
    for storage in ("full", "delta"):
        pruned = _run(workdir, *common, "--action", "prune", "--storage", storage)
        loaded = _run(workdir, *common, "--action", "load", "--uri", pruned["version_uri"])
        rows[storage] = (pruned, loaded)
    print(f"\n{'phase (seconds)':<34}{'full':>10}{'delta':>10}")
    for phase in rows["full"][0]["seconds"]:
        print(
            f"{phase:<34}{rows['full'][0]['seconds'][phase]:>10.2f}{rows['delta'][0]['seconds'].get(phase, 0):>10.2f}"
        )
    limit = 1.5 * model_bytes + 1.5 * 2**30
    for storage, (pruned, loaded) in rows.items():
        print(
            f"{storage}: peak RSS of the prune {pruned['peak_rss'] / 2**30:.2f} GiB = "
            f"{pruned['peak_rss'] / model_bytes:.2f}x the model's bytes (target <= 1.5x + 1.5 GiB = "
            f"{limit / 2**30:.2f} GiB: {'met' if pruned['peak_rss'] <= limit else 'MISSED'}); "
            f"artifacts {loaded['artifact_bytes'] / 2**20:,.1f} MiB; load {loaded['seconds']:.1f} s "
            f"(peak RSS {loaded['peak_rss'] / 2**30:.2f} GiB)"
        )
    ratio = rows["delta"][1]["artifact_bytes"] / rows["full"][1]["artifact_bytes"]
    print(
        f"delta artifacts / full artifacts: {ratio:.2%} (target <= 1%: {'met' if ratio <= 0.01 else 'MISSED'}); "
        f"delta registration (log model + register) "
        f"{rows['delta'][0]['seconds']['log_model'] + rows['delta'][0]['seconds']['register']:.1f} s "
        f"(target <= 10 s); delta load / full load: {rows['delta'][1]['seconds'] / rows['full'][1]['seconds']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
