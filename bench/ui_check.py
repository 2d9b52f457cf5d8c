"""The MLflow UI over a sweep's store, checked in a real (headless) browser.

    apt-get install chromium                                    # Debian's package
    python -m bench.ui_check --tracking-uri sqlite:///$PWD/mlflow.db --screenshot docs/figures/mlflow-runs.png

Starts ``mlflow ui`` on a free loopback port over the store, opens the sweep's runs table (the link the
launcher prints: ``#/experiments/<id>/runs?workflowType=machine_learning``) in headless Chromium, and
expands the sweep's parent run and checks that the table lists every trial of the sweep by name; then
opens one trial's page and checks that it shows its params (``method``, ``batch_size``, ``hp.*``).
``--screenshot`` writes the runs table as a PNG. Chromium is driven by Playwright (``pip install
playwright``; it uses the system's Chromium, no browser download). Exit 0 when every check passes; the
same function backs ``tests/sweep/test_ui.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.ui_check")


def browser() -> str | None:
    """The Chromium binary on PATH, if any."""
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, timeout_s: float = 120) -> Iterator[str]:
    """``mlflow ui`` over ``tracking_uri`` on a free loopback port; yields its base URL."""
    port = _free_port()
    art = tempfile.mkdtemp(prefix="mlflow-art-")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", tracking_uri, "--default-artifact-root", art, "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"mlflow ui did not start on {url}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def page(width: int = 1600, height: int = 900) -> Iterator[Any]:
    """A page of headless Chromium (the system's binary, driven by Playwright)."""
    from playwright.sync_api import sync_playwright

    exe = browser()
    if exe is None:
        raise RuntimeError("no Chromium on PATH (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which(exe), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b.new_page(viewport={"width": width, "height": height})
        finally:
            b.close()


def runs_table(pg: Any, url: str, parent: str, screenshot: Path | None, settle_ms: int = 6000) -> list[str]:
    """The rows of the runs table at ``url`` after expanding the sweep's parent run (MLflow nests the
    trials under it, collapsed): each row's text, colour first."""
    pg.goto(url)
    pg.wait_for_timeout(settle_ms)
    link = pg.get_by_role("link", name=parent, exact=True).first
    box = link.bounding_box()
    if box is not None:  # the expander sits left of the run's colour dot
        pg.mouse.click(box["x"] - 33, box["y"] + box["height"] / 2)
        pg.wait_for_timeout(2500)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(screenshot))
    return [e.inner_text().replace("\n", " | ") for e in pg.query_selector_all(".ag-row")]


@dataclass
class Check:
    """What the browser saw: the runs-table URL, run names missing from it, params missing from a run's page."""

    runs_url: str
    missing_runs: list[str] = field(default_factory=list)
    missing_params: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing_runs and not self.missing_params


def check(tracking_uri: str, experiment: str = "model-editing", screenshot: Path | None = None) -> Check:
    """Open the runs table of ``experiment`` (its latest sweep expanded) and one trial's page."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise RuntimeError(f"no experiment {experiment!r} in {tracking_uri}")
    parents = c.search_runs(
        [exp.experiment_id], "tags.`sweep.role` = 'parent'", order_by=["attributes.start_time DESC"]
    )
    if not parents:
        raise RuntimeError(f"experiment {experiment!r} has no sweep")
    parent = parents[0]
    trials = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    with mlflow_ui(tracking_uri) as base, page() as pg:
        runs_url = f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        rows = " ".join(runs_table(pg, runs_url, parent.info.run_name, screenshot))
        out = Check(runs_url, missing_runs=[r.info.run_name for r in trials if r.info.run_name not in rows])
        one = trials[0]
        pg.goto(f"{base}/#/experiments/{exp.experiment_id}/runs/{one.info.run_id}")
        pg.wait_for_timeout(5000)
        text = pg.inner_text("body")
        want = ["method", "batch_size", *(k for k in one.data.params if k.startswith("hp."))][:6]
        out.missing_params = [p for p in want if p not in text]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ui_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--experiment", default="model-editing")
    ap.add_argument("--screenshot", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = check(args.tracking_uri, args.experiment, args.screenshot)
    log.info(
        "runs table %s: %d trial(s) missing, params missing on a trial's page: %s",
        res.runs_url,
        len(res.missing_runs),
        res.missing_params or "none",
    )
    return 0 if res.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
