"""`headstart sweep` and the `sweep` DVC stage in a real project on tiny data (slow: two Prefect start-ups)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from tests.e2e.conftest import make_project, sh
from tests.tiny import MOBILENET, tiny_params, write_tiny_fmnist

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MOBILENET.is_file(), reason="ImageNet MobileNetV2 file not installed (make install)"),
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    raw = tiny_params(write_tiny_fmnist(tmp / "tiny-fmnist"))
    raw["train"]["runs"] = {"fmnist-frozen": {"source": "fmnist", "strategy": "frozen"}}
    return make_project(tmp / "project", raw)


def test_sweep_command_prints_the_table_and_writes_the_report(repo: Path) -> None:
    out = sh(repo, "headstart", "sweep").stdout
    header = r"\| fraction \| images \| test accuracy: frozen at (\w+) \| test accuracy: partial at \1 \| "
    header += r"test accuracy: finetune"
    assert re.search(header, out), out
    assert "| 50% |" in out and "| 100% |" in out
    assert re.search(r"scratch (never )?catches up with finetune on best validation loss", out), out
    reports = repo / "reports" / "sweep"
    with open(reports / "table.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 8  # 2 fractions x 4 strategies
    assert len(list((reports / "cells").glob("*.json"))) == 8


def test_dvc_runs_the_sweep_pipeline_and_then_nothing(repo: Path) -> None:
    proc = sh(repo, "dvc", "repro", "sweep/dvc.yaml")
    assert "Running stage 'sweep/dvc.yaml:sweep'" in proc.stdout, proc.stdout
    assert "summary.json" in sh(repo, "dvc", "metrics", "show").stdout
    again = sh(repo, "dvc", "repro", "sweep/dvc.yaml").stdout
    assert "Running stage 'sweep/dvc.yaml:sweep'" not in again, again
