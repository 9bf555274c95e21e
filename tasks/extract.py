"""The extract stage: the frozen source network run once over every target image, its activations stored in Zarr.

The same forward pass stores the activations at every tap (the cut and the source's `taps`), so a
later run can cut at any of them without extracting again. With `extract.runner: dask` this task
stays the coordinator (store, writer lock, commit) and the rows are computed by shard tasks on Dask
workers (headstart.dask_extract), bitwise the same.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from tqdm.auto import tqdm

from headstart.augment import TTA_VIEWS, build_pipeline, render
from headstart.backbones import StagedNet, feature_shape
from headstart.caching import cached, run_logger
from headstart.config import ExtractParams
from headstart.datasets import TaskData, load_task
from headstart.extraction import provenance, sample_keys, segment_features, source_network, stored_taps
from headstart.fit import resolve_device
from headstart.progress import TaskProgress
from headstart.records import ExtractRecord, Output, SourceWeights, TaskMeta, relative
from headstart.store import MARKER, FeatureStore, rows_per_chunk, store_path
from headstart.views import PLAIN, ViewRows, augment_digest, plan_rows, seeds_of


def open_store(
    store_root: Path, weights: SourceWeights, net: StagedNet, cuts: list[str], params: ExtractParams
) -> tuple[FeatureStore, dict[str, tuple[int, ...]], dict[str, Any]]:
    """The source's store for these taps (created if new), each tap's shape, and the provenance that keys it."""
    pre = weights.preprocess
    shapes = {t: feature_shape(net, t, pre) for t in cuts}
    prov = provenance(weights.sha256, weights.arch, cuts, pre, params.dtype)
    widest = max(shapes.values(), key=math.prod)  # every tap shares the rows per chunk, sized for the widest
    chunk_rows = rows_per_chunk(widest, params.chunk_mb, params.batch_size, np.dtype(params.dtype).itemsize)
    store = FeatureStore.open_or_create(store_path(store_root, prov), prov, shapes, chunk_rows, params.codec)
    if store.codec != params.codec:
        run_logger().warning(
            "extract %s: the store %s keeps the codec %s it was made with (extract.codec %s applies to new stores; "
            "the values are the same: delete the store to rewrite it)", weights.source, store.path, store.codec,
            params.codec,
        )  # fmt: skip
    return store, shapes, prov


def plan(task_data: TaskData, images: np.ndarray, params: ExtractParams, digest: str | None) -> ViewRows:
    """The store's rows for `images` (the task's, train then val then test): every image plainly, `views`
    augmented views of each training image (keyed with `digest`) and `tta` test-time views of each test image."""
    sizes = [len(task_data.split(s)) for s in ("train", "val", "test")]
    return plan_rows(
        sample_keys(images), np.arange(sizes[0]), params.views, digest,
        np.arange(sum(sizes[:2]), sum(sizes)), TTA_VIEWS[: params.tta],
    )  # fmt: skip


def describe(rows: ViewRows) -> str:
    """What a store's rows are, for the log: `120 images + 2 augmented views of 79 + 2 test-time views of 14`."""
    plain, parts = int((rows.view == PLAIN).sum()), []
    for kind, sign in (("augmented", 1), ("test-time", -1)):
        views = np.unique(rows.view[rows.view * sign > 0])
        if len(views):
            parts.append(f"{len(views)} {kind} view(s) of {int((rows.view == views[0]).sum())}")
    return " + ".join([f"{plain} images", *parts])


def fill_store(
    store: FeatureStore, rows: ViewRows, images: np.ndarray, net: StagedNet, weights: SourceWeights,
    cuts: list[str], params: ExtractParams, on_chunk: Callable[[int], None] | None,
) -> int:  # fmt: skip
    """Repair damaged chunks, then compute the rows the store lacks (here or on Dask); how many were computed."""
    device = resolve_device(params.device)
    net.to(device)
    keys = rows.keys
    viewed = bool((rows.view != PLAIN).any())
    if viewed and params.runner == "dask":
        raise ValueError("extract.views and extract.tta are computed by the local runner: set extract.runner: local")

    def features(idx: np.ndarray) -> dict[str, np.ndarray]:
        pixels = (
            render(images, rows.image[idx], rows.view[idx], seeds_of(keys[idx]), params.augment, TTA_VIEWS)
            if viewed else images[idx]
        )  # fmt: skip
        return segment_features(net, pixels, weights.preprocess, cuts, params.batch_size, device)

    repaired = store.repair(keys, features)
    if repaired:
        run_logger().warning("extract %s: %d rows of damaged chunks recomputed", weights.source, repaired)
    todo = len(store.missing(keys))
    progress = TaskProgress(f"extracting {weights.source} ({todo} images)", todo)
    with tqdm(total=todo, unit="img", desc=f"extract {weights.source}", disable=todo == 0) as bar:

        def advance(rows: int) -> None:
            bar.update(rows)
            progress.advance(bar.n)

        if params.runner == "dask":
            from headstart.dask_extract import extend_on_dask  # distributed is imported only when asked for

            computed = extend_on_dask(store, keys, images, weights, cuts, params, advance, on_chunk)
        else:

            def compute(idx: np.ndarray) -> dict[str, np.ndarray]:
                feats = features(idx)
                advance(len(idx))
                return feats

            computed = store.extend(keys, compute, on_chunk=on_chunk)
    progress.finish()
    return computed + repaired


@task(**cached("extract"))
def extract(
    weights: SourceWeights,
    task_meta: TaskMeta,
    params: ExtractParams,
    data_dir: Path,
    store_root: Path,
    taps: Sequence[str] = (),
    on_chunk: Callable[[int], None] | None = None,
) -> ExtractRecord:
    """Bring the source's feature store up to date with every train/val/test image of the target task.

    The store holds the activations at the source's cut and at `taps`. Only rows the store lacks
    are computed (new samples, or the rest of an interrupted run). `on_chunk(committed_rows)` is a
    test-only hook run after each committed chunk (not part of the cache key).
    """
    task_data = load_task(Path(data_dir), "target")
    if task_data.fingerprint() != task_meta.fingerprint:
        raise ValueError(f"{data_dir}/target.npz does not match its data record; rerun the data stage")
    if params.views:
        build_pipeline(params.augment)  # a bad argument is refused before any work, naming the item
    digest = augment_digest(params.augment) if params.views else None
    images = task_data.all_images()
    rows = plan(task_data, images, params, digest)
    net = source_network(weights)
    cuts = stored_taps(net, weights.cut, taps)
    store, shapes, prov = open_store(Path(store_root), weights, net, cuts, params)
    started = time.perf_counter()
    computed = fill_store(store, rows, images, net, weights, cuts, params, on_chunk)
    seconds = time.perf_counter() - started
    unique = len(set(map(bytes, rows.keys)))
    run_logger().info(
        "extract %s at %s: %d rows (%s), %d reused from %s, %d computed in %.1f s (%.0f rows/s, %s runner on %s)",
        weights.source, ", ".join(cuts), unique, describe(rows), unique - computed, store.path, computed, seconds,
        computed / seconds if computed and seconds > 0 else 0.0, params.runner, resolve_device(params.device),
    )  # fmt: skip
    return ExtractRecord(
        source=weights.source, store=relative(store.path), store_key=store.path.stem, rows=store.rows, cut=weights.cut,
        taps=cuts, tap_shapes={t: list(s) for t, s in shapes.items()}, provenance=prov, views=params.views,
        augment_digest=digest, tta=params.tta,
        outputs=[Output.of(store.path / MARKER)],
    )  # fmt: skip
