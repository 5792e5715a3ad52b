"""Our sums-only statistics vs the reference approach: a general hook framework with running Welford state.

The reference (re-implemented here, small but faithful to the approach the performance targets
compares against): forward hooks on the same projections (each block's MLP
output projection and attention output projection) take the projection's
input, keep the non-padding tokens (a boolean gather), and for every tracked
quantity (the activation a and |a|) compute the batch's mean and M2 and merge
them into a running Welford state (n, mean, M2) per neuron, in the model's
dtype (float32 here), batch by batch, while the full model runs under
torch.no_grad(). Importances come from that state: abs = mean|a|,
rms = sqrt(var + mean^2), std = sqrt(var).

Ours: ``collect_statistics`` (forward pre-hooks, float32 masked reductions per
batch added into float64 sums, model body only).

Timing: interleaved rounds over the same batches in one process, ratios
against a plain torch.no_grad() forward of the full model. Agreement: the
top-k FF neurons (k = 2% of all FF neurons, global, ties to the lower index)
by score = I(forget) / (I(retain) + 1e-3) for abs, rms and std, ours vs a
float64 Welford computed here on the same data.

    python examples/benchmarks/reference_comparison.py [--batches 2] [--repeats 11] [--stat-batches 4]
"""

from __future__ import annotations

import argparse

import torch

from common import build_neox, footer, header, interleaved, make_batches, n_real_tokens, plain_forward, table
from mlflow_selprune import collect_statistics, find_architecture, importance
from mlflow_selprune.engine.selection import select

QUOTED_REFERENCE_RATIO = 2.4  # quoted for the reference on a 4-layer 256-wide GPT-NeoX on this machine
FRAC = 0.02
EPS = 1e-3


class Welford:
    """Running per-neuron count, mean and M2 (sum of squared deviations), merged batch by batch."""

    def __init__(self, n_neurons: int, dtype: torch.dtype):
        self.n = 0
        self.mean = torch.zeros(n_neurons, dtype=dtype)
        self.m2 = torch.zeros(n_neurons, dtype=dtype)

    def update(self, x: torch.Tensor) -> None:
        """Merge a batch [m, n_neurons] (Chan et al.'s parallel update)."""
        m = x.shape[0]
        if m == 0:
            return
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.n + m
        delta = batch_mean - self.mean
        self.mean += delta * (m / total)
        self.m2 += batch_m2 + delta * delta * (self.n * m / total)
        self.n = total

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.n


class WelfordCollector:
    """A general hook framework: named transforms of each hooked input, each tracked by Welford state."""

    TRANSFORMS = {"a": lambda x: x, "abs": torch.abs}

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        self.model = model
        self.dtype = dtype
        self.arch = find_architecture(model)
        self.state = {
            kind: [{name: Welford(p.n_neurons, dtype) for name in self.TRANSFORMS} for p in self.arch.projections(kind)]
            for kind in ("ff", "attn")
        }
        self.keep = None

    def _hook(self, kind: str, layer: int):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])[self.keep].to(self.dtype)
            for name, transform in self.TRANSFORMS.items():
                self.state[kind][layer][name].update(transform(x))

        return hook

    def collect(self, batches) -> "WelfordCollector":
        handles = [
            p.module.register_forward_hook(self._hook(kind, p.layer))
            for kind in ("ff", "attn")
            for p in self.arch.projections(kind)
        ]
        try:
            with torch.no_grad():
                for batch in batches:
                    self.keep = batch["attention_mask"].reshape(-1).bool()
                    self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            for handle in handles:
                handle.remove()
        return self

    def importance(self, kind: str, name: str) -> torch.Tensor:
        """float64 [n_layers, n_neurons]."""
        rows = []
        for state in self.state[kind]:
            a, absolute = state["a"], state["abs"]
            value = {
                "abs": absolute.mean,
                "rms": torch.sqrt(a.var.clamp_min(0) + a.mean**2),
                "std": torch.sqrt(a.var.clamp_min(0)),
            }[name]
            rows.append(value.double())
        return torch.stack(rows)


def top_k(scores: torch.Tensor) -> set[int]:
    """The library's own selection: k = round(2% of all FF neurons), global, ties to the lower index."""
    chosen = select(scores, torch.zeros_like(scores, dtype=torch.bool), FRAC)
    return set(chosen.reshape(-1).nonzero().squeeze(1).tolist())


