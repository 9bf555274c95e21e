"""The in-memory form of a classification task (train/val/test splits) and its file form.

The data stage writes one `<name>.npz` (uint8 images, int64 labels) and one `<name>.json`
(class names, counts, content fingerprint) per task; every later stage reads them back with
`load_task`, which refuses a file whose content no longer matches its fingerprint.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headstart.files import atomic_path
from headstart.fingerprint import combine, sha256_array
from headstart.images import Decode

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    images: np.ndarray
    """uint8, (N, H, W) grey or (N, H, W, 3) RGB."""
    labels: np.ndarray
    """int64, (N,), in 0..num_classes-1."""

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TaskData:
    name: str
    class_names: list[str]
    train: Split
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        return getattr(self, name)

    def all_images(self) -> np.ndarray:
        """Every image, train then val then test: the rows the extract stage stores (and `headstart verify` checks)."""
        return np.concatenate([self.split(s).images for s in SPLITS])

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Split -> class name -> images: what an unbalanced folder looks like, for the log and MLflow."""
        return {
            s: {name: int(np.count_nonzero(self.split(s).labels == c)) for c, name in enumerate(self.class_names)}
            for s in SPLITS
        }

    def fingerprint(self) -> str:
        """Content hash of every array and the class names (not of the file that holds them)."""
        parts = [",".join(self.class_names)]
        for s in SPLITS:
            parts += [sha256_array(self.split(s).images), sha256_array(self.split(s).labels)]
        return combine(*parts)


def save_task(task: TaskData, directory: Path, decode: Decode, lineage: dict[str, Any] | None = None) -> dict:
    """Write `<directory>/<name>.npz` and `.json` atomically; return the `.json` content (a TaskMeta).

    `decode` is how an image file becomes one of these images: a model trained on them keeps it.
    `lineage` (where the images came from, the data params) goes into the `.json` as it is.
    """
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for s in SPLITS:
        arrays[f"{s}_images"] = task.split(s).images
        arrays[f"{s}_labels"] = task.split(s).labels
    npz = directory / f"{task.name}.npz"
    tmp = atomic_path(npz)
    try:
        _write_npz(tmp, arrays)
        os.replace(tmp, npz)
    finally:
        tmp.unlink(missing_ok=True)
    record = {
        "name": task.name,
        "class_names": task.class_names,
        "counts": {s: len(task.split(s)) for s in SPLITS},
        "class_counts": task.class_counts(),
        "fingerprint": task.fingerprint(),
        "decode": decode.model_dump(mode="json"),
        **(lineage or {}),
    }
    meta = directory / f"{task.name}.json"
    tmp = atomic_path(meta)
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, meta)
    return record


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz whose bytes depend on the arrays only (np.savez stamps the time), so DVC sees no change."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def load_task(directory: Path, name: str) -> TaskData:
    """Read a task written by `save_task`; raise if its content does not match its fingerprint."""
    meta_path = directory / f"{name}.json"
    npz_path = directory / f"{name}.npz"
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(npz_path, allow_pickle=False) as z:
            splits = {s: Split(z[f"{s}_images"], z[f"{s}_labels"]) for s in SPLITS}
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err.filename}: missing; run the data stage first") from None
    task = TaskData(name=name, class_names=list(meta["class_names"]), **splits)
    if task.fingerprint() != meta["fingerprint"]:
        raise ValueError(f"{npz_path}: content does not match the fingerprint in {meta_path}; rerun the data stage")
    return task
