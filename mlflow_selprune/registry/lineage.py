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

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BadInputError, causes

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
# dead in the version (its parent's dead neurons and this run's): a chain's totals add up
FF_PRUNED_TOTAL = PREFIX + "ff_pruned_total"
ATTN_PRUNED_TOTAL = PREFIX + "attn_pruned_total"
PLUGIN_VERSION = PREFIX + "plugin_version"
COMPLETE = PREFIX + "complete"
METRIC_PREFIX = PREFIX + "metric."
# One tag per gate decision, never overwritten: selprune.gate.<UTC time>-<random>, a JSON record.
GATE_RECORD_PREFIX = PREFIX + "gate."
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
LINEAGE_RECORD = "selprune/lineage.json"
GATE_ARTIFACT_DIR = "selprune/gate"  # gate records too long for a tag, whole, with their digest in the tag
LINEAGE_PARAM = PREFIX + "lineage_sha256"

# The metrics kept as version tags: what a gate or an auditor reads without opening the run.
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


def lineage_tags(tags: dict) -> dict[str, str]:
    """The tags a lineage record covers: every ``selprune.*`` tag but the gate records, appended later by design."""
    return {k: v for k, v in tags.items() if k.startswith(PREFIX) and not k.startswith(GATE_RECORD_PREFIX)}


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


def metrics_from_tags(tags: dict) -> dict[str, float]:
    return {k[len(METRIC_PREFIX) :]: float(v) for k, v in tags.items() if k.startswith(METRIC_PREFIX)}


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

    @property
    def kind(self) -> str:
        """root, unlearned, or incomplete (a parent tag without ``selprune.complete``: never deploy it)."""
        if not self.is_unlearned:
            return "root"
        return "unlearned" if self.tags.get(COMPLETE) == "true" else "incomplete"

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
            "ff_pruned_total": int(t[FF_PRUNED_TOTAL]) if FF_PRUNED_TOTAL in t else None,
            "attn_pruned_total": int(t[ATTN_PRUNED_TOTAL]) if ATTN_PRUNED_TOTAL in t else None,
            "weights_sha256": t.get(WEIGHTS_SHA),
            "config_sha256": t.get(CONFIG_SHA),
            "metrics": metrics_from_tags(t),
            "trust_remote_code": t.get(TRUST_REMOTE_CODE),
            "storage": t.get(STORAGE, "full"),
            "gate_decisions": gate_records(t),
            "source": {k[len(SOURCE_PREFIX) :]: v for k, v in sorted(t.items()) if k.startswith(SOURCE_PREFIX)},
        }


def gate_records(tags: dict) -> list[dict]:
    """Every gate decision recorded on a version, oldest first; one that is not JSON reads as
    ``{"unreadable": KEY}`` (and is a finding of ``check_gate_records``), never silently dropped."""
    records = []
    for key in sorted(k for k in tags if k.startswith(GATE_RECORD_PREFIX)):
        try:
            record = json.loads(tags[key])
        except ValueError:
            record = None
        records.append(record if isinstance(record, dict) else {"unreadable": key})
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
        hop = Hop(resolved.canonical_uri, resolved.registered_name, resolved.version, resolved.run_id, resolved.tags)
        if hop.is_unlearned and hop.tags.get(COMPLETE) != "true":
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


# ----------------------------------------------------------------------------- tamper evidence

OK, CHANGED, NOT_APPLICABLE = "ok", "CHANGED", "-"
CHECKS = ("weights", "parent", "tags", "artifacts", "files", "signature")


@dataclass
class Audit:
    """What verifying one version found: a status per check, one line per finding (exit 1) and per note."""

    hop: Hop
    status: dict = field(default_factory=lambda: dict.fromkeys(CHECKS, NOT_APPLICABLE))
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    actual_weights_sha256: str | None = None

    def ok(self, check: str) -> None:
        if self.status[check] == NOT_APPLICABLE:
            self.status[check] = OK

    def tampered(self, check: str, message: str) -> None:
        self.status[check] = CHANGED
        self.findings.append(f"tampered: {self.hop.uri}: {message}")

    def to_dict(self) -> dict:
        return {
            "kind": self.hop.kind,
            "checks": dict(self.status),
            "findings": list(self.findings),
            "notes": list(self.notes),
        }


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "...'"


