"""Standing forget requests (policies): what every version of a registered model must have removed.

A policy names a registered model, the forget and retain DATA (with the sha256 of their documents as read when
it was made), the recipe (``PruneConfig``, ``DataOptions``, ``EvidenceOptions``, storage), the gate's
thresholds, the aliases it protects and, optionally, the public keys whose signatures it requires. Its body is
canonical JSON; its sha256 is its identity, which every version unlearned under it carries in its anchored
lineage (``selprune.policy`` = ``NAME@SHA256``).

Where it lives, in what MLflow already stores:

- each revision is a run of the experiment ``selprune-policies``: the body as ``selprune/policy.json``, its
  sha256 as the run's param ``selprune.policy_sha256`` (a param cannot be changed), and, signed, the body's
  in-toto statement as ``selprune/policy.dsse.json``;
- the registered model carries one tag per policy, ``selprune.policy.<NAME>``, naming its latest revision
  (what the MLflow UI shows).

Revisions form a chain (each body holds its predecessor's sha256); retiring writes a last revision that says
so, so nothing is ever lost. Readers take the body from the run, check it against the param, the chain and
the tag, and, where the policy names keys, its signature by one of the keys its predecessor named (the
first revision by one of its own).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from ..config import GATE_METRICS, DataOptions, EvidenceOptions, PruneConfig, SourceOptions
from ..errors import BadInputError
from . import lineage

EXPERIMENT = "selprune-policies"
TAG_PREFIX = "selprune.policy."  # on the registered model: selprune.policy.<NAME> -> the latest revision
BODY_ARTIFACT = "selprune/policy.json"
ENVELOPE_ARTIFACT = "selprune/policy.dsse.json"
BODY_PARAM = "selprune.policy_sha256"
PREDICATE = "https://mlflow-selprune.readthedocs.io/attestation/policy/v1"
RUN_MODEL_TAG = "selprune.policy_model"  # run tags that find a model's revisions (a search, never trusted alone)
RUN_NAME_TAG = "selprune.policy_name"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
THRESHOLDS = (
    "max_retain_drop",
    "min_forget_drop",
    "min_selectivity",
    "max_relearn_recovery",
    "max_code_pass_rate",
    "max_quantized_recovery",
)


class PolicyError(BadInputError):
    """A policy that cannot be made, found, or trusted; the message says which and what to do."""


@dataclass
class Policy:
    """One revision of a policy, as its body says (``sha256``: of that body, the policy's identity)."""

    body: dict
    sha256: str
    run_id: str | None = None
    findings: list[str] = field(default_factory=list)  # why it cannot be trusted; empty when it verifies
    notes: list[str] = field(default_factory=list)  # what is off but decides nothing (the UI's tag, say)

    name = property(lambda self: self.body.get("name"))
    model = property(lambda self: self.body.get("model"))
    revision = property(lambda self: self.body.get("revision"))
    retired = property(lambda self: bool(self.body.get("retired")))
    protect = property(lambda self: list(self.body.get("protect") or []))
    thresholds = property(lambda self: dict(self.body["gate"]))

    @property
    def ref(self) -> str:
        """What a version unlearned under this revision carries in its lineage."""
        return f"{self.name}@{self.sha256}"

    def recipe(self) -> tuple[PruneConfig, DataOptions, EvidenceOptions]:
        """The recipe's config objects, validated as ``prune`` validates them."""
        recipe = self.body["recipe"]
        data = DataOptions(**{k: v for k, v in recipe["data"].items() if k in _fields(DataOptions)})
        for side in ("source", "forget_source", "retain_source"):  # asdict made them dicts
            setattr(data, side, SourceOptions(**(recipe["data"].get(side) or {})))
        return (
            PruneConfig(**recipe["prune"]).validate(),
            data.validate(),
            EvidenceOptions(**recipe["evidence"]).validate(),
        )

    def config_sha256(self) -> str:
        """The ``selprune.config_sha256`` a version pruned with this recipe carries (``PrunePlan.full_config``)."""
        from ..unlearn import recipe_config

        return lineage.config_sha256(recipe_config(*self.recipe(), trust_remote_code=False))

    def trusted_keys(self) -> dict:
        """``{key id: public key}`` of the keys this revision requires signatures by (empty: none required)."""
        return _public_keys(self.body.get("trusted_keys") or {})


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _public_keys(pems: dict) -> dict:
    from .attest import key_id, public_key

    keys = [public_key(pem.encode()) for pem in pems.values()]
    return {key_id(key): key for key in keys}


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PolicyError(
            f"--name {name!r} cannot name a policy: use 1-64 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit"
        )


def documents_sha256(spec: str, source: SourceOptions) -> str:
    """The sha256 of the documents a DATA spec reads now (each one length-prefixed, in order): what a policy pins,
    independent of any model's tokenizer."""
    from ..data.sources import iter_texts, load_documents

    digest = hashlib.sha256()
    count = 0
    for text in iter_texts(load_documents(spec, source)):
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
        count += 1
    if count == 0:
        raise PolicyError(f"DATA {spec!r} holds no documents; a policy needs documents to forget and to keep")
    return digest.hexdigest()


def make_body(
    *,
    name: str,
    model: str,
    forget: str,
    retain: str | None,
    config: PruneConfig,
    data: DataOptions,
    evidence: EvidenceOptions,
    storage: str,
    thresholds: dict,
    protect: list[str],
    trusted_keys: dict,
    user: str,
) -> dict:
    """A first revision's body; every input already checked (``create`` checks the model and its aliases)."""
    check_name(name)
    if data.forget_classes is not None:
        raise PolicyError(
            "--forget-classes: a policy pins its DATA by the sha256 of its documents' text, which does not cover "
            "labels or images; give forget and retain DATA of documents"
        )
    forget, retain = _absolute(forget) or forget, _absolute(retain)  # the cron job or the receiver runs elsewhere
    sources = {side: data.source_for(side) for side in ("forget", "retain")}
    return {
        "schema": 1,
        "name": name,
        "model": model,
        "revision": 1,
        "previous_sha256": None,
        "retired": False,
        "forget": {"data": forget, "documents_sha256": documents_sha256(forget, sources["forget"])},
        "retain": {"data": retain, "documents_sha256": documents_sha256(retain, sources["retain"]) if retain else None},
        "recipe": {
            "prune": config.to_dict(),
            "data": data.to_dict(),
            "evidence": evidence.to_dict(),
            "storage": storage,
        },
        "gate": {**{k: thresholds.get(k) for k in THRESHOLDS}, "metric": thresholds.get("metric", "top1")},
        "protect": sorted(set(protect)),
        "trusted_keys": trusted_keys,
        "created": _now(),
        "user": user,
    }


def _absolute(spec: str | None) -> str | None:
    """A local DATA path as an absolute path (any other spec as it is)."""
    from pathlib import Path

    from ..data.specs import looks_like_path

    if spec and looks_like_path(spec) and Path(spec).expanduser().exists():
        return str(Path(spec).expanduser().resolve())
    return spec


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def body_bytes(body: dict) -> bytes:
    return lineage.canonical_json(body).encode()


def body_sha256(body: dict) -> str:
    return hashlib.sha256(body_bytes(body)).hexdigest()


# ----------------------------------------------------------------------------- writing


def check_model_and_aliases(model: str, protect: list[str]) -> None:
    """The model must exist and every protected alias must point at one of its versions now."""
    from .resolve import check_alias, registered_model

    if "'" in model or "`" in model:
        raise PolicyError(f"--model: '{model}': a policy cannot follow a model whose name holds a quote")
    for alias in protect:
        check_alias(alias, "--protect")
    registered = registered_model(model)
    missing = [a for a in protect if a not in (registered.aliases or {})]
    if missing:
        raise PolicyError(
            f"--protect: registered model '{model}' has no alias {', '.join('@' + a for a in missing)}; point it at a "
            "version first (a policy protects aliases that exist)"
        )


def write(body: dict, signing_key=None) -> Policy:
    """Log a revision (its body, anchored by a param; signed with ``signing_key`` when given), then point the
    model's tag at it. Where the process dies in between, the revision is in the run and the tag still names its
    predecessor: ``policies`` reads the run (the chain's newest), and the next write of the tag catches up."""
    from mlflow.entities import Param

    from . import attest
    from .resolve import client

    data = body_bytes(body)
    digest = hashlib.sha256(data).hexdigest()
    experiment = _experiment_id()
    run = client().create_run(
        experiment,
        run_name=f"policy {body['name']} r{body['revision']} of {body['model']}",
        tags={
            RUN_MODEL_TAG: body["model"],
            RUN_NAME_TAG: body["name"],
            "selprune.policy_revision": str(body["revision"]),
        },
    )
    run_id = run.info.run_id
    client().log_text(run_id, data.decode(), BODY_ARTIFACT)
    if signing_key is not None:
        envelope = attest.sign(
            attest.statement(f"policy:{body['model']}/{body['name']}", digest, PREDICATE, {"policy": body}), signing_key
        )
        client().log_text(run_id, envelope.decode(), ENVELOPE_ARTIFACT)
    # the params find the revision (a search no tag edit can steer) and anchor its body; they never change
    client().log_batch(
        run_id,
        params=[
            Param(RUN_MODEL_TAG, body["model"]),
            Param(RUN_NAME_TAG, body["name"]),
            Param(BODY_PARAM, digest),
        ],
    )
    client().set_terminated(run_id)
    pointer = {"revision": body["revision"], "sha256": digest, "run_id": run_id, "retired": bool(body["retired"])}
    client().set_registered_model_tag(body["model"], TAG_PREFIX + body["name"], json.dumps(pointer, sort_keys=True))
    return Policy(body, digest, run_id)


def _experiment_id() -> str:
    """The policies' experiment, made on first use (the active experiment of the caller is left alone)."""
    from mlflow.exceptions import MlflowException

    from .resolve import client

    found = client().get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    try:
        return client().create_experiment(EXPERIMENT)
    except MlflowException:  # made meanwhile by another writer
        made = client().get_experiment_by_name(EXPERIMENT)
        if made is None:
            raise
        return made.experiment_id


def check_successor(current: Policy, signing_key, writing: str) -> None:
    """Refuse, in one line, to write ``writing`` (a revision, a retirement) after ``current`` where it does not verify
    or where it requires a signature by one of its keys and ``signing_key`` is none of them."""
    from .attest import signs_for

    if current.findings:
        raise PolicyError(
            f"policy {current.name} does not verify, so its {writing} cannot be written: {current.findings[0]}"
        )
    keys = current.trusted_keys()
    if keys and not signs_for(signing_key, keys):
        raise PolicyError(
            f"--signing-key: policy {current.name} requires its {writing} signed by one of its keys; give one of them"
        )


def next_revision(current: Policy, user: str, **changes) -> dict:
    """The body of the revision after ``current`` (``changes``: e.g. ``retired=True``)."""
    body = json.loads(json.dumps(current.body))
    body.update(changes, revision=current.revision + 1, previous_sha256=current.sha256, created=_now(), user=user)
    return body


# ----------------------------------------------------------------------------- reading


def _revision_runs(model: str) -> list:
    """Every run, in any experiment, whose immutable params say it holds a revision of a policy of ``model`` (a run
    cannot be moved out of sight, nor its params changed; deleting it needs MANAGE)."""
    return _runs(f"params.`{RUN_MODEL_TAG}` = '{model}'")


def all_revision_runs() -> list:
    """Every policy revision run of every model."""
    return _runs(f"params.`{RUN_MODEL_TAG}` LIKE '%'")


def _runs(filter_string: str) -> list:
    from .resolve import all_pages, client

    experiments = [e.experiment_id for e in all_pages(client().search_experiments, max_results=1000)]
    runs: list = []
    for start in range(0, len(experiments), 100):  # a search takes at most 100 experiments
        batch = experiments[start : start + 100]
        runs += all_pages(client().search_runs, experiment_ids=batch, filter_string=filter_string, max_results=1000)
    return runs


def signed_by(policy: Policy, roots: dict) -> bool:
    """Whether the policy's revision is signed by one of ``roots`` (an operator's keys, given to ``reconcile``)."""
    return policy.run_id is not None and not _signature_findings(str(policy.name), policy, roots)


def body_problem(body) -> str | None:
    """Why a stored body is not a policy this code can follow, or None: a body is read from a run anyone with EDIT
    on its experiment can write, so every field is checked before anything reads it."""
    from .resolve import check_alias

    if not isinstance(body, dict):
        return "it is not a JSON object"
    kinds = {"schema": int, "name": str, "model": str, "revision": int, "retired": bool, "forget": dict}
    kinds.update(retain=dict, recipe=dict, gate=dict, protect=list, trusted_keys=dict)
    for key, kind in kinds.items():
        value = body.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"its {key} is {lineage.short(value)}, not a {kind.__name__}"
    if body["schema"] != 1 or body["revision"] < 1:
        return f"its schema {body['schema']} or revision {body['revision']} is not one this plugin reads"
    if not isinstance(body.get("previous_sha256"), (str, type(None))):
        return "its previous_sha256 is not text"
    if not (isinstance(body["forget"].get("data"), str) and isinstance(body["forget"].get("documents_sha256"), str)):
        return "its forget DATA or digest is not text"
    if not all(isinstance(body["retain"].get(k), (str, type(None))) for k in ("data", "documents_sha256")):
        return "its retain DATA or digest is not text"
    if set(body["gate"]) != {*THRESHOLDS, "metric"} or not all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        for k, v in body["gate"].items()
        if k != "metric"
    ):
        return "its gate is not the gate's thresholds"
    if not all(isinstance(alias, str) for alias in body["protect"]):
        return "its protected aliases are not all names"
    if body["gate"]["metric"] not in GATE_METRICS:
        return f"its gate metric is {lineage.short(body['gate']['metric'])}, not one of {', '.join(GATE_METRICS)}"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in body["trusted_keys"].items()):
        return "its keys are not text"
    try:
        for alias in body["protect"]:
            check_alias(alias, "protect")
        policy = Policy(body, "")
        policy.recipe()
        policy.trusted_keys()
    except Exception as exc:  # noqa: BLE001 - whatever a stored body makes the config classes or key loader raise
        return f"its recipe, aliases or keys do not load ({type(exc).__name__}: {lineage.short(str(exc))})"
    return None


