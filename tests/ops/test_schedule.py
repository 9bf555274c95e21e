"""Scheduled runs for real: `headstart server prefect` and `headstart schedule --interval` on tiny data.

A cold scheduled run computes every stage; the next one, with nothing changed, finds every stage
up to date (only the raw stage fingerprints the raw files again, as on every run); after one target
image changes, only what depends on it runs again. Every run publishes its summary and progress
artifacts. Stopping both commands pauses the schedule and leaves no process behind. About three
minutes on 2 busy cores: marked slow.
"""

from __future__ import annotations

import gzip
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings

from headstart import servers, tracking
from headstart.fmnist import read_idx
from tests.ops.conftest import BIN, assert_all_gone, clean_env, free_port, process_tree
from tests.states import task_states
from tests.tiny import IDX_FILES, REPO, encode_idx, tiny_params, write_tiny_fmnist

pytestmark = pytest.mark.slow

ALWAYS = {"raw"}
"""Runs on every flow run: it fingerprints what the raw data is now (its record is rewritten only when that changed)."""
STAGES = ALWAYS | {"data", "pretrain", "weights", "extract", "advise", "train", "evaluate"}
TIMEOUT_S = 480


def computed(states: Counter) -> set[str]:
    return {task for (task, state), n in states.items() if state != "Cached" and n}


