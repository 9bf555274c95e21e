"""The sweep flow on tiny data with a real Prefect server and MLflow store: cells, the cut, report, resuming.

The upstream stages run without Prefect (as DVC runs them), and the stage records they write are
removed when the module is done: both runners reuse a current record on disk, so this module leaves
no cached upstream results behind for tests/flow/test_pipeline.py, whichever runs first.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from prefect.client.orchestration import get_client

from flows import stages
from flows.layout import Layout
from flows.sweep import fraction_sweep
from headstart.config import STORED, Params, parse_params
from headstart.records import AdviseRecord
from tasks.sweep import cell_name
from tests.states import task_states
from tests.tiny import tiny_params, write_tiny_fmnist

FRACTIONS = [0.5, 1.0]
STRATEGIES = ["frozen", "partial", "finetune", "scratch"]
CELLS = len(FRACTIONS) * len(STRATEGIES)


def run_sweep(root: Path, params: Params) -> tuple[Any, Counter]:
    """Run the flow (inputs already prepared); return its final state and the task runs' states by task."""
    state = fraction_sweep(params=params, root=root, with_upstream=False, return_state=True)
    with get_client(sync_client=True) as client:
        return state, task_states(client, state.state_details.flow_run_id)


def upstream_records(lay: Layout, source: str) -> list[Path]:
    """The records of the stages the sweep reads, by which a later run of either orchestrator would reuse them."""
    return [
        lay.data_record,
        lay.source_model / "record.json",
        lay.weights_record,
        lay.extract_record(source),
        lay.advice_record(source),
    ]


@pytest.fixture(scope="module")
def project(project_root: Path) -> Iterator[dict[str, Any]]:
    """Tiny data, the source model, its weights, stored activations at every cut and the advice (its cut ranking),
    written by the plain stage functions; the sweep uses the params.yaml defaults but for the fractions."""
    raw = tiny_params(write_tiny_fmnist(project_root / "tiny-fmnist"))
    raw["sources"] = {"fmnist": raw["sources"]["fmnist"]}
    raw["train"]["runs"] = {"fmnist-frozen": {"source": "fmnist", "strategy": "frozen"}}
    params = parse_params(raw)
    assert params.sweep.strategies == STRATEGIES and params.sweep.cut == "best"
    assert params.sweep.fractions == FRACTIONS and params.sweep.seeds == [0]
    lay = Layout(project_root)
    for record in upstream_records(lay, "fmnist"):  # another module's run on the same data would be reused
        record.unlink(missing_ok=True)
    runner = stages.Recorder(stages.plain_runner)
    stages.upstream(params, lay, runner, ["fmnist"], advised=["fmnist"])
    assert runner.computed == ["data", "pretrain", "weights", "extract@fmnist", "advise@fmnist"]
    advice = AdviseRecord.read(lay.advice_record("fmnist"))
    yield {"root": project_root, "raw": raw, "params": params, "lay": lay, "advice": advice}
    for record in upstream_records(lay, "fmnist"):
        record.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def interrupted(project: dict[str, Any]) -> dict[str, Any]:
    """A sweep that fails at its fifth cell (its output path is taken by a folder), then the same sweep again."""
    lay: Layout = project["lay"]
    blocker = lay.sweep_cells / f"{cell_name('frozen', 1.0, 0)}.json"
    blocker.mkdir(parents=True)
    failed, failed_states = run_sweep(project["root"], project["params"])
    finished_before = sorted(p.name for p in lay.sweep_cells.glob("*.json") if p.is_file())
    shutil.rmtree(blocker)
    resumed, resumed_states = run_sweep(project["root"], project["params"])
    return {
        "failed": failed,
        "failed_states": failed_states,
        "finished_before": finished_before,
        "resumed": resumed,
        "resumed_states": resumed_states,
    }


def test_a_failed_sweep_keeps_the_cells_it_finished(interrupted: dict[str, Any]) -> None:
    assert interrupted["failed"].is_failed()
    assert interrupted["failed_states"][("sweep", "Completed")] == len(STRATEGIES)
    assert interrupted["failed_states"][("sweep", "Failed")] == 1
    assert ("sweep_report", "Completed") not in interrupted["failed_states"]
    assert interrupted["finished_before"] == sorted(f"{cell_name(k, 0.5, 0)}.json" for k in STRATEGIES)


def test_the_rerun_computes_only_the_missing_cells(interrupted: dict[str, Any]) -> None:
    assert interrupted["resumed"].is_completed()
    states = interrupted["resumed_states"]
    assert states[("sweep", "Cached")] == len(STRATEGIES)
    assert states[("sweep", "Completed")] == len(STRATEGIES)
    assert states[("sweep_report", "Completed")] == 1
    assert sum(states.values()) == CELLS + 1


def test_every_cell_is_one_finished_child_of_one_parent_run(interrupted: dict[str, Any]) -> None:
    result = interrupted["resumed"].result()
    parent = mlflow.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        output_format="list",
    )
    finished = Counter(r.info.run_name for r in children if r.info.status == "FINISHED")
    assert finished == Counter(cell_name(k, f, 0) for f in FRACTIONS for k in STRATEGIES)
    assert [r.info.run_name for r in children if r.info.status == "FAILED"] == [cell_name("frozen", 1.0, 0)]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/table.csv", "sweep/val_loss.png", "sweep/train_loss.png", "sweep/test_accuracy.png"} <= artifacts


