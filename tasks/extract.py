"""Compute the frozen body's activations for every target image once, into the source's Zarr feature store.

One forward pass stores the activations at every tap (the cut and the source's `taps`), so a later
run can cut at any of them without extracting again. With `extract.runner: dask` this task stays
the coordinator (store, writer lock, commit) and the rows are computed by shard tasks on Dask
workers (tasks/extract_dask.py), bitwise the same.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from prefect import task
from tqdm.auto import tqdm

from headstart.backbones import Preprocess, StagedNet, feature_shape, preprocess
from headstart.caching import cached, output, run_logger
from headstart.config import ExtractParams
from headstart.datasets import SPLITS, load_task
from headstart.fingerprint import row_keys
from headstart.fit import resolve_device
from headstart.progress import TaskProgress
from headstart.sources import load_source
from headstart.store import MARKER, FeatureStore, provenance, rows_per_chunk, store_path


def stored_taps(net: StagedNet, cut: str, taps: Sequence[str] = ()) -> list[str]:
    """The cut and the extra taps, deduplicated, in network order; an unknown name is an error naming it."""
    wanted = {cut, *taps}
    unknown = sorted(wanted - set(net.cut_names))
    if unknown:
        raise KeyError(f"unknown cut point(s) {unknown} in the source's cut/taps; expected some of {net.cut_names}")
    return [name for name in net.cut_names if name in wanted]


def extract_taps(
    net: StagedNet,
    images: np.ndarray,
    pre: Preprocess,
    taps: Sequence[str],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> Iterator[dict[str, np.ndarray]]:
    """float32 activations at every tap for uint8 `images`, one forward pass per batch from the first image.

    Batches start at `images[0]`, so the caller decides the batch boundaries (the store passes one
    chunk at a time, which keeps resumed runs bitwise equal to uninterrupted ones).
    """
    body = net.upto(stored_taps(net, taps[0], taps)[-1])
    body.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = preprocess(images[i : i + batch_size], pre).to(device)
            out = {}
            for name, stage in body.stages.items():
                x = stage(x)
                if name in taps:
                    out[name] = x.float().cpu().numpy()
            yield out


def segment_features(
    net: StagedNet,
    images: np.ndarray,
    pre: Preprocess,
    taps: Sequence[str],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Activations at every tap for one chunk segment's images (the unit the store's `compute` gets)."""
    batches = list(extract_taps(net, images, pre, taps, batch_size, device))
    return {t: np.concatenate([b[t] for b in batches]) for t in taps}


def weights_preprocess(record: dict) -> Preprocess:
    """The weights record's preprocessing (a dict, or its JSON text)."""
    pre = record["preprocess"]
    return Preprocess.model_validate_json(pre) if isinstance(pre, str) else Preprocess.model_validate(pre)


@task(**cached("extract"))
def extract(
    source_name: str,
    weights_record: dict,
    data_record: dict,
    params: ExtractParams,
    data_dir: Path,
    store_root: Path,
    taps: Sequence[str] = (),
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Bring the source's feature store up to date with every train/val/test image of the target task.

    The store holds the activations at the weights record's cut and at `taps` (the source's taps).
    Only rows the store lacks are computed (new samples, or the rest of an interrupted run).
    `on_chunk(committed_rows)` is a test-only hook run after each committed chunk.
    """
    log = run_logger()
    task_data = load_task(Path(data_dir), "target")
    if task_data.fingerprint() != data_record["fingerprint"]:
        raise ValueError(
            f"{data_dir}/target.npz has fingerprint {task_data.fingerprint()}, the data record "
            f"{data_record['fingerprint']}; rerun the data stage"
        )
    images = np.concatenate([task_data.split(s).images for s in SPLITS])
    keys = row_keys(images)

    pre = weights_preprocess(weights_record)
    cut = weights_record["cut"]
    net = load_source(weights_record)
    cuts = stored_taps(net, cut, taps)
    shapes = {t: feature_shape(net, t, pre) for t in cuts}
    prov = provenance(weights_record["sha256"], weights_record["arch"], cuts, pre)
    path = store_path(store_root, prov)
    widest = max(shapes.values(), key=math.prod)  # every tap shares the rows per chunk, sized for the widest
    store = FeatureStore.open_or_create(path, prov, shapes, rows_per_chunk(widest, params.chunk_mb, params.batch_size))

    device = resolve_device(params.device)
    todo = len(store.missing(keys))
    progress = TaskProgress(f"extracting {source_name} ({todo} images)", todo)
    started = time.perf_counter()
    with tqdm(total=todo, unit="img", desc=f"extract {source_name}", disable=todo == 0) as bar:

        def advance(rows: int) -> None:
            bar.update(rows)
            progress.advance(bar.n)

        if params.runner == "dask":
            from tasks.extract_dask import extend_on_dask  # distributed is imported only when asked for

            computed = extend_on_dask(store, keys, images, weights_record, cuts, params, advance, on_chunk)
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
        source_name,
        ", ".join(cuts),
        unique,
        unique - computed,
        path,
        computed,
        seconds,
        computed / seconds if computed and seconds > 0 else 0.0,
        params.runner,
        device,
    )
    return {
        "source": source_name,
        "store_key": path.stem,
        "store_path": str(path),
        "rows": store.rows,
        "cut": cut,
        "feature_shape": list(shapes[cut]),
        "taps": cuts,
        "tap_shapes": {t: list(s) for t, s in shapes.items()},
        "computed": computed,
        "outputs": [output(path / MARKER)],
    }
