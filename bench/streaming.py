"""Benchmark 11: head training streamed from the store at N and 10N rows, against the same training in memory at N.

A synthetic store of `block2`-shaped activations (64x7x7 = 3136 floats a row, post-ReLU clusters of
five classes) is written through `FeatureStore.extend` at N and 10N rows. Each training runs in a
process of its own, so one run's peak resident set does not hide another's: streamed at N and
10N (peak RSS ratio; one epoch at 10N, which already visits every window), loaded whole at N
(throughput, and the metrics, which must be equal), and both again at N from stores written
with `extract.codec` lz4 and none (what the throughput pays for decompression).

Run as `python -m bench.streaming STORE ROWS MODE WINDOW_MB EPOCHS` it is one such process: it trains
a linear head on the store's first 90% rows (validated on the rest) and prints its peak RSS before
(after a warm-up training: the imports the loop makes on first use) and after, the seconds from opening
the store to the trained head (and of its median epoch), and the
per-epoch metrics.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.memory import json_process, peak_rss_mb
from bench.timing import Goal, Row, Stat, log, repeat, stat, timed
from headstart.config import HeadParams, OptimParams, StreamParams
from headstart.extraction import provenance
from headstart.images import Preprocess
from headstart.store import KEY_BYTES, FeatureStore, rows_per_chunk, store_path

if TYPE_CHECKING:  # the measured process imports no more than training needs
    from bench.workspace import Workspace

NAME = "streaming"
MEMORY_GOAL = Goal("<=", 1.2)
SPEED_GOAL = Goal(">=", 0.8)
OTHER_CODECS = ("lz4", "none")
"""`extract.codec` values measured beside the default (zstd-1): what streaming's throughput pays for compression."""
SHAPE = (64, 7, 7)
"""The source CNN's `block2`: the activations the issue sizes (a million rows are 12.5 GB)."""
CLASSES = 5
WINDOW_MB = 32.0
"""Streaming's shuffle window here: far below either store, so both stream the same way."""
PRE = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))


def prov() -> dict[str, Any]:
    return provenance("00" * 32, "fmnist_cnn", "block2", PRE)


def keys(n: int) -> np.ndarray:
    """Distinct row keys (never the all-zero tombstone): the row number in the first bytes."""
    out = np.zeros((n, KEY_BYTES), dtype=np.uint8)
    out[:, :8] = np.arange(1, n + 1, dtype=np.uint64)[:, None].view(np.uint8)
    return out


def label_of(rows: np.ndarray) -> np.ndarray:
    """Classes spread over the rows (every chunk holds all five)."""
    return (rows * 7919 + 3) % CLASSES


def features(rows: np.ndarray) -> np.ndarray:
    """Post-ReLU clusters, seeded by the segment's first row: the same rows whatever the store's size."""
    centres = np.random.default_rng(99).normal(0, 0.05, (CLASSES, *SHAPE)).astype(np.float32)
    noise = np.random.default_rng(int(rows[0])).standard_normal((len(rows), *SHAPE), dtype=np.float32)
    return np.maximum(centres[label_of(rows)] + noise, 0)


def write_store(root: Path, n: int, codec: str = "zstd-1") -> Path:
    """A complete store of n synthetic rows, one chunk segment at a time (the extract stage's chunk size)."""
    chunk_rows = rows_per_chunk(SHAPE, 4.0, 250)
    store = FeatureStore.open_or_create(store_path(root, prov()), prov(), SHAPE, chunk_rows, codec)
    store.extend(keys(n), features)
    return store.path


def one_process(store: Path, n: int, mode: str, epochs: int) -> dict[str, Any]:
    return json_process("bench.streaming", str(store), str(n), mode, str(WINDOW_MB), str(epochs))


