"""The data stage: Fashion-MNIST (or a user's image folder) validated, split and saved as the source and target tasks.

Pure functions parse and check IDX bytes, select classes and draw seeded, stratified (and nested)
subsets; the helpers below them find the IDX files (params, Debian's package, or the official
download verified by md5) and read image folders; the `data` task writes both tasks to disk.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from prefect import task
from tqdm import tqdm

from headstart.caching import cached, output, run_logger
from headstart.checkpoints import ChecksumError, atomic_path
from headstart.config import DataParams
from headstart.datasets import Split, TaskData, save_task
from headstart.env import project_root
from headstart.fingerprint import combine, sha256_file

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
_BLOCK = 1 << 20


# ---------------------------------------------------------------- pure functions


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


def _check_fraction(fraction: float, name: str, upper_inclusive: bool) -> None:
    if not (0.0 < fraction < 1.0 or (upper_inclusive and fraction == 1.0)):
        raise ValueError(f"{name} must be in (0, 1{']' if upper_inclusive else ')'}, got {fraction}")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split, so both parts keep the class balance; each class gets at least one of each."""
    _check_fraction(val_fraction, "val_fraction", upper_inclusive=False)
    if len(labels) == 0:
        raise ValueError("no samples to split")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < 2:
            raise ValueError(f"class {c} has {len(members)} sample; at least 2 are needed to split it")
        n_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def nested_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded, stratified subset: the first ceil(fraction * n) of a fixed per-class permutation.

    Because the permutation depends only on the seed, a smaller fraction's subset lies inside
    a larger one's, so learning curves over fractions add data instead of swapping it.
    """
    _check_fraction(fraction, "train_fraction", upper_inclusive=True)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, math.ceil(round(fraction * len(members), 9)))
        chosen.append(members[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def make_task(
    name: str, class_names: list[str], pool: Split, test: Split, params: DataParams, subset: bool
) -> TaskData:
    """Split `pool` into train/val; with `subset`, keep only the nested `train_fraction` of train."""
    train_idx, val_idx = stratified_split(pool.labels, params.val_fraction, params.seed)
    if subset:
        train_idx = train_idx[nested_fraction(pool.labels[train_idx], params.train_fraction, params.seed)]
    return TaskData(
        name=name,
        class_names=class_names,
        train=Split(pool.images[train_idx], pool.labels[train_idx]),
        val=Split(pool.images[val_idx], pool.labels[val_idx]),
        test=test,
    )


def fmnist_task(name: str, train: Split, test: Split, keep: list[int], params: DataParams, subset: bool) -> TaskData:
    """A task of the Fashion-MNIST classes `keep`, relabelled 0..k-1."""
    pool = Split(*select_labels(train.images, train.labels, keep))
    return make_task(
        name, class_names_for(keep), pool, Split(*select_labels(test.images, test.labels, keep)), params, subset
    )


def folder_task(images: np.ndarray, labels: np.ndarray, class_names: list[str], params: DataParams) -> TaskData:
    """The target task from a user's images: a stratified `test_fraction` is held out first."""
    pool_idx, test_idx = stratified_split(labels, params.test_fraction, params.seed)
    test = Split(images[test_idx], labels[test_idx])
    return make_task("target", class_names, Split(images[pool_idx], labels[pool_idx]), test, params, subset=True)


def decode_image(raw: bytes, size: int) -> np.ndarray:
    """PNG/JPEG bytes -> RGB uint8 (size, size, 3); raises OSError/ValueError if not a readable image."""
    with Image.open(io.BytesIO(raw)) as img:
        rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


# ---------------------------------------------------------------- I/O helpers (called by the task)


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


