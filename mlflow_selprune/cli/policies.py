"""Policies: ``policy create|show|list|retire``, ``reconcile``, ``status`` and ``history``.

A policy is a standing forget request (``registry.policy``); ``reconcile`` makes the registry match it, once per
call (cron, ``mlflow run . -e reconcile``, or the webhook receiver); ``status`` and ``history`` read.
Exit codes as everywhere: 0 all compliant, 1 something is not (or a finding), 2 bad input, 3 unexpected.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from ..config import DataOptions, EvidenceOptions, PruneConfig, SourceOptions
from .common import (
    SIGNING_KEY,
    EXIT_GATE_FAILED,
    EXIT_OK,
    NO_PROGRESS,
    _no_progress_bars,
    _announce_store,
    _say_store,
    config_from,
    config_options,
    data_from,
    handle_errors,
    main,
    no_progress_option,
    threshold_options,
)

TRUSTED_KEYS = click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    metavar="PUB.pem",
    help="Check signatures against this Ed25519 public key (repeatable; default: $SELPRUNE_TRUSTED_KEYS).",
)


# the gate's --max-retain-drop is the policy's threshold; a budget recipe's limit takes this name instead
BUDGET_RETAIN_FLAG = "--budget-max-retain-drop"


def _recipe_options(func):
    """``prune``'s DATA and recipe options, spelled as there (but for the budget's retain limit: the gate's
    ``--max-retain-drop`` is the policy's threshold, so the budget's is ``--budget-max-retain-drop``)."""
    recipe = tuple(f.name for f in dataclasses.fields(PruneConfig) if f.name != "max_retain_drop")
    for decorator in (
        config_options(PruneConfig, only=recipe),
        click.option(
            BUDGET_RETAIN_FLAG,
            "budget_max_retain_drop",
            type=float,
            default=None,
            help="Budget mode (prune's --max-retain-drop): never keep a step that pushes the retain drop past this.",
        ),
        config_options(EvidenceOptions),
        config_options(DataOptions),
        config_options(SourceOptions),
        config_options(SourceOptions, prefix="forget_"),
        config_options(SourceOptions, prefix="retain_"),
    ):
        func = decorator(func)
    return func


@main.group()
def policy():
    """Standing forget requests: what every version of a registered model must have removed."""


@policy.command("create")
@click.option("--model", required=True, help="Registered model the policy follows (every version of it).")
@click.option("--name", "policy_name", required=True, help="The policy's name (a second create makes a new revision).")
@click.option("--forget", required=True, help="DATA to forget, as prune takes it; its documents' sha256 is pinned.")
@click.option("--retain", default=None, help="DATA to keep, as prune takes it; its documents' sha256 is pinned.")
@_recipe_options
@click.option("--storage", type=click.Choice(["full", "delta"]), default="full", show_default=True, help="As prune's.")
@threshold_options
@click.option(
    "--protect", multiple=True, metavar="ALIAS", help="An alias only compliant versions may hold (repeatable)."
)
@click.option(
    "--trusted-key",
    "require_keys",
    multiple=True,
    metavar="PUB.pem",
    help="Require every version, decision and revision under this policy to be signed by this key (repeatable).",
)
@SIGNING_KEY
@no_progress_option
@handle_errors
def create(model, policy_name, forget, retain, storage, protect, require_keys, signing_key, **kw):
    """Make (or revise) a policy: its DATA, recipe, gate thresholds and protected aliases, digested and kept in the
    registry."""
    from ..registry import attest, policy as policies
    from ..registry.gate import check_thresholds
    from ..registry.resolve import acting_user
    from ..unlearn import check_data_specs

    _say_store()
    policies.check_name(policy_name)
    config = dataclasses.replace(config_from(PruneConfig, kw), max_retain_drop=kw["budget_max_retain_drop"]).validate()
    data = data_from(kw).validate()
    evidence = config_from(EvidenceOptions, kw).validate()
    thresholds = {k: kw[k] for k in policies.THRESHOLDS}
    check_thresholds(set_alias=None, **thresholds)
    check_data_specs(forget, retain, data)
    key = attest.load_signing_key(signing_key)
    required = _required_keys(require_keys, key)
    _announce_store(require_existing=True)
    policies.check_model_and_aliases(model, list(protect))
    body = policies.make_body(
        name=policy_name,
        model=model,
        forget=forget,
        retain=retain,
        config=config,
        data=data,
        evidence=evidence,
        storage=storage,
        thresholds={**thresholds, "metric": kw["metric"]},
        protect=list(protect),
        trusted_keys=required,
        user=acting_user(),
    )
    body = _after_current(model, policy_name, body, key)
    written = policies.write(body, key)
    click.echo(
        f"policy {written.name} r{written.revision} of '{model}': sha256 {written.sha256[:16]} (run {written.run_id})"
        + (f"; protects {', '.join('@' + a for a in written.protect)}" if written.protect else "")
        + ("; signed" if key is not None else "")
    )


def _required_keys(paths, key) -> dict:
    """``{key id: PEM}`` of the keys a policy requires; the revision that names them is signed by one of them."""
    from ..errors import BadInputError
    from ..registry import attest

    keys = attest.load_trusted_keys(list(paths)) if paths else {}
    if keys and not attest.signs_for(key, keys):
        raise BadInputError(
            "--trusted-key: a policy that requires signatures is itself signed by one of its keys; give --signing-key "
            "with the private key of one of them"
        )
    return {kid: attest.public_pem(pub) for kid, pub in sorted(keys.items())}


def _after_current(model: str, name: str, body: dict, key) -> dict:
    """``body`` as the next revision of policy ``name`` where one exists (which must verify, and whose keys, if it
    names any, must include the one signing this revision)."""
    from ..registry import policy as policies

    chain = policies.chains(model).get(name)
    if not chain:
        return body
    current = chain[-1]
    policies.check_successor(current, key, "next revision")
    changes = {k: v for k, v in body.items() if k not in ("revision", "previous_sha256", "created", "user")}
    return policies.next_revision(current, body["user"], **changes)


@policy.command("retire")
@click.option("--model", required=True, help="Registered model.")
@click.option(
    "--name", "policy_name", required=True, help="The policy to retire (its revisions stay, and its history)."
)
@SIGNING_KEY
@handle_errors
def retire(model, policy_name, signing_key):
    """Stop following a policy: a last revision that says it is retired (nothing is deleted)."""
    from ..errors import BadInputError
    from ..registry import attest, policy as policies
    from ..registry.resolve import acting_user

    _say_store()
    key = attest.load_signing_key(signing_key)
    _announce_store(require_existing=True)
    current = policies.get(model, policy_name)
    if current.retired:
        raise BadInputError(f"--name: policy {policy_name} of '{model}' is retired already (r{current.revision})")
    policies.check_successor(current, key, "retirement")
    written = policies.write(policies.next_revision(current, acting_user(), retired=True), key)
    click.echo(f"policy {policy_name} of '{model}' retired (r{written.revision}, sha256 {written.sha256[:16]})")


@policy.command("show")
@click.option("--model", required=True, help="Registered model.")
@click.option("--name", "policy_name", required=True, help="The policy.")
@click.option("--json", "as_json", is_flag=True, help="Print the body and its checks as JSON.")
@handle_errors
def show(model, policy_name, as_json):
    """A policy's latest revision, verified: its body, digest, run, and what does not verify (exit 1)."""
    from ..registry import policy as policies

    _announce_store(require_existing=True)
    current = policies.get(model, policy_name)
    if as_json:
        click.echo(json.dumps(_policy_dict(current), indent=2))
    else:
        click.echo(
            f"policy {current.name} r{current.revision} of '{model}' (sha256 {current.sha256}, run {current.run_id})"
        )
        if current.body.get("forget"):
            click.echo(json.dumps(current.body, indent=2, sort_keys=True))
        for line in current.notes + current.findings:
            click.echo(line)
    sys.exit(EXIT_GATE_FAILED if current.findings else EXIT_OK)


