"""What a pruning run removed, and how it is written down: masks and scores as
safetensors, everything else as one JSON record. Nothing is pickled."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import PruneConfig


@dataclass
class PruneResult:
    """Cumulative masks, last scores, and a record per step.

    ``parent_undos`` holds the original columns of every kept step, so the
    parent can be restored exactly (the random control and the relearning
    check need it); it is never saved.
    """

    ff_mask: torch.Tensor  # bool [n_layers, d_mlp]
    attn_mask: torch.Tensor  # bool [n_layers, n_heads * d_head]
    ff_scores: torch.Tensor | None
    attn_scores: torch.Tensor | None
    steps: list[dict]
    config: PruneConfig
    architecture: dict
    baseline_metrics: dict = field(default_factory=dict)
    final_metrics: dict = field(default_factory=dict)
    stop_reason: str = ""
    parent_undos: list = field(default_factory=list, repr=False, compare=False)
    # neurons already dead (all-zero columns) in the parent before this run: never chosen, never in the control
    ff_dead: torch.Tensor | None = None
    attn_dead: torch.Tensor | None = None
    # with --attn-mean-offset: every attention neuron's mean retain activation in the parent (the first step's
    # statistics), which the random control folds in for its own neurons; never saved
    attn_parent_means: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # a budget run: its baseline and final metrics on the select split it stopped on (the fields above then hold
    # the eval split's, measured after the loop)
    select_metrics: dict | None = None
    # --relearn-steps: forget top-1 of the unlearned model, parent and control along the fine-tuning
    # (evaluation.relearning); saved in the record's evidence, never here
    relearn_curve: dict | None = field(default=None, compare=False)

    @property
    def ff_pruned(self) -> int:
        """Pruned by this run."""
        return int(self.ff_mask.sum())

    @property
    def attn_pruned(self) -> int:
        return int(self.attn_mask.sum())

    def dead_before(self, kind: str) -> torch.Tensor:
        """Bool [n_layers, n]: the neurons of ``kind`` already dead in the parent."""
        mask = self.ff_mask if kind == "ff" else self.attn_mask
        dead = self.ff_dead if kind == "ff" else self.attn_dead
        return torch.zeros_like(mask) if dead is None else dead

    @property
    def ff_pruned_total(self) -> int:
        """Dead in the result: the parent's dead neurons and this run's."""
        return int((self.ff_mask | self.dead_before("ff")).sum())

    @property
    def attn_pruned_total(self) -> int:
        return int((self.attn_mask | self.dead_before("attn")).sum())

    def masks(self) -> dict[str, torch.Tensor]:
        return {"ff_mask": self.ff_mask, "attn_mask": self.attn_mask}

    def scores(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.ff_scores is not None:
            out["ff_scores"] = self.ff_scores.float()
        if self.attn_scores is not None:
            out["attn_scores"] = self.attn_scores.float()
        return out

    def record(self) -> dict:
        """A JSON-serialisable account of the run (no tensors)."""
        return {
            "config": self.config.to_dict(),
            "architecture": self.architecture,
            "ff_pruned": self.ff_pruned,
            "attn_pruned": self.attn_pruned,
            "ff_pruned_total": self.ff_pruned_total,
            "attn_pruned_total": self.attn_pruned_total,
            "ff_pruned_per_layer": self.ff_mask.sum(1).tolist(),
            "attn_pruned_per_layer": self.attn_mask.sum(1).tolist(),
            "baseline_metrics": self.baseline_metrics,
            "final_metrics": self.final_metrics,
            "stop_reason": self.stop_reason,
            "steps": self.steps,
        }

    def save(self, directory: str | Path, extra_record: dict | None = None) -> dict[str, Path]:
        """Write masks and scores (safetensors) and the record (JSON, plus ``extra_record``) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "masks": directory / "masks.safetensors",
            "scores": directory / "scores.safetensors",
            "record": directory / "pruning_record.json",
        }
        save_file({k: v.contiguous() for k, v in self.masks().items()}, str(paths["masks"]))
        save_file({k: v.contiguous() for k, v in self.scores().items()}, str(paths["scores"]))
        record = finite_json(self.record() | (extra_record or {}))
        paths["record"].write_text(json.dumps(record, indent=2, default=_json_default, allow_nan=False))
        return paths


def finite_json(value):
    """Non-finite floats (an infinite perplexity, say) as None: strict JSON has no NaN/Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
