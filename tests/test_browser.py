"""The version page and the HTML report, rendered by a real browser (headless Chromium) from a real
`mlflow server` on 127.0.0.1: what a reviewer opening the MLflow UI sees.

Debian's `chromium` is installed by `.ci/run`; under CI=true a missing browser fails the test, elsewhere it
skips.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_helpers import SMALL, TINY_NAME, MlflowServer, cli, server_store
from system_tools import missing

pytestmark = pytest.mark.slow(seconds=60)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from screenshots import CHROMIUM, render  # noqa: E402  (the script that makes docs/img from the demo)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        missing("Chromium", "no chromium on PATH")
    return CHROMIUM


def test_the_version_page_and_the_report_render_in_a_browser(tmp_path_factory, tiny_tokenizer, browser):
    root = tmp_path_factory.mktemp("browser")
    with MlflowServer(root) as srv, server_store(srv, tiny_tokenizer) as store:
        out = cli(
            "prune",
            "--model-uri",
            f"models:/{TINY_NAME}@base",
            "--forget",
            store["forget"],
            "--retain",
            store["retain"],
            "--ff-frac",
            "0.1",
            "--steps",
            "1",
            *SMALL,
            env=store["env"],
        )
        assert out.returncode == 0, out.stderr[-3000:]
        client = MlflowClient()
        version = max(client.search_model_versions(f"name='{TINY_NAME}'"), key=lambda v: int(v.version))
        metrics = client.get_run(version.run_id).data.metrics
        shots = os.environ.get("SELPRUNE_SCREENSHOTS")  # a directory: keep the two pages' screenshots there
        page = render(
            f"{srv.uri}/#/models/{TINY_NAME}/versions/{version.version}",
            root / "profile",
            screenshot=f"{shots}/version-page.png" if shots else None,
        )
        assert "Unlearned by selective pruning" in page, page[-3000:]
        assert "forget top-1" in page and "random control" in page
        assert f"mlflow-selprune lineage models:/{TINY_NAME}/{version.version} --verify" in page
        # the artifact as the server stores it (its raw endpoint sends files as downloads, which a headless
        # browser would save, not show)
        local = client.download_artifacts(version.run_id, "selprune/report.html", str(root))
        report = render(f"file://{local}", root / "profile", screenshot=f"{shots}/report.png" if shots else None)
        assert "what was unlearned" in report and "What the models say" in report, report[-3000:]
        assert f"{metrics['forget_top1']:.4f}" in report and f"{metrics['retain_top1']:.4f}" in report
        assert "data:image/png;base64," in report
