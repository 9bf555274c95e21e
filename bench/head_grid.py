"""Benchmark 12: a grid of 12 frozen heads trained in one pass per cut against one frozen head, on the same store.

One head is what the train stage trains for a frozen run under params.yaml (its linear head at the
source's cut): its stored activations read, then `train_frozen_head`. The grid is what a run with
`grid` trains (`headstart.grid.train_grid`): 3 learning rates x 2 cuts (block2, fc1) x 2 head
widths (linear, one hidden layer), each cut's activations read once and its six heads stepped on
every batch. Both sides include their reads, as the train stage pays them; early stopping is on, as
in the pipeline, so the grid runs until its slowest head stops.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.timing import Goal, Row, Stat, repeat, stat, timed
from bench.workspace import QUICK_SPLITS, SHARED, Workspace
from headstart.config import GridParams
from headstart.datasets import TaskData
from headstart.grid import grid_cells, train_grid
from headstart.records import ExtractRecord
from headstart.strategies import Features, train_frozen_head
from headstart.streaming import stored_rows
from tasks.train import recipe_of

NAME = "head_grid"
GOAL = Goal("<=", 3.0)
ARCH = "fmnist_cnn"
TAP = "fc1"
"""The grid's second cut, stored beside the source's cut (block2) by the same forward pass."""
WIDTH = 32
GRID = GridParams(lrs=[3e-3, 1e-3, 3e-4], cuts=["block2", TAP], hidden=[[], [WIDTH]])


def reader(record: ExtractRecord, task: TaskData, ws: Workspace) -> Callable[[str], Features]:
    """A cut's training and validation activations, read from the store as the train stage reads them."""
    stream = ws.train_params.stream
    return lambda cut: tuple(stored_rows(record, split.images, cut, stream) for split in (task.train, task.val))


def run(ws: Workspace) -> list[Row]:
    if why := ws.unavailable(ARCH):
        return [Row("12. a grid of 12 heads vs one head", skipped=why)]
    size, splits = SHARED[ARCH]
    sizes = QUICK_SPLITS if ws.quick else splits
    task = ws.subset(*sizes)
    data_dir, meta = ws.save(task, f"{ARCH}-{size}-{'-'.join(map(str, sizes))}")
    weights = ws.weights(ARCH, size)
    record, _ = ws.extract(weights, data_dir, meta, ws.root / "features" / NAME, taps=[TAP])
    read = reader(record, task, ws)
    params = ws.train_params
    recipe = recipe_of("frozen", params)
    labels = (task.train.labels, task.val.labels)
    cells = grid_cells(GRID, record.cut, params.head, params.frozen, len(task.train))

    def one_head() -> int:
        train_x, val_x = read(record.cut)
        return train_frozen_head((train_x, labels[0]), (val_x, labels[1]), task.num_classes, recipe)[1].epochs

    def once(rep: int) -> dict[str, float]:
        epochs, one_s = timed(one_head)
        grid, grid_s = timed(lambda: train_grid(cells, read, labels, task.num_classes, recipe.seed, recipe.device))
        return {
            "one": one_s,
            "grid": grid_s,
            "ratio": grid_s / one_s,
            "epochs": epochs,
            "grid_epochs": max(c.result.epochs for c in grid.cells),
            "acc": grid.kept.result.best["val_accuracy"],
        }

    samples = repeat(once, ws.repeats, NAME)
    return [
        Row(
            f"12. a grid of {len(cells)} heads (3 lrs x block2, {TAP} x linear, {WIDTH} wide) vs one head, "
            f"{ARCH}@{record.cut}, {len(task.train)}+{len(task.val)} img, early stopping on",
            [
                ("one head", stat(samples, "one", "s")),
                ("its epochs", stat(samples, "epochs")),
                ("grid", stat(samples, "grid", "s")),
                ("its longest head's epochs", stat(samples, "grid_epochs")),
                ("chosen head's val accuracy", stat(samples, "acc")),
            ],
            Stat(tuple(s["ratio"] for s in samples)),
            GOAL,
        )
    ]
