"""The transfer flow on tiny data with a real Prefect server, MLflow store and Zarr stores.

One module-scoped project: a cold run, then a warm run that must compute nothing, then
changes that must recompute exactly what they touch.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
import pytest
from prefect.client.orchestration import get_client

from flows.layout import Layout
from flows.pipeline import transfer
from headstart.config import parse_params
from tests.states import task_states
from tests.tiny import install_mobilenet, tiny_params, write_tiny_fmnist


def run_flow(root: Path, raw: dict[str, Any]) -> tuple[dict[str, Any], Counter]:
    """Run the flow; return its result and how many task runs ended in each state, by task."""
    state = transfer(params=parse_params(raw), root=root, return_state=True)
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        states = task_states(client, flow_run_id)
    return state.result(), states


@pytest.fixture(scope="module")
def project(project_root: Path) -> dict[str, Any]:
    data_root = write_tiny_fmnist(project_root / "tiny-fmnist")
    if not install_mobilenet(project_root / ".torch"):
        pytest.skip("the ImageNet MobileNetV2 file is not installed (run `make install`)")
    raw = tiny_params(data_root)
    first, first_states = run_flow(project_root, raw)
    return {"root": project_root, "raw": raw, "first": first, "first_states": first_states}


def computed(states: Counter) -> set[str]:
    return {task for (task, state), n in states.items() if state != "Cached" and n}


ALWAYS = {"raw"}
"""Runs on every flow run: it fingerprints what the raw data is now (its record is rewritten only when that changed)."""
STAGES = ALWAYS | {"data", "pretrain", "weights", "extract", "advise", "train", "evaluate"}


def test_cold_run_computes_every_stage_and_logs_every_training(project: dict[str, Any]) -> None:
    assert computed(project["first_states"]) == STAGES
    runs = project["first"]["runs"]
    assert set(runs) == {"fmnist-frozen", "fmnist-finetune", "fmnist-scratch", "imagenet-frozen"}
    for record in runs.values():
        assert 0.0 <= record["test_accuracy"] <= 1.0
    # the tiny task is learnable: transfer from the pretrained source is far above chance (20%)
    assert runs["fmnist-frozen"]["test_accuracy"] > 0.5
    finished = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'FINISHED'")
    assert len(finished) >= 1 + 2 + 4  # pretrain + advise per source (every source is advised) + one per transfer run
    assert mlflow.MlflowClient().get_model_version_by_alias("fmnist-transfer", "champion") is not None


def test_second_run_with_nothing_changed_computes_nothing(
    project: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        result, states = run_flow(project["root"], project["raw"])
    assert computed(states) == ALWAYS, states
    assert states == Counter({("raw", "Completed"): 1})  # no other stage even started a task run
    # ... because each found its record on disk current: every stage of the pipeline, once per source or run
    found = Counter(r.getMessage().split(":", 1)[0] for r in caplog.records if "up to date (" in r.getMessage())
    sources, runs = len(project["raw"]["sources"]), len(project["raw"]["train"]["runs"])
    assert found == Counter(
        {"data": 1, "pretrain": 1, "weights": 1, "extract": sources, "advise": sources, "train": runs, "evaluate": runs}
    )
    for name, record in result["runs"].items():
        assert record["test_accuracy"] == project["first"]["runs"][name]["test_accuracy"]


def test_deleted_output_is_recomputed_not_trusted(project: dict[str, Any]) -> None:
    model = Layout(project["root"]).run_model("fmnist-scratch") / "model.safetensors"
    model.unlink()
    result, states = run_flow(project["root"], project["raw"])
    assert model.is_file()
    assert ("train", "Completed") in states
    assert {"data", "pretrain", "weights", "extract", "advise"}.isdisjoint(computed(states))
    assert (
        result["runs"]["fmnist-scratch"]["test_accuracy"] == project["first"]["runs"]["fmnist-scratch"]["test_accuracy"]
    )


def test_head_change_recomputes_only_training_and_evaluation(project: dict[str, Any]) -> None:
    raw = {
        **project["raw"],
        "train": {**project["raw"]["train"], "head": {"hidden": [16], "dropout": 0.0, "init": "kaiming"}},
    }
    _, states = run_flow(project["root"], raw)
    assert computed(states) == ALWAYS | {"train", "evaluate"}
