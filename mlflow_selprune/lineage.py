"""Lineage: the tag schema on unlearned model versions, digests, and the audit chain.

Every unlearned version carries ``selprune.*`` tags naming its parent, its
root, the run, the forget/retain data and their digests, the configuration
and weights digests, how many neurons were pruned, and its headline metrics.
``selprune.complete`` is written in the same request that creates the
version, so a version without it was not made by a finished ``prune``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

PREFIX = "selprune."
PARENT = PREFIX + "parent_model_uri"
ROOT = PREFIX + "root_model_uri"
RUN_ID = PREFIX + "run_id"
FORGET_DATA = PREFIX + "forget_data"
FORGET_DIGEST = PREFIX + "forget_digest"
RETAIN_DATA = PREFIX + "retain_data"
RETAIN_DIGEST = PREFIX + "retain_digest"
CONFIG_SHA = PREFIX + "config_sha256"
WEIGHTS_SHA = PREFIX + "weights_sha256"
FF_PRUNED = PREFIX + "ff_pruned"
ATTN_PRUNED = PREFIX + "attn_pruned"
PLUGIN_VERSION = PREFIX + "plugin_version"
COMPLETE = PREFIX + "complete"
METRIC_PREFIX = PREFIX + "metric."
GATE_VERDICT = PREFIX + "gate.verdict"
GATE_THRESHOLDS = PREFIX + "gate.thresholds"
GATE_FAILED = PREFIX + "gate.failed"

# The metrics kept as version tags: what a gate or an auditor reads without opening the run.
HEADLINE_METRICS = (
    "forget_top1", "retain_top1", "forget_top10", "retain_top10",
    "forget_skip50_top1", "retain_skip50_top1", "forget_loss", "retain_loss",
    "forget_top1_drop", "retain_top1_drop", "forget_top10_drop", "retain_top10_drop",
    "forget_skip50_top1_drop", "retain_skip50_top1_drop",
    "forget_loss_increase", "retain_loss_increase", "selectivity",
)


class LineageError(ValueError):
    """A version's lineage is missing or inconsistent."""


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of every tensor in the state dict (name, dtype, shape, bytes), independent of file format."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_sha256(config: dict) -> str:
    """A digest of the pruning and data settings (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def metric_tags(metrics: dict) -> dict[str, str]:
    return {METRIC_PREFIX + k: repr(float(metrics[k])) for k in HEADLINE_METRICS if k in metrics}


def metrics_from_tags(tags: dict) -> dict[str, float]:
    return {k[len(METRIC_PREFIX):]: float(v) for k, v in tags.items() if k.startswith(METRIC_PREFIX)}


def build_tags(*, parent, run_id: str, forget, retain, config: dict, weights_digest: str,
               ff_pruned: int, attn_pruned: int, metrics: dict, plugin_version: str) -> dict[str, str]:
    """The full tag set of a new unlearned version (``parent``: a ``registry.ResolvedModel``)."""
    root = parent.tags.get(ROOT) or parent.canonical_uri
    tags = {
        PARENT: parent.canonical_uri,
        ROOT: root,
        RUN_ID: run_id,
        FORGET_DATA: forget.spec,
        FORGET_DIGEST: forget.digest,
        RETAIN_DATA: retain.spec,
        RETAIN_DIGEST: retain.digest,
        CONFIG_SHA: config_sha256(config),
        WEIGHTS_SHA: weights_digest,
        FF_PRUNED: str(ff_pruned),
        ATTN_PRUNED: str(attn_pruned),
        PLUGIN_VERSION: plugin_version,
        **metric_tags(metrics),
    }
    tags[COMPLETE] = "true"
    return tags


@dataclass
class Hop:
    """One version in a lineage chain."""

    uri: str
    name: str | None
    version: str | None
    run_id: str | None
    tags: dict

    @property
    def is_unlearned(self) -> bool:
        return PARENT in self.tags

    def to_dict(self) -> dict:
        t = self.tags
        return {
            "model_uri": self.uri,
            "run_id": self.run_id,
            "unlearned": self.is_unlearned,
            "complete": t.get(COMPLETE) == "true",
            "parent_model_uri": t.get(PARENT),
            "forget_data": t.get(FORGET_DATA),
            "forget_digest": t.get(FORGET_DIGEST),
            "retain_data": t.get(RETAIN_DATA),
            "retain_digest": t.get(RETAIN_DIGEST),
            "ff_pruned": int(t[FF_PRUNED]) if FF_PRUNED in t else None,
            "attn_pruned": int(t[ATTN_PRUNED]) if ATTN_PRUNED in t else None,
            "weights_sha256": t.get(WEIGHTS_SHA),
            "config_sha256": t.get(CONFIG_SHA),
            "metrics": metrics_from_tags(t),
            "gate_verdict": t.get(GATE_VERDICT),
            "gate_thresholds": json.loads(t[GATE_THRESHOLDS]) if GATE_THRESHOLDS in t else None,
        }


def chain(model_uri: str, max_hops: int = 100) -> list[Hop]:
    """From ``model_uri`` back to its root, following ``selprune.parent_model_uri``."""
    from .registry import resolve

    hops: list[Hop] = []
    uri = model_uri
    seen = set()
    while uri is not None:
        if uri in seen or len(hops) >= max_hops:
            raise LineageError(f"lineage of {model_uri} loops back to {uri}")
        seen.add(uri)
        resolved = resolve(uri)
        hop = Hop(resolved.canonical_uri, resolved.registered_name, resolved.version, resolved.run_id, resolved.tags)
        if hop.is_unlearned and hop.tags.get(COMPLETE) != "true":
            raise LineageError(f"{hop.uri} is an incomplete unlearned version (no {COMPLETE} tag); do not deploy it")
        hops.append(hop)
        uri = hop.tags.get(PARENT) if hop.is_unlearned else None
    return hops


def verify(hop: Hop) -> tuple[bool, str | None, str]:
    """Recompute the weights digest of ``hop``'s model: (matches, recorded, actual)."""
    from .registry import load_components, resolve

    model, _ = load_components(resolve(hop.uri))
    actual = weights_sha256(model)
    recorded = hop.tags.get(WEIGHTS_SHA)
    return recorded == actual, recorded, actual
