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
from headstart.fingerprint import sha256_bytes
from headstart.fmnist import class_names_for, read_fmnist, resolve_source, select_labels
from headstart.folder import check_splits, content_split, dvc_dir_md5, scan_folder, unit_draw
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


def folder_task(images: np.ndarray, labels: np.ndarray, splits: list[str], class_names: list[str]) -> TaskData:
    """The target task from a user's images, each in the split `splits` names (`unused`: left out)."""
    split_of = np.asarray(splits)

    def part(name: str) -> Split:
        idx = np.flatnonzero(split_of == name)
        return Split(images[idx], labels[idx])

    return TaskData(name="target", class_names=class_names, train=part("train"), val=part("val"), test=part("test"))


# ---------------------------------------------------------------- I/O helpers (called by the task)


def read_image_folder(folder: Path, decode: Decode, params: DataParams) -> TaskData:
    """The image folder as a task: every file decoded by `decode`, split by its content (headstart.folder).

    All unreadable files are reported together, so one run finds every bad file.
    """
    scan = scan_folder(folder)
    if scan.skipped:
        count = sum(scan.skipped.values())
        run_logger().info("%s: skipped %d files that are not PNG/JPEG: %s", folder, count, scan.skipped)
    given = {i.given_split for i in scan.images} - {None}
    images, labels, splits, bad = [], [], [], []
    for item in tqdm(scan.images, desc=f"reading {folder.name}", unit="img", disable=None):
        path = folder / item.path
        try:
            raw = path.read_bytes()
            images.append(decode_image(raw, decode, str(path)))
        except (OSError, ValueError) as err:
            bad.append(f"  {err}")
            continue
        sha = sha256_bytes(raw)
        split = content_split(sha, params.seed, params.val_fraction, params.test_fraction, item.given_split, given)
        if split == "train" and unit_draw(sha, params.seed, "train_fraction") >= params.train_fraction:
            split = "unused"  # nested: an image kept at 5% is kept at 10%
        labels.append(scan.classes.index(item.label))
        splits.append(split)
    if bad:
        raise ValueError(f"{folder}: {len(bad)} unreadable images (expected PNG/JPEG):\n" + "\n".join(bad))
    check_splits([scan.classes[i] for i in labels], splits, scan.classes, folder)
    return folder_task(np.stack(images), np.asarray(labels, dtype=np.int64), splits, scan.classes)


# ---------------------------------------------------------------- the task


@task(**cached("data"))
def data(params: DataParams, raw: RawRecord, out_dir: Path, download_dir: Path, with_source: bool = True) -> DataRecord:
    """Build the target task (FMNIST-1 or the image folder) and, `with_source`, the source task (FMNIST-2).

    `raw` (the raw stage's record) is what the files are now: it is an argument so that the cache
    key changes with them. Fashion-MNIST is read only when a task comes from it.
    """
    log = run_logger()
    tasks: list[tuple[TaskData, Decode]] = []
    origin = "none"
    if with_source or params.image_folder is None:
        root = absolute(str(params.root)) if params.root is not None else None
        files, where = resolve_source(root, absolute(str(download_dir)))
        log.info("Fashion-MNIST IDX files from %s", where)
        origin = where.split(":", 1)[0]  # root, system or download: where from, not a path of this machine
        train, test = read_fmnist(files)
        if with_source:
            tasks.append(
                (fmnist_task("source", train, test, params.source_labels, params, subset=False), FMNIST_DECODE)
            )
        if params.image_folder is None:
            tasks.append((fmnist_task("target", train, test, params.target_labels, params, subset=True), FMNIST_DECODE))
    if params.image_folder is not None:
        decode = Decode(mode="RGB", size=params.folder_image_size, resize=params.folder_resize)
        tasks.append((read_image_folder(absolute(str(params.image_folder)), decode, params), decode))
    out_dir = absolute(str(out_dir))
    lineage = {"source": {}, "target": {"data_params": params.model_dump(mode="json")}}
    if params.image_folder is not None:
        lineage["target"]["data_version"] = dvc_dir_md5(absolute(str(params.image_folder)))
    metas = {t.name: TaskMeta(**save_task(t, out_dir, decode, lineage[t.name])) for t, decode in tasks}
    for meta in metas.values():
        log.info("task %s: %d classes, counts %s", meta.name, len(meta.class_names), meta.counts)
        log.info("task %s per class: %s", meta.name, meta.class_counts)
    written = [out_dir / f"{name}.{ext}" for name in metas for ext in ("npz", "json")]
    return DataRecord(
        origin=origin, source=metas.get("source"), target=metas["target"], outputs=[Output.of(p) for p in written]
    )
