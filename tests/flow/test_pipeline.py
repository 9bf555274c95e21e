"""The transfer flow on tiny data with a real Prefect server, MLflow store and Zarr stores.

One module-scoped project: a cold run, then a warm run that must compute nothing, then
changes that must recompute exactly what they touch.
"""

from __future__ import annotations

import copy
import logging
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.layout import Layout
from flows.pipeline import transfer
from flows.stages import pipeline_calls
from flows.status import StageStatus, pipeline_status, stage_links
from flows.summary import summary_markdown
from headstart.caching import bound_arguments
from headstart.config import parse_params
from headstart.records import ExtractRecord
from headstart.store import FeatureStore, StoreError
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
    found = Counter(
        r.getMessage().split("@")[0].split(":")[0] for r in caplog.records if "up to date (" in r.getMessage()
    )
    sources, runs = len(project["raw"]["sources"]), len(project["raw"]["train"]["runs"])
    assert found == Counter(
        {"data": 1, "pretrain": 1, "weights": 1, "extract": sources, "advise": sources, "train": runs, "evaluate": runs}
    )
    for name, record in result["runs"].items():
        assert record["test_accuracy"] == project["first"]["runs"][name]["test_accuracy"]


def test_status_after_a_run_is_up_to_date_and_every_call_binds_its_task(project: dict[str, Any]) -> None:
    params, lay = parse_params(project["raw"]), Layout(project["root"])
    statuses = pipeline_status(params, lay)
    assert len(statuses) == len(stage_links(params))  # every DVC stage once
    assert {s.stage: s.state for s in statuses} == dict.fromkeys(stage_links(params), "up to date")
    for stage, build in pipeline_calls(params, lay):
        call = build()
        # every argument bound: the key status computes without the task is the key Prefect's cache uses
        assert call.stage == stage and bound_arguments(call.load().fn, call.kwargs) == call.kwargs, stage
        assert call.kind.read(call.record).inputs == call.inputs, stage


def _stale(statuses: list[StageStatus]) -> dict[str, tuple[str, list[str]]]:
    return {s.stage: (s.state, s.why) for s in statuses if s.state != "up to date"}


def test_status_names_a_changed_param_as_the_reason_for_the_stages_it_touches(project: dict[str, Any]) -> None:
    raw = {**project["raw"], "train": {**project["raw"]["train"], "seed": 7}}
    stale = _stale(pipeline_status(parse_params(raw), Layout(project["root"])))
    runs = project["raw"]["train"]["runs"]
    assert stale == {
        **{f"train@{r}": ("stale", ["params changed (params.yaml: train)"]) for r in runs},
        **{f"evaluate@{r}": ("waits", [f"on train@{r}"]) for r in runs},
    }


def test_status_names_a_changed_weights_file_and_a_changed_data_file(project: dict[str, Any]) -> None:
    params, lay = parse_params(project["raw"]), Layout(project["root"])
    weights = project["root"] / ".torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    labels = Path(project["raw"]["data"]["root"]) / "t10k-labels-idx1-ubyte.gz"
    for path, first in ((weights, "weights"), (labels, "raw")):
        original = path.read_bytes()
        path.write_bytes(original + b"\0")
        try:
            stale = _stale(pipeline_status(params, lay))
        finally:
            path.write_bytes(original)
        assert list(stale)[0] == first and stale[first][0] == "stale"
        if first == "weights":
            assert stale["weights"][1] == [f"output {path.relative_to(project['root'])} changed or missing"]
            assert "data" not in stale and stale["extract@imagenet"] == ("waits", ["on weights"])
        else:
            assert stale["raw"][1] == ["Fashion-MNIST t10k-labels-idx1-ubyte.gz changed"]
            assert stale["data"] == ("waits", ["on raw"]) and len(stale) == len(stage_links(params))
    assert _stale(pipeline_status(params, lay)) == {}


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


