"""The data stage: Fashion-MNIST (or a user's image folder) validated, split and saved as the source and target tasks.

Pure functions build the tasks from arrays (class subsets, stratified and nested splits from
headstart.splits); the IDX files are found and checked by headstart.fmnist, image files decoded
by headstart.images (the decoder `headstart predict` and the served model use too); the `data`
task writes both tasks to disk. Which raw files it reads is the raw stage's record, so a changed
file reruns this stage under both orchestrators.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from tqdm import tqdm

from headstart.caching import cached, run_logger
from headstart.config import DataParams
from headstart.datasets import Split, TaskData, save_task
from headstart.fmnist import class_names_for, read_fmnist, resolve_source, select_labels
from headstart.images import FMNIST_DECODE, Decode, decode_image
from headstart.records import DataRecord, Output, RawRecord, TaskMeta, absolute
from headstart.splits import nested_fraction, stratified_split

# ---------------------------------------------------------------- pure functions


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


# ---------------------------------------------------------------- I/O helpers (called by the task)


def read_image_folder(folder: Path, decode: Decode) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images decoded by `decode` (RGB at a size: uint8 (N, size, size, 3)), labels, class names: a folder a class.

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
            images.append(decode_image(path.read_bytes(), decode, str(path)))
            labels.append(label)
        except (OSError, ValueError) as err:
            bad.append(f"  {err}")
    if bad:
        raise ValueError(f"{folder}: {len(bad)} unreadable images (expected PNG/JPEG):\n" + "\n".join(bad))
    return np.stack(images), np.asarray(labels, dtype=np.int64), [c.name for c in classes]


# ---------------------------------------------------------------- the task


@task(**cached("data"))
def data(params: DataParams, raw: RawRecord, out_dir: Path, download_dir: Path) -> DataRecord:
    """Build the source (FMNIST-2) and target (FMNIST-1 or the image folder) tasks and save them.

    `raw` (the raw stage's record) is what the files are now: it is an argument so that the cache
    key changes with them.
    """
    log = run_logger()
    root = absolute(str(params.root)) if params.root is not None else None
    files, origin = resolve_source(root, absolute(str(download_dir)))
    log.info("Fashion-MNIST IDX files from %s", origin)
    train, test = read_fmnist(files)
    source = fmnist_task("source", train, test, params.source_labels, params, subset=False)
    decode = FMNIST_DECODE
    if params.image_folder is not None:
        decode = Decode(mode="RGB", size=params.folder_image_size)
        images, labels, names = read_image_folder(absolute(str(params.image_folder)), decode)
        target = folder_task(images, labels, names, params)
    else:
        target = fmnist_task("target", train, test, params.target_labels, params, subset=True)
    out_dir = absolute(str(out_dir))
    decodes = {"source": FMNIST_DECODE, "target": decode}
    metas = {t.name: TaskMeta(**save_task(t, out_dir, decodes[t.name])) for t in (source, target)}
    for meta in metas.values():
        log.info("task %s: %d classes %s, counts %s", meta.name, len(meta.class_names), meta.class_names, meta.counts)
    written = [out_dir / f"{name}.{ext}" for name in metas for ext in ("npz", "json")]
    kind = origin.split(":", 1)[0]  # root, system or download: where from, not a path of this machine
    return DataRecord(
        origin=kind, source=metas["source"], target=metas["target"], outputs=[Output.of(p) for p in written]
    )
