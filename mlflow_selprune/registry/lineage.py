"""Lineage: the tag schema on unlearned model versions, digests, and the audit chain.

Every unlearned version carries ``selprune.*`` tags naming its parent, its
root, the run, the forget/retain data and their digests, the configuration
and weights digests, how many neurons were pruned, and its headline metrics.
``selprune.complete`` is written in the same request that creates the
version, so a version without it was not made by a finished ``prune``.

Tags can be edited by anyone with write access to the model, so the run that
made a version anchors them: the full tag set as ``selprune/lineage.json``,
its sha256 as a run param (immutable in MLflow). ``audit`` checks a version
against that record, its weights and its parent's against their digests, and
the run's masks, scores and pruning record against theirs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import QUANTIZED_FORMATS
from ..errors import BadInputError, causes

from .anchor import (  # noqa: F401 - the record's names, read here as everywhere
    EXPORT_RECORD_PREFIX,
    GATE_RECORD_PREFIX,
    LINEAGE_PARAM,
    LINEAGE_RECORD,
    PREFIX,
    UNVERIFIED,
    anchored_record,
    lineage_tags,
    recorded_tags,
)

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
# dead in the version (its parent's dead neurons and this run's): a chain's totals add up
FF_PRUNED_TOTAL = PREFIX + "ff_pruned_total"
ATTN_PRUNED_TOTAL = PREFIX + "attn_pruned_total"
PLUGIN_VERSION = PREFIX + "plugin_version"
COMPLETE = PREFIX + "complete"
METRIC_PREFIX = PREFIX + "metric."
# One tag per gate decision, never overwritten: selprune.gate.<UTC time>-<random>, a JSON record.
TRUST_REMOTE_CODE = PREFIX + "trust_remote_code"
STORAGE = PREFIX + "storage"
PARENT_WEIGHTS_SHA = PREFIX + "parent_weights_sha256"
# A base (root) version registered by `mlflow-selprune register`: where it came from, one tag per entry
# (source, source_kind, gguf_sha256, gguf_quantization, package, ...), anchored like an unlearned version's.
SOURCE_PREFIX = PREFIX + "source."
# {run artifact path: sha256} of the masks, scores and pruning record, as canonical JSON.
ARTIFACTS_SHA = PREFIX + "artifacts_sha256"
MANIFEST_SHA = PREFIX + "manifest_sha256"  # every file of the model directory (registry.manifest)
ATTESTATION_SHA = PREFIX + "attestation_sha256"  # the signed statement's envelope (registry.attest)
RECORD_ARTIFACTS = ("selprune/masks.safetensors", "selprune/scores.safetensors", "selprune/pruning_record.json")
# The version's tags as registered, a run artifact anchored by a run param (params cannot be changed or deleted).
# signed gate decisions (KEY.dsse.json), and gate records too long for a tag, whole (KEY.json, digest in the tag)
GATE_ARTIFACT_DIR = "selprune/gate"
# One tag per file `mlflow-selprune export` made of the version, never overwritten (registry.exports).
# The formats `prune --quantized-check` measured in ("int8,int4"): a gate on the quantized recovery requires
# every one of them, so a format whose recovery could not be measured is never passed over.
QUANTIZED_CHECK = PREFIX + "quantized_check"
# NAME@SHA256 of the policy (registry.policy) a version was unlearned under by `reconcile`
POLICY = PREFIX + "policy"

# The tags a version shows in the MLflow UI: what a person filters or sorts by (parent, forget data, the headline
# drops, the policy it was made under, the verified digest; a base version's source): at most 6, and one more per
# decision recorded on it (gate, reconcile; each its own tag, never overwritten). Every other lineage tag lives only
# in the record its run anchored (LINEAGE_RECORD), read from there, verified (``recorded_tags``), never from an
# unverified tag.
SHOWN = (
    PARENT,
    FORGET_DATA,
    METRIC_PREFIX + "forget_top1_drop",
    METRIC_PREFIX + "retain_top1_drop",
    POLICY,
    WEIGHTS_SHA,
    SOURCE_PREFIX + "source",
)

# The headline metrics kept in the lineage record: what a gate or an auditor reads (from the verified record).
HEADLINE_METRICS = (
    "forget_top1",
    "retain_top1",
    "forget_top10",
    "retain_top10",
    "forget_skip50_top1",
    "retain_skip50_top1",
    "forget_loss",
    "retain_loss",
    "forget_top1_drop",
    "retain_top1_drop",
    "forget_top10_drop",
    "retain_top10_drop",
    "forget_skip50_top1_drop",
    "retain_skip50_top1_drop",
    "forget_loss_increase",
    "retain_loss_increase",
    "selectivity",
    "top10_selectivity",
    "skip50_top1_selectivity",
    "control_forget_top1_drop",
    "control_retain_top1_drop",
    "control_forget_skip50_top1_drop",
    "control_selectivity",
    "relearn_forget_top1",
    "relearn_parent_forget_top1",
    "relearn_recovery",
    "relearn_control_forget_top1",
    "relearn_control_recovery",
    "relearn_parent_recovery",
    "relearn_steps",
    "relearn_lr",
    # --code-tasks (causal LMs)
    "forget_code_pass_rate",
    "parent_forget_code_pass_rate",
    "control_forget_code_pass_rate",
    "forget_code_pass_rate_3shot",
    "parent_forget_code_pass_rate_3shot",
    "control_forget_code_pass_rate_3shot",
    "retain_cloze_accuracy",
    "parent_retain_cloze_accuracy",
    "control_retain_cloze_accuracy",
    # --quantized-check (evaluation.quantized), per format
    *(
        f"quantized_{fmt}_{name}"
        for fmt in QUANTIZED_FORMATS
        for name in ("forget_top1_drop", "retain_top1_drop", "control_forget_top1_drop", "recovery")
    ),
    # image classifiers
    "forget_top5",
    "retain_top5",
    "forget_top5_drop",
    "retain_top5_drop",
    "top5_selectivity",
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


def canonical_json(value) -> str:
    """Sorted keys, no spaces: the same value always gives the same bytes, hence the same digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def shown(tags: dict) -> dict[str, str]:
    """The tags a new version is registered with (``SHOWN``); the full set goes to its anchored record."""
    return {k: tags[k] for k in SHOWN if k in tags}


