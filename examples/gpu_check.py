"""GPU check: the CUDA path end to end, with figures to paste into the README.

    python examples/gpu_check.py            # one GPU (falls back to CPU when there is none)
    python examples/gpu_check.py --shard    # several GPUs: load with device_map="auto" across them
    python examples/gpu_check.py --big      # also a ~1.1B Llama-shaped model in bf16, phase by phase

With two or more GPUs visible, a two-device case always runs too: the model split layer-wise over cuda:0 and
cuda:1 must give the same statistics and the same pruning masks as the model on one GPU.

Checks, on a randomly initialised GPT-NeoX of the demo's shape (or --layers/--width):
1. bf16 load, and that statistics are still float64;
2. pruning in bf16 and save/reload equality of the logits;
3. collection throughput (tokens/s) vs a plain forward, and peak CUDA memory;
4. with --big: a Llama-shaped model of about 1.1B parameters (random init,
   bf16, ``--device auto`` style loading), one pruning step with small token
   budgets, each phase timed: load, collect, score/select/surgery, evaluate,
   weights digest, save; plus peak memory against the model's bytes.
Offline: no hub access; needs torch and transformers only (no MLflow). Prints one line per figure; exits 1 if a
check fails.
"""

import argparse
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from mlflow_selprune import PruneConfig, collect_statistics, find_architecture, prune


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--shard", action="store_true", help="device_map='auto' across all visible GPUs")
    parser.add_argument("--big", action="store_true", help="also run the ~1.1B-parameter phase timing")
    parser.add_argument("--big-layers", type=int, default=22, help="layers of the big model (22: about 1.1B)")
    parser.add_argument("--big-tokens", type=int, default=512, help="collect and eval tokens per side")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA device)"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"device: {name}; GPUs visible: {torch.cuda.device_count()}; torch {torch.__version__}")
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.width // 64,
        intermediate_size=4 * args.width,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        GPTNeoXForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        kwargs = {"dtype": torch.bfloat16}
        if args.shard and cuda:
            kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs).eval()
        if "device_map" not in kwargs:
            model.to(device)
        devices = sorted({str(p.device) for p in model.parameters()})
        print(f"loaded bf16 model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters on {devices}")
        first = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        batches = [
            {
                "input_ids": torch.randint(0, 50304, (args.batch, args.seq), generator=g),
                "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
            }
            for _ in range(args.batches)
        ]
        batches = [{k: v.to(first) for k, v in b.items()} for b in batches]
        n_tokens = args.batches * args.batch * args.seq

        stats = collect_statistics(model, batches[:2], progress=False)
        dtype_ok = stats.ff.sums["sum_abs"].dtype == torch.float64
        print(f"statistics dtype: {stats.ff.sums['sum_abs'].dtype} ({'ok' if dtype_ok else 'FAIL'})")
        failures += [] if dtype_ok else ["statistics not float64"]

        def plain():
            with torch.inference_mode():
                for b in batches:
                    model(**b)

        def collect():
            collect_statistics(model, batches, progress=False)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        plain()  # warm-up
        pairs = [(timed(plain, sync), timed(collect, sync)) for _ in range(3)]
        ratio = statistics.median(c / p for p, c in pairs)
        best_plain, best_collect = min(p for p, _ in pairs), min(c for _, c in pairs)
        print(
            f"plain forward: {n_tokens / best_plain:,.0f} tokens/s; "
            f"collection: {n_tokens / best_collect:,.0f} tokens/s; "
            f"collection/forward time ratio (median of 3): {ratio:.2f}"
        )
        if cuda:
            print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

        half = max(1, len(batches) // 2)
        result = prune(
            model, batches[:half], batches[half:] or batches, PruneConfig(ff_frac=0.02, steps=2), progress=False
        )
        arch = find_architecture(model)
        zeroed = all(
            bool((p.columns()[:, m.to(p.columns().device)] == 0).all()) for p, m in zip(arch.ff, result.ff_mask)
        )
        print(f"pruned {result.ff_pruned} FF neurons in bf16; columns zeroed: {'ok' if zeroed else 'FAIL'}")
        failures += [] if zeroed else ["columns not zeroed"]
        with torch.inference_mode():
            before = model(**batches[0]).logits.float().cpu()
        model.save_pretrained(f"{tmp}/pruned")
        reloaded = AutoModelForCausalLM.from_pretrained(f"{tmp}/pruned", **kwargs).eval()
        if "device_map" not in kwargs:
            reloaded.to(device)
        with torch.inference_mode():
            after = reloaded(**batches[0]).logits.float().cpu()
        same = torch.equal(before, after)
        print(
            f"save/reload logits identical: {'ok' if same else 'FAIL (max diff %.3g)' % (before - after).abs().max()}"
        )
        failures += [] if same else ["reload differs"]
        if cuda and torch.cuda.device_count() >= 2:
            failures += two_device_check(tmp, config, batches)
    if args.big:
        failures += big_model_phases(args, device, sync)
    print("all checks passed" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


def two_device_check(tmp, config, batches) -> list[str]:
    """The first half of the layers on cuda:0, the rest on cuda:1, against the same model on cuda:0 alone:
    token weights and masks must reach each hook's device, and the choices must not change."""
    half = config.num_hidden_layers // 2
    one = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to("cuda:0").eval()
    device_map = {f"gpt_neox.{name}": 0 for name, _ in one.gpt_neox.named_children() if name != "layers"}
    device_map |= {name: 1 for name, _ in one.named_children() if name != "gpt_neox"}  # the output head
    device_map |= {f"gpt_neox.layers.{i}": 0 if i < half else 1 for i in range(config.num_hidden_layers)}
    two = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, device_map=device_map).eval()
    print(f"two devices: layers on {sorted({str(p.device) for p in two.parameters()})}")
    batches = [{k: v.to("cuda:0") for k, v in b.items()} for b in batches[:4]]
    failures = []
    stats_one = collect_statistics(one, batches, sums="all", progress=False)
    stats_two = collect_statistics(two, batches, sums="all", progress=False)
    worst = max(
        float(
            (
                (stats_two[k].sums[n].cpu() - stats_one[k].sums[n].cpu()).abs()
                / stats_one[k].sums[n].cpu().abs().clamp_min(1e-6)
            ).max()
        )
        for k in ("ff", "attn")
        for n in stats_one[k].sums
    )
    print(
        f"two devices: statistics vs one device, worst relative difference {worst:.2e} "
        f"({'ok' if worst < 1e-3 else 'FAIL'})"
    )
    failures += [] if worst < 1e-3 else ["two-device statistics differ"]
    settings = PruneConfig(ff_frac=0.02, attn_frac=0.02, steps=2)
    mask_one = prune(one, batches[:2], batches[2:], settings, progress=False)
    mask_two = prune(two, batches[:2], batches[2:], settings, progress=False)
    same = all(torch.equal(getattr(mask_one, m), getattr(mask_two, m)) for m in ("ff_mask", "attn_mask"))
    print(f"two devices: pruning masks equal to one device: {'ok' if same else 'FAIL'}")
    return failures + ([] if same else ["two-device masks differ"])


def big_model_phases(args, device, sync) -> list[str]:
    """One pruning step on a TinyLlama-shaped model (hidden 2048, MLP 5632, 32 heads, 4 KV heads)."""
    import resource

    from transformers import LlamaConfig, LlamaForCausalLM

    from mlflow_selprune.engine import score, select
    from mlflow_selprune.engine.surgery import prune_neurons
    from mlflow_selprune.evaluation.next_token import token_statistics
    from mlflow_selprune.registry.lineage import weights_sha256

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=args.big_layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    phases, failures = [], []

    def phase(name, fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        phases.append((name, time.perf_counter() - start))
        return out

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device("cpu"):
            LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        kwargs = {"dtype": torch.bfloat16, "device_map": "auto" if device == "cuda" else None}
        model = phase(
            "load (from_pretrained, bf16)", lambda: AutoModelForCausalLM.from_pretrained(tmp, **kwargs).eval()
        )
        n_params = sum(p.numel() for p in model.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        first = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        seq = 128
        rows = max(1, args.big_tokens // seq)
        forget = [
            {
                "input_ids": torch.randint(0, 16000, (rows, seq), generator=g).to(first),
                "attention_mask": torch.ones(rows, seq, dtype=torch.long, device=first),
            }
        ]
        retain = [
            {
                "input_ids": torch.randint(16000, 32000, (rows, seq), generator=g).to(first),
                "attention_mask": torch.ones(rows, seq, dtype=torch.long, device=first),
            }
        ]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stats_f = phase("collect forget", lambda: collect_statistics(model, forget, progress=False))
        stats_r = phase("collect retain", lambda: collect_statistics(model, retain, progress=False))
        arch = find_architecture(model)

        def surgery():
            scores = score(stats_f.ff, stats_r.ff, "abs", eps=1e-3)
            mask = select(scores, torch.zeros(arch.shape("ff"), dtype=torch.bool), 0.02)
            prune_neurons(arch, "ff", mask)
            return mask

        mask = phase("score + select + zero weights", surgery)

        def evaluate():
            with torch.inference_mode():
                for batch in forget + retain:
                    logits = model(**batch).logits
                    token_statistics(logits, batch["input_ids"], batch["attention_mask"])

        phase("evaluate forget + retain", evaluate)
        digest_seconds_before = len(phases)
        phase("weights digest (sha256, streamed)", lambda: weights_sha256(model))
        phase("save_pretrained (what the flavor writes)", lambda: model.save_pretrained(f"{tmp}/pruned"))
        zeroed = all(bool((p.columns()[:, m.to(p.columns().device)] == 0).all()) for p, m in zip(arch.ff, mask))
        failures += [] if zeroed else ["big model: columns not zeroed"]
        digest_seconds = phases[digest_seconds_before][1]
        print(
            f"\nbig model: Llama-shaped, {n_params / 1e9:.2f}B parameters, {model_bytes / 2**30:.2f} GiB in bf16, "
            f"on {sorted({str(p.device) for p in model.parameters()})}; {rows * seq} tokens per side; "
            f"{int(mask.sum())} FF neurons pruned"
        )
        for name, seconds in phases:
            print(f"  {name:<45}{seconds:8.2f} s")
        print(f"  digest speed: {model_bytes / digest_seconds / 1e9:.2f} GB/s")
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"  peak host RSS: {peak_rss / 2**30:.2f} GiB ({peak_rss / model_bytes:.2f}x the model's bytes)")
        if device == "cuda":
            print(
                f"  peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
                f"({torch.cuda.max_memory_allocated() / model_bytes:.2f}x the model's bytes)"
            )
    return failures


if __name__ == "__main__":
    sys.exit(main())