def _run_of(hop: Hop) -> str | None:
    """The run that made the version: the registry's own field (not a tag anyone can edit), else the tag."""
    return hop.run_id or hop.tags.get(RUN_ID)


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


def run_artifact(run_id: str | None, path: str) -> bytes | None:
    """A run artifact's bytes as stored now (small files: records, masks, scores), or None where it is gone."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp))
        except Exception as exc:  # noqa: BLE001 - a refusal is the user's to fix; anything else: the file is gone
            refuse_if_denied(exc)
            if not isinstance(exc, (MlflowException, OSError)):
                raise
            return None
        return local.read_bytes() if local.is_file() else None


def _weights(uri: str, dtype: str | None, cache: dict) -> tuple[str, str]:
    """``(digest, dtype)`` of the model at ``uri`` loaded in ``dtype`` (None: as stored); each model loads once."""
    if (uri, dtype) not in cache:
        from .loading import load_components
        from .resolve import resolve

        model, _ = load_components(resolve(uri), dtype=dtype)
        loaded = str(model.dtype).removeprefix("torch.")
        cache[(uri, dtype)] = cache[(uri, loaded)] = (weights_sha256(model), loaded)
        del model
    return cache[(uri, dtype)]


def check_tags(audit: Audit) -> None:
    """The version's selprune tags against the record its run anchored: an edited tag cannot hide."""
    from mlflow.exceptions import MlflowException

    hop, run_id = audit.hop, _run_of(audit.hop)
    try:
        anchored = anchored_digest(run_id) if run_id else None
    except MlflowException as exc:
        refuse_if_denied(exc)
        audit.tampered("tags", f"its run {run_id} cannot be read ({str(exc).splitlines()[0]})")
        return
    if anchored is None:
        if hop.is_unlearned:
            audit.notes.append(
                f"note: {hop.uri}: its run holds no lineage record (made by an older plugin); "
                "its tags cannot be checked"
            )
        return
    record = run_artifact(run_id, LINEAGE_RECORD)
    if record is None:
        audit.tampered("tags", f"the lineage record artifact {LINEAGE_RECORD} of run {run_id} is missing")
        return
    actual = hashlib.sha256(record).hexdigest()
    if actual != anchored:
        audit.tampered(
            "tags",
            f"the lineage record artifact changed: {LINEAGE_RECORD} of run {run_id} has sha256 "
            f"{actual[:16]}, the run param {LINEAGE_PARAM} records {anchored[:16]}",
        )
        return
    recorded, now = json.loads(record), lineage_tags(hop.tags)
    for key in sorted(recorded.keys() | now.keys()):
        if key not in now:
            audit.tampered("tags", f"tag {key} removed (recorded {_short(recorded[key])})")
        elif key not in recorded:
            audit.tampered("tags", f"tag {key} added (now {_short(now[key])})")
        elif recorded[key] != now[key]:
            audit.tampered("tags", f"tag {key} changed: recorded {_short(recorded[key])}, now {_short(now[key])}")
    audit.ok("tags")


def check_gate_records(audit: Audit) -> None:
    """Each gate decision must parse, and one kept whole in an artifact must match the digest in its tag."""
    tags = audit.hop.tags
    for key in sorted(k for k in tags if k.startswith(GATE_RECORD_PREFIX)):
        try:
            record = json.loads(tags[key])
        except ValueError:
            record = None
        if not isinstance(record, dict):
            audit.tampered("tags", f"gate record {key} is not a JSON record: {_short(tags[key])}")
            continue
        if "record_sha256" in record:
            stored = run_artifact(_run_of(audit.hop), str(record.get("record_artifact")))
            if stored is None or hashlib.sha256(stored).hexdigest() != record["record_sha256"]:
                audit.tampered(
                    "tags",
                    f"gate record {key}: its full record {record.get('record_artifact')} is "
                    f"{'missing' if stored is None else 'changed'}",
                )


