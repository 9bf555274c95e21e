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

import numpy as np
from prefect import task
from tqdm.auto import tqdm

from headstart.backbones import feature_shape
from headstart.caching import cached, run_logger
from headstart.config import ExtractParams
from headstart.datasets import SPLITS, load_task
from headstart.extraction import provenance, sample_keys, segment_features, source_network, stored_taps
from headstart.fit import resolve_device
from headstart.progress import TaskProgress
from headstart.records import ExtractRecord, Output, SourceWeights, TaskMeta, relative
from headstart.store import MARKER, FeatureStore, rows_per_chunk, store_path


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
    log = run_logger()
    task_data = load_task(Path(data_dir), "target")
    if task_data.fingerprint() != task_meta.fingerprint:
        raise ValueError(f"{data_dir}/target.npz does not match its data record; rerun the data stage")
    images = np.concatenate([task_data.split(s).images for s in SPLITS])
    keys = sample_keys(images)
    net, pre = source_network(weights), weights.preprocess
    cuts = stored_taps(net, weights.cut, taps)
    shapes = {t: feature_shape(net, t, pre) for t in cuts}
    prov = provenance(weights.sha256, weights.arch, cuts, pre)
    path = store_path(store_root, prov)
    widest = max(shapes.values(), key=math.prod)  # every tap shares the rows per chunk, sized for the widest
    store = FeatureStore.open_or_create(path, prov, shapes, rows_per_chunk(widest, params.chunk_mb, params.batch_size))

    device = resolve_device(params.device)
    todo = len(store.missing(keys))
    progress = TaskProgress(f"extracting {weights.source} ({todo} images)", todo)
    started = time.perf_counter()
    with tqdm(total=todo, unit="img", desc=f"extract {weights.source}", disable=todo == 0) as bar:

        def advance(rows: int) -> None:
            bar.update(rows)
            progress.advance(bar.n)

        if params.runner == "dask":
            from headstart.dask_extract import extend_on_dask  # distributed is imported only when asked for

            computed = extend_on_dask(store, keys, images, weights, cuts, params, advance, on_chunk)
        else:
            net.to(device)

            def compute(idx: np.ndarray) -> dict[str, np.ndarray]:
                feats = segment_features(net, images[idx], pre, cuts, params.batch_size, device)
                advance(len(idx))
                return feats

            computed = store.extend(keys, compute, on_chunk=on_chunk)
    progress.finish()
    seconds = time.perf_counter() - started
    unique = len(set(map(bytes, keys)))
    log.info(
        "extract %s at %s: %d unique images, %d reused from %s, %d computed in %.1f s (%.0f img/s, %s runner on %s)",
        weights.source, ", ".join(cuts), unique, unique - computed, path, computed, seconds,
        computed / seconds if computed and seconds > 0 else 0.0, params.runner, device,
    )  # fmt: skip
    return ExtractRecord(
        source=weights.source,
        store=relative(path),
        store_key=path.stem,
        rows=store.rows,
        cut=weights.cut,
        taps=cuts,
        tap_shapes={t: list(s) for t, s in shapes.items()},
        provenance=prov,
        outputs=[Output.of(path / MARKER)],
    )
