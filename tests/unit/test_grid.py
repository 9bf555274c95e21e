"""Many heads from one read: the grid's cells, its one-pass loop, its choice rule and its params."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from headstart.checkpoints import load_model
from headstart.config import (
    FeatureAugmentParams,
    GridParams,
    HeadParams,
    OptimParams,
    ParamsError,
    RunParams,
    parse_params,
)
from headstart.fit import ArrayInputs, fit_many
from headstart.grid import LOGREG_HEAD, Cell, choose, grid_cells, train_cells, train_grid
from headstart.records import TrainRecord, absolute
from headstart.strategies import Recipe, seeded_head, train_frozen_head
from tasks.train import train
from tests.tiny import tiny_params
from tests.unit.training_setup import Setup, prepare, with_taps

HEAD = HeadParams(hidden=[8], dropout=0.3)
"""Dropout on: a cell's dropout draws must be its own, whatever the other heads draw."""
OPTIM = OptimParams(epochs=5, batch_size=16, lr=3e-3, weight_decay=1e-4, patience=2)
CLASSES = 3


class CountingInputs(ArrayInputs):
    """Rows in memory that count how often a loop reads them: one shuffled pass and one in-order pass per epoch."""

    def __init__(self, x: np.ndarray):
        super().__init__(x)
        self.shuffles = self.in_orders = 0

    def shuffled(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.shuffles += 1
        return super().shuffled(batch_size, generator)

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        self.in_orders += 1
        return super().in_order(batch_size)


Labelled = tuple[np.ndarray, np.ndarray]


def features(shape: tuple[int, ...], seed: int = 0) -> tuple[Labelled, Labelled]:
    """Learnable stored-activation look-alikes: each class shifts its own block of features."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Labelled:
        y = np.arange(n) % CLASSES
        x = rng.normal(size=(n, *shape)).astype(np.float32)
        flat = x.reshape(n, -1)
        for c in range(CLASSES):
            flat[y == c, c::CLASSES] += 0.4
        return x, y

    return split(96), split(30)


def same(a: nn.Module, b: nn.Module) -> bool:
    """Bitwise the same weights."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def epochs(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_a_one_cell_grid_is_the_single_frozen_head_bitwise() -> None:
    train, val = features((4, 3, 3))
    recipe = Recipe(HEAD, OPTIM, seed=5, device="cpu")
    single, alone = train_frozen_head(train, val, CLASSES, recipe)
    cells = grid_cells(GridParams(), "block2", HEAD, OPTIM, len(train[0]))
    assert cells == [Cell("block2", HEAD, OPTIM)]  # an empty grid is the run's own head
    [cell] = train_cells(cells, train, val, CLASSES, recipe)
    assert same(cell.head, single)
    assert epochs(cell.result.history) == epochs(alone.history) and cell.result.best_epoch == alone.best_epoch


def test_every_cell_is_stepped_on_one_read_per_epoch_and_trains_as_it_would_alone() -> None:
    (x, y), (xv, yv) = features((20,))
    grid = GridParams(lrs=[3e-2, 3e-3], hidden=[[], [8]], logreg=True)
    cells = grid_cells(grid, "fc1", HEAD, OPTIM, len(x))
    assert len(cells) == 2 * 2 + 1
    train_x, val_x = CountingInputs(x), CountingInputs(xv)
    results = train_cells(cells, (train_x, y), (val_x, yv), CLASSES, Recipe(HEAD, OPTIM, seed=1, device="cpu"))
    longest = max(r.result.epochs for r in results)
    assert train_x.shuffles == longest and val_x.in_orders == longest  # each epoch reads the rows once for all heads
    for cell, result in zip(cells, results, strict=True):
        assert result.cell == cell and result.result.epochs >= 1
        start = seeded_head(x, CLASSES, cell.head, seed=1)
        assert not same(result.head, start)  # stepped away from its seeded start
        recipe = Recipe(cell.head, cell.optim, seed=1, device="cpu")
        alone, fitted = train_frozen_head((x, y), (xv, yv), CLASSES, recipe)
        assert same(result.head, alone), cell.name
        assert epochs(result.result.history) == epochs(fitted.history)


def test_feature_augmentation_is_drawn_once_a_batch_and_each_cell_sees_what_it_would_alone() -> None:
    train, val = features((4, 3, 3))
    augment = FeatureAugmentParams(flip=True, crop=0.25, brightness=0.2, contrast=0.2)
    recipe = Recipe(HEAD, OPTIM, seed=2, device="cpu", feature_augment=augment)
    cells = grid_cells(GridParams(lrs=[1e-2, 1e-3], hidden=[[], [8]]), "block2", HEAD, OPTIM, len(train[0]))
    for result in train_cells(cells, train, val, CLASSES, recipe):
        alone, _ = train_frozen_head(
            train, val, CLASSES, replace(recipe, head=result.cell.head, optim=result.cell.optim)
        )
        assert same(result.head, alone), result.cell.name
    plain = train_cells(cells[:1], train, val, CLASSES, replace(recipe, feature_augment=None))[0]
    assert not same(plain.head, train_cells(cells[:1], train, val, CLASSES, recipe)[0].head)  # it did augment


def test_a_grid_is_deterministic_per_seed() -> None:
    train, val = features((12,))
    cells = grid_cells(GridParams(lrs=[1e-2, 1e-3], hidden=[[8]]), "fc1", HEAD, OPTIM, len(train[0]))
    seeded = [Recipe(HEAD, OPTIM, seed=seed, device="cpu") for seed in (0, 0, 1)]
    first, again, other = (train_cells(cells, train, val, CLASSES, recipe) for recipe in seeded)
    assert all(same(a.head, b.head) for a, b in zip(first, again, strict=True))
    assert [a.result.history[-1]["val_loss"] for a in first] == [b.result.history[-1]["val_loss"] for b in again]
    assert not any(same(a.head, b.head) for a, b in zip(first, other, strict=True))


def test_cells_come_in_grid_order_with_the_logistic_regression_last_per_cut() -> None:
    grid = GridParams(lrs=[1e-2, 1e-3], cuts=["block2", "fc1"], hidden=[[], [16, 8]], logreg=True, logreg_c=0.5)
    cells = grid_cells(grid, "block2", HEAD, OPTIM, train_rows=400)
    assert [c.name for c in cells] == [
        "block2-linear-lr0.01", "block2-linear-lr0.001", "block2-16x8-lr0.01", "block2-16x8-lr0.001", "block2-logreg",
        "fc1-linear-lr0.01", "fc1-linear-lr0.001", "fc1-16x8-lr0.01", "fc1-16x8-lr0.001", "fc1-logreg",
    ]  # fmt: skip
    assert cells[2].head == HEAD.model_copy(update={"hidden": [16, 8]}) and cells[2].optim.lr == 1e-2
    logreg = cells[4]
    assert logreg.logreg and logreg.head == LOGREG_HEAD and logreg.optim.lr == OPTIM.lr
    assert logreg.optim.weight_decay == pytest.approx(1 / (0.5 * 400))  # scikit-learn's C, per training row
    assert logreg.params() == {
        "cut": "block2", "lr": OPTIM.lr, "hidden": [], "logreg": True, "weight_decay": 1 / 200, "init": "zeros"
    }  # fmt: skip


def test_the_choice_is_accuracy_then_loss_then_grid_order_and_never_a_diverged_cell() -> None:
    assert choose([(0.8, 0.5), (0.9, 0.7), (0.85, 0.1)]) == 1  # accuracy first
    assert choose([(0.9, 0.5), (0.9, 0.4), (0.8, 0.1)]) == 1  # equal accuracy: the lower loss
    assert choose([(0.9, 0.4), (0.9, 0.4), (0.9, 0.4)]) == 0  # all equal: the first in grid order
    assert choose([None, (0.1, 3.0), None]) == 1
    assert choose([None, None]) is None and choose([]) is None


class NanAfterFirstEpoch(nn.Module):
    """A linear head whose predictions turn to NaN after its first validation: a head that diverges."""

    def __init__(self, width: int):
        super().__init__()
        self.linear, self.evals = nn.Linear(width, CLASSES), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        if not self.training:
            self.evals += 1
            return out * float("nan") if self.evals > 2 else out  # two validation batches per epoch
        return out


def test_a_diverging_head_stops_alone_and_keeps_its_best_epoch() -> None:
    train, val = features((10,))
    torch.manual_seed(0)
    bad, good = NanAfterFirstEpoch(10), nn.Sequential(nn.Flatten(), nn.Linear(10, CLASSES))
    optims = [OPTIM.model_copy(update={"patience": OPTIM.epochs})] * 2
    with pytest.raises(FloatingPointError, match="diverged"):
        fit_many([NanAfterFirstEpoch(10)], train, val, optims[:1], seed=0)
    bad_result, good_result = fit_many([bad, good], train, val, optims, seed=0, stop_diverged=True)
    assert bad_result.diverged and bad_result.epochs == 1 and bad_result.best_epoch == 1
    assert not good_result.diverged and good_result.epochs == OPTIM.epochs


def test_a_grid_reads_each_cut_once_and_keeps_the_chosen_cuts_activations() -> None:
    stored = {"block2": features((4, 3, 3), seed=0), "fc1": features((16,), seed=1)}
    reads: list[str] = []

    def read(cut: str) -> tuple[np.ndarray, np.ndarray]:
        reads.append(cut)
        return stored[cut][0][0], stored[cut][1][0]

    labels = (stored["block2"][0][1], stored["block2"][1][1])
    grid = GridParams(lrs=[1e-2, 1e-3], cuts=["block2", "fc1"], hidden=[[], [8]])
    cells = grid_cells(grid, "block2", HEAD, OPTIM, len(labels[0]))
    outcome = train_grid(cells, read, labels, CLASSES, Recipe(HEAD, OPTIM, seed=0, device="cpu"))
    assert reads == ["block2", "fc1"]
    assert [r.cell for r in outcome.cells] == cells
    assert outcome.chosen == choose([r.score for r in outcome.cells])
    assert outcome.features[0] is stored[outcome.kept.cell.cut][0][0]
    summary = outcome.summary()
    assert summary["chosen"] == outcome.kept.cell.name and len(summary["cells"]) == len(cells)
    assert "seconds" not in summary["cells"][0]  # content only: history.json gates the caches


def run(**fields: object) -> dict[str, object]:
    return {"source": "fmnist", "strategy": "frozen", **fields}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (run(strategy="finetune", grid={}), "grid applies to frozen runs"),
        (run(cut="fc1", grid={"cuts": ["block1"]}), "set the cut once"),
        (run(grid={"lrs": [0.001, 0.001]}), "distinct"),
        (run(grid={"hidden": [[8], [8]]}), "distinct"),
        (run(grid={"lrs": [0.0]}), "greater than 0"),
        (run(grid={"logreg_c": 0}), "greater than 0"),
        (run(grid={"cuts": ["block3"]}), "grid.cuts holds 'block3'"),
    ],
)
def test_a_bad_grid_is_refused_naming_its_key(tmp_path: Path, fields: dict, message: str) -> None:
    raw = tiny_params(tmp_path)
    raw["train"]["runs"] = {"grid": fields}
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