def _read_revision(run, model: str) -> Policy | None:
    """The revision a run holds, checked against its param and for its shape; None where the run holds none (a
    write that died before its anchor)."""
    digest = run.data.params.get(BODY_PARAM)
    if digest is None:
        return None
    placeholder = {"name": run.data.params.get(RUN_NAME_TAG) or "?", "model": model, "revision": 0}
    stored = lineage.run_artifact(run.info.run_id, BODY_ARTIFACT)
    if stored is None or hashlib.sha256(stored).hexdigest() != digest:
        return Policy(
            placeholder,
            digest,
            run.info.run_id,
            [f"policy run {run.info.run_id}: its body {BODY_ARTIFACT} is missing or changed since it was anchored"],
        )
    body = _json(stored)
    problem = body_problem(body)
    if problem is not None:
        return Policy(placeholder, digest, run.info.run_id, [f"policy run {run.info.run_id}: its body: {problem}"])
    return Policy(body, digest, run.info.run_id)


def policies(model: str, include_retired: bool = False) -> list[Policy]:
    """The latest revision of each policy of ``model``, verified (each with its findings; empty: trusted)."""
    return [p for chain in chains(model).values() if (p := chain[-1]).findings or include_retired or not p.retired]


def chains(model: str) -> dict[str, list[Policy]]:
    """Every revision of each policy of ``model``, oldest first, the newest carrying every finding of the chain."""
    from .resolve import client

    by_name: dict[str, list[Policy]] = {}
    for run in _revision_runs(model):
        revision = _read_revision(run, model)
        if revision is not None:
            by_name.setdefault(str(revision.body.get("name")), []).append(revision)
    tags = client().get_registered_model(model).tags or {}
    for tag in tags:  # a policy the UI shows that no run holds: its runs were deleted, or the tag made up
        name = tag[len(TAG_PREFIX) :]
        if tag.startswith(TAG_PREFIX) and name not in by_name:
            finding = f"policy {name}: the model's tag {tag} names a revision that no policy run holds"
            by_name[name] = [Policy({"name": name, "model": model, "revision": 0}, "", None, [finding])]
    chains_ = {}
    for name, revisions in sorted(by_name.items()):
        revisions.sort(key=lambda p: (p.revision if isinstance(p.revision, int) else -1, p.sha256))
        newest = revisions[-1]
        newest.findings = [*newest.findings, *_chain_findings(model, name, revisions)]
        pointer = _json(tags.get(TAG_PREFIX + name))
        if isinstance(pointer, dict) and not all(isinstance(pointer.get(k), str) for k in ("run_id", "sha256")):
            pointer = {"run_id": lineage.short(pointer.get("run_id")), "revision": None, "sha256": None}
        known = {p.run_id: p.revision for p in revisions}
        if (
            isinstance(pointer, dict)
            and pointer.get("sha256") != newest.sha256
            and (
                pointer.get("run_id") not in known
                or not isinstance(pointer.get("revision"), int)
                or pointer["revision"] > (newest.revision or 0)
            )
        ):  # the UI names a revision the runs do not hold, or a later one: revisions were hidden, or made up
            newest.findings.append(
                f"policy {name}: the model's tag {TAG_PREFIX}{name} names {lineage.short(pointer.get('run_id'))} "
                f"(revision {lineage.short(pointer.get('revision'))}), which is not in the policy's revisions (newest: "
                f"r{newest.revision})"
            )
        elif not isinstance(pointer, dict) or pointer.get("sha256") != newest.sha256:
            newest.notes.append(
                f"note: policy {name}: the model's tag {TAG_PREFIX}{name} does not name its latest revision "
                f"(r{newest.revision}, sha256 {newest.sha256[:16]}): edited, or its write did not finish; the "
                "revision runs decide, and the next `policy create` or `retire` rewrites it"
            )
        chains_[name] = revisions
    return chains_


