"""Fashion-MNIST from its IDX files: found, parsed and checked (magic number, dimensions, byte counts, labels).

The files come from a folder named in params, Debian's package `dataset-fashion-mnist`, or the
official download verified by md5; every error names the file.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from headstart.datasets import Split
from headstart.download import download

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
"""Fashion-MNIST's official class names, indexed by label."""

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Role -> file name without `.gz`; a folder may hold each file gzipped or plain."""

OFFICIAL_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
"""md5 of the official .gz files (torchvision's FashionMNIST resources list)."""

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's package `dataset-fashion-mnist` installs the IDX files."""

_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}
_IMAGE_SHAPE = (28, 28)


def parse_idx(raw: bytes, name: str, ndim: int | None = None) -> np.ndarray:
    """Decode an uint8 IDX file (3-d images or 1-d labels), refusing anything not exactly that format.

    `ndim` pins which of the two the caller expects; every error names the file (`name`).
    """
    expected = {ndim: _IDX_MAGIC[ndim]} if ndim is not None else _IDX_MAGIC
    wanted = " or ".join(f"0x{m:08x} (uint8, {d}-d)" for d, m in expected.items())
    if len(raw) < 4:
        raise ValueError(f"{name}: not an IDX file: {len(raw)} bytes, too short for the 4-byte magic number")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic not in expected.values():
        raise ValueError(f"{name}: not the expected IDX file: magic number 0x{magic:08x}, expected {wanted}")
    dims_count = magic & 0xFF
    header = 4 + 4 * dims_count
    if len(raw) < header:
        raise ValueError(
            f"{name}: truncated IDX header: expected {header} bytes for {dims_count} dims, found {len(raw)}"
        )
    dims = struct.unpack(f">{dims_count}I", raw[4:header])
    size = header + math.prod(dims)
    if len(raw) != size:
        problem = "truncated" if len(raw) < size else f"{len(raw) - size} trailing bytes"
        raise ValueError(
            f"{name}: {problem}: dims {dims} need {size} bytes ({header} header + {size - header} data), "
            f"found {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def check_pair(images: np.ndarray, labels: np.ndarray, images_name: str, labels_name: str) -> None:
    """Refuse an images/labels pair that is not N 28x28 images with N labels in 0..9."""
    if images.ndim != 3 or images.shape[1:] != _IMAGE_SHAPE:
        raise ValueError(f"{images_name}: images have shape {images.shape}, expected (N, 28, 28)")
    if labels.ndim != 1:
        raise ValueError(f"{labels_name}: labels have shape {labels.shape}, expected (N,)")
    if len(labels) != len(images):
        raise ValueError(
            f"{labels_name}: {len(labels)} labels, but {images_name} holds {len(images)} images; expected equal counts"
        )
    if len(labels) and labels.max() > 9:
        bad = np.flatnonzero(labels > 9)
        raise ValueError(
            f"{labels_name}: labels must be in 0..9; found {labels[bad[0]]} at index {bad[0]} ({len(bad)} out of range)"
        )


def select_labels(images: np.ndarray, labels: np.ndarray, keep: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the samples whose label is in `keep`, relabelled 0..k-1 in the order of `keep`."""
    if len(set(keep)) != len(keep):
        raise ValueError(f"labels to keep must be distinct, got {keep}")
    mask = np.isin(labels, keep)
    lookup = np.full(max([*keep, int(labels.max(initial=0))]) + 1, -1, dtype=np.int64)
    lookup[keep] = np.arange(len(keep))
    return images[mask], lookup[labels[mask]]


def class_names_for(keep: list[int]) -> list[str]:
    """Fashion-MNIST class names of `keep`, in the order `select_labels` relabels them."""
    return [CLASS_NAMES[k] for k in keep]


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one IDX file, gunzipping it when its name ends in `.gz`."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: not a readable gzip file: {err}") from None
    return parse_idx(raw, str(path), ndim=ndim)


def idx_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in `folder` (each `.gz` or plain), or None if any is missing."""
    found = {}
    for role, base in IDX_FILES.items():
        candidates = [folder / f"{base}.gz", folder / base]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found[role] = path
    return found


def read_fmnist(files: Mapping[str, Path]) -> tuple[Split, Split]:
    """Train and test splits, each images/labels pair checked against the other."""
    splits = []
    for part in ("train", "test"):
        img_path, lab_path = files[f"{part}_images"], files[f"{part}_labels"]
        images, labels = read_idx(img_path, ndim=3), read_idx(lab_path, ndim=1)
        check_pair(images, labels, str(img_path), str(lab_path))
        splits.append(Split(images, labels.astype(np.int64)))
    return splits[0], splits[1]


def resolve_source(
    root: Path | None,
    download_dir: Path,
    system_dir: Path = SYSTEM_DIR,
    base_url: str = OFFICIAL_BASE_URL,
    md5s: Mapping[str, str] = OFFICIAL_MD5,
    timeout_s: float = 60.0,
    retries: int = 3,
) -> tuple[dict[str, Path], str]:
    """The four IDX files and where they came from: `root`, else `system_dir`, else a verified download.

    Downloads land in `download_dir` (headstart.download: verified by md5, retried on network errors);
    files already there are reused when their md5 matches.
    """
    expected = ", ".join(f"{b}[.gz]" for b in IDX_FILES.values())
    if root is not None:
        files = idx_files(root)
        if files is None:
            raise FileNotFoundError(f"{root}: data.root lacks the Fashion-MNIST IDX files; expected {expected}")
        return files, f"root:{root}"
    files = idx_files(system_dir)
    if files is not None:
        return files, f"system:{system_dir}"
    download_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for role, base in IDX_FILES.items():
        dest = download_dir / f"{base}.gz"
        md5 = md5s[dest.name]
        url = base_url.rstrip("/") + "/" + dest.name
        download(url, dest, md5, retries=retries, timeout_s=timeout_s, algorithm="md5")
        files[role] = dest
    return files, f"download:{base_url}"
