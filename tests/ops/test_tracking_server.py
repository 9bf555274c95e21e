"""Tracking server mode: `headstart server mlflow` started for real, a pretrain logged and registered through it.

The source model is then fetched back by `models:/...@champion` over HTTP (artifacts proxied by
the server), and SIGTERM to the command stops every process the server started.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

from headstart import servers, tracking
from headstart.config import PretrainParams, WeightsParams
from headstart.datasets import save_task
from headstart.images import FMNIST_DECODE
from headstart.records import TaskMeta
from headstart.sources import fetch
from tasks.pretrain import pretrain
from tests.ops.conftest import BIN, assert_all_gone, clean_env, free_port, process_tree
from tests.unit.training_setup import tiny_task

SOURCE = "ops-source"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`headstart server mlflow` as a user runs it, in its own project folder."""
    root = tmp_path_factory.mktemp("tracking-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = servers.Server(
        "headstart server mlflow",
        [str(BIN / "headstart"), "server", "mlflow", "--port", str(port)],
        url,
        f"{url}/health",
    )
    with (root / "server.log").open("w") as log:
        running = servers.start(command, log=log, timeout_s=180, base_env=clean_env(root))
        try:
            yield {"root": root, "url": url, "process": running.process, "tree": process_tree(running.pid)}
        finally:
            running.stop()  # after the test's own SIGTERM there is nothing left; after a failure, leave nothing


@pytest.fixture(scope="module")
def logged(server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One pretrain logged and registered against the server, its model fetched back by registry URI."""
    work = tmp_path_factory.mktemp("tracking-client")
    previous = mlflow.get_tracking_uri()
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", server["url"])
    mlflow.set_tracking_uri(server["url"])
    try:
        meta = TaskMeta(**save_task(tiny_task("source", classes=4, sizes=(40, 12, 12)), work / "data", FMNIST_DECODE))
        params = PretrainParams(epochs=1, batch_size=16, device="cpu", register_as=SOURCE)
        pretrained = pretrain.fn(params=params, task_meta=meta, data_dir=work / "data", out_dir=work / "model")
        run_id = tracking.run_of_model(pretrained.sha256)  # the run is found by the model file's sha256
        fetched = fetch(f"models:/{SOURCE}@champion", None, WeightsParams(), work / "cache")
        client = MlflowClient(server["url"])
        yield {"pretrained": pretrained, "run_id": run_id, "fetched": fetched, "client": client}
    finally:
        mlflow.set_tracking_uri(previous)
        mp.undo()


def test_the_run_and_the_registered_model_are_on_the_server(logged: dict[str, Any], server: dict[str, Any]):
    client, pretrained = logged["client"], logged["pretrained"]
    assert logged["run_id"] is not None
    run = client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == tracking.EXPERIMENT
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's, not a client path
    version = client.get_model_version_by_alias(SOURCE, tracking.CHAMPION)
    assert version.tags[tracking.WEIGHTS_SHA_TAG] == pretrained.sha256
    assert run.data.tags[tracking.MODEL_SHA_TAG] == pretrained.sha256
    stored = list((server["root"] / ".mlflow-server" / "artifacts").rglob("model.safetensors"))
    assert stored, "the model's weights did not land in the server's artifact store"


def test_the_registry_uri_fetches_the_same_verified_weights(logged: dict[str, Any]):
    fetched, pretrained = logged["fetched"], logged["pretrained"]
    assert fetched.sha256 == pretrained.sha256
    assert fetched.spec is not None and fetched.spec.arch == "fmnist_cnn"
    assert Path(fetched.path).is_file()


def test_sigterm_to_the_command_stops_every_server_process(logged: dict[str, Any], server: dict[str, Any]):
    tree = server["tree"]
    assert len(tree) >= 3  # headstart, the mlflow server in a session of its own, its uvicorn worker
    server["process"].send_signal(signal.SIGTERM)
    assert server["process"].wait(timeout=60) == 0
    assert_all_gone(tree)
    assert not servers.healthy(f"{server['url']}/health")
    assert f"export MLFLOW_TRACKING_URI={server['url']}" in (server["root"] / "server.log").read_text()
