"""The pretrain task on a tiny generated source task: model file, metrics, one MLflow run, a registered version."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from headstart import tracking
from headstart.checkpoints import load_model
from headstart.config import PretrainParams
from headstart.datasets import Split, TaskData, load_task, save_task
from headstart.env import project_root
from headstart.fingerprint import sha256_file
from headstart.images import FMNIST_DECODE
from headstart.records import PretrainRecord, TaskMeta
from tasks.pretrain import pretrain, source_preprocess, train_source
from tests.unit.training_setup import tiny_task

PARAMS = PretrainParams(epochs=2, batch_size=16, lr=2e-3, patience=2, device="cpu", register_as="test-source")


def save(task: TaskData, data_dir: Path) -> TaskMeta:
    """Write the task as the data stage does (Fashion-MNIST's decoding) and return its TaskMeta."""
    return TaskMeta(**save_task(task, data_dir, FMNIST_DECODE))


def run_id_of(record: PretrainRecord) -> str:
    """The MLflow run that trained the record's model: records hold content, the run is found by its sha256 tag."""
    run_id = tracking.run_of_model(record.sha256)
    assert run_id is not None, f"no MLflow run is tagged {tracking.MODEL_SHA_TAG}={record.sha256}"
    return run_id


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[PretrainRecord, Path, Path]:
    data_dir = tmp_path_factory.mktemp("data")
    task_meta = save(tiny_task("source", classes=5, sizes=(100, 25, 25)), data_dir)
    out_dir = project_root() / "models" / "source"
    return pretrain.fn(params=PARAMS, task_meta=task_meta, data_dir=data_dir, out_dir=out_dir), data_dir, out_dir


def test_preprocess_is_the_architectures_own():
    pre = source_preprocess("fmnist_cnn")
    assert (pre.image_size, pre.channels, pre.mean, pre.std) == (28, 1, (0.5,), (0.5,))
    assert source_preprocess("resnet18").channels == 3


def test_saved_model_rebuilds_with_identical_outputs(pretrained):
    record, data_dir, out_dir = pretrained
    assert isinstance(record, PretrainRecord) and record.arch == PARAMS.arch
    assert record.path == "models/source/model.safetensors"  # inside the project: a relative path
    path = project_root() / record.path
    assert path == out_dir / "model.safetensors" and sha256_file(path) == record.sha256
    assert [o.path for o in record.outputs] == ["models/source/model.safetensors", "models/source/metrics.json"]
    assert record.intact()

    net, spec = load_model(path, record.sha256)
    source = load_task(data_dir, "source")
    assert spec.cut is None and spec.class_names == source.class_names and spec.dropout == PARAMS.dropout
    assert spec.decode == FMNIST_DECODE
    again, _, _ = train_source(source, PARAMS)  # same seed, same data: the same network
    x = torch.randn(8, 1, 28, 28)
    net.eval()
    assert torch.equal(net(x), again(x))

    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] == record.test_accuracy >= 0.8  # the bands are easy
    assert metrics["epochs"] == 2 and metrics["n_test"] == 25 and set(metrics["per_class"]) == set(source.class_names)
    assert (record.epochs, record.best_epoch) == (metrics["epochs"], metrics["best_epoch"])
    assert "seconds" not in metrics  # content only: a rerun writes the same bytes


def test_one_finished_mlflow_run_with_per_epoch_metrics(pretrained):
    record, data_dir, _ = pretrained
    client = MlflowClient()
    run = client.get_run(run_id_of(record))
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    assert run.data.tags["stage"] == "pretrain" and run.data.tags[tracking.MODEL_SHA_TAG] == record.sha256
    assert run.data.tags["data_fingerprint"] == load_task(data_dir, "source").fingerprint()
    assert run.data.params["lr"] == "0.002" and run.data.params["epochs"] == "2"
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2]
    assert run.data.metrics["test_accuracy"] == pytest.approx(record.test_accuracy)
    assert "curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )
    assert [m.name for m in models] == ["model"]


def test_registered_as_champion(pretrained):
    record, _, _ = pretrained
    version = MlflowClient().get_model_version_by_alias(PARAMS.register_as, tracking.CHAMPION)
    registered = tracking.registered_version(PARAMS.register_as, record.sha256)
    assert registered is not None and version.version == registered.version
    assert version.tags[tracking.WEIGHTS_SHA_TAG] == record.sha256
    assert version.run_id == run_id_of(record)
    served = mlflow.pyfunc.load_model(f"models:/{PARAMS.register_as}@{tracking.CHAMPION}")
    assert len(served.predict(tiny_task("source", classes=5).test.images[:3])) == 3


def test_a_training_that_raises_leaves_its_run_failed(tmp_path: Path):
    good = tiny_task("source", classes=5, sizes=(20, 5, 5))
    bad_val = Split(good.val.images, good.val.labels + 10)  # labels outside the 5 classes: cross-entropy raises
    bad = TaskData("source", good.class_names, good.train, bad_val, good.test)
    task_meta = save(bad, tmp_path)
    with pytest.raises((IndexError, RuntimeError)):
        pretrain.fn(params=PARAMS, task_meta=task_meta, data_dir=tmp_path, out_dir=tmp_path / "out")
    runs = mlflow.search_runs(
        experiment_ids=[tracking.experiment_id()],
        filter_string=f"tags.data_fingerprint = '{bad.fingerprint()}'",
        output_format="list",
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "out" / "model.safetensors").exists()