def margin(scores: torch.Tensor, k: int) -> float:
    """Relative gap between the k-th and (k+1)-th best score: how far from a tie the cut is."""
    values = torch.sort(scores.reshape(-1), descending=True).values
    return float((values[k - 1] - values[k]) / values[k - 1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2, help="batches per timing round")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds (after one warm-up round)")
    parser.add_argument(
        "--stat-batches", type=int, default=4, help="batches each of forget and retain for the top-k check"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header("reference comparison: sums-only pre-hooks vs a Welford hook framework", args)
    vocab = 4096
    model = build_neox(vocab=vocab)
    print("   model: GPT-NeoX 4 layers, hidden 256, intermediate 1024, 4 heads, vocab 4096, float32, random init")

    # ---- timing
    batches = make_batches(args.batches, args.batch_size, args.seq_len, vocab)
    real = n_real_tokens(batches)
    contenders = {
        "plain forward (full)": plain_forward(model, batches),
        "plain forward (body)": plain_forward(model, batches, body=True),
        "ours: collect (abs)": lambda: collect_statistics(model, batches, progress=False),
        "ours: collect (all)": lambda: collect_statistics(model, batches, sums="all", progress=False),
        "reference: Welford hooks (float32)": lambda: WelfordCollector(model).collect(batches),
    }
    t = interleaved(contenders, repeats=args.repeats, warmup=1)
    print(
        f"\n   timing: {args.batches} batches of {args.batch_size}x{args.seq_len} ({real:,} real tokens) per round, "
        f"median over {args.repeats} interleaved rounds; ratio = median of per-round time ratios"
    )
    rows = [
        [
            name,
            t.median(name),
            real / t.median(name),
            t.ratio(name, "plain forward (full)"),
            t.ratio(name, "plain forward (body)"),
        ]
        for name in contenders
    ]
    rows.append(["reference as quoted (not measured here)", "", "", QUOTED_REFERENCE_RATIO, ""])
    table(rows, ["contender", "s/round", "tokens/s", "x full forward", "x body forward"])
    ours, ref = (
        t.ratio("ours: collect (abs)", "plain forward (full)"),
        t.ratio("reference: Welford hooks (float32)", "plain forward (full)"),
    )
    print(
        f"   ours (abs) {ours:.2f}x vs reference {ref:.2f}x a plain full forward (measured here); "
        f"reference quoted at ~{QUOTED_REFERENCE_RATIO}x; reference / ours = {ref / ours:.2f}"
    )

    # ---- agreement of the top-k neurons with a float64 Welford
    half = vocab // 2
    forget = make_batches(args.stat_batches, args.batch_size, args.seq_len, vocab, seed=1, low=2, high=half)
    retain = make_batches(args.stat_batches, args.batch_size, args.seq_len, vocab, seed=2, low=half, high=vocab)
    ours_f = collect_statistics(model, forget, sums="all", progress=False).ff
    ours_r = collect_statistics(model, retain, sums="all", progress=False).ff
    exact_f, exact_r = (
        WelfordCollector(model, torch.float64).collect(forget),
        WelfordCollector(model, torch.float64).collect(retain),
    )
    ref_f, ref_r = WelfordCollector(model).collect(forget), WelfordCollector(model).collect(retain)
    n_ff = ours_f.sums["sum_abs"].numel()
    k = round(FRAC * n_ff)
    print(
        f"\n   top-k agreement: forget = {args.stat_batches} batches of ids in [2, {half}), retain = "
        f"{args.stat_batches} batches of ids in [{half}, {vocab}) ({n_real_tokens(forget):,} / "
        f"{n_real_tokens(retain):,} real tokens); k = {FRAC:.0%} of {n_ff} FF neurons = {k}; "
        f"score = I(forget) / (I(retain) + {EPS:g})"
    )
    rows = []
    for name in ("abs", "rms", "std"):
        exact = exact_f.importance("ff", name) / (exact_r.importance("ff", name) + EPS)
        ours_scores = importance(ours_f, name) / (importance(ours_r, name) + EPS)
        ref_scores = ref_f.importance("ff", name) / (ref_r.importance("ff", name) + EPS)
        truth, mine, theirs = top_k(exact), top_k(ours_scores), top_k(ref_scores)
        max_rel = float(((ours_scores - exact).abs() / exact.abs().clamp_min(1e-12)).max())
        rows.append(
            [
                name,
                str(mine == truth),
                f"{len(mine & truth)}/{k}",
                max_rel,
                str(theirs == truth),
                f"{len(theirs & truth)}/{k}",
                margin(exact, k),
            ]
        )
    table(
        rows,
        [
            "importance",
            "ours: top-k identical",
            "overlap",
            "max rel. score error",
            "ref float32: identical",
            "overlap",
            "k-th/(k+1)-th gap (rel.)",
        ],
    )
    for row in rows:
        print(f"   {row[0]}: top-k identical: {row[1]} (overlap {row[2]}) vs float64 Welford")
    footer()


if __name__ == "__main__":
    main()
