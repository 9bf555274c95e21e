"""A user's own folder of photos, end to end through the CLI: init, run, predict, then photos added, edited, removed.

The photos are real Fashion-MNIST test images written as JPEG and PNG files of varied sizes and
modes; the project is made by `headstart init` (git, DVC, `dvc add images`) and driven by
`headstart` and `dvc repro` alternately, as a user would.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from headstart.fmnist import SYSTEM_DIR, idx_files, read_fmnist
from tests.e2e import conftest
from tests.tiny import REPO, install_mobilenet, write_image_folder

pytestmark = pytest.mark.e2e
CLASSES = {0: "tshirt", 1: "trouser", 7: "sneaker"}


def _fmnist():
    files = idx_files(SYSTEM_DIR)
    if files is None:
        pytest.skip("Fashion-MNIST is not installed (make install puts it in /usr/share/datasets/fashion-mnist)")
    return read_fmnist(files)


def _photos(split, per_class: int, skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for index, label in enumerate(CLASSES):
        members = split.images[split.labels == label][skip : skip + per_class]
        images.append(members)
        labels.append(np.full(len(members), index))
    return np.concatenate(images), np.concatenate(labels)


def sh(root: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """A command in the project, running this checkout's headstart (an `init`ed project holds no code of its own)."""
    return conftest.sh(root, *cmd, code=REPO, check=check)


