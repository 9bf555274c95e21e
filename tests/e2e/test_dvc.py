"""One truth, two orchestrators, in a real git + DVC project on tiny data: `dvc repro` and `headstart run`
rerun exactly what a change touches, reuse each other's results, and survive the project being moved.

The tests run in order on one project, each starting from the state the previous one left.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.e2e.conftest import make_project, sh
from tests.tiny import IDX_FILES, MOBILENET, encode_idx, tiny_params, write_tiny_fmnist

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MOBILENET.is_file(), reason="ImageNet MobileNetV2 file not installed (make install)"),
]
RUNS = ("fmnist-frozen", "imagenet-frozen")
PIPELINE = {
    "raw", "data", "pretrain", "weights", "extract@fmnist", "extract@imagenet", "advise@fmnist", "advise@imagenet",
    *(f"{stage}@{run}" for stage in ("train", "evaluate") for run in RUNS),
}  # fmt: skip
STAGE_TASKS = ("data", "pretrain", "weights", "extract", "advise", "train", "evaluate")


def ran(proc) -> set[str]:
    """The stages `dvc repro` ran (not the ones it skipped or restored)."""
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout))


def computed(proc) -> set[str]:
    """The stages `headstart run` computed: every stage task that did not report its record up to date."""
    text = proc.stdout + proc.stderr
    current = set(re.findall(r"(\w+)(?:@[\w-]+)?: up to date \(", text))  # `data`, `extract@fmnist`
    started = set(re.findall(r"Task run '(\w+)(?:-[\w-]+)?' - ", text))  # `data`, `train-fmnist-frozen`
    return (started & set(STAGE_TASKS)) - current


def outputs_mtimes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for d in ("data", "models", "reports", "features", "weights")
        for p in (root / d).rglob("*")
    }


def registered(root: Path) -> dict[str, int]:
    """Registered model name -> number of versions, from the project's own MLflow store."""
    code = (
        "import json; from headstart.env import configure_environment; configure_environment();"
        "from mlflow import MlflowClient; c = MlflowClient();"
        "print(json.dumps({m.name: len(c.search_model_versions(f\"name = '{m.name}'\")) "
        "for m in c.search_registered_models()}))"
    )
    return json.loads(sh(root, "python", "-c", code).stdout.strip().splitlines()[-1])


def change_one_target_test_image(data_root: Path, value: int) -> None:
    """Rewrite the first test image whose label is a target class (0-4): the source task is untouched."""
    images_path, labels_path = data_root / IDX_FILES[("test", "images")], data_root / IDX_FILES[("test", "labels")]
    images = np.frombuffer(gzip.decompress(images_path.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28).copy()
    labels = np.frombuffer(gzip.decompress(labels_path.read_bytes()), np.uint8, offset=8)
    first = int(np.flatnonzero(labels < 5)[0])
    images[first, 0, :4] = value
    images_path.write_bytes(gzip.compress(encode_idx(images), mtime=0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dvc")
    data_root = write_tiny_fmnist(tmp / "tiny-fmnist")
    raw = tiny_params(data_root)
    raw["train"]["runs"] = {run: {"source": run.split("-")[0], "strategy": "frozen"} for run in RUNS}
    return make_project(tmp / "project", raw), data_root


def test_repro_from_clean_runs_the_pipeline_but_not_the_sweep(setup: tuple[Path, Path]) -> None:
    repo, _ = setup
    proc = sh(repo, "dvc", "repro")
    assert ran(proc) == PIPELINE
    metrics = json.loads((repo / "reports" / "fmnist-frozen" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert "fmnist-frozen" in sh(repo, "dvc", "metrics", "show").stdout
    assert not (repo / "reports" / "sweep").exists()


def test_repro_with_nothing_changed_only_fingerprints_the_raw_data(setup: tuple[Path, Path]) -> None:
    repo, _ = setup
    assert ran(sh(repo, "dvc", "repro")) == {"raw"}


def test_headstart_run_after_dvc_repro_recomputes_and_registers_nothing(setup: tuple[Path, Path]) -> None:
    repo, _ = setup
    before, versions = outputs_mtimes(repo), registered(repo)
    proc = sh(repo, "headstart", "run")
    assert computed(proc) == set(), proc.stderr[-3000:]
    assert outputs_mtimes(repo) == before
    assert registered(repo) == versions == {"fmnist-source": 1, "fmnist-transfer": 2}
    assert "| fmnist-frozen | fmnist | frozen |" in proc.stdout
    assert ran(sh(repo, "dvc", "repro")) == {"raw"}


def test_editing_a_training_helper_reruns_training_only_under_both(setup: tuple[Path, Path]) -> None:
    repo, _ = setup
    helper = repo / "headstart" / "strategies.py"
    original = helper.read_text()
    helper.write_text(original + "\n# a comment: a changed helper that only training imports\n")
    proc = sh(repo, "headstart", "run")
    assert computed(proc) == {"train", "evaluate"}, proc.stderr[-3000:]
    assert ran(sh(repo, "dvc", "repro")) == {"raw"}, "headstart run recorded what it made in dvc.lock"

    helper.write_text(original)
    assert ran(sh(repo, "dvc", "repro")) == {"raw", *(f"{s}@{r}" for s in ("train", "evaluate") for r in RUNS)}
    assert computed(sh(repo, "headstart", "run")) == set()
    assert registered(repo) == {"fmnist-source": 1, "fmnist-transfer": 2}, "identical weights: no new version"


def test_a_changed_raw_file_reruns_data_and_what_depends_on_it(setup: tuple[Path, Path]) -> None:
    repo, data_root = setup
    change_one_target_test_image(data_root, 255)
    proc = sh(repo, "dvc", "repro")
    assert ran(proc) == PIPELINE - {"pretrain", "weights"}, "the source task did not change: neither did its model"
    assert (proc.stdout + proc.stderr).count(", 1 computed in") == 2, "each store extracts only the changed image"

    change_one_target_test_image(data_root, 0)
    proc = sh(repo, "headstart", "run")
    assert computed(proc) == {"data", "extract", "advise", "train", "evaluate"}
    assert (proc.stdout + proc.stderr).count(", 1 computed in") == 2
    assert ran(sh(repo, "dvc", "repro")) == {"raw"}


def test_a_param_change_after_dvc_repro_reruns_only_what_reads_it(setup: tuple[Path, Path]) -> None:
    repo, _ = setup
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["head"]["init"] = "xavier"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(repo, "dvc", "repro")) == {"raw", *(f"{s}@{r}" for s in ("train", "evaluate") for r in RUNS)}
    assert computed(sh(repo, "headstart", "run")) == set()


def test_a_copied_project_reuses_everything_and_reads_nothing_outside_itself(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, _ = setup
    copy = tmp_path / "elsewhere" / "project"
    shutil.copytree(repo, copy, symlinks=True)
    away = repo.with_name("project-moved-away")
    repo.rename(away)
    try:
        before = outputs_mtimes(copy)
        proc = sh(copy, "headstart", "run")
        assert computed(proc) == set(), proc.stderr[-3000:]
        assert outputs_mtimes(copy) == before
        assert ran(sh(copy, "dvc", "repro")) == {"raw"}
        for folder in ("data", "models", "reports", "features", "weights"):
            for record in (copy / folder).rglob("*.json"):
                assert str(repo) not in record.read_text(), f"{record} names the old project folder"
    finally:
        away.rename(repo)
