"""`headstart predict` on a model registered in a real MLflow store: PNG, JPEG, folders, IDX files, table and JSON."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from headstart.serving import predict_proba
from tests.ops.conftest import MODEL
from tests.tiny import encode_idx

URI = f"models:/{MODEL}@champion"


@pytest.fixture(scope="module")
def inputs(registered: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Test images as PNG files in a folder, one large RGB JPEG, and an IDX file of the same images."""
    folder = tmp_path_factory.mktemp("predict")
    images = registered["test"].images[:6]
    pngs = folder / "pngs"
    pngs.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(pngs / f"{i:02d}.png")
    big = folder / "photo.jpg"
    Image.fromarray(np.stack([images[0]] * 3, axis=-1)).resize((300, 200), Image.Resampling.NEAREST).save(big)
    idx = folder / "images-idx3-ubyte.gz"
    idx.write_bytes(gzip.compress(encode_idx(images)))
    return {"images": images, "pngs": pngs, "big": big, "idx": idx}


def predict(*args: str) -> Any:
    return CliRunner().invoke(app, ["predict", *args])


def test_json_matches_the_training_code_path_for_pngs_and_idx(registered: dict[str, Any], inputs: dict[str, Any]):
    result = predict(str(inputs["pngs"]), str(inputs["idx"]), "--model", URI, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["image"] for r in rows] == [str(inputs["pngs"] / f"{i:02d}.png") for i in range(6)] + [
        f"{inputs['idx']}[{i}]" for i in range(6)
    ]
    registered["net"].eval()
    expected = predict_proba(registered["net"], registered["spec"], inputs["images"]).argmax(1)
    names = registered["spec"].class_names
    assert [r["class"] for r in rows] == [names[k] for k in expected] * 2
    assert [r["probability"] for r in rows[:6]] == [r["probability"] for r in rows[6:]]  # PNG is lossless
    assert all(1 / len(names) <= r["probability"] <= 1 for r in rows)


def test_a_large_rgb_jpeg_is_made_grey_and_small_like_the_training_images(inputs: dict[str, Any], registered):
    result = predict(str(inputs["big"]), "--model", URI, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["class"] in registered["spec"].class_names


def test_table_has_a_header_and_one_line_per_image(inputs: dict[str, Any]):
    result = predict(str(inputs["pngs"] / "00.png"), str(inputs["pngs"] / "01.png"), "--model", URI)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["image", "class", "probability"]
    assert len(lines) == 3 and lines[1].startswith(str(inputs["pngs"] / "00.png"))
    assert f"model {URI}" in result.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.png", "no such file or folder"),
        (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "notes.txt"),
        (lambda d: (d / "broken.png").write_bytes(b"\x89PNG not really") and d / "broken.png", "broken.png"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no PNG/JPEG files"),
    ],
)
def test_bad_input_is_refused_naming_the_file(make, message: str, tmp_path: Path, registered):
    result = predict(str(make(tmp_path)), "--model", URI)
    assert result.exit_code == 2
    assert message in result.stderr


def test_unknown_model_is_a_clear_error(inputs: dict[str, Any]):
    result = predict(str(inputs["big"]), "--model", "models:/no-such-model@champion")
    assert result.exit_code == 2
    assert "no-such-model" in result.stderr and "not in the MLflow registry" in result.stderr


def test_every_unreadable_input_is_named_and_paths_are_checked_before_the_model(tmp_path: Path, registered):
    (tmp_path / "a.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "b.jpg").write_bytes(b"nor this")
    result = predict(str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), "--model", URI)
    assert result.exit_code == 2 and "2 unreadable input(s)" in result.stderr
    assert str(tmp_path / "a.png") in result.stderr and str(tmp_path / "b.jpg") in result.stderr
    missing = predict(str(tmp_path / "nope.png"), "--model", "models:/no-such-model@champion")
    assert missing.exit_code == 2 and "no such file or folder" in missing.stderr
    assert "registry" not in missing.stderr  # refused before any model was looked up