@pytest.mark.faults
def test_a_corrupt_chunk_fails_the_reading_stage_and_the_next_run_repairs_exactly_its_rows(
    project: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    lay = Layout(project["root"])
    record = ExtractRecord.read(lay.extract_record("fmnist"))
    chunk = min(p for p in (record.store_dir() / "features" / record.cut / "c").rglob("*") if p.is_file())
    raw_bytes = bytearray(chunk.read_bytes())
    raw_bytes[len(raw_bytes) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw_bytes))
    train = project["raw"]["train"]
    raw = {  # a new learning rate: the frozen run retrains, reading the store
        **project["raw"],
        "train": {
            **train,
            "runs": {"fmnist-frozen": train["runs"]["fmnist-frozen"]},
            "frozen": {**train["frozen"], "lr": 0.002},
        },
    }
    state = transfer(params=parse_params(raw), root=project["root"], return_state=True)
    assert state.is_failed()
    with pytest.raises(StoreError, match=r"rows \d+\.\.\d+ unreadable .*marked incomplete: rerun the extract stage"):
        state.result()

    with caplog.at_level(logging.INFO):
        _, states = run_flow(project["root"], raw)
    assert computed(states) == ALWAYS | {"extract", "train", "evaluate"}  # advise's record names the same store
    chunk_rows = FeatureStore(record.store_dir(), "r").chunk_rows
    assert f"extract fmnist: {chunk_rows} rows of damaged chunks recomputed" in caplog.text
    assert FeatureStore(record.store_dir(), "r").scan() == []


CRASH_BEFORE_RECORD = """
import os, sys
from headstart.records import ExtractRecord
ExtractRecord.write = lambda self, path: os._exit(137)  # dies as under kill -9, after the store's marker
from flows.cli import app
app(["stage", "extract", "fmnist", "--params", sys.argv[1]])
"""


@pytest.mark.faults
def test_a_crash_between_the_store_marker_and_the_stage_record_resumes_without_computing(
    project: dict[str, Any], tmp_path: Path
) -> None:
    record = Layout(project["root"]).extract_record("fmnist")
    kept = record.read_bytes()
    record.unlink()  # so the stage runs: the store is complete, the record not yet written
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(project["raw"], sort_keys=False))
    stage = [sys.executable, "-m", "flows.cli", "stage", "extract", "fmnist", "--params", str(params)]
    crashed = subprocess.run([sys.executable, "-c", CRASH_BEFORE_RECORD, str(params)], capture_output=True, timeout=600)
    assert crashed.returncode == 137 and not record.exists()
    again = subprocess.run(stage, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"extract fmnist at .*, 0 computed", again.stderr), again.stderr[-3000:]
    assert record.read_bytes() == kept


def test_advise_on_every_source_ranks_them(project: dict[str, Any]) -> None:
    from flows.choose import advise_sources, rank_sources

    advice = advise_sources(params=parse_params(project["raw"]), root=project["root"], sources=["fmnist", "imagenet"])
    rows = rank_sources(advice)
    assert {r["source"] for r in rows} == {"fmnist", "imagenet"}
    assert rows[0]["val_accuracy"] >= rows[1]["val_accuracy"]
    with get_client(sync_client=True) as client:
        assert client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["advise-sources"])))


def test_stored_views_extract_only_the_views_and_every_run_reports_tta(
    project: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """extract.views/tta grow the stores by their views alone; training and evaluation rerun; a rerun is a no-op."""
    raw = copy.deepcopy(project["raw"])
    raw["extract"].update(views=2, tta=2)
    raw["evaluate"]["tta"] = 2
    with caplog.at_level(logging.INFO):
        result, states = run_flow(project["root"], raw)
    assert computed(states) == ALWAYS | {"extract", "advise", "train", "evaluate"}, states
    pattern = (r"extract (\w+) at .*?: \d+ rows \((\d+) images \+ 2 augmented view\(s\) of (\d+) "
               r"\+ 2 test-time view\(s\) of (\d+)\), (\d+) reused from .*?, (\d+) computed")  # fmt: skip
    logged = [re.search(pattern, r.getMessage()) for r in caplog.records if r.getMessage().startswith("extract ")]
    found = {m[1]: tuple(map(int, m.groups()[1:])) for m in logged if m}
    assert set(found) == set(raw["sources"]), [r.getMessage() for r in caplog.records]
    for images, train, test, reused, new in found.values():
        assert reused == images and new == 2 * train + 2 * test  # the plain rows are kept: only views computed
    for name, run in result["runs"].items():
        assert 0.0 <= run["tta_accuracy"] <= 1.0, name
        assert run["test_accuracy"] >= 0.0
    assert "| with TTA |" in summary_markdown(result)
    _, again = run_flow(project["root"], raw)
    assert computed(again) == ALWAYS
