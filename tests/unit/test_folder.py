"""A user's image folder: scanning, content-hash splits that survive growth, the crop decoder, init's refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.init import check_images, init_project
from headstart.config import DataParams
from headstart.fingerprint import sha256_file
from headstart.folder import content_split, dvc_dir_md5, scan_folder
from headstart.images import Decode, decode_image
from headstart.tracking import champion_verdict, classes_tag
from tasks.data import read_image_folder
from tests.tiny import tiny_images, write_image_folder

NAMES = ["cat", "dog", "fox"]


def _folder(tmp_path, n=60, seed=0, start=0, name="photos"):
    images, labels = tiny_images(n, seed)
    folder = tmp_path / name
    write_image_folder(folder, images, labels % 3, NAMES, start=start)
    return folder


def _splits(folder, params):
    scan = scan_folder(folder)
    given = {i.given_split for i in scan.images} - {None}
    return {
        i.path: content_split(
            sha256_file(folder / i.path), params.seed, params.val_fraction, params.test_fraction, i.given_split, given
        )
        for i in scan.images
    }


def test_adding_photos_moves_no_photo_between_splits(tmp_path):
    folder = _folder(tmp_path)
    params = DataParams(image_folder=folder, val_fraction=0.2, test_fraction=0.2)
    before = _splits(folder, params)
    assert set(before.values()) == {"train", "val", "test"}
    new_images, new_labels = tiny_images(30, 7)
    write_image_folder(folder, new_images, new_labels % 3, NAMES, start=1000)  # 30 new photos
    after = _splits(folder, params)
    assert len(after) == len(before) + 30
    assert {p: after[p] for p in before} == before
    # the task the data stage builds agrees, and the same seed gives the same task
    task = read_image_folder(folder, Decode(mode="RGB", size=16), params)
    again = read_image_folder(folder, Decode(mode="RGB", size=16), params)
    assert task.fingerprint() == again.fingerprint()
    counts = {s: sum(1 for v in after.values() if v == s) for s in ("train", "val", "test")}
    assert (len(task.train), len(task.val), len(task.test)) == (counts["train"], counts["val"], counts["test"])


def test_own_train_val_test_folders_are_used_as_given(tmp_path):
    images, labels = tiny_images(60, 0)
    for split, sl in (("train", slice(0, 40)), ("test", slice(40, 60))):
        write_image_folder(tmp_path / "photos" / split, images[sl], labels[sl] % 3, NAMES, start=sl.start)
    folder = tmp_path / "photos"
    params = DataParams(image_folder=folder, val_fraction=0.25, test_fraction=0.2)
    splits = _splits(folder, params)
    assert {v for p, v in splits.items() if p.startswith("test/")} == {"test"}
    drawn = {v for p, v in splits.items() if p.startswith("train/")}
    assert drawn == {"train", "val"}  # val drawn from train/, since no val/ was given; no test drawn from it
    task = read_image_folder(folder, Decode(mode="RGB", size=16), params)
    assert len(task.test) == 20 and task.class_names == NAMES


def test_scan_counts_other_files_and_refuses_one_class(tmp_path):
    folder = _folder(tmp_path, n=12)
    (folder / "cat" / "notes.txt").write_text("not an image")
    (folder / "cat" / ".DS_Store").write_bytes(b"\0")
    (folder / ".hidden").mkdir()
    scan = scan_folder(folder)
    assert scan.classes == NAMES and scan.skipped == {".txt": 1} and len(scan.images) == 12
    one = tmp_path / "one"
    write_image_folder(one, *tiny_images(5, 0)[:1], np.zeros(5, int), ["cat"])
    with pytest.raises(ValueError, match=r"at least 2 class sub-folders.*\['cat'\]"):
        scan_folder(one)


def test_a_class_without_training_images_is_named(tmp_path):
    folder = _folder(tmp_path, n=30)
    write_image_folder(folder, *tiny_images(1, 3)[:1], np.zeros(1, int), ["owl"], start=500)
    owl = sha256_file(next((folder / "owl").iterdir()))
    # a seed whose draw puts the lone owl outside train (the draw is fixed by its content and the seed)
    seed = next(s for s in range(100) if content_split(owl, s, 0.3, 0.3, None, set()) != "train")
    params = DataParams(image_folder=folder, val_fraction=0.3, test_fraction=0.3, seed=seed)
    with pytest.raises(ValueError, match=r"class 'owl' has 1 image\(s\) and none fell in the train split"):
        read_image_folder(folder, Decode(mode="RGB", size=16), params)


def test_crop_decode_keeps_the_aspect_ratio(tmp_path):
    wide = np.zeros((40, 120, 3), dtype=np.uint8)
    wide[:, :40] = (255, 0, 0)  # red left third, green centre, blue right third
    wide[:, 40:80] = (0, 255, 0)
    wide[:, 80:] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    cropped = decode_image(path.read_bytes(), Decode(mode="RGB", size=32, resize=36), str(path))
    stretched = decode_image(path.read_bytes(), Decode(mode="RGB", size=32), str(path))
    assert cropped.shape == stretched.shape == (32, 32, 3)
    assert (cropped[:, :, 1] > 200).all() and (cropped[:, :, 0] < 50).all()  # only the green centre survives
    assert (stretched[:, 0, 0] > 200).all() and (stretched[:, -1, 2] > 200).all()  # stretching keeps all three
    with pytest.raises(ValueError, match="resize 20 needs a size no larger"):
        Decode(mode="RGB", size=32, resize=20)


def test_champion_moves_only_among_models_of_the_same_classes():
    class Version:
        def __init__(self, classes, score):
            self.version, self.tags = "3", {"classes": classes_tag(classes), "score": str(score)}

    same, other = classes_tag(["cat", "dog"]), classes_tag(["0", "1"])
    assert champion_verdict(None, other, 0.1) is None  # the first version takes it
    assert champion_verdict(Version(["cat", "dog"], 0.8), same, 0.9) is None
    assert "scores higher" in champion_verdict(Version(["cat", "dog"], 0.8), same, 0.7)
    assert "other classes" in champion_verdict(Version(["cat", "dog"], 0.1), other, 1.0)


def test_init_refuses_what_it_cannot_train_on(tmp_path):
    folder = _folder(tmp_path, n=30)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="busy: not empty"):
        init_project(tmp_path / "busy", folder, None, "mobilenet_v2", 64)
    with pytest.raises(ValueError, match="exactly one of --images"):
        init_project(tmp_path / "new", None, None, "mobilenet_v2", 64)
    bad = [folder / "cat" / "broken.png", folder / "dog" / "fake.jpg"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad[1].write_bytes(b"BM not a jpeg")
    with pytest.raises(ValueError, match="2 unreadable images") as err:
        check_images(folder, DataParams(image_folder=folder))
    assert all(str(p) in str(err.value) for p in bad)
    assert not (tmp_path / "new").exists()


def test_the_data_version_is_the_hash_dvc_add_records(tmp_path):
    import subprocess
    import sys

    import yaml

    folder = _folder(tmp_path, n=9, name="images")
    (folder / "cat" / "notes.txt").write_text("DVC versions every file, images or not")
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "add", "-q", "images"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "images.dvc").read_text())["outs"][0]["md5"]
    assert dvc_dir_md5(folder) == recorded
    (folder / "dog" / "new.png").write_bytes((folder / "cat" / "notes.txt").read_bytes())
    assert dvc_dir_md5(folder) != recorded


def test_init_takes_any_torchvision_model_with_its_weights_own_sizes():
    from flows.init import backbone_source

    source, resize = backbone_source("efficientnet_b0", None)
    assert source == {
        "weights": "torchvision:efficientnet_b0/IMAGENET1K_V1", "arch": "efficientnet_b0", "cut": "penultimate",
        "image_size": 224,
    } and resize == 256  # fmt: skip
    pinned, resize = backbone_source("mobilenet_v2", 64)
    assert pinned["weights"].endswith("/IMAGENET1K_V1") and len(pinned["sha256"]) == 64 and resize == 73
    with pytest.raises(ValueError, match="unknown backbone 'nosuch'; expected a torchvision classification model"):
        backbone_source("nosuch", None)
