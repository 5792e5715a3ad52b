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
import math
from dataclasses import dataclass

import torch

from ..errors import BadInputError

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
# One tag per gate decision, never overwritten: selprune.gate.<UTC time>-<random>, a JSON record.
GATE_RECORD_PREFIX = PREFIX + "gate."
TRUST_REMOTE_CODE = PREFIX + "trust_remote_code"
STORAGE = PREFIX + "storage"
PARENT_WEIGHTS_SHA = PREFIX + "parent_weights_sha256"

# The metrics kept as version tags: what a gate or an auditor reads without opening the run.
HEADLINE_METRICS = (
    "forget_top1", "retain_top1", "forget_top10", "retain_top10",
    "forget_skip50_top1", "retain_skip50_top1", "forget_loss", "retain_loss",
    "forget_top1_drop", "retain_top1_drop", "forget_top10_drop", "retain_top10_drop",
    "forget_skip50_top1_drop", "retain_skip50_top1_drop",
    "forget_loss_increase", "retain_loss_increase", "selectivity", "top10_selectivity", "skip50_top1_selectivity",
    "control_forget_top1_drop", "control_retain_top1_drop", "control_forget_skip50_top1_drop", "control_selectivity",
    "relearn_forget_top1", "relearn_parent_forget_top1", "relearn_recovery",
    # image classifiers
    "forget_top5", "retain_top5", "forget_top5_drop", "retain_top5_drop", "top5_selectivity",
)


class LineageError(BadInputError):
    """A version's lineage is missing or inconsistent."""


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of every tensor in the state dict (name, dtype, shape, bytes), independent of file format.

    Streams tensor by tensor: the bytes are hashed in place (a CPU tensor is never copied; a GPU
    tensor is copied to the host one at a time), so memory stays flat whatever the model's size.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def config_sha256(config: dict) -> str:
    """A digest of the pruning and data settings (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def metric_tags(metrics: dict) -> dict[str, str]:
    """Headline metrics as tags; a not-meaningful (NaN) value is left out, never written as 'nan'."""
    return {METRIC_PREFIX + k: repr(float(metrics[k])) for k in HEADLINE_METRICS
            if k in metrics and math.isfinite(float(metrics[k]))}


def metrics_from_tags(tags: dict) -> dict[str, float]:
    return {k[len(METRIC_PREFIX):]: float(v) for k, v in tags.items() if k.startswith(METRIC_PREFIX)}


def build_tags(*, parent, run_id: str, forget, retain, config: dict, weights_digest: str,
               ff_pruned: int, attn_pruned: int, metrics: dict, plugin_version: str,
               trust_remote_code: bool = False, storage: str = "full",
               parent_weights_digest: str | None = None) -> dict[str, str]:
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
        TRUST_REMOTE_CODE: str(bool(trust_remote_code)).lower(),
        STORAGE: storage,
        **({PARENT_WEIGHTS_SHA: parent_weights_digest} if parent_weights_digest else {}),
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
            "trust_remote_code": t.get(TRUST_REMOTE_CODE),
            "storage": t.get(STORAGE, "full"),
            "gate_decisions": gate_records(t),
        }


def gate_records(tags: dict) -> list[dict]:
    """Every gate decision recorded on a version, oldest first."""
    records = []
    for key in sorted(k for k in tags if k.startswith(GATE_RECORD_PREFIX)):
        try:
            records.append(json.loads(tags[key]))
        except ValueError:
            continue
    return records


def deciding_record(tags: dict, aliases: list[str]) -> dict | None:
    """The latest decision that moved one of ``aliases`` (those now pointing at the version) there."""
    for record in reversed(gate_records(tags)):
        if record.get("alias_moved") and record["alias_moved"] in aliases:
            return record
    return None


def chain(model_uri: str, max_hops: int = 100) -> list[Hop]:
    """From ``model_uri`` back to its root, following ``selprune.parent_model_uri``."""
    from .resolve import resolve

    hops: list[Hop] = []
    uri = model_uri
    seen = set()
    while uri is not None:
        if uri in seen or len(hops) >= max_hops:
            raise LineageError(f"lineage of {model_uri} loops back to {uri}")
        seen.add(uri)
        try:
            resolved = resolve(uri)
        except BadInputError as exc:
            if not hops:
                raise
            raise LineageError(f"lineage of {model_uri}: the link {uri} (parent of {hops[-1].uri}) is missing: "
                               f"{str(exc).splitlines()[0]}") from None
        hop = Hop(resolved.canonical_uri, resolved.registered_name, resolved.version, resolved.run_id, resolved.tags)
        if hop.is_unlearned and hop.tags.get(COMPLETE) != "true":
            raise LineageError(f"{hop.uri} is an incomplete unlearned version (no {COMPLETE} tag); do not deploy it")
        hops.append(hop)
        uri = hop.tags.get(PARENT) if hop.is_unlearned else None
    return hops


def verify(hop: Hop) -> tuple[bool, str | None, str]:
    """Recompute the weights digest of ``hop``'s model: (matches, recorded, actual)."""
    from .loading import load_components
    from .resolve import resolve

    model, _ = load_components(resolve(hop.uri))
    actual = weights_sha256(model)
    recorded = hop.tags.get(WEIGHTS_SHA)
    return recorded == actual, recorded, actual


def aliases_of(hop: Hop) -> list[str]:
    """The aliases that point at ``hop``'s version now."""
    if not hop.name or not hop.version:
        return []
    from .resolve import client

    return sorted(client().get_model_version(hop.name, hop.version).aliases or [])
