"""The sweep's cells and report: subsets, cells as nested MLflow runs, averages, crossover, table, figures."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from flows.sweep import cells
from headstart import tracking
from headstart.config import STORED, ExtractParams, ParamsError, SweepParams, load_params, parse_params
from headstart.datasets import Split
from headstart.records import AdviseRecord
from headstart.splits import nested_fraction
from tasks.advise import probe_subset
from tasks.extract import extract
from tasks.sweep import cell_name, subset, sweep, sweep_cut
from tasks.sweep_report import (
    crossover,
    crossover_lines,
    crossovers,
    metric_figure,
    summarise,
    table_csv,
    table_markdown,
)
from tests.tiny import REPO, placeholder_advice
from tests.unit.training_setup import Setup, prepare


def cell(strategy: str, fraction: float, seed: int = 0, cut: str | None = None, **metrics: float) -> dict:
    defaults = {"test_accuracy": 0.5, "final_train_loss": 1.0, "best_val_loss": 1.0, "seconds": 1.0}
    record = {"strategy": strategy, "cut": cut, "fraction": fraction, "seed": seed, "train_size": int(1000 * fraction)}
    return record | defaults | metrics


def test_cell_names_are_readable_and_distinct() -> None:
    assert cell_name("finetune", 0.05, 0) == "finetune-5pct-s0"
    assert cell_name("scratch", 0.15, 2) == "scratch-15pct-s2"  # 0.15 * 100 is 15.000000000000002
    assert cell_name("frozen", 0.125, 1) == "frozen-12.5pct-s1"
    grid = cells(SweepParams())
    assert len({cell_name(k, f, s) for s, f, k in grid}) == len(grid) == 40  # 10 fractions x 4 strategies


def test_cells_run_seed_by_seed_from_the_smallest_fraction() -> None:
    grid = cells(SweepParams(fractions=[1.0, 0.5], strategies=["scratch", "frozen"], seeds=[3, 1]))
    assert grid == [(3, 0.5, "scratch"), (3, 0.5, "frozen"), (3, 1.0, "scratch"), (3, 1.0, "frozen")] + [
        (1, 0.5, "scratch"),
        (1, 0.5, "frozen"),
        (1, 1.0, "scratch"),
        (1, 1.0, "frozen"),
    ]


def test_subsets_are_nested_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(5), 40)
    images = np.arange(len(labels) * 4, dtype=np.uint8).reshape(-1, 2, 2)
    images[:, 0, 0] = np.arange(len(labels))  # a row id we can read back
    split = Split(images, labels)
    small, large = subset(split, 0.1, seed=0), subset(split, 0.5, seed=0)
    assert set(small.images[:, 0, 0]) < set(large.images[:, 0, 0])
    assert np.bincount(small.labels).tolist() == [4] * 5
    assert np.bincount(large.labels).tolist() == [20] * 5
    assert len(subset(split, 1.0, seed=0)) == len(split)
    other = subset(split, 0.1, seed=1)
    assert set(other.images[:, 0, 0]) != set(small.images[:, 0, 0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return prepare(tmp_path_factory.mktemp("sweep"))


def run_cell(setup: Setup, strategy: str, fraction: float, out_dir: Path, seed: int = 0, **overrides) -> dict:
    """One cell as the flow calls it (frozen and partial at the store's `block2`); `overrides` replace arguments."""
    arguments = {
        "strategy": strategy,
        "fraction": fraction,
        "seed": seed,
        "cut": "block2" if strategy in STORED else None,
        "head": setup.params.head,
        "optim": setup.params.end_to_end if strategy in ("finetune", "scratch") else setup.params.frozen,
        "device": "cpu",
        "weights": setup.weights,
        "extract_record": setup.extract_record if strategy in STORED else None,
        "task_meta": setup.task_meta,
        "data_dir": setup.data_dir,
        "out_dir": out_dir,
        "stream": setup.params.stream,
    }
    return sweep.fn(**(arguments | overrides))


def test_cells_are_child_runs_of_the_parent_and_write_their_history(setup: Setup, tmp_path: Path) -> None:
    with tracking.keyed_run("sweep-test", "unit-test-parent", {"source": "fmnist"}, {"stage": "sweep"}) as parent:
        records = {s: run_cell(setup, s, 0.5, tmp_path) for s in ("frozen", "partial", "finetune", "scratch")}
    client = MlflowClient()
    for strategy, record in records.items():
        assert record["train_size"] == 30  # half of the 60 training images, stratified
        assert 0.0 <= record["test_accuracy"] <= 1.0
        assert record["best_val_loss"] > 0 and record["final_train_loss"] > 0
        run = client.get_run(record["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["strategy"] == strategy and run.data.params["fraction"] == "0.5"
        assert record["cut"] == ("block2" if strategy in STORED else None)
        assert run.data.params["cut"] == str(record["cut"])
        assert run.data.metrics["test_accuracy"] == pytest.approx(record["test_accuracy"])
        written = json.loads((tmp_path / f"{record['cell']}.json").read_text())
        assert written["test_accuracy"] == record["test_accuracy"]
        assert len(written["history"]) == record["epochs"]
        assert record["outputs"][0]["path"].endswith(f"{record['cell']}.json")
    assert records["finetune"]["test_accuracy"] != records["scratch"]["test_accuracy"] or (
        records["finetune"]["best_val_loss"] != records["scratch"]["best_val_loss"]
    )
    # partial trains more than the head (fc1 above block2), so it is not the frozen cell under another name
    assert records["partial"]["best_val_loss"] != records["frozen"]["best_val_loss"]
    assert client.get_run(records["partial"]["mlflow_run_id"]).data.params["upper_init"] == "pretrained"


def test_a_cell_takes_a_cut_exactly_when_it_trains_on_stored_activations(setup: Setup, tmp_path: Path) -> None:
    with tracking.keyed_run("sweep-test", "unit-test-cut-check", {}, {}):
        with pytest.raises(ValueError, match="take a stored cut"):
            run_cell(setup, "partial", 0.5, tmp_path, cut=None)
        with pytest.raises(ValueError, match="take a stored cut"):
            run_cell(setup, "finetune", 0.5, tmp_path, cut="block2")


def ranked(ranking: list[str]) -> AdviseRecord:
    """An advise record whose probe ranked the cuts so (its other measurements are placeholders)."""
    return placeholder_advice(ranking)


def test_best_cut_is_the_probes_first_and_a_named_cut_is_kept() -> None:
    advice = ranked(["block1", "block2", "fc1"])
    assert sweep_cut("best", advice) == "block1"
    assert sweep_cut("fc1", advice) == "fc1"
    assert sweep_cut("fc1", None) == "fc1"
    with pytest.raises(ValueError, match="advise"):
        sweep_cut("best", None)


def test_the_probe_sees_only_images_every_fraction_from_5pct_trains_on() -> None:
    """Why one probe ranking may pick the cut for every fraction: with the same seed its subset is nested inside."""
    labels = np.random.default_rng(7).permutation(np.repeat(np.arange(5), 5400))  # FMNIST-1's training split
    probe = set(probe_subset(labels, per_class=200, seed=0))
    assert len(probe) == 1000
    assert probe <= set(nested_fraction(labels, 0.05, seed=0))
    assert not probe <= set(nested_fraction(labels, 0.05, seed=1))  # another seed: the probe saw other images


def test_the_parent_run_is_found_again_by_its_key() -> None:
    with tracking.keyed_run("sweep-test", "unit-test-key-2", {"a": 1}, {"grid": "x"}) as first:
        pass
    with tracking.keyed_run("sweep-test", "unit-test-key-2", {"a": 1}, {"grid": "y"}) as again:
        pass
    assert again.info.run_id == first.info.run_id
    assert MlflowClient().get_run(first.info.run_id).data.tags["grid"] == "y"


def test_a_cell_is_deterministic_for_its_seed(setup: Setup, tmp_path: Path) -> None:
    with tracking.keyed_run("sweep-test", "unit-test-determinism", {}, {}):
        a = run_cell(setup, "scratch", 1.0, tmp_path / "a", seed=4)
        b = run_cell(setup, "scratch", 1.0, tmp_path / "b", seed=4)
    keys = ("test_accuracy", "test_loss", "final_train_loss", "best_val_loss")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_a_cell_outside_a_parent_run_is_refused(setup: Setup, tmp_path: Path) -> None:
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="parent run"):
        run_cell(setup, "frozen", 1.0, tmp_path)


def test_summary_averages_over_seeds() -> None:
    rows = summarise(
        [cell("scratch", 0.5, 0, test_accuracy=0.8), cell("scratch", 0.5, 1, test_accuracy=0.9), cell("frozen", 0.5)]
    )
    assert [(r["strategy"], r["seeds"]) for r in rows] == [("scratch", 2), ("frozen", 1)]
    assert rows[0]["test_accuracy_mean"] == pytest.approx(0.85)
    assert rows[0]["test_accuracy_std"] == pytest.approx(0.05)
    assert rows[1]["test_accuracy_std"] == 0.0


def losses(strategy: str, values: dict[float, float]) -> list[dict]:
    return [cell(strategy, f, best_val_loss=v, test_accuracy=1 - v) for f, v in values.items()]


def test_crossover_is_where_scratch_catches_up_for_good() -> None:
    fine = losses("finetune", {0.1: 0.5, 0.25: 0.4, 0.5: 0.35, 1.0: 0.3})
    # better at 10%, worse at 25%, then at least as good from 50% on: the crossover is 50%
    scratch = losses("scratch", {0.1: 0.45, 0.25: 0.5, 0.5: 0.35, 1.0: 0.2})
    rows = summarise(fine + scratch)
    assert crossover(rows, "finetune", "best_val_loss") == 0.5
    assert crossover(rows, "finetune", "test_accuracy") == 0.5  # higher is better for accuracy
    never = summarise(fine + losses("scratch", {0.1: 0.6, 0.25: 0.5, 0.5: 0.4, 1.0: 0.31}))
    assert crossover(never, "finetune", "best_val_loss") is None
    always = summarise(fine + losses("scratch", {0.1: 0.1, 0.25: 0.1, 0.5: 0.1, 1.0: 0.1}))
    assert crossover(always, "finetune", "best_val_loss") == 0.1
    assert crossovers(summarise(fine)) == {}  # no scratch baseline, nothing to compare
    assert set(crossovers(rows)) == {"finetune"}
    assert crossover_lines({"finetune": {"best_val_loss": 0.5, "test_accuracy": None}}) == [
        "scratch catches up with finetune on best validation loss from 50% of the data on",
        "scratch never catches up with finetune on test accuracy (behind at the largest share)",
    ]


def test_table_has_a_line_per_fraction_and_a_column_per_strategy_and_metric() -> None:
    rows = summarise(losses("finetune", {0.05: 0.5, 1.0: 0.3}) + losses("scratch", {0.05: 0.6, 1.0: 0.2}))
    lines = table_markdown(rows).splitlines()
    assert len(lines) == 4
    assert "best validation loss: scratch" in lines[0] and "test accuracy: finetune" in lines[0]
    assert lines[2].startswith("| 5% | 50 |") and "0.600" in lines[2]
    csv_lines = table_csv(rows).splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("strategy,cut,fraction,train_size,seeds")


def test_table_and_figures_name_the_cut_of_frozen_and_partial() -> None:
    cells = [cell("frozen", 1.0, cut="block1"), cell("partial", 1.0, cut="block1"), cell("scratch", 1.0, cut=None)]
    rows = summarise(cells)
    assert [r["cut"] for r in rows] == ["block1", "block1", None]
    header = table_markdown(rows).splitlines()[0]
    assert "test accuracy: frozen at block1 | test accuracy: partial at block1 | test accuracy: scratch |" in header
    labels = [line.get_label() for line in metric_figure(rows, "test_accuracy").axes[0].get_lines()]
    assert labels == ["frozen at block1", "partial at block1", "scratch"]


def test_table_shows_the_spread_over_several_seeds() -> None:
    rows = summarise([cell("scratch", 1.0, 0, best_val_loss=0.2), cell("scratch", 1.0, 1, best_val_loss=0.4)])
    assert "0.300 ± 0.100" in table_markdown(rows)


def test_figure_draws_a_line_per_strategy_and_marks_the_crossover(tmp_path: Path) -> None:
    rows = summarise(losses("finetune", {0.1: 0.5, 1.0: 0.3}) + losses("scratch", {0.1: 0.6, 1.0: 0.2}))
    fig = metric_figure(rows, "best_val_loss", crossover_at=1.0)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["finetune", "scratch", "scratch catches up (100%)"]
    fig.savefig(tmp_path / "f.png", format="png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_params_are_validated_naming_the_key() -> None:
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    for key, value, expected in (
        ("fractions", [0.5, 0.5], "distinct"),
        ("fractions", [0.0, 0.5], "greater than 0"),
        ("strategies", ["auto"], "'frozen', 'partial', 'finetune', 'scratch', 'frozen\\+views' or 'partial\\+views'"),
        ("source", "nowhere", "expected one of"),
        ("cut", "block9", "expected 'best' or one of \\['block2', 'block1', 'fc1'\\]"),
    ):
        bad = {**raw, "sweep": {**raw["sweep"], key: value}}
        with pytest.raises(ParamsError, match=expected) as err:
            parse_params(bad, "params.yaml")
        assert "sweep" in str(err.value)


def test_views_cells_train_the_stored_strategy_on_the_stored_views(setup: Setup, tmp_path: Path) -> None:
    """frozen+views and partial+views: the same strategy and cut, trained on the store's augmented views."""
    viewed = extract.fn(
        weights=setup.weights, task_meta=setup.task_meta, data_dir=setup.data_dir, store_root=tmp_path / "features",
        params=ExtractParams(batch_size=32, chunk_mb=0.5, device="cpu", views=2),
    )  # fmt: skip
    with tracking.keyed_run("sweep-test", "unit-test-views", {}, {}):
        for strategy in ("frozen", "partial"):
            plain = run_cell(setup, strategy, 1.0, tmp_path / strategy)
            views = run_cell(setup, f"{strategy}+views", 1.0, tmp_path / f"{strategy}+views", extract_record=viewed,
                             cut="block2", optim=setup.params.frozen)  # fmt: skip
            assert views["cell"] == f"{strategy}+views-100pct-s0" and views["cut"] == "block2"
            assert views["best_val_loss"] != plain["best_val_loss"]  # other training rows, the same validation ones
            params = MlflowClient().get_run(views["mlflow_run_id"]).data.params
            assert params["strategy"] == f"{strategy}+views"
            assert ("upper_init" in params) == (strategy == "partial")
        with pytest.raises(ValueError, match="the store holds none: set extract.views"):
            run_cell(setup, "frozen+views", 1.0, tmp_path / "none", extract_record=setup.extract_record, cut="block2")