def run(ws: Workspace) -> list[Row]:
    n, epochs = ws.size(500, 6_000), ws.size(2, 3)
    stores = {}
    for size in (n, 10 * n):
        stores[size], seconds = timed(lambda size=size: write_store(ws.fresh_dir(f"streaming-{size}"), size))
        log(f"{NAME}: wrote {size} rows of {SHAPE} in {seconds:.1f} s")
    by_codec = {codec: write_store(ws.fresh_dir(f"streaming-{codec}"), n, codec) for codec in OTHER_CODECS}

    def once(rep: int) -> dict[str, Any]:
        small = one_process(stores[n], n, "always", epochs)
        large = one_process(stores[10 * n], 10 * n, "always", 1)  # an epoch visits every window: the peak is in it
        loaded = one_process(stores[n], n, "never", epochs)
        rows = int(0.9 * n) * epochs
        codecs = {}
        for codec, store in by_codec.items():
            streamed, whole = (one_process(store, n, mode, epochs)["seconds"] for mode in ("always", "never"))
            codecs |= {f"{codec}_rate": rows / streamed, f"{codec}_loaded_rate": rows / whole}
            codecs[codec] = whole / streamed
        return codecs | {
            "small": small["peak_mb"], "large": large["peak_mb"], "loaded_mb": loaded["peak_mb"],
            "before": small["before_mb"], "memory": large["peak_mb"] / small["peak_mb"],
            "streamed_rate": rows / small["seconds"], "loaded_rate": rows / loaded["seconds"],
            "speed": loaded["seconds"] / small["seconds"], "same": small["history"] == loaded["history"],
            "streamed_epoch": small["epoch_s"], "loaded_epoch": loaded["epoch_s"],
        }  # fmt: skip

    samples = repeat(once, ws.process_repeats, NAME)
    for store in [*stores.values(), *by_codec.values()]:
        ws.drop(store.parent)
    same = "yes" if all(s["same"] for s in samples) else "NO"
    what = f"linear head on {SHAPE} rows, {epochs} epochs ({10 * n}: 1), window {WINDOW_MB:g} MiB"
    return [
        Row(
            f"11a. streaming: peak RSS of streamed head training, {n} vs {10 * n} rows ({what})",
            [
                (f"{n} rows", stat(samples, "small", "MB")),
                (f"{10 * n} rows", stat(samples, "large", "MB")),
                (f"{n} rows loaded whole", stat(samples, "loaded_mb", "MB")),
                ("before training (imports)", stat(samples, "before", "MB")),
            ],
            Stat(tuple(s["memory"] for s in samples)),
            MEMORY_GOAL,
        ),
        Row(
            f"11b. streaming: throughput streamed vs loaded whole, {n} rows (same metrics: {same})",
            [
                ("streamed", stat(samples, "streamed_rate", "rows/s")),
                ("loaded whole (read included)", stat(samples, "loaded_rate", "rows/s")),
                ("an epoch streamed", stat(samples, "streamed_epoch", "s")),
                ("an epoch loaded (no read)", stat(samples, "loaded_epoch", "s")),
                ("metrics identical", same),
            ],
            Stat(tuple(s["speed"] for s in samples)),
            SPEED_GOAL,
        ),
        *(
            Row(
                f"11c. streaming: throughput streamed vs loaded whole, {n} rows, a store written with codec {codec}",
                [
                    ("streamed", stat(samples, f"{codec}_rate", "rows/s")),
                    ("loaded whole (read included)", stat(samples, f"{codec}_loaded_rate", "rows/s")),
                ],
                Stat(tuple(s[codec] for s in samples)),
                SPEED_GOAL,
            )
            for codec in OTHER_CODECS
        ),
    ]


def main(store: Path, n: int, mode: str, window_mb: float, epochs: int) -> None:
    """Train a linear head on the store (first 90% of rows; the rest validate); print RSS, seconds, metrics as JSON."""
    import torch

    from headstart.strategies import Recipe, train_frozen_head
    from headstart.streaming import StoredRows

    stream = StreamParams(mode=mode, window_mb=window_mb)
    split = int(0.9 * n)
    all_keys, all_labels = keys(n), label_of(np.arange(n))
    optim = OptimParams(epochs=epochs, batch_size=256, lr=1e-3, patience=epochs)
    tiny = (np.ones((2, *SHAPE), dtype=np.float32), np.arange(2))  # the loop's first-use imports, not measured
    train_frozen_head(tiny, tiny, CLASSES, Recipe(HeadParams(), optim.model_copy(update={"epochs": 1}), 0, "cpu"))
    before = peak_rss_mb()
    started = time.perf_counter()
    reader = FeatureStore.open(store, prov())
    train = (StoredRows(reader, all_keys[:split], "block2", stream), all_labels[:split])
    val = (StoredRows(reader, all_keys[split:], "block2", stream), all_labels[split:])
    torch.manual_seed(0)
    _, result = train_frozen_head(train, val, CLASSES, Recipe(HeadParams(), optim, 0, "cpu"))
    seconds = time.perf_counter() - started
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    epoch_s = float(np.median([row["seconds"] for row in result.history]))
    print(json.dumps({"before_mb": before, "peak_mb": peak_rss_mb(), "seconds": seconds, "epoch_s": epoch_s,
                      "history": history}))  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