def lineage_record(tags: dict) -> bytes:
    """The bytes of ``selprune/lineage.json`` for a version with ``tags``."""
    return canonical_json(lineage_tags(tags)).encode()


def file_sha256(path) -> str:
    """A file's sha256, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_digests(files: dict) -> dict[str, str]:
    """``{"selprune/<file name>": sha256}`` of the local files logged under the run's ``selprune/``."""
    return {f"selprune/{Path(path).name}": file_sha256(path) for path in files.values()}


def metric_tags(metrics: dict) -> dict[str, str]:
    """Headline metrics as tags; a not-meaningful (NaN) value is left out, never written as 'nan'."""
    return {
        METRIC_PREFIX + k: repr(float(metrics[k]))
        for k in HEADLINE_METRICS
        if k in metrics and math.isfinite(float(metrics[k]))
    }


def number(value) -> float | None:
    """A tag's finite number, or None where the tag does not hold one."""
    try:
        parsed = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return parsed if math.isfinite(parsed) else None


def metrics_from_tags(tags: dict) -> dict[str, float]:
    """The ``selprune.metric.*`` tags that hold a finite number (one that does not: ``malformed_tags``)."""
    metrics = {k[len(METRIC_PREFIX) :]: number(v) for k, v in tags.items() if k.startswith(METRIC_PREFIX)}
    return {k: v for k, v in metrics.items() if v is not None}


COUNT_TAGS = (FF_PRUNED, ATTN_PRUNED, FF_PRUNED_TOTAL, ATTN_PRUNED_TOTAL)


def count(value) -> int | None:
    """A tag's count of neurons, or None where the tag does not hold one."""
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 20 else None