def check_artifacts(audit: Audit) -> None:
    """The run's masks, scores and pruning record against their digests: the evidence of what was pruned."""
    recorded = audit.hop.tags.get(ARTIFACTS_SHA)
    if recorded is None:
        return
    try:
        recorded = json.loads(recorded)
    except ValueError:
        audit.tampered("artifacts", f"tag {ARTIFACTS_SHA} is not JSON")
        return
    run_id = _run_of(audit.hop)
    for path, digest in sorted(recorded.items()):
        stored = run_artifact(run_id, path)
        if stored is None:
            audit.tampered("artifacts", f"artifact {path} of run {run_id} is missing")
        elif (actual := hashlib.sha256(stored).hexdigest()) != digest:
            audit.tampered(
                "artifacts", f"artifact {path} of run {run_id} changed: sha256 {actual[:16]}, recorded {digest[:16]}"
            )
    audit.ok("artifacts")


def check_files(audit: Audit) -> None:
    """Every file of the model directory (config, tokenizer, MLmodel, weights, the record's copies) against the
    manifest recorded when the version was made, whose digest the (verified) tags hold."""
    from mlflow.exceptions import MlflowException

    from . import manifest

    recorded_digest = audit.hop.tags.get(MANIFEST_SHA)
    if recorded_digest is None:
        return
    run_id = _run_of(audit.hop)
    stored = run_artifact(run_id, manifest.MANIFEST_ARTIFACT)
    if stored is None:
        audit.tampered("files", f"the manifest {manifest.MANIFEST_ARTIFACT} of run {run_id} is missing")
        return
    if (actual := hashlib.sha256(stored).hexdigest()) != recorded_digest:
        audit.tampered(
            "files",
            f"the manifest {manifest.MANIFEST_ARTIFACT} of run {run_id} changed: sha256 "
            f"{actual[:16]}, recorded {recorded_digest[:16]}",
        )
        return
    try:
        now = manifest.of_artifacts(audit.hop.uri)
    except (MlflowException, OSError) as exc:
        audit.tampered("files", f"the model files cannot be read ({str(exc).splitlines()[0][:120]})")
        return
    for difference in manifest.differences(json.loads(stored)["files"], now):
        audit.tampered("files", difference)
    audit.ok("files")


def check_signatures(audit: Audit, trusted: dict, parent_manifest: str | None) -> None:
    """With trusted keys: an unlearned version must carry a statement signed by one of them that says what its
    verified tags say, and every gate decision that moved an alias must be signed the same way."""
    from . import attest

    hop, run_id = audit.hop, _run_of(audit.hop)

    def opened(path: str | None, recorded_digest: str | None, what: str):
        envelope = run_artifact(run_id, path) if path and recorded_digest else None
        if envelope is None:
            audit.tampered("signature", f"unsigned: {what} has no signed attestation, and --trusted-key requires one")
            return None
        if attest.envelope_sha256(envelope) != recorded_digest:
            audit.tampered("signature", f"{what}: its attestation {path} changed since it was recorded")
            return None
        try:
            return attest.open_envelope(envelope, trusted)[0]
        except attest.InvalidAttestation as exc:
            audit.tampered("signature", f"{what}: {exc}")
            return None

    if hop.is_unlearned:
        signed = opened(attest.ATTESTATION_ARTIFACT, hop.tags.get(ATTESTATION_SHA), "the version")
        if signed is not None:
            expected = attest.unlearning_predicate(hop.tags, parent_manifest)
            claims = {
                "predicate type": (signed.get("predicateType"), attest.UNLEARNING_PREDICATE),
                "subject": (signed.get("subject", [{}])[0].get("digest", {}).get("sha256"), hop.tags.get(MANIFEST_SHA)),
                "run": (signed.get("predicate", {}).get("run_id"), run_id),
                "parent manifest": (
                    signed.get("predicate", {}).get("parent", {}).get("manifest_sha256"),
                    parent_manifest,
                ),
                "lineage": (signed.get("predicate", {}).get("lineage_tags"), expected["lineage_tags"]),
            }
            for name, (said, now) in claims.items():
                if said != now:
                    audit.tampered(
                        "signature",
                        f"the signed statement's {name} is not the version's "
                        f"({_short(said)} signed, {_short(now)} now)",
                    )
    for key in sorted(k for k in hop.tags if k.startswith(GATE_RECORD_PREFIX)):
        try:
            record = json.loads(hop.tags[key])
        except ValueError:
            continue  # check_gate_records names it
        if not isinstance(record, dict) or not record.get("alias_moved"):
            continue
        what = f"gate decision {key} (moved @{record['alias_moved']})"
        signed = opened(record.get("attestation_artifact"), record.get("attestation_sha256"), what)
        if signed is None:
            continue
        decision = signed.get("predicate", {}).get("decision", {})
        if (
            signed.get("predicateType") != attest.GATE_PREDICATE
            or signed.get("predicate", {}).get("model_version") != hop.uri
            or decision.get("alias_requested") != record["alias_moved"]
            or any(decision.get(k) != record.get(k) for k in ("time", "verdict", "thresholds", "user"))
        ):
            audit.tampered("signature", f"{what}: the signed decision is not the recorded one")
    audit.ok("signature")


