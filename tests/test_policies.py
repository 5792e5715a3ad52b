"""Standing policies: create, reconcile (report and --fix), status, history, on a real sqlite store."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from mlflow_helpers import TINY_NAME, invoke, register_tiny

SMALL = ["--paragraphs", "--max-length", "64", "--batch-size", "4", "--collect-tokens", "2000", "--eval-tokens", "1000"]
RECIPE = ["--ff-frac", "0.1", "--steps", "1", "--no-control", *SMALL]
GATE = ["--max-retain-drop", "1"]  # any result passes: these tests check the mechanics, not the model


def versions() -> dict[str, dict]:
    return {str(mv.version): dict(mv.tags) for mv in MlflowClient().search_model_versions(f"name='{TINY_NAME}'")}


def alias(name: str) -> str | None:
    return MlflowClient().get_registered_model(TINY_NAME).aliases.get(name)


def create_policy(store, *extra):
    return invoke(
        "policy",
        "create",
        "--model",
        TINY_NAME,
        "--name",
        "no-code",
        "--forget",
        store["forget"],
        "--retain",
        store["retain"],
        *RECIPE,
        *GATE,
        "--protect",
        "production",
        *extra,
    )


def test_a_policy_follows_every_base_version_and_keeps_its_alias_on_a_compliant_one(store, tiny_tokenizer):
    client = MlflowClient()
    client.set_registered_model_alias(TINY_NAME, "production", "1")
    out = create_policy(store)
    assert out.exit_code == 0, out.output
    assert "policy no-code r1" in out.stdout
    report = invoke("reconcile", "--model", TINY_NAME)
    assert report.exit_code == 1, report.output
    assert "v1 is a base version" in report.stdout
    fixed = invoke("reconcile", "--model", TINY_NAME, "--fix", "--no-progress")
    assert fixed.exit_code == 0, fixed.output
    tags = versions()
    children = [v for v, t in tags.items() if t.get("selprune.parent_model_uri") == f"models:/{TINY_NAME}/1"]
    assert len(children) == 1 and str(alias("production")) == children[0]
    again = invoke("reconcile", "--model", TINY_NAME, "--fix", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["actions"] == []
    assert versions() == tags  # nothing written the second time

    base = register_tiny(tiny_tokenizer, alias=None)
    assert invoke("reconcile", "--model", TINY_NAME, "--fix", "--no-progress").exit_code == 0
    new_children = [v for v, t in versions().items() if t.get("selprune.parent_model_uri") == base]
    assert len(new_children) == 1

    client.set_registered_model_alias(TINY_NAME, "production", base.rsplit("/", 1)[1])  # by hand, to the raw base
    seen = invoke("reconcile", "--model", TINY_NAME)
    assert seen.exit_code == 1 and "is a base version" in seen.stdout
    assert invoke("reconcile", "--model", TINY_NAME, "--fix").exit_code == 0
    assert str(alias("production")) == new_children[0]
    history = invoke("history", f"models:/{TINY_NAME}@production")
    assert history.exit_code == 0, history.output
    print(history.stdout)
    status = invoke("status", "--model", TINY_NAME)
    print(status.stdout)
    assert status.exit_code == 0