def flip_byte(path: Path) -> None:
    path.chmod(0o644)  # DVC makes its cache objects read-only
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _computed(output: str) -> int:
    found = re.findall(r"(\d+) reused from .*?, (\d+) computed", output)
    assert len(found) == 1, f"expected one extract log line, found {found}\n{output[-3000:]}"
    return int(found[0][1])


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_a_folder_of_photos_from_init_to_predict_and_dvc_repro_after_new_photos(tmp_path: Path) -> None:
    train, test = _fmnist()
    folder = tmp_path / "photos"
    write_image_folder(folder, *_photos(test, 40), list(CLASSES.values()))
    project = tmp_path / "closet"

    init = sh(tmp_path, "headstart", "init", str(project), "--images", str(folder), "--image-size", "64")
    assert "headstart run" in init.stdout
    assert (project / "images.dvc").is_file() and (project / ".git").is_dir()
    install_mobilenet(project / ".torch")
    params = yaml.safe_load((project / "params.yaml").read_text())  # the real config, shrunk to seconds
    params["train"]["end_to_end"].update(epochs=2)
    params["train"]["frozen"].update(epochs=10)
    params["advise"]["probe"].update(epochs=5)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "shrink the training to seconds")

    first = sh(project, "headstart", "run")
    assert "fmnist" not in first.stdout.split("Data target")[1]  # no Fashion-MNIST source, pretrain or run
    accuracy = dict(re.findall(r"\| (frozen|finetune) \| imagenet \| \w+ \| ([\d.]+)% \|", first.stdout))
    assert set(accuracy) == {"frozen", "finetune"} and float(accuracy["frozen"]) > 80, first.stdout
    assert "Champion: closet v" in first.stdout and "headstart predict --model models:/closet@champion" in first.stdout

    new = tmp_path / "new"
    images, labels = _photos(train, 5)
    write_image_folder(new, images, labels, list(CLASSES.values()))
    answer = json.loads(sh(project, "headstart", "predict", "--json", str(new)).stdout)
    truth = {str(p): p.parent.name for p in new.rglob("*.*")}
    right = sum(row["class"] == truth[row["image"]] for row in answer)
    assert len(answer) == 15 and right >= 12, answer
    exported = sh(project, "headstart", "export", "frozen", "--format", "onnx")
    assert re.search(r"onnxruntime matches torch on \d+ test images \(max abs difference", exported.stdout)
    assert (project / "models" / "runs" / "frozen" / "model.onnx").is_file()

    # the user keeps the better run only (and the changes below retrain one model, not two, each time)
    del params["train"]["runs"]["finetune"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "keep the frozen run")

    # 10 more photos of one class: data, extract (10 rows), advise, train and evaluate rerun under DVC
    images, labels = _photos(train, 10, skip=100)
    write_image_folder(project / "images", images[labels == 0], labels[labels == 0], list(CLASSES.values()), 5000)
    sh(project, "dvc", "add", "-q", "images")
    pending = sh(project, "headstart", "status").stdout  # what would rerun, and why, before anything runs
    assert re.search(r"^raw +stale: 10 image\(s\) added: tshirt/\S+, ", pending, re.M), pending
    assert re.search(r"^data +waits: on raw$", pending, re.M) and "evaluate@frozen" in pending, pending
    grown = sh(project, "dvc", "repro")
    out = grown.stdout + grown.stderr
    expected = {"raw", "data", "extract@imagenet", "advise@imagenet", "train@frozen", "evaluate@frozen"}
    assert expected <= _ran(out) and _computed(out) == 10

    again = sh(project, "dvc", "repro")
    assert _ran(again.stdout + again.stderr) == {"raw"}  # nothing changed: the data stage is not rerun
    assert "every stage is up to date" in sh(project, "headstart", "status").stdout
    warm = sh(project, "headstart", "run")  # decided from the records: no Prefect server, no task started
    assert warm.stdout.startswith("every stage is up to date: nothing to run") and "Champion: closet v" in warm.stdout

    # one photo's pixels edited: one row computed; one photo removed: no row computed, data reruns
    photo = sorted((project / "images" / "trouser").glob("*.png"))[0]
    Image.fromarray(255 - np.asarray(Image.open(photo).convert("L"))).save(photo)
    sh(project, "dvc", "add", "-q", "images")
    edited = sh(project, "headstart", "run")
    assert _computed(edited.stdout + edited.stderr) == 1
    sorted((project / "images" / "sneaker").glob("*.jpg"))[0].unlink()
    sh(project, "dvc", "add", "-q", "images")
    removed = sh(project, "dvc", "repro")
    out = removed.stdout + removed.stderr
    assert {"data", "extract@imagenet", "train@frozen"} <= _ran(out) and _computed(out) == 0

    # lineage: the newest training run's MLflow dataset is the photos' DVC version
    version = yaml.safe_load((project / "images.dvc").read_text())["outs"][0]["md5"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    latest = client.search_runs(
        [client.get_experiment_by_name("closet").experiment_id], "tags.stage = 'train'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )[0]  # fmt: skip
    assert [d.dataset.digest for d in latest.inputs.dataset_inputs] == [version]
    assert latest.data.params["data.image_folder"] == "images"

    # experiments: the records and metrics are in git, so `dvc exp show` has every metric of both
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "photos")
    sh(project, "dvc", "exp", "run", "-n", "faster", "--set-param", "train.frozen.lr=0.003")
    rows = list(csv.DictReader(io.StringIO(sh(project, "dvc", "exp", "show", "--csv").stdout)))
    shown = {row["Experiment"]: row for row in rows}
    assert "faster" in shown, rows
    column = "accuracy"  # one metrics file (one run): DVC names its columns without the file's path
    assert all(re.fullmatch(r"[\d.]+", row[column]) for row in rows if row["Experiment"] in ("", "faster")), rows
    sh(project, "dvc", "plots", "show")  # the declared plots: training curves and the report's images
    page = (project / "dvc_plots" / "index.html").read_text()
    assert "models/runs/frozen/history.json" in page and "reports/frozen/confusion.png" in page

    # damage: a flipped byte in a stored chunk is found by `headstart verify` and repaired by `dvc repro` alone
    record = json.loads((project / "features" / "imagenet.json").read_text())
    store = project / record["store"]
    flip_byte(min(p for p in (store / "features" / record["cut"] / "c").rglob("*") if p.is_file()))
    found = sh(project, "headstart", "verify", check=False)
    assert found.returncode == 1 and re.search(r"features/\S+ rows 0\.\.\d+: unreadable", found.stdout), found.stdout
    repaired = sh(project, "dvc", "repro")
    out = repaired.stdout + repaired.stderr
    assert "rows of damaged chunks recomputed" in out and "extract@imagenet" in _ran(out), out
    assert sh(project, "headstart", "verify").stdout.startswith("ok ")

    # a photo's DVC cache object damaged: verify names it; once `dvc checkout` has copied it back, both runs refuse it
    photo = sorted((project / "images" / "tshirt").glob("*.png"))[0]
    md5 = hashlib.md5(photo.read_bytes(), usedforsecurity=False).hexdigest()
    flip_byte(project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:])
    found = sh(project, "headstart", "verify", check=False)
    assert found.returncode == 1 and f"images/tshirt/{photo.name}: DVC cache object" in found.stdout, found.stdout
    photo.unlink()
    sh(project, "dvc", "checkout", "images")  # DVC copies the damaged object back without a word
    for command in (("dvc", "repro"), ("headstart", "run")):
        refused = sh(project, *command, check=False)
        message = refused.stdout + refused.stderr
        assert refused.returncode != 0 and f"{photo}: checked out from the damaged DVC cache object" in message, message
