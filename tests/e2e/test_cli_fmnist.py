"""The newcomer's path on real Fashion-MNIST (a subset), through the `headstart` command."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import make_project, sh
from tests.tiny import IDX_FILES, MOBILENET, encode_idx, tiny_params

REAL = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (REAL / IDX_FILES[("train", "images")]).is_file(), reason="dataset-fashion-mnist missing"),
    pytest.mark.skipif(not MOBILENET.is_file(), reason="ImageNet MobileNetV2 file not installed (make install)"),
]


def real_subset(folder: Path, n_train: int, n_test: int) -> Path:
    """The first images of the real Fashion-MNIST files, written back as IDX."""
    folder.mkdir(parents=True)
    for (split, kind), name in IDX_FILES.items():
        raw = gzip.decompress((REAL / name).read_bytes())
        offset = 16 if kind == "images" else 8
        array = np.frombuffer(raw, dtype=np.uint8, offset=offset)
        n = n_train if split == "train" else n_test
        array = array.reshape(-1, 28, 28)[:n] if kind == "images" else array[:n]
        (folder / name).write_bytes(gzip.compress(encode_idx(array), mtime=0))
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    raw = tiny_params(real_subset(tmp / "fmnist", n_train=4000, n_test=1000), **{"pretrain.epochs": 2})
    return make_project(tmp / "project", raw)


def outputs_mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for d in ("models", "reports", "features") for p in (root / d).rglob("*")}


def test_help_lists_the_commands(project: Path) -> None:
    out = sh(project, "headstart", "--help").stdout
    for command in ("run", "stage", "ui"):
        assert command in out


def test_run_on_real_fashion_mnist_prints_the_summary_and_a_rerun_recomputes_nothing(project: Path) -> None:
    out = sh(project, "headstart", "run").stdout
    assert "Source model on the source test set" in out
    for name in ("fmnist-frozen", "fmnist-finetune", "fmnist-scratch", "imagenet-frozen"):
        assert f"| {name} |" in out
        metrics = json.loads((project / "reports" / name / "metrics.json").read_text())
        assert metrics["accuracy"] > 0.5  # 5 classes: chance is 0.2
    source = json.loads((project / "models" / "source" / "metrics.json").read_text())
    assert source["test_accuracy"] > 0.8

    before = outputs_mtimes(project)
    again = sh(project, "headstart", "run").stdout
    assert outputs_mtimes(project) == before
    assert again.split("| run |")[1] == out.split("| run |")[1]


def test_bad_param_is_refused_naming_the_key(project: Path) -> None:
    proc = sh_fail(project, "headstart", "run", "--set", "train.head.init=zero")
    assert "train.head.init" in proc.stderr


def sh_fail(root: Path, *cmd: str):
    import subprocess

    from tests.e2e.conftest import BIN, project_env

    proc = subprocess.run(
        [str(BIN / cmd[0]), *cmd[1:]], cwd=root, env=project_env(root), capture_output=True, text=True
    )
    assert proc.returncode != 0
    return proc
