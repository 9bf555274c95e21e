"""Choosing a strategy through the real flow and CLI on tiny data: partial, auto and grid runs, `advise`,
`compare-init`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.layout import Layout
from flows.pipeline import transfer
from flows.summary import summary_markdown
from headstart.checkpoints import load_model
from headstart.config import parse_params
from headstart.grid import choose
from headstart.records import absolute
from tests.tiny import tiny_params, write_tiny_fmnist

pytestmark = pytest.mark.slow  # a cold flow run on tiny data (Prefect server start, pretrain, extract, 3 runs)
GRID = {"lrs": [0.003, 0.001], "cuts": ["block2", "fc1"], "hidden": [[], [16]], "logreg": True}
"""2 learning rates x 2 cuts x 2 widths, plus a logistic regression per cut: 10 heads."""


@pytest.fixture(scope="module")
def project(project_root: Path) -> dict[str, Any]:
    raw = tiny_params(write_tiny_fmnist(project_root / "tiny-fmnist"))
    raw["sources"] = {"fmnist": raw["sources"]["fmnist"]}
    raw["train"]["runs"] = {
        "fmnist-partial": {"source": "fmnist", "strategy": "partial", "cut": "block1"},
        "fmnist-auto": {"source": "fmnist", "strategy": "auto"},
        "fmnist-grid": {"source": "fmnist", "strategy": "frozen", "grid": GRID},
    }
    raw["train"]["partial"].update(epochs=2, batch_size=64)
    raw["advise"].update(probe_per_class=20, probe={"epochs": 5, "batch_size": 32, "lr": 0.003})
    params_file = project_root / "strategy-params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = transfer(params=parse_params(raw), root=project_root)
    return {"root": project_root, "raw": raw, "result": result, "params_file": params_file}


def test_partial_and_auto_runs_train_evaluate_and_report_their_choice(project: dict[str, Any]) -> None:
    runs = project["result"]["runs"]
    assert runs["fmnist-partial"]["trained"] == "partial" and runs["fmnist-partial"]["cut"] == "block1"
    advice = json.loads((Layout(project["root"]).advice("fmnist") / "advice.json").read_text())
    auto = runs["fmnist-auto"]
    assert auto["chosen"] == advice["recommendation"]["strategy"]
    assert auto["baseline_val_accuracy"] is not None or auto["chosen"] == "scratch"
    assert auto["trained"] in (auto["chosen"], "scratch")
    for record in runs.values():
        assert 0.0 <= record["test_accuracy"] <= 1.0
    text = summary_markdown(project["result"])
    assert f"fmnist-auto: auto trained {auto['trained']}" in text
    assert ("NEGATIVE TRANSFER: fmnist-auto" in text) == bool(auto["negative_transfer"])
    tags = MlflowClient().get_run(auto["mlflow_run_id"]).data.tags
    assert tags["strategy"] == "auto" and tags["auto_choice"].split("@")[0] == auto["trained"]


def test_advise_command_prints_the_quadrant_the_recommendation_and_the_evidence(project: dict[str, Any]) -> None:
    from flows.cli import app

    out = CliRunner().invoke(app, ["advise", "fmnist", "--params", str(project["params_file"])])
    assert out.exit_code == 0, out.output
    advice = json.loads((Layout(project["root"]).advice("fmnist") / "advice.json").read_text())
    assert advice["quadrant"] in out.output and f"recommendation: {advice['recommendation']['strategy']}" in out.output
    for cut in ("block1", "block2", "fc1", "pixels"):
        assert cut in out.output
    bad = CliRunner().invoke(app, ["advise", "nope", "--params", str(project["params_file"])])
    assert bad.exit_code != 0 and "unknown source" in bad.output


def test_compare_init_shows_constant_inits_collapsing_the_hidden_units(project: dict[str, Any]) -> None:
    from flows.cli import app

    args = ["compare-init", "--hidden", "8", "--init", "kaiming", "--init", "zeros"]
    out = CliRunner().invoke(app, [*args, "--params", str(project["params_file"])])
    assert out.exit_code == 0, out.output
    assert "| kaiming |" in out.output and "| 8 of 8 |" in out.output
    assert "| zeros |" in out.output and "| 1 of 8 |" in out.output and "symmetry" in out.output
    client = MlflowClient()
    names = {r.info.run_name for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert {"init-frozen-kaiming", "init-frozen-zeros"} <= names


def test_a_grid_run_logs_every_head_as_a_child_run_and_keeps_the_chosen_one(project: dict[str, Any]) -> None:
    record = project["result"]["runs"]["fmnist-grid"]
    client = MlflowClient()
    parent = client.get_run(record["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.run_name"],
    )
    combos = {(c, json.dumps(h), str(lr), "False") for c in GRID["cuts"] for h in GRID["hidden"] for lr in GRID["lrs"]}
    combos |= {(c, "[]", "0.001", "True") for c in GRID["cuts"]}  # the logistic regressions, at train.frozen.lr
    params = [r.data.params for r in children]
    assert {(p["cut"], p["hidden"], p["lr"], p["logreg"]) for p in params} == combos and len(children) == 10
    assert all(r.info.status == "FINISHED" and r.data.metrics["best_val_accuracy"] > 0 for r in children)
    assert all(len(client.get_metric_history(r.info.run_id, "val_loss")) >= 1 for r in children)
    # the kept network is the chosen cell: its cut and head in the saved model, its figures in the record
    history = json.loads(absolute(record["path"]).with_name("history.json").read_text())["grid"]
    cells = history["cells"]
    assert history["chosen"] == cells[choose([(c["val_accuracy"], c["val_loss"]) for c in cells])]["name"]
    chosen = next(r for r in children if r.data.tags["chosen"] == "true")
    assert chosen.info.run_name == f"fmnist-grid/{record['grid_cell']}" and record["grid_cell"] == history["chosen"]
    assert parent.data.tags["grid_choice"] == record["grid_cell"] and parent.data.params["chosen.cut"] == record["cut"]
    assert record["val_accuracy"] == chosen.data.metrics["best_val_accuracy"]
    _, spec = load_model(absolute(record["path"]), record["sha256"])
    assert spec.cut == chosen.data.params["cut"] and json.dumps(spec.head.hidden) == chosen.data.params["hidden"]
    assert 0.0 <= record["test_accuracy"] <= 1.0 and "test_accuracy" in parent.data.metrics  # evaluated as one head
    assert f"fmnist-grid: its grid of heads chose {record['grid_cell']}" in summary_markdown(project["result"])