def _chain_findings(model: str, name: str, revisions: list[Policy]) -> list[str]:
    """What is wrong with a policy's revisions: a broken chain, a body of another model or name, a signature a
    required key did not make."""
    found = [line for p in revisions[:-1] for line in p.findings]
    previous = None
    for number, p in enumerate(revisions, start=1):
        if p.findings and p is not revisions[-1]:
            continue
        body = p.body
        if body.get("model") != model or body.get("name") != name or body.get("revision") != number:
            found.append(
                f"policy {name}: revision run {p.run_id} holds {lineage.short(body.get('name'))} revision "
                f"{lineage.short(body.get('revision'))} of {lineage.short(body.get('model'))}, not revision {number}"
            )
        elif body.get("previous_sha256") != (previous.sha256 if previous else None):
            found.append(
                f"policy {name}: revision {number} does not follow revision {number - 1} (its previous_sha256 differs)"
            )
        required = (previous or p).trusted_keys() if not p.findings else {}
        if required:
            found += _signature_findings(name, p, required)
        previous = p
    return found


def _signature_findings(name: str, p: Policy, required: dict) -> list[str]:
    from . import attest

    envelope = lineage.run_artifact(p.run_id, ENVELOPE_ARTIFACT)
    if envelope is None:
        return [f"policy {name}: revision {p.revision} is unsigned, and the policy requires a signature"]
    try:
        signed, _ = attest.open_envelope(envelope, required)
    except attest.InvalidAttestation as exc:
        return [f"policy {name}: revision {p.revision}: {exc}"]
    if (
        attest.claim(signed, "subject", 0, "digest", "sha256") != p.sha256
        or attest.claim(signed, "predicateType") != PREDICATE
    ):
        return [f"policy {name}: revision {p.revision}: its signed statement is of another body"]
    return []


def _json(text):
    try:
        return json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None


def get(model: str, name: str) -> Policy:
    """The latest revision of policy ``name`` of ``model`` (retired or not), or one line saying what exists."""
    found = chains(model)
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise PolicyError(f"--name: registered model '{model}' has no policy '{name}' (its policies: {known})")
    return found[name][-1]