def check_weights(audit: Audit, cache: dict) -> str:
    """The version's weights against the digest recorded when it was made; returns the dtype they load in."""
    actual, dtype = _weights(audit.hop.uri, None, cache)
    audit.actual_weights_sha256 = actual
    recorded = audit.hop.tags.get(WEIGHTS_SHA)
    if actual != recorded:
        audit.tampered("weights", f"weights changed: sha256 {actual[:16]}, recorded {str(recorded)[:16]}")
    audit.ok("weights")
    return dtype


def check_parent(audit: Audit, dtype: str, cache: dict) -> None:
    """The parent's weights against the digest taken before pruning: a changed parent voids the comparison.

    The parent is loaded in the version's dtype, as ``prune --dtype`` loaded it.
    """
    recorded = audit.hop.tags.get(PARENT_WEIGHTS_SHA)
    if recorded is None:
        return
    parent = audit.hop.tags[PARENT]
    actual, _ = _weights(parent, dtype, cache)
    if actual != recorded:
        audit.tampered(
            "parent",
            f"parent {parent} weights changed since this version was made: sha256 "
            f"{actual[:16]}, recorded {recorded[:16]}",
        )
    audit.ok("parent")


def audit(hop: Hop, cache: dict, strict: bool = True, trusted: dict | None = None) -> Audit:
    """Every check on one version. ``cache`` holds weights digests across versions (each model loads once);
    ``strict``: a model that cannot be loaded raises (else it is a finding, so a table of versions goes on);
    ``trusted``: key id -> public key; signatures by one of them are then required (None: not checked)."""
    result = Audit(hop)
    check_tags(result)
    check_gate_records(result)
    if trusted is not None:
        check_signatures(result, trusted, _parent_manifest(hop))
    if hop.kind == "incomplete":
        result.findings.append(
            f"incomplete: {hop.uri}: an unlearned version without {COMPLETE} "
            "(its prune did not finish); do not deploy it"
        )
    if hop.kind == "incomplete" or (hop.kind == "root" and WEIGHTS_SHA not in hop.tags):
        return result
    check_artifacts(result)
    check_files(result)
    if result.status["files"] == CHANGED:  # files that fail their manifest are never loaded (nor their code run)
        result.notes.append(f"note: {hop.uri}: weights not loaded: its files do not match their manifest")
        return result
    try:
        dtype = check_weights(result, cache)
        if hop.kind == "unlearned":
            check_parent(result, dtype, cache)
    except BadInputError as exc:
        if strict:
            raise
        result.findings.append(f"unverifiable: {hop.uri}: {str(exc).splitlines()[0]}")
    return result


def _parent_manifest(hop: Hop) -> str | None:
    """The parent's manifest digest as its tags say now (verified as that hop of the chain)."""
    if not hop.is_unlearned:
        return None
    from .resolve import resolve

    try:
        return resolve(hop.tags[PARENT]).tags.get(MANIFEST_SHA)
    except BadInputError:
        return None


def versions(name: str) -> tuple[list[Hop], dict[str, list[str]]]:
    """Every version of registered model ``name``, oldest first, and the aliases pointing at each."""
    from .resolve import client, did_you_mean

    found = client().search_model_versions(f"name='{name}'")
    if not found:
        raise BadInputError(f"registered model '{name}' has no versions{did_you_mean(name)}; check the name")
    hops = [
        Hop(f"models:/{mv.name}/{mv.version}", mv.name, str(mv.version), mv.run_id, dict(mv.tags or {}))
        for mv in sorted(found, key=lambda mv: int(mv.version))
    ]
    aliases: dict[str, list[str]] = {}
    for alias, version in (client().get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    return hops, {v: sorted(a) for v, a in aliases.items()}