def test_a_grid_defaults_off_and_parses_every_axis(tmp_path: Path) -> None:
    raw = tiny_params(tmp_path)
    assert all(r.grid is None for r in parse_params(raw).train.runs.values())
    grid = {"lrs": [0.01, 0.001], "cuts": ["block2", "fc1"], "hidden": [[], [256]], "logreg": True}
    raw["train"]["runs"] = {"grid": run(grid=grid)}
    parsed = parse_params(raw).train.runs["grid"]
    assert parsed.grid == GridParams(**grid) and parsed.cuts == ["block2", "fc1"]
    assert RunParams(source="fmnist", strategy="frozen").cuts == [None]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """The training setup with a store holding block2 and fc1 (the grid's two cuts)."""
    root = tmp_path_factory.mktemp("grid")
    return with_taps(prepare(root), root, ["fc1"])


def train_grid_run(setup: Setup, out_dir: Path, run: RunParams) -> TrainRecord:
    return train.fn(
        run_name="test-grid", run=run, source=setup.source, params=setup.params.model_copy(update={"reject": 0.1}),
        weights=setup.weights, extract_record=setup.extract_record, task_meta=setup.task_meta,
        data_dir=setup.data_dir, out_dir=out_dir,
    )  # fmt: skip


def test_the_train_task_keeps_the_chosen_cell_with_its_baseline_and_threshold_and_writes_content_only(
    setup: Setup, tmp_path: Path
) -> None:
    grid = GridParams(lrs=[0.01, 0.002], cuts=["block2", "fc1"], logreg=True)
    run = RunParams(source="fmnist", strategy="frozen", baseline=True, grid=grid)
    first, again = (train_grid_run(setup, tmp_path / name, run) for name in ("a", "b"))
    history = json.loads(absolute(first.path).with_name("history.json").read_text())
    cells = history["grid"]["cells"]
    assert len(cells) == 6 and first.grid_cell == history["grid"]["chosen"]
    chosen = cells[choose([(c["val_accuracy"], c["val_loss"]) for c in cells])]
    assert chosen["name"] == first.grid_cell and first.cut == chosen["cut"]
    assert first.val_accuracy == chosen["val_accuracy"] and first.best_epoch == chosen["best_epoch"]
    _, spec = load_model(absolute(first.path), first.sha256)
    assert spec.cut == chosen["cut"] and spec.head.hidden == chosen["hidden"]
    assert spec.head.init == chosen["init"] and spec.reject_below == first.reject_below is not None
    assert first.baseline_val_accuracy is not None and first.negative_transfer is not None
    # the same inputs give the same model and the same files: records and outputs hold content only
    assert again.sha256 == first.sha256 and again.grid_cell == first.grid_cell
    assert absolute(again.path).with_name("history.json").read_text() == json.dumps(history, indent=2)
    assert [o.sha256 for o in again.outputs] == [o.sha256 for o in first.outputs]