def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str, timeout_s: float = 60.0) -> Path:
    """Stream `url` to a temp file beside `dest`, renamed to `dest` only if its md5 is `md5`."""
    tmp = atomic_path(dest)
    try:
        h = hashlib.md5(usedforsecurity=False)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as f:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                    while block := resp.read(_BLOCK):
                        h.update(block)
                        f.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(f"{url}: download failed: {err}") from None
        if h.hexdigest() != md5.lower():
            raise ChecksumError(
                f"{url}: md5 mismatch: expected {md5.lower()}, got {h.hexdigest()}; the file was not kept"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def resolve_source(
    root: Path | None,
    download_dir: Path,
    system_dir: Path = SYSTEM_DIR,
    base_url: str = OFFICIAL_BASE_URL,
    md5s: Mapping[str, str] = OFFICIAL_MD5,
    timeout_s: float = 60.0,
) -> tuple[dict[str, Path], str]:
    """The four IDX files and where they came from: `root`, else `system_dir`, else a verified download.

    Downloads land in `download_dir`; files already there are reused when their md5 matches.
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
        if not (dest.is_file() and _md5_file(dest) == md5.lower()):
            download(base_url.rstrip("/") + "/" + dest.name, dest, md5, timeout_s)
        files[role] = dest
    return files, f"download:{base_url}"


def read_image_folder(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, size, size, 3) uint8, labels and class names from one sub-folder per class.

    Every file in a class folder must be an image (hidden files are skipped); all unreadable ones
    are reported together, so one run finds every bad file.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: data.image_folder is not a folder")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{folder}: expected at least 2 class sub-folders, found {[c.name for c in classes]}")
    files = []
    for label, cls in enumerate(classes):
        members = sorted(p for p in cls.iterdir() if p.is_file() and not p.name.startswith("."))
        if len(members) < 3:
            raise ValueError(f"{cls}: class folder holds {len(members)} images; at least 3 are needed (train/val/test)")
        files += [(p, label) for p in members]
    images, labels, bad = [], [], []
    for path, label in tqdm(files, desc=f"reading {folder.name}", unit="img", disable=None):
        try:
            images.append(decode_image(path.read_bytes(), size))
            labels.append(label)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            bad.append(f"  {path}: {err}")
    if bad:
        raise ValueError(f"{folder}: {len(bad)} unreadable images (expected PNG/JPEG):\n" + "\n".join(bad))
    return np.stack(images), np.asarray(labels, dtype=np.int64), [c.name for c in classes]


def _in_project(path: Path) -> Path:
    return path if path.is_absolute() else project_root() / path


# ---------------------------------------------------------------- the task


def _current_content(parameters: dict) -> dict[str, str | None]:
    """The bytes behind the folders the params name, so editing a file there invalidates the cache."""
    params = DataParams.model_validate(parameters["params"])
    root = _in_project(params.root) if params.root is not None else SYSTEM_DIR
    files = idx_files(root) or {}
    folder = _in_project(params.image_folder) if params.image_folder is not None else None
    return {
        "idx": combine(*(f"{role}:{sha256_file(p)}" for role, p in sorted(files.items()))) if files else None,
        "image_folder": combine(
            *(f"{p.relative_to(folder)}:{sha256_file(p)}" for p in sorted(folder.rglob("*")) if p.is_file())
        )
        if folder is not None and folder.is_dir()
        else None,
    }


@task(**cached("data", content=_current_content))
def data(params: DataParams, out_dir: Path, download_dir: Path) -> dict:
    """Build the source (FMNIST-2) and target (FMNIST-1 or the image folder) tasks and save them."""
    log = run_logger()
    root = _in_project(params.root) if params.root is not None else None
    files, origin = resolve_source(root, _in_project(download_dir))
    log.info("Fashion-MNIST IDX files from %s", origin)
    train, test = read_fmnist(files)
    source = fmnist_task("source", train, test, params.source_labels, params, subset=False)
    if params.image_folder is not None:
        images, labels, names = read_image_folder(_in_project(params.image_folder), params.folder_image_size)
        target = folder_task(images, labels, names, params)
    else:
        target = fmnist_task("target", train, test, params.target_labels, params, subset=True)
    out_dir = _in_project(out_dir)
    records = {t.name: save_task(t, out_dir) for t in (source, target)}
    for rec in records.values():
        log.info(
            "task %s: %d classes %s, counts %s", rec["name"], len(rec["class_names"]), rec["class_names"], rec["counts"]
        )
    written = [out_dir / f"{name}.{ext}" for name in records for ext in ("npz", "json")]
    return {**records, "origin": origin, "outputs": [output(p) for p in written]}
