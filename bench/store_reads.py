"""Benchmark 6: head training reading its features from the Zarr store against the same arrays already in memory.

The train stage reads a split's features once (`headstart.extraction.stored_features`), then trains
the head with params.yaml's settings; the in-memory side skips only the read.
"""

from __future__ import annotations

from bench.timing import Row, Stat, repeat, stat, timed
from bench.workspace import Workspace
from headstart.strategies import train_frozen_head
from tasks.train import recipe_of

NAME = "store_reads"
ARCH = "fmnist_cnn"


def run(ws: Workspace) -> list[Row]:
    stored = ws.shared(ARCH)
    task, recipe = stored.task, recipe_of("frozen", ws.train_params)
    in_shape = stored.feature_shape
    in_memory = stored.features("train"), stored.features("val")
    mb = sum(a.nbytes for a in in_memory) / 2**20

    def train(train_x, val_x) -> int:
        train_set, val_set = (train_x, task.train.labels), (val_x, task.val.labels)
        return train_frozen_head(train_set, val_set, task.num_classes, recipe)[1].epochs

    def once(rep: int) -> dict[str, float]:
        (train_x, val_x), read_s = timed(lambda: (stored.features("train"), stored.features("val")))
        epochs, store_train_s = timed(lambda: train(train_x, val_x))
        memory_epochs, memory_s = timed(lambda: train(*in_memory))
        rows = len(task.train) * epochs
        store_rate, memory_rate = rows / (read_s + store_train_s), len(task.train) * memory_epochs / memory_s
        return {"read": read_s, "read_mb": mb / read_s, "epochs": epochs, "store": store_rate, "memory": memory_rate}

    samples = repeat(once, ws.repeats, NAME)
    return [
        Row(
            f"6. store reads: head training, {ARCH}@{stored.weights.cut} {in_shape}, {len(task.train)} rows",
            [
                ("from the store", stat(samples, "store", "rows/s")),
                ("from memory", stat(samples, "memory", "rows/s")),
                ("read", stat(samples, "read", "s")),
                ("read rate", stat(samples, "read_mb", "MiB/s")),
                ("epochs", stat(samples, "epochs")),
            ],
            Stat(tuple(s["store"] / s["memory"] for s in samples)),
        )
    ]