def malformed_tags(tags: dict) -> list[str]:
    """One phrase per lineage tag whose value is not of its kind (a metric that is not a finite number, a count
    that is not a whole number): what is read from a tag is checked before it is used."""
    found = [
        f"tag {k} is {short(v)}, not a finite number"
        for k, v in sorted(tags.items())
        if k.startswith(METRIC_PREFIX) and number(v) is None
    ]
    found += [f"tag {k} is {short(tags[k])}, not a count" for k in COUNT_TAGS if k in tags and count(tags[k]) is None]
    return found


def build_tags(
    *,
    parent,
    run_id: str,
    forget,
    retain,
    config: dict,
    weights_digest: str,
    ff_pruned: int,
    attn_pruned: int,
    metrics: dict,
    plugin_version: str,
    ff_pruned_total: int | None = None,
    attn_pruned_total: int | None = None,
    trust_remote_code: bool = False,
    storage: str = "full",
    parent_weights_digest: str | None = None,
    artifacts: dict | None = None,
    manifest_digest: str | None = None,
    policy: str | None = None,
) -> dict[str, str]:
    """The full tag set of a new unlearned version (``parent``: a ``registry.ResolvedModel``; ``artifacts``:
    ``artifact_digests`` of the run's masks, scores and record)."""
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
        FF_PRUNED_TOTAL: str(ff_pruned if ff_pruned_total is None else ff_pruned_total),
        ATTN_PRUNED_TOTAL: str(attn_pruned if attn_pruned_total is None else attn_pruned_total),
        PLUGIN_VERSION: plugin_version,
        TRUST_REMOTE_CODE: str(bool(trust_remote_code)).lower(),
        STORAGE: storage,
        **({PARENT_WEIGHTS_SHA: parent_weights_digest} if parent_weights_digest else {}),
        **({ARTIFACTS_SHA: canonical_json(artifacts)} if artifacts else {}),
        **({MANIFEST_SHA: manifest_digest} if manifest_digest else {}),
        **({POLICY: policy} if policy else {}),
        **metric_tags(metrics),
    }
    quantized_check = (config.get("evidence") or {}).get("quantized_check")
    if quantized_check:
        tags[QUANTIZED_CHECK] = quantized_check
    tags[COMPLETE] = "true"
    return tags


@dataclass
class Hop:
    """One version in a lineage chain."""

    uri: str
    name: str | None
    version: str | None
    run_id: str | None
    tags: dict  # every lineage tag (from the anchored record, where it matches) and the version's records
    version_tags: dict | None = None  # the tags on the version itself, as the registry holds them

    @property
    def is_unlearned(self) -> bool:
        return PARENT in self.tags

    @property
    def kind(self) -> str:
        """root, unlearned, or incomplete (a parent tag without ``selprune.complete``: never deploy it)."""
        if not self.is_unlearned:
            return "root"
        # a record that no longer matches its anchor: the audit reports it, the version is not taken as unfinished
        return "unlearned" if self.tags.get(COMPLETE) == "true" or UNVERIFIED in self.tags else "incomplete"

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
            "ff_pruned": count(t.get(FF_PRUNED)),
            "attn_pruned": count(t.get(ATTN_PRUNED)),
            "ff_pruned_total": count(t.get(FF_PRUNED_TOTAL)),
            "attn_pruned_total": count(t.get(ATTN_PRUNED_TOTAL)),
            "weights_sha256": t.get(WEIGHTS_SHA),
            "config_sha256": t.get(CONFIG_SHA),
            "metrics": metrics_from_tags(t),
            "trust_remote_code": t.get(TRUST_REMOTE_CODE),
            "storage": t.get(STORAGE, "full"),
            "gate_decisions": gate_records(t),
            "source": {k[len(SOURCE_PREFIX) :]: v for k, v in sorted(t.items()) if k.startswith(SOURCE_PREFIX)},
        }


# A decision's time, as the gate writes it: UTC, to the microsecond (to the second in older records), so times sort as
# text in the order they were made.
RECORD_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?Z")
# verdict of the record ``prune``/``materialize --alias`` write when they move an alias to the version they made
REGISTERED = "registered"
# verdict of the record `reconcile --fix` writes when it moves (or keeps) a protected alias on a compliant version
RECONCILED = "reconcile"
# verdict of a record that an alias was found where no recorded move put it (by hand): never explains the alias
OBSERVED = "observed"
# the verdicts whose records move an alias (and so explain it)
MOVES = ("pass", REGISTERED, RECONCILED)
ALIAS = re.compile(r"[\w\-]{1,255}")  # what MLflow accepts as an alias name
_RECORD_TEXT = (
    "verdict",
    "user",
    "alias_requested",
    "alias_not_moved",
    "attestation_sha256",
    "record_sha256",
    "seen_by",
    "policy",
    "reason",
)


