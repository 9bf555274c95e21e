"""Compute the frozen body's activations for every target image once, into the source's Zarr feature store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from prefect import task
from torch import nn
from tqdm.auto import tqdm

from headstart.backbones import Preprocess, feature_shape, preprocess
from headstart.caching import cached, output, run_logger
from headstart.config import ExtractParams
from headstart.datasets import SPLITS, load_task
from headstart.fingerprint import row_keys
from headstart.fit import resolve_device
from headstart.sources import load_source
from headstart.store import MARKER, FeatureStore, provenance, rows_per_chunk, store_path


def extract_features(
    body: nn.Module, images: np.ndarray, pre: Preprocess, batch_size: int, device: torch.device | str = "cpu"
) -> Iterator[np.ndarray]:
    """float32 activations of `body` for uint8 `images`, one batch at a time from the first image.

    Batches start at `images[0]`, so the caller decides the batch boundaries (the store passes one
    chunk at a time, which keeps resumed runs bitwise equal to uninterrupted ones).
    """
    body.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = preprocess(images[i : i + batch_size], pre).to(device)
            yield body(x).float().cpu().numpy()


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
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Bring the source's feature store up to date with every train/val/test image of the target task.

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
    shape = feature_shape(net, cut, pre)
    prov = provenance(weights_record["sha256"], weights_record["arch"], cut, pre)
    path = store_path(store_root, prov)
    store = FeatureStore.open_or_create(path, prov, shape, rows_per_chunk(shape, params.chunk_mb, params.batch_size))

    device = resolve_device(params.device)
    body = net.upto(cut).to(device)
    todo = len(store.missing(keys))
    started = time.perf_counter()
    with tqdm(total=todo, unit="img", desc=f"extract {source_name}", disable=todo == 0) as bar:

        def compute(idx: np.ndarray) -> np.ndarray:
            feats = np.concatenate(list(extract_features(body, images[idx], pre, params.batch_size, device)))
            bar.update(len(idx))
            return feats

        computed = store.extend(keys, compute, on_chunk=on_chunk)
    seconds = time.perf_counter() - started
    unique = len(set(map(bytes, keys)))
    log.info(
        "extract %s: %d unique images, %d reused from %s, %d computed in %.1f s (%.0f img/s on %s)",
        source_name,
        unique,
        unique - computed,
        path,
        computed,
        seconds,
        computed / seconds if computed and seconds > 0 else 0.0,
        device,
    )
    return {
        "source": source_name,
        "store_key": path.stem,
        "store_path": str(path),
        "rows": store.rows,
        "feature_shape": list(store.feature_shape),
        "computed": computed,
        "outputs": [output(path / MARKER)],
    }