def _policy_dict(p) -> dict:
    return {
        "name": p.name,
        "revision": p.revision,
        "sha256": p.sha256,
        "run_id": p.run_id,
        "retired": p.retired,
        "body": p.body,
        "findings": p.findings,
        "notes": p.notes,
    }


@policy.command("list")
@click.option("--model", default=None, help="Only this registered model's policies (default: every model's).")
@click.option("--retired", is_flag=True, help="Also the retired ones.")
@handle_errors
def list_policies(model, retired):
    """Every policy: model, name, revision, digest, protected aliases, verified or not."""
    from ..reconcile import check_model, models_with_policies
    from ..registry import policy as policies

    _announce_store(require_existing=True)
    if model is not None:
        check_model(model)
    for name in [model] if model else models_with_policies():
        for p in policies.policies(name, include_retired=retired):
            state = "DOES NOT VERIFY" if p.findings else ("retired" if p.retired else "active")
            protects = " ".join("@" + a for a in p.protect) or "-"
            click.echo(f"{name}  {p.name}  r{p.revision}  {p.sha256[:16]}  {protects}  {state}")


@main.command()
@click.option("--model", default=None, help="Only this registered model (default: every model with a policy).")
@click.option("--fix", is_flag=True, help="Prune, gate and register what is missing; move protected aliases back.")
@SIGNING_KEY
@click.option(
    "--trusted-key",
    "roots",
    multiple=True,
    metavar="PUB.pem",
    help="Follow only policies signed by this Ed25519 public key (repeatable; default: $SELPRUNE_TRUSTED_KEYS); "
    "others are reported, not followed.",
)
@click.option(
    "--seen",
    multiple=True,
    hidden=True,
    metavar="ALIAS=VERSION@UNIXTIME",
    help="An alias move a webhook delivery reported (the receiver passes it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status rows, actions and problems as JSON.")
