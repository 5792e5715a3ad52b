"""What a reviewer sees: screenshots of an unlearned version's page in the MLflow UI and of its run's report.

Starts `mlflow ui` on 127.0.0.1 over a store the demo wrote, renders the version page and
``selprune/report.html`` in headless Chromium (Debian's ``chromium``) and writes
``version-page.png`` and ``report.png``. The README's screenshots come from it, after the demo:

    cd $(mktemp -d) && mlflow-selprune demo --no-progress
    python /path/to/examples/screenshots.py --store sqlite:///$PWD/mlflow.db --out /path/to/docs/img
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, profile, screenshot=None, height: int = 1600) -> str:
    """The DOM of ``url`` after its scripts ran (a virtual-time budget lets the UI fetch and draw); with
    ``screenshot``, also a PNG of the window there."""
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=30000",
        f"--window-size=1280,{height}",
    ]
    if screenshot is not None:
        subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    return subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="the tracking URI the demo wrote (sqlite:///.../mlflow.db)")
    parser.add_argument("--model", default="selprune-demo@unlearned", help="NAME@ALIAS or NAME/VERSION")
    parser.add_argument("--out", default="docs/img", help="where the two PNGs go")
    args = parser.parse_args()
    if CHROMIUM is None:
        print("no chromium on this machine (apt-get install chromium)", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=args.store)
    name, _, ref = args.model.replace("@", "/@").partition("/")
    version = (
        client.get_model_version_by_alias(name, ref[1:]) if ref.startswith("@") else client.get_model_version(name, ref)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            page = render(
                f"{url}/#/models/{name}/versions/{version.version}", Path(tmp) / "p", out / "version-page.png"
            )
            report = client.download_artifacts(version.run_id, "selprune/report.html", tmp)
            render(f"file://{report}", Path(tmp) / "p", out / "report.png", height=2400)
    finally:
        server.terminate()
        server.wait(timeout=60)
    if "Unlearned by selective pruning" not in page:
        print("the version page did not render its description", file=sys.stderr)
        return 1
    print(f"{out / 'version-page.png'} and {out / 'report.png'}: models:/{name}/{version.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