def _latest_plausible_time() -> str:
    """An hour from now, as a record's time is written (to the second): later is no record's time, clocks apart."""
    import datetime

    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    return later.strftime("%Y-%m-%dT%H:%M:%S")


def json_record(value: str) -> dict:
    """A record tag's JSON object; ``ValueError`` where the tag holds anything else (or JSON nested too deep)."""
    try:
        record = json.loads(value)
    except (ValueError, RecursionError):
        raise ValueError("is not a JSON record") from None
    if not isinstance(record, dict):
        raise ValueError("is not a JSON record")
    return record


def parse_gate_record(key: str, value: str) -> dict:
    """The decision record in tag ``key``, every field it is read for checked for its type; ``ValueError`` says
    what is wrong. A tag is written by anyone with EDIT, so nothing in it is trusted before this."""
    record = json_record(value)
    if not isinstance(record.get("time"), str) or not RECORD_TIME.fullmatch(record["time"]):
        raise ValueError(f"is malformed: its time is {short(record.get('time'))}, not YYYY-MM-DDTHH:MM:SS[.ffffff]Z")
    if record["time"][:19] > _latest_plausible_time():  # it would sort after every real one, and stay the latest
        raise ValueError(f"is malformed: its time {short(record['time'])} is in the future")
    for name in ("verdict",) + tuple(n for n in _RECORD_TEXT if n in record):
        if not isinstance(record.get(name), str):
            raise ValueError(f"is malformed: its {name} is {short(record.get(name))}, not text")
    for name in ("alias_moved", "alias_requested", "alias_seen"):
        if record.get(name) is not None and not (isinstance(record[name], str) and ALIAS.fullmatch(record[name])):
            raise ValueError(f"is malformed: its {name} is {short(record[name])}, not an alias name")
    for pair in (("attestation_artifact", "attestation_sha256"), ("record_artifact", "record_sha256")):
        if (pair[0] in record) != (pair[1] in record):
            raise ValueError(f"is malformed: it has one of {pair[0]} and {pair[1]} without the other")
    if not isinstance(record.get("thresholds"), (dict, type(None))):
        raise ValueError(f"is malformed: its thresholds are {short(record['thresholds'])}, not an object")
    for name, suffix in (("attestation_artifact", ".dsse.json"), ("record_artifact", ".json")):
        expected = f"{GATE_ARTIFACT_DIR}/{key}{suffix}"  # where the gate writes it, and nowhere else
        if name in record and record[name] != expected:
            raise ValueError(f"is malformed: its {name} is {short(record[name])}, not {expected}")
    return record


def names_alias(record: dict, alias: str) -> bool:
    """Whether a decision record is about ``alias``: it moved it, asked for it, or saw it."""
    return alias in (record.get("alias_moved"), record.get("alias_requested"), record.get("alias_seen"))


def gate_envelope_path(key: str) -> str:
    """Where the signed decision of record ``key`` is kept in its version's run (its name is the key)."""
    return f"{GATE_ARTIFACT_DIR}/{key}.dsse.json"


def gate_record_entries(tags: dict) -> list[tuple[str, dict | None]]:
    """``(tag key, record)`` of every gate decision on a version, oldest first; the record is None where the
    tag does not hold a well-formed record (``parse_gate_record`` says why)."""
    entries: list[tuple[str, dict | None]] = []
    for key in sorted(k for k in tags if k.startswith(GATE_RECORD_PREFIX)):
        try:
            entries.append((key, parse_gate_record(key, tags[key])))
        except ValueError:
            entries.append((key, None))
    return entries


