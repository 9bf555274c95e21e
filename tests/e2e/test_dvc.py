"""`dvc repro` in a real git repo reruns exactly the stages a change touches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import make_project, sh
from tests.tiny import MOBILENET, tiny_params, write_tiny_fmnist

pytestmark = pytest.mark.skipif(
    not MOBILENET.is_file(), reason="ImageNet MobileNetV2 file not installed (make install)"
)


def ran(proc) -> set[str]:
    """The stages `dvc repro` ran (not the ones it skipped or restored)."""
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout))


def set_param(root: Path, dotted: str, value) -> None:
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dvc")
    data_root = write_tiny_fmnist(tmp / "tiny-fmnist")
    raw = tiny_params(data_root)
    raw["train"]["runs"] = {
        "fmnist-frozen": {"source": "fmnist", "strategy": "frozen"},
        "imagenet-frozen": {"source": "imagenet", "strategy": "frozen"},
    }
    return make_project(tmp / "project", raw)


def test_repro_from_clean_runs_every_stage(repo: Path) -> None:
    proc = sh(repo, "dvc", "repro")
    assert ran(proc) == {
        "data",
        "pretrain",
        "weights",
        "extract@fmnist",
        "extract@imagenet",
        "advise@fmnist",
        "advise@imagenet",
        "train@fmnist-frozen",
        "train@imagenet-frozen",
        "evaluate@fmnist-frozen",
        "evaluate@imagenet-frozen",
        "sweep",
    }
    metrics = json.loads((repo / "reports" / "fmnist-frozen" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert "fmnist-frozen" in sh(repo, "dvc", "metrics", "show").stdout


def test_repro_with_nothing_changed_runs_nothing(repo: Path) -> None:
    assert ran(sh(repo, "dvc", "repro")) == set()


def test_head_param_change_reruns_only_training_and_evaluation(repo: Path) -> None:
    set_param(repo, "train.head.init", "xavier")
    assert ran(sh(repo, "dvc", "repro")) == {
        "train@fmnist-frozen",
        "train@imagenet-frozen",
        "evaluate@fmnist-frozen",
        "evaluate@imagenet-frozen",
        "sweep",
    }


def test_data_change_reruns_extraction_onward_but_not_the_source_model(repo: Path) -> None:
    set_param(repo, "data.train_fraction", 0.5)
    assert ran(sh(repo, "dvc", "repro")) == {
        "data",
        "extract@fmnist",
        "extract@imagenet",
        "advise@fmnist",
        "advise@imagenet",
        "train@fmnist-frozen",
        "train@imagenet-frozen",
        "evaluate@fmnist-frozen",
        "evaluate@imagenet-frozen",
        "sweep",
    }
