"""`headstart export`: a run's trained model as ONNX, checked on the test images and logged beside the MLflow model."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from flows.layout import Layout
from headstart import tracking
from headstart.checkpoints import load_model
from headstart.datasets import load_task
from headstart.export import export_onnx
from headstart.records import TrainRecord, absolute


def export_run(lay: Layout, run_name: str, out: Path | None = None) -> tuple[Path, float, int]:
    """Write the run's model as ONNX; returns its path, the largest probability difference and the images checked."""
    record = TrainRecord.read(lay.train_record(run_name))
    net, spec = load_model(absolute(record.path), record.sha256)
    test = load_task(lay.data, "target").test
    path = out or lay.run_model(run_name) / "model.onnx"
    diff = export_onnx(net, spec, path, test.images, record.sha256)
    run_id = tracking.run_of_model(record.sha256)
    if run_id is not None:
        client = MlflowClient()
        client.log_artifact(run_id, str(path), artifact_path="export")
        client.log_metric(run_id, "onnx_max_abs_diff", diff)
    return path, diff, len(test.images)
