"""The extraction core: the frozen source network's activations at its taps, and the provenance that keys them.

Everything that decides an activation is imported from here (the source network as the weights
record rebuilds it, the preprocessing, the forward pass, the row keys, the store), so this file's
import closure is the code version in every feature store's key: a change to any of those files
makes a new store, never old features for a changed extractor. How rows are scheduled (one
process or Dask shards, headstart.dask_extract) is not imported here: it does not change a row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from headstart.backbones import StagedNet, preprocess
from headstart.codeversion import code_version
from headstart.fingerprint import row_keys
from headstart.images import Preprocess
from headstart.records import ExtractRecord, SourceWeights
from headstart.sources import load_source
from headstart.store import FeatureStore

CORE = "headstart/extraction.py"


def provenance(
    weights_sha256: str, arch: str, taps: str | Sequence[str], pre: Preprocess, dtype: str = "float32"
) -> dict[str, Any]:
    """Everything that determines the stored values, as JSON-able group attributes.

    `taps` are the stages whose outputs are (to be) stored, in network order; one name is one tap.
    A writer's provenance names every tap of its store, a reader's the taps it needs. `dtype`
    (extract.dtype) is in it because float16 rounds every value: a float16 store is another
    store, never read as the float32 one. The codec is not: it is lossless.
    """
    taps = [taps] if isinstance(taps, str) else list(taps)
    if not taps or len(set(taps)) != len(taps):
        raise ValueError(f"taps must be a non-empty list of distinct stage names, got {taps}")
    return {
        "weights_sha256": weights_sha256,
        "arch": arch,
        "taps": taps,
        "preprocess": pre.model_dump(mode="json"),
        "code_version": code_version(CORE),
        "torch": torch.__version__,
        "dtype": dtype,
    }


def source_network(weights: SourceWeights) -> StagedNet:
    """The frozen source network a weights record describes (its file's sha256 verified)."""
    return load_source(weights)


def sample_keys(images: np.ndarray) -> np.ndarray:
    """The store's row keys: one content hash per image."""
    return row_keys(images)


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
    """Activations at every tap for one chunk segment's images (the unit the store's `compute` gets).

    A segment of one batch (chunks no larger than a batch) is returned as computed, without a copy.
    """
    batches = list(extract_taps(net, images, pre, taps, batch_size, device))
    if len(batches) == 1:
        return batches[0]
    return {t: np.concatenate([b[t] for b in batches]) for t in taps}


def stored_features(record: ExtractRecord, images: np.ndarray, tap: str | None = None) -> np.ndarray:
    """The stored activations at `tap` (default: the source's cut) for these uint8 images, in their order.

    Rows are keyed by pixel content; the store's provenance is checked and it must be complete.
    """
    tap = tap or record.cut
    return FeatureStore.open(record.store_dir(), record.provenance_for(tap)).read(sample_keys(images), tap)