def up_to_date(client: SyncPrefectClient, flow_run_id: Any, expected: set[str], timeout_s: float = 60.0) -> set[str]:
    """The stages a flow run logged as up to date (their record on disk current: no task run started for them).

    Logs reach the API in batches after the run ends: polls until `expected` are all there, or the timeout.
    """
    deadline = time.monotonic() + timeout_s
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    while True:
        found = {
            log.message.split(":", 1)[0].split("@")[0]
            for log in client.read_logs(log_filter=log_filter)
            if "up to date (" in log.message
        }
        if expected <= found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def wait_for_runs(client: SyncPrefectClient, n: int, started_after: datetime | None = None) -> list[FlowRun]:
    """The first `n` completed flow runs (that started after `started_after`), oldest first; fails on a failed run."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)
        failed = [r for r in runs if r.state_type in (StateType.FAILED, StateType.CRASHED)]
        assert not failed, [(r.name, r.state.message) for r in failed]
        done = [
            r
            for r in runs
            if r.state_type == StateType.COMPLETED and (started_after is None or r.start_time > started_after)
        ]
        if len(done) >= n:
            return done[:n]
        time.sleep(2)
    raise AssertionError(f"fewer than {n} scheduled runs completed in {TIMEOUT_S} s")


def change_one_target_image(data_root: Path) -> None:
    """Invert one training image of a target class (labels 0-4): the source task (labels 5-9) stays as it was."""
    images_path = data_root / IDX_FILES[("train", "images")]
    images = read_idx(images_path, ndim=3).copy()
    labels = read_idx(data_root / IDX_FILES[("train", "labels")], ndim=1)
    i = int(next(k for k, label in enumerate(labels) if label < 5))
    images[i] = 255 - images[i]
    images_path.write_bytes(gzip.compress(encode_idx(images), mtime=0))


def default_signals() -> None:
    """In the child before exec: SIGINT and SIGTERM do what they do by default, whatever this process inherited."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A Prefect server and a schedule serving the flow every 10 s, both as a user starts them."""
    root = tmp_path_factory.mktemp("scheduled")
    data_root = write_tiny_fmnist(root / "tiny-fmnist")
    raw = tiny_params(data_root)
    raw["sources"] = {"fmnist": raw["sources"]["fmnist"]}
    raw["train"]["runs"] = {"fmnist-frozen": raw["train"]["runs"]["fmnist-frozen"]}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for package in ("headstart", "tasks", "flows"):  # a frozen copy: edits to the checkout do not change cache keys
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = f"{url}/api"
    env = clean_env(root, PREFECT_HOME=str(root / ".prefect"), PYTHONPATH=str(root))
    server_cmd = servers.Server(
        "headstart server prefect",
        [str(BIN / "headstart"), "server", "prefect", "--port", str(port)],
        url,
        f"{api}/health",
    )
    server_log = (root / "server.log").open("w")
    schedule_log = (root / "schedule.log").open("w")
    server = servers.start(server_cmd, log=server_log, timeout_s=180, base_env=env)
    schedule = subprocess.Popen(
        [str(BIN / "headstart"), "schedule", "--interval", "10", "--name", "nightly"],
        cwd=root,
        env={**env, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
        stdout=schedule_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=default_signals,  # not whatever the shell that started the tests ignores (`make test &`)
    )
    info = {"root": root, "data_root": data_root, "api": api, "server": server, "schedule": schedule}
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            info["client"] = client
            yield info
    finally:
        for process in (schedule, server.process):  # a no-op after the last test stopped them
            if process.poll() is None:
                servers.Running(server_cmd, process).stop()
        server_log.close()
        schedule_log.close()


@pytest.fixture(scope="module")
def first_two(scheduled: dict[str, Any]) -> list[tuple[FlowRun, Counter]]:
    client = scheduled["client"]
    return [(run, task_states(client, run.id)) for run in wait_for_runs(client, 2)]


def test_the_first_scheduled_run_computes_every_stage(first_two):
    (run, states), _ = first_two
    assert run.deployment_id is not None  # a scheduled run of the served deployment, not an ad-hoc one
    assert computed(states) == STAGES, states


def test_the_second_scheduled_run_computes_nothing(first_two, scheduled: dict[str, Any]):
    _, (run, states) = first_two
    assert computed(states) == ALWAYS, states
    assert {task for task, _ in states} == ALWAYS  # no other stage even started a task run
    assert up_to_date(scheduled["client"], run.id, STAGES - ALWAYS) == STAGES - ALWAYS


def test_each_run_publishes_its_summary_and_training_progress(first_two, scheduled: dict[str, Any]):
    client = scheduled["client"]
    (run, _), _ = first_two
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
    )
    summary = next(a for a in artifacts if a.key == "transfer-summary")
    mlflow_client = MlflowClient(f"sqlite:///{scheduled['root'] / 'mlflow.db'}")
    experiment = mlflow_client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    (mlflow_run,) = mlflow_client.search_runs([experiment], filter_string="attributes.run_name = 'fmnist-frozen'")
    for expected in (
        "fingerprint",
        "| fmnist | `models/source/model.safetensors` | fmnist_cnn | block2 |",
        "| frozen |",
    ):
        assert expected in summary.data
    assert f"runs/{mlflow_run.info.run_id})" in summary.data
    bars = {a.description.split(":")[0].split("-", 1)[0]: a.data for a in artifacts if a.type == "progress"}
    assert bars == {"pretrain": 100.0, "extract": 100.0, "advise": 100.0, "train": 100.0}


def test_after_a_data_change_only_what_depends_on_it_runs_again(first_two, scheduled: dict[str, Any]):
    change_one_target_image(scheduled["data_root"])
    changed_at = datetime.now(UTC)
    (run,) = wait_for_runs(scheduled["client"], 1, started_after=changed_at)
    rerun = {"data", "extract", "advise", "train", "evaluate"}  # not pretrain or weights: the source task is unchanged
    assert computed(task_states(scheduled["client"], run.id)) == ALWAYS | rerun


def test_stopping_pauses_the_schedule_and_leaves_no_process(first_two, scheduled: dict[str, Any]):
    schedule, server = scheduled["schedule"], scheduled["server"]
    processes = process_tree(schedule.pid) + process_tree(server.pid)
    schedule.send_signal(signal.SIGTERM)  # what a service manager sends; it stops as Ctrl-C does
    assert schedule.wait(timeout=120) == 0
    deployment = scheduled["client"].read_deployment_by_name("transfer/nightly")
    assert deployment.paused
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    assert_all_gone(processes)
