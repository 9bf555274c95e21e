"""The epoch's batch order over stored rows: seeded shuffled chunks, the rows of a bounded window shuffled together.

A feature store is read a chunk at a time, so an order that a reader can follow without holding
every row is one that visits whole chunks: the chunks are shuffled, consecutive ones form windows
of at most `window_rows` rows, and each window's rows are shuffled. The order depends only on the
generator (the seed and how many epochs drew from it before), the rows' chunks and the window, so
streamed and in-memory training, which both follow it, see the same batches. When every row fits
in one window, nothing else is drawn: the order is one permutation of all the rows, exactly what
the training loop draws for an array in memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def window_rows(window_mb: float, feature_shape: tuple[int, ...]) -> int:
    """Rows of float32 activations of this shape in `window_mb` MiB (at least one)."""
    return max(1, int(window_mb * (1 << 20) // (4 * math.prod(feature_shape))))


def epoch_windows(chunk_of: np.ndarray, window_rows: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's windows: each a tensor of row indices in batch order; concatenated, every row once.

    `chunk_of[i]` is the store chunk holding row i. A window holds whole chunks (a chunk with more
    rows than `window_rows` is a window alone); its rows, taken in index order, are permuted by
    the generator, which also draws the chunk order when there is more than one window.
    """
    n = len(chunk_of)
    if n <= window_rows:
        return [torch.randperm(n, generator=generator)]
    by_chunk = np.argsort(chunk_of, kind="stable")
    bounds = np.flatnonzero(np.diff(chunk_of[by_chunk])) + 1
    groups = np.split(by_chunk, bounds)  # the rows of each chunk, in index order
    windows: list[list[np.ndarray]] = [[]]
    held = 0
    for c in torch.randperm(len(groups), generator=generator).tolist():
        if held and held + len(groups[c]) > window_rows:
            windows.append([])
            held = 0
        windows[-1].append(groups[c])
        held += len(groups[c])
    out = []
    for parts in windows:
        rows = torch.from_numpy(np.sort(np.concatenate(parts)))
        out.append(rows[torch.randperm(len(rows), generator=generator)])
    return out