@NO_PROGRESS
@handle_errors
def reconcile(model, fix, signing_key, roots, seen, as_json, no_progress):
    """One idempotent pass: is every version followed by a compliant unlearned child, and does every protected
    alias point at one? With --fix, make it so. Exit 0 when all comply, 1 when not."""
    from ..registry.attest import load_signing_key, load_trusted_keys

    _say_store()
    load_signing_key(signing_key)  # a bad key answers before the store is touched
    trusted = load_trusted_keys(list(roots)) or None  # none given: $SELPRUNE_TRUSTED_KEYS, if set
    deliveries = [_delivery(text) for text in seen]
    _announce_store(require_existing=True)
    from ..reconcile import Pass, reconcile as run_reconcile

    settings = Pass(
        fix=fix,
        signing_key=signing_key,
        seen_by="webhook" if deliveries else "reconcile",
        progress=_no_progress_bars(no_progress),
        roots=trusted,
        seen=deliveries,
    )
    report = run_reconcile(model, settings)
    _print_report(report, as_json)
    sys.exit(EXIT_OK if report.compliant else EXIT_GATE_FAILED)


def _delivery(text: str) -> tuple[str, str, int]:
    import re

    from ..errors import BadInputError

    match = re.fullmatch(r"([\w\-]{1,255})=(\d{1,12})@(\d{1,12})", text)
    if match is None:
        raise BadInputError(f"--seen {text!r}: expected ALIAS=VERSION@UNIXTIME")
    return match[1], match[2], int(match[3])


@main.command()
@click.option("--model", default=None, help="Only this registered model (default: every model with a policy).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@handle_errors
def status(model, as_json):
    """One table: each model, its policies, their protected aliases, the version each points to, compliant or not
    and why (reads only; `reconcile --fix` writes the same table into the model's description)."""
    _announce_store(require_existing=True)
    from ..reconcile import reconcile as run_reconcile

    report = run_reconcile(model)
    _print_report(report, as_json, actions=False)
    sys.exit(EXIT_OK if report.compliant else EXIT_GATE_FAILED)


def _print_report(report, as_json: bool, actions: bool = True) -> None:
    from ..registry.compliance import table

    if as_json:
        click.echo(json.dumps({"rows": report.rows, "actions": report.actions, "problems": report.problems}, indent=2))
        return
    if actions:
        for line in report.actions:
            click.echo(f"did: {line}")
    for line in table(report.rows) if report.rows else ["no policies"]:
        click.echo(line)
    for line in report.problems:
        click.echo(f"not compliant: {line}")


@main.command()
@click.argument("alias_uri", metavar="models:/NAME@ALIAS")
@TRUSTED_KEYS
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@handle_errors
def history(alias_uri, trusted_keys, as_json):
    """Who pointed an alias where, when, and by which decision (gate, prune --alias, reconcile, or a move by hand
    seen by a webhook or by reconcile)."""
    import re

    from ..errors import BadInputError
    from ..registry.attest import load_trusted_keys
    from ..registry.history import alias_history

    match = re.fullmatch(r"models:/([^/@]+)@([\w\-]+)", alias_uri or "")
    if match is None:
        raise BadInputError(f"'{alias_uri}' is not an alias URI; give models:/NAME@ALIAS")
    trusted = load_trusted_keys(trusted_keys) or None
    _announce_store(require_existing=True)
    from ..reconcile import check_model

    check_model(match[1])
    rows, now = alias_history(match[1], match[2], trusted)
    if as_json:
        click.echo(json.dumps({"alias": alias_uri, "now": now, "history": rows}, indent=2))
        return
    columns = ("time", "version", "event", "user", "signature", "what")
    cells = [columns] + [tuple(str(row[c]) for c in columns) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns) - 1)]
    for line in cells:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1])
    click.echo(f"now: {alias_uri} -> " + (f"version {now}" if now else "no version (the alias is not set)"))
