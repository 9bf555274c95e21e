"""One decoder: an image file reaches the network as the same tensor in training, `headstart predict` and serving."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from flows.predict import read_inputs
from headstart.backbones import create_model, preprocess
from headstart.checkpoints import ModelSpec, save_model
from headstart.config import DataParams
from headstart.datasets import load_task
from headstart.images import Decode, Preprocess, decode_image
from headstart.mlflow_model import HeadstartModel
from headstart.serving import predict_proba
from tasks.data import data, read_image_folder
from tasks.raw import raw
from tests.tiny import write_tiny_fmnist


def _photo(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    img.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of photos of varied sizes and modes: RGBA and grey PNGs, RGB JPEGs."""
    root = tmp_path_factory.mktemp("photos")
    kinds = [((40, 30), "RGBA", ".png"), ((90, 120), "RGB", ".jpg"), ((64, 64), "L", ".png"), ((17, 50), "RGB", ".png")]
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir()
        for i, (size, mode, suffix) in enumerate(kinds):
            _photo(root / name / f"{name}{i}{suffix}", size, mode, seed=10 * c + i)
    return root


def test_training_predict_and_the_served_model_see_the_same_tensor(folder: Path, tmp_path: Path) -> None:
    params = DataParams(root=write_tiny_fmnist(tmp_path / "fmnist"), image_folder=folder, folder_image_size=32)
    record = data.fn(params=params, raw=raw.fn(params=params), out_dir=tmp_path / "prepared", download_dir=tmp_path)
    target = load_task(tmp_path / "prepared", "target")
    stored = np.concatenate([target.train.images, target.val.images, target.test.images])
    pre = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))
    spec = ModelSpec(
        arch="fmnist_cnn", num_classes=2, class_names=["cats", "dogs"], preprocess=pre, decode=record.target.decode
    )
    torch.manual_seed(0)
    net = create_model("fmnist_cnn", 2)
    net.eval()
    weights = tmp_path / "model.safetensors"
    sha = save_model(net, spec, weights)
    manifest = tmp_path / "model.json"
    manifest.write_text(json.dumps({"sha256": sha, "spec": spec.model_dump(mode="json")}))
    served = HeadstartModel()
    served.load_context(SimpleNamespace(artifacts={"weights": str(weights), "manifest": str(manifest)}))

    files = sorted(folder.rglob("*.*"))
    names, predicted = read_inputs(files, spec.decoding())
    assert names == [str(f) for f in files]
    for file, pixels in zip(files, predicted, strict=True):
        in_training = [row for row in stored if row.shape == pixels.shape and np.array_equal(row, pixels)]
        assert in_training, f"{file}: `headstart predict` decodes other pixels than the data stage stored"
        assert torch.equal(preprocess(in_training[0][None], pre), preprocess(pixels[None], pre))
        answer = served.predict(None, [base64.b64encode(file.read_bytes()).decode()])
        expected = predict_proba(net, spec, in_training[0][None])[0]
        assert answer["probability"][0] == expected.max(), f"{file}: the served model sees another tensor"
        assert answer["class"][0] == spec.class_names[int(expected.argmax())]


def test_the_decoder_is_what_the_data_stage_uses(folder: Path) -> None:
    decode = Decode(mode="RGB", size=24)
    task = read_image_folder(folder, decode, DataParams(val_fraction=0.2, test_fraction=0.2))
    images = np.concatenate([task.split(s).images for s in ("train", "val", "test")])
    assert task.class_names == ["cats", "dogs"] and images.shape == (8, 24, 24, 3)
    for file in sorted(folder.rglob("*.*")):
        assert any(np.array_equal(row, decode_image(file.read_bytes(), decode)) for row in images), file


def test_formats_other_than_png_and_jpeg_are_refused_naming_the_file(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="BMP")
    with pytest.raises(ValueError, match=r"photo\.png: not a readable PNG/JPEG image: the file is BMP \(only PNG and"):
        decode_image(buf.getvalue(), Decode(mode="RGB"), "photo.png")
    with pytest.raises(ValueError, match=r"notes\.png: .*no image format Pillow knows \(5 bytes") as err:
        decode_image(b"hello", Decode(mode="RGB"), "notes.png")
    assert "BytesIO" not in str(err.value)
