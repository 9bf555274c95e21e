"""`headstart predict`: load a model by URI (sha256 verified), read image files, folders or IDX files, predict.

The model is fetched the way a source's weights are (headstart.sources: a registry version's
weights checked against its `weights_sha256` tag), then rebuilt from the `ModelSpec` inside
the safetensors file: the preprocessing is the one it was trained with, never re-typed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headstart.backbones import StagedNet
from headstart.checkpoints import ModelSpec, load_model
from headstart.config import WeightsParams
from headstart.fmnist import read_idx
from headstart.images import SUFFIXES, Decode, decode_image
from headstart.serving import answers, predict_images
from headstart.sources import fetch


def load_for_prediction(uri: str, cache_dir: Path) -> tuple[StagedNet, ModelSpec, str]:
    """The network, its spec and its weights sha256; `uri` is models:/<name>@<alias>, models:/<name>/<n> or a path."""
    fetched = fetch(uri, None, WeightsParams(), cache_dir)
    net, spec = load_model(fetched.path, fetched.sha256)
    net.eval()
    return net, spec, fetched.sha256


def image_files(folder: Path) -> list[Path]:
    """Every PNG/JPEG under `folder` (sub-folders too), sorted; hidden files skipped."""
    found = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(".")
    )
    if not found:
        raise FileNotFoundError(f"{folder}: no PNG/JPEG files in this folder")
    return found


def read_inputs(paths: Sequence[Path], decode: Decode) -> tuple[list[str], list[np.ndarray]]:
    """Names and uint8 images: PNG/JPEG files (decoded as the model's training data was), folders, IDX files."""
    names: list[str] = []
    images: list[np.ndarray] = []
    bad: list[str] = []
    for path in paths:
        if path.is_dir():
            files = image_files(path)
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
        for file in files:
            try:
                if file.suffix.lower() in SUFFIXES:
                    images.append(decode_image(file.read_bytes(), decode, str(file)))
                    names.append(str(file))
                else:
                    batch = read_idx(file, ndim=3)
                    names += [f"{file}[{i}]" for i in range(len(batch))]
                    images += list(batch)
            except (OSError, ValueError) as err:
                bad.append(f"  {err}")
    if bad:
        raise ValueError(
            f"{len(bad)} unreadable input(s) (PNG/JPEG files or IDX image files expected):\n" + "\n".join(bad)
        )
    return names, images


def predict_files(uri: str, paths: Sequence[Path], cache_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """One row per image (image, class, probability) and the model's weights sha256."""
    net, spec, sha256 = load_for_prediction(uri, cache_dir)
    names, images = read_inputs(paths, spec.decoding())
    probs = predict_images(net, spec, images)
    rows = [
        {"image": name, "class": answer, "probability": round(float(p.max()), 6)}
        for name, answer, p in zip(names, answers(spec, probs), probs, strict=True)
    ]
    return rows, sha256


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Aligned columns: image, class, probability."""
    width_image = max([len("image"), *(len(r["image"]) for r in rows)])
    width_class = max([len("class"), *(len(r["class"]) for r in rows)])
    lines = [f"{'image':<{width_image}}  {'class':<{width_class}}  probability"]
    lines += [f"{r['image']:<{width_image}}  {r['class']:<{width_class}}  {r['probability']:.4f}" for r in rows]
    return "\n".join(lines)
