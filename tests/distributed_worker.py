"""Run under torchrun: collect, evaluate and prune a tiny model with Accelerate, save what rank 0 saw.

    torchrun --nproc_per_node N tests/distributed_worker.py OUT_DIR [--fail-rank R]

With a single process (no torchrun) it computes the same thing without an
accelerator, so a test can compare 1 process with N.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from mlflow_selprune import collect_statistics, evaluate_model, prune  # noqa: E402

N_BATCHES = 5  # not divisible by 2: uneven shards


def make_model():
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return GPTNeoXForCausalLM(config).eval()


def make_batches(seed):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(N_BATCHES):
        ids = torch.randint(2, 256, (3, 16), generator=g) if seed == 1 else torch.randint(2, 128, (3, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 16 - (i + 1) :] = 0  # padding differs per batch
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def main(out_dir, fail_rank=None):
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        if fail_rank is not None and accelerator.process_index == fail_rank:
            raise ValueError(f"rank {fail_rank} was told to fail")
    model = make_model()
    forget, retain = make_batches(1), make_batches(2)
    stats = collect_statistics(model, forget, sums="all", accelerator=accelerator, progress=False)

    def evaluate_fn(m):
        out = evaluate_model(m, forget, prefix="forget_", accelerator=accelerator, progress=False)
        out.update(evaluate_model(m, retain, prefix="retain_", accelerator=accelerator, progress=False))
        return out

    result = prune(
        model,
        forget,
        retain,
        ff_frac=0.1,
        attn_frac=0.05,
        steps=3,
        evaluate_fn=evaluate_fn,
        accelerator=accelerator,
        progress=False,
    )
    if accelerator is None or accelerator.is_main_process:
        os.makedirs(out_dir, exist_ok=True)
        tensors = {f"ff_{k}": v.cpu() for k, v in stats.ff.sums.items()}
        tensors.update(result.masks())
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "result.safetensors"))
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(
                {
                    "n_tokens": stats.ff.n_tokens,
                    "final_metrics": result.final_metrics,
                    "world_size": 1 if accelerator is None else accelerator.num_processes,
                },
                f,
            )


if __name__ == "__main__":
    fail = int(sys.argv[sys.argv.index("--fail-rank") + 1]) if "--fail-rank" in sys.argv else None
    main(sys.argv[1], fail)