def test_the_report_has_a_row_per_cell_and_the_figures(project: dict[str, Any], interrupted: dict[str, Any]) -> None:
    out: Path = project["lay"].sweep
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["strategy"], float(r["fraction"])) for r in rows) == sorted(
        (k, f) for f in FRACTIONS for k in STRATEGIES
    )
    for row in rows:
        assert 0.0 <= float(row["test_accuracy_mean"]) <= 1.0
        assert float(row["best_val_loss_mean"]) > 0 and row["seeds"] == "1"
    full = [r for r in rows if r["fraction"] == "1.0"]
    half = [r for r in rows if r["fraction"] == "0.5"]
    assert all(int(f["train_size"]) > int(h["train_size"]) for f, h in zip(full, half, strict=True))
    for name in ("val_loss.png", "train_loss.png", "test_accuracy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert len((out / "table.md").read_text().splitlines()) == 2 + len(FRACTIONS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"] == CELLS and set(summary["crossover"]) == {"frozen", "partial", "finetune"}
    result = interrupted["resumed"].result()
    assert result["crossover"] == summary["crossover"]


def test_a_warm_rerun_computes_nothing(project: dict[str, Any], interrupted: dict[str, Any]) -> None:
    state, states = run_sweep(project["root"], project["params"])
    assert state.is_completed()
    assert states == Counter({("sweep", "Cached"): CELLS, ("sweep_report", "Cached"): 1})
    assert state.result()["parent_run_id"] == interrupted["resumed"].result()["parent_run_id"]


def test_frozen_and_partial_cells_train_at_the_probes_best_cut(project: dict[str, Any], interrupted: dict) -> None:
    best = project["advice"].ranking[0]
    assert best in project["params"].sources["fmnist"].stored_cuts
    result = interrupted["resumed"].result()
    assert {(r["strategy"], r["cut"]) for r in result["cell_records"]} == {
        (s, best if s in STORED else None) for s in STRATEGIES
    }
    for record in result["cell_records"]:
        run = mlflow.get_run(record["mlflow_run_id"])
        assert run.data.params["cut"] == str(record["cut"])
        written = json.loads((project["lay"].sweep_cells / f"{record['cell']}.json").read_text())
        assert written["cut"] == record["cut"]
    assert mlflow.get_run(result["parent_run_id"]).data.params["cut"] == best
    with open(project["lay"].sweep / "table.csv", newline="") as f:
        assert {(r["strategy"], r["cut"]) for r in csv.DictReader(f)} == {
            (s, best if s in STORED else "") for s in STRATEGIES
        }
    header = (project["lay"].sweep / "table.md").read_text().splitlines()[0]
    assert f"test accuracy: frozen at {best} | test accuracy: partial at {best} | test accuracy: finetune |" in header


def test_the_partial_cell_learns_within_its_epoch_budget(interrupted: dict[str, Any]) -> None:
    cells = {(r["strategy"], r["fraction"]): r for r in interrupted["resumed"].result()["cell_records"]}
    partial, frozen = cells[("partial", 1.0)], cells[("frozen", 1.0)]
    assert 1 <= partial["epochs"] <= 2  # tiny params: train.partial.epochs is 2
    assert partial["test_accuracy"] > 0.5  # 5 classes: chance is 0.2
    assert (partial["best_val_loss"], partial["test_loss"]) != (frozen["best_val_loss"], frozen["test_loss"])


def test_more_seeds_compute_only_the_new_seeds_cells(project: dict[str, Any], interrupted: dict[str, Any]) -> None:
    raw = {**project["raw"], "sweep": {**project["raw"]["sweep"], "strategies": ["scratch"], "seeds": [0, 1]}}
    state, states = run_sweep(project["root"], parse_params(raw))
    assert states[("sweep", "Cached")] == 2 and states[("sweep", "Completed")] == 2
    rows = {(r["strategy"], r["fraction"]): r for r in state.result()["rows"]}
    assert all(r["seeds"] == 2 for r in rows.values())
    assert any(r["best_val_loss_std"] > 0 for r in rows.values())


def test_a_named_cut_recomputes_only_the_cells_that_train_at_it(project: dict[str, Any], interrupted: dict) -> None:
    best = project["advice"].ranking[0]
    other = next(c for c in project["params"].sources["fmnist"].stored_cuts if c != best)
    raw = {**project["raw"], "sweep": {**project["raw"]["sweep"], "cut": other, "fractions": [1.0]}}
    state, states = run_sweep(project["root"], parse_params(raw))
    assert states[("sweep", "Cached")] == 2  # finetune and scratch do not depend on the cut
    assert states[("sweep", "Completed")] == 2
    records = {r["strategy"]: r for r in state.result()["cell_records"]}
    assert records["frozen"]["cut"] == records["partial"]["cut"] == other
    assert records["finetune"]["cut"] is None


def test_best_follows_the_advise_stages_ranking(project: dict[str, Any], interrupted: dict[str, Any]) -> None:
    """Not the source's configured cut: put the probe's second choice first and the frozen cell moves there."""
    path = project["lay"].advice("fmnist") / "advice.json"
    original = path.read_text()
    ranking = json.loads(original)["ranking"]
    path.write_text(json.dumps({**json.loads(original), "ranking": [*ranking[1:], ranking[0]]}))
    try:
        raw = {**project["raw"], "sweep": {**project["raw"]["sweep"], "strategies": ["frozen"], "fractions": [1.0]}}
        state, _ = run_sweep(project["root"], parse_params(raw))
    finally:
        path.write_text(original)
    assert [r["cut"] for r in state.result()["cell_records"]] == [ranking[1]]
