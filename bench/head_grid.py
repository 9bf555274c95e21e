"""Benchmark 12: a grid of 12 frozen heads trained in one pass per cut against one frozen head, on the same store.

One head is what the train stage trains for a frozen run under params.yaml (its linear head at the
source's cut): its stored activations read, then `train_frozen_head`. The grid is what a run with
`grid` trains (`headstart.grid.train_grid`): 3 learning rates x 2 cuts (block2, fc1) x 2 head
widths (linear, one hidden layer), each cut's activations read once and its six heads stepped on
every batch. Both sides pay their reads, as the train stage does, and run the same epochs (early
stopping off, so the ratio is per epoch, not a matter of when each side stops). Two rows: the
activations loaded whole (what a split that fits in `train.stream.window_mb` does) and streamed
from the store every epoch (`train.stream.mode: always`, what a larger split does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from bench.timing import Goal, Row, Stat, repeat, stat, timed
from bench.workspace import QUICK_SPLITS, SHARED, Workspace
from headstart.config import GridParams, StreamParams
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
EPOCHS = 10
"""Epochs per side in full mode (quick: 2)."""


def reader(record: ExtractRecord, task: TaskData, stream: StreamParams) -> Callable[[str], Features]:
    """A cut's training and validation activations, read from the store as the train stage reads them."""
    return lambda cut: tuple(stored_rows(record, split.images, cut, stream) for split in (task.train, task.val))


def case(ws: Workspace, record: ExtractRecord, task: TaskData, mode: str) -> Row:
    params = ws.train_params
    read = reader(record, task, params.stream.model_copy(update={"mode": mode}))
    epochs = ws.size(2, EPOCHS)
    optim = params.frozen.model_copy(update={"epochs": epochs, "patience": epochs})
    recipe = replace(recipe_of("frozen", params), optim=optim)
    labels = (task.train.labels, task.val.labels)
    cells = grid_cells(GRID, record.cut, params.head, optim, len(task.train))

    def one_head() -> None:
        train_x, val_x = read(record.cut)
        train_frozen_head((train_x, labels[0]), (val_x, labels[1]), task.num_classes, recipe)

    def once(rep: int) -> dict[str, float]:
        _, one_s = timed(one_head)
        grid, grid_s = timed(lambda: train_grid(cells, read, labels, task.num_classes, recipe))
        return {"one": one_s, "grid": grid_s, "ratio": grid_s / one_s, "acc": grid.kept.result.best["val_accuracy"]}

    one_head()  # untimed: a process's first read and training pay one-off costs (imports, allocations)
    samples = repeat(once, ws.repeats, f"{NAME} {mode}")
    read_as = {"never": "loaded whole", "always": "streamed from the store"}[mode]
    return Row(
        f"12. a grid of {len(cells)} heads vs one head, {read_as}: 3 lrs x (block2, {TAP}) x (linear, {WIDTH} wide), "
        f"{ARCH}, {len(task.train)}+{len(task.val)} img, {epochs} epochs",
        [
            ("one head", stat(samples, "one", "s")),
            ("grid", stat(samples, "grid", "s")),
            ("chosen head's val accuracy", stat(samples, "acc")),
        ],
        Stat(tuple(s["ratio"] for s in samples)),
        GOAL,
    )


def run(ws: Workspace) -> list[Row]:
    if why := ws.unavailable(ARCH):
        return [Row("12. a grid of 12 heads vs one head", skipped=why)]
    size, splits = SHARED[ARCH]
    sizes = QUICK_SPLITS if ws.quick else splits
    task = ws.subset(*sizes)
    data_dir, meta = ws.save(task, f"{ARCH}-{size}-{'-'.join(map(str, sizes))}")
    record, _ = ws.extract(ws.weights(ARCH, size), data_dir, meta, ws.root / "features" / NAME, taps=[TAP])
    return [case(ws, record, task, mode) for mode in ("never", "always")]
