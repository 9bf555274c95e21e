"""Many frozen heads from one read: a grid of learning rates x cuts x head widths, the best on validation kept.

The stored activations are the expensive part of training a head (decoded from the store, gathered
into batches), so the heads of one cut train together (`headstart.fit.fit_many`): each batch is read
once and steps every head, each head with its own Adam, dropout stream, early stopping and best
epoch, exactly as it would train alone. A cut is another input, so each cut is read once. An
optional logistic-regression cell per cut (a linear head, zero-initialised, L2-regularised as
scikit-learn's `C`) is the classic linear-probe reference, trained the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from headstart.config import GridParams, HeadParams, OptimParams
from headstart.fit import FitResult, fit_many
from headstart.strategies import Features, Labelled, Recipe, seeded_head
from headstart.threads import head_threads, torch_threads

LOGREG_HEAD = HeadParams(hidden=[], dropout=0.0, init="zeros")
"""Logistic regression: one linear layer from zero (its loss is convex, so the start only fixes the path)."""


@dataclass(frozen=True)
class Cell:
    """One head of the grid: the cut it reads, its head and its optimiser."""

    cut: str
    head: HeadParams
    optim: OptimParams
    logreg: bool = False

    @property
    def name(self) -> str:
        """`block2-256-lr0.001`, `fc1-linear-lr0.0003`, `block2-logreg`: unique within a grid."""
        if self.logreg:
            return f"{self.cut}-logreg"
        return f"{self.cut}-{'x'.join(map(str, self.head.hidden)) or 'linear'}-lr{self.optim.lr:g}"

    def params(self) -> dict[str, Any]:
        """What tells the cell from the others (its MLflow child run's params)."""
        return {
            "cut": self.cut,
            "lr": self.optim.lr,
            "hidden": list(self.head.hidden),
            "logreg": self.logreg,
            "weight_decay": self.optim.weight_decay,
            "init": self.head.init,
        }


def grid_cells(grid: GridParams, cut: str, head: HeadParams, optim: OptimParams, train_rows: int) -> list[Cell]:
    """Every cell in grid order: cut by cut, each width with each learning rate, then the cut's logistic regression.

    An axis left empty takes the run's own value (`cut`, `head.hidden`, `optim.lr`), so an empty grid
    is one cell: the run's single head. The logistic regression trains at `optim.lr` with weight decay
    1 / (C x train_rows): the mean-loss form of scikit-learn's penalty |w|^2 / (2C) on the summed loss.
    """
    cells = []
    for c in grid.cuts or [cut]:
        for hidden in grid.hidden or [head.hidden]:
            widened = head.model_copy(update={"hidden": list(hidden)})
            cells += [Cell(c, widened, optim.model_copy(update={"lr": lr})) for lr in grid.lrs or [optim.lr]]
        if grid.logreg:
            decay = optim.model_copy(update={"weight_decay": 1.0 / (grid.logreg_c * train_rows)})
            cells.append(Cell(c, LOGREG_HEAD, decay, logreg=True))
    return cells


@dataclass(frozen=True)
class CellResult:
    """A trained cell: its head (best epoch restored) and its history."""

    cell: Cell
    head: nn.Module
    result: FitResult

    @property
    def score(self) -> tuple[float, float] | None:
        """(validation accuracy, validation loss) at its best epoch; None when no epoch had a finite loss."""
        if self.result.best_epoch == 0 and self.result.start is None:
            return None
        return self.result.best["val_accuracy"], self.result.best["val_loss"]

    def summary(self) -> dict[str, Any]:
        """Its params and best figures, content only (no timings): what history.json lists per cell."""
        best = self.score
        return {
            "name": self.cell.name,
            **self.cell.params(),
            "epochs": self.result.epochs,
            "best_epoch": self.result.best_epoch,
            "diverged": self.result.diverged,
            "val_accuracy": best[0] if best else None,
            "val_loss": best[1] if best else None,
        }


def choose(scores: Sequence[tuple[float, float] | None]) -> int | None:
    """The best cell: highest validation accuracy, then lowest validation loss, then the first in grid order.

    Accuracy is what the user keeps a head for; the loss breaks ties between heads that classify the
    validation images equally (the more confident one); grid order makes the choice total. None
    (diverged) cells never win; None when every cell is None.
    """
    ranked = [(-s[0], s[1], i) for i, s in enumerate(scores) if s is not None]
    return min(ranked)[2] if ranked else None


def train_cells(
    cells: Sequence[Cell],
    train: Labelled,
    val: Labelled,
    num_classes: int,
    recipe: Recipe,
) -> list[CellResult]:
    """The cells of one cut trained together on its activations, each head seeded as `train_frozen_head` seeds one.

    `recipe` is the run's frozen recipe: its seed, device, class weights and feature augmentation apply
    to every cell, each with its own head and optimiser. With more than one cell, a cell whose
    validation loss diverges stops alone; one cell fails as a single head does.
    """
    heads = [seeded_head(train[0], num_classes, cell.head, recipe.seed) for cell in cells]
    with torch_threads(head_threads()):  # bitwise the same at any count: fitted to the idle cores
        results = fit_many(
            heads,
            train,
            val,
            [cell.optim for cell in cells],
            recipe.seed,
            recipe.device,
            class_weights=recipe.class_weights,
            train_augment=recipe.augmenter(),
            stop_diverged=len(cells) > 1,
        )
    return [CellResult(c, h, r) for c, h, r in zip(cells, heads, results, strict=True)]


@dataclass(frozen=True)
class GridOutcome:
    """Every cell's result in grid order, the chosen one, and the stored activations of its cut (to calibrate it)."""

    cells: list[CellResult]
    chosen: int
    features: Features

    @property
    def kept(self) -> CellResult:
        return self.cells[self.chosen]

    def summary(self) -> dict[str, Any]:
        """The chosen cell's name and every cell's figures (history.json's `grid`)."""
        return {"chosen": self.kept.cell.name, "cells": [c.summary() for c in self.cells]}


def train_grid(
    cells: Sequence[Cell],
    read: Callable[[str], Features],
    labels: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    recipe: Recipe,
) -> GridOutcome:
    """Every cell, one cut at a time: `read(cut)` once (training and validation activations), its cells together.

    Only the cut being trained and the best one so far are held, so a grid over many cuts needs no
    more memory than two of them.
    """
    results: list[CellResult | None] = [None] * len(cells)
    kept: Features | None = None
    for cut in dict.fromkeys(c.cut for c in cells):
        at = [i for i, c in enumerate(cells) if c.cut == cut]
        features = read(cut)
        trained = train_cells(
            [cells[i] for i in at], (features[0], labels[0]), (features[1], labels[1]), num_classes, recipe
        )
        for i, result in zip(at, trained, strict=True):
            results[i] = result
        best = choose([r.score if r is not None else None for r in results])
        if best is not None and cells[best].cut == cut:
            kept = features
    chosen = choose([r.score for r in results])
    if chosen is None or kept is None:
        raise FloatingPointError(f"every one of the grid's {len(cells)} heads diverged: lower the learning rates")
    return GridOutcome([r for r in results if r is not None], chosen, kept)
