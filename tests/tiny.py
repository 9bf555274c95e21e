"""Tiny, learnable Fashion-MNIST look-alikes and the real params.yaml shrunk to a seconds-long run."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from headstart.backbones import create_model
from headstart.checkpoints import save_weights
from headstart.images import Preprocess
from headstart.records import AdviseRecord, Recommendation, SourceWeights

REPO = Path(__file__).resolve().parent.parent
MOBILENET = REPO / ".torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array: magic 0x0803 for images (3-d), 0x0801 for labels (1-d)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def tiny_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 images over the 10 labels; each label is a bar at its own place, plus noise, so it is learnable."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row = 2 + 2 * label + rng.integers(0, 2)
        images[i, row : row + 3, 4:24] = 220
    return images, labels.astype(np.uint8)


def write_tiny_fmnist(folder: Path, n_train: int = 800, n_test: int = 300, seed: int = 0) -> Path:
    """The four IDX .gz files of a tiny Fashion-MNIST stand-in."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = tiny_images(n, s)
        (folder / IDX_FILES[(split, "images")]).write_bytes(gzip.compress(encode_idx(images), mtime=0))
        (folder / IDX_FILES[(split, "labels")]).write_bytes(gzip.compress(encode_idx(labels), mtime=0))
    return folder


def tiny_params(data_root: Path, **overrides: Any) -> dict[str, Any]:
    """The real params.yaml with every loop shrunk to an epoch or two on tiny data."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["root"] = str(data_root)
    raw["pretrain"].update(epochs=1, batch_size=64)
    raw["sources"]["imagenet"]["image_size"] = 32
    raw["extract"]["batch_size"] = 64
    raw["train"]["frozen"].update(epochs=3, batch_size=64)
    raw["train"]["end_to_end"].update(epochs=1, batch_size=64)
    raw["train"]["partial"].update(epochs=2, batch_size=64)
    raw["sweep"]["fractions"] = [0.5, 1.0]
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return raw


def install_mobilenet(torch_home: Path) -> bool:
    """Put the real ImageNet MobileNetV2 file (placed by `make install`) into a torch hub cache."""
    if not MOBILENET.is_file():
        return False
    target = torch_home / "hub" / "checkpoints" / MOBILENET.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copyfile(MOBILENET, target)
    return True


def random_cnn_weights(path: Path, pre: Preprocess) -> SourceWeights:
    """The weights record of a seeded, untrained fmnist_cnn saved at `path`: extraction needs weights, not training."""
    torch.manual_seed(0)
    sha = save_weights(create_model("fmnist_cnn", 5).state_dict(), path)
    return SourceWeights(
        source="fmnist", uri=str(path), path=str(path), sha256=sha, arch="fmnist_cnn", cut="block2", preprocess=pre
    )


def placeholder_advice(ranking: list[str], strategy: str = "frozen") -> AdviseRecord:
    """An advise record whose probe ranked the cuts so and that recommends `strategy` at the first one.

    Its other measurements are placeholders: readers of a recommendation or a ranking need only those.
    """
    probe = {"val_accuracy": 0.5, "val_loss": 1.0, "dims": 8, "epochs": 1}
    return AdviseRecord(
        source="fmnist",
        samples_per_class=20,
        num_classes=3,
        probe_rows=30,
        val_rows=15,
        cuts={c: probe for c in ranking},
        untrained={c: probe for c in ranking},
        pixels=probe,
        ranking=ranking,
        similarity=0.5,
        thresholds={"small_per_class": 50, "similar_gain": 0.2},
        size="small",
        domain="similar",
        quadrant="small target, similar domain",
        recommendation=Recommendation(strategy=strategy, cut=ranking[0], why="test"),
    )


def write_image_folder(
    folder: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], start: int = 0
) -> list[Path]:
    """uint8 grey images as a class-per-folder tree of PNG and JPEG files of varied sizes and modes.

    Every third file is an RGB JPEG, the others grey or RGBA PNGs; sizes vary so the decoder's
    resize and crop are exercised. `start` numbers the files, so a second call adds new ones.
    """
    from PIL import Image

    written = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True), start=start):
        side = 28 + 4 * (i % 5)
        img = Image.fromarray(image).resize((side + 6 * (i % 2), side), Image.Resampling.BILINEAR)
        target = folder / class_names[int(label)]
        target.mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:
            path = target / f"img{i:05d}.jpg"
            img.convert("RGB").save(path, quality=92)
        else:
            path = target / f"img{i:05d}.png"
            (img.convert("RGBA") if i % 3 == 1 else img).save(path)
        written.append(path)
    return written