def gate_records(tags: dict) -> list[dict]:
    """Every gate decision recorded on a version, oldest first; one that does not parse reads as
    ``{"unreadable": KEY}`` (and is a finding of ``check_gate_records``), never silently dropped."""
    return [record if record is not None else {"unreadable": key} for key, record in gate_record_entries(tags)]


def deciding_record(tags: dict, aliases: list[str]) -> dict | None:
    """The latest decision that moved one of ``aliases`` (those now pointing at the version) there."""
    for _, record in reversed(gate_record_entries(tags)):
        if record is not None and record.get("alias_moved") in aliases:
            return record
    return None


def chain(model_uri: str, max_hops: int = 100) -> list[Hop]:
    """From ``model_uri`` back to its root, following ``selprune.parent_model_uri``."""
    from .resolve import resolve

    hops: list[Hop] = []
    uri: str | None = model_uri
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
            raise LineageError(
                f"lineage of {model_uri}: the link {uri} (parent of {hops[-1].uri}) is missing: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        hop = Hop(
            resolved.canonical_uri,
            resolved.registered_name,
            resolved.version,
            resolved.run_id,
            resolved.tags,
            resolved.version_tags,
        )
        if hop.kind == "incomplete":
            raise LineageError(f"{hop.uri} is an incomplete unlearned version (no {COMPLETE} tag); do not deploy it")
        hops.append(hop)
        uri = hop.tags.get(PARENT) if hop.is_unlearned else None
    return hops


def aliases_of(hop: Hop) -> list[str]:
    """The aliases that point at ``hop``'s version now."""
    if not hop.name or not hop.version:
        return []
    from .resolve import client

    return sorted(client().get_model_version(hop.name, hop.version).aliases or [])


def short(value) -> str:
    """A value as a finding quotes it: one line, at most 80 characters, whatever it holds."""
    import reprlib

    text = repr(value[:80]) if isinstance(value, str) else reprlib.repr(value)
    return text if len(text) <= 80 else text[:77] + "...'"


def refuse_if_denied(exc: BaseException) -> None:
    """A read the server refused (401/403) is a permission the user lacks, never a missing file or a finding:
    one permission line (exit 2)."""
    from .resolve import access_refused_message

    for cause in causes(exc):
        message = access_refused_message(cause)
        if message is not None:
            raise BadInputError(message) from None


def anchored_digest(run_id: str, param: str = LINEAGE_PARAM) -> str | None:
    """The record's sha256 that run ``run_id`` logged as its (immutable) ``param``, or None where it has none."""
    from .resolve import client

    return client().get_run(run_id).data.params.get(param)


@contextlib.contextmanager
def downloaded_run_artifact(run_id: str | None, path: str):
    """Inside: the local copy of a run artifact as stored now, or None where it is gone (a refusal of the store
    is the user's to fix: it is raised as such); the copy is removed on exit."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp))
        except Exception as exc:  # noqa: BLE001 - a refusal is the user's to fix; anything else: the file is gone
            refuse_if_denied(exc)
            if not isinstance(exc, (MlflowException, OSError)):
                raise
            local = None
        yield local if local is not None and local.is_file() else None


def run_artifact(run_id: str | None, path: str) -> bytes | None:
    """A run artifact's bytes as stored now (small files: records, masks, scores), or None where it is gone."""
    with downloaded_run_artifact(run_id, path) as local:
        return None if local is None else local.read_bytes()


def versions(name: str) -> tuple[list[Hop], dict[str, list[str]]]:
    """Every version of registered model ``name``, oldest first, and the aliases pointing at each."""
    from .resolve import client, did_you_mean

    found = client().search_model_versions(f"name='{name}'")
    if not found:
        raise BadInputError(f"registered model '{name}' has no versions{did_you_mean(name)}; check the name")
    hops = [
        Hop(
            f"models:/{mv.name}/{mv.version}",
            mv.name,
            str(mv.version),
            mv.run_id,
            recorded_tags(mv.run_id, dict(mv.tags or {})),
            dict(mv.tags or {}),
        )
        for mv in sorted(found, key=lambda mv: int(mv.version))
    ]
    aliases: dict[str, list[str]] = {}
    for alias, version in (client().get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    return hops, {v: sorted(a) for v, a in aliases.items()}
