"""The MLflow UI over a sweep's store, opened in headless Chromium (skipped where no Chromium is
installed: ``apt-get install chromium``): the runs table lists every trial, a trial's page its params."""

from __future__ import annotations

import importlib.util

import pytest
import ray

from bench.ui_check import browser, check
from sweep import launch
from sweep.config import load_sweep
from sweep.plan import make_plan
from tests.conftest import write_tiny_assets
from tests.sweep.test_sweep import launch_args, sweep_yaml

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        browser() is None or importlib.util.find_spec("playwright") is None,
        reason="needs Chromium (apt-get install chromium) and playwright (pip install playwright)",
    ),
]


def test_the_runs_table_lists_the_trials_with_their_params(tmp_path, tok_bos):
    assets = write_tiny_assets(tmp_path, tok_bos)
    path = sweep_yaml(assets, "ui", {"algorithm": ["memit", "emmet"], "layers": [[1]], "batch_size": [2]})
    cfg = load_sweep(str(path))
    try:
        summary = launch.run(cfg, make_plan(cfg), launch_args(["--local", "--num-cpus", "2"]))
    finally:
        ray.shutdown()
    assert summary["errors"] == 0
    res = check(summary["tracking_uri"], "test", screenshot=tmp_path / "runs.png")
    assert res.ok, res
    assert (tmp_path / "runs.png").stat().st_size > 10_000
