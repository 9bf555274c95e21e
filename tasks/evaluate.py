"""The evaluate stage: a trained run scored on the target's test split, reported, logged and registered.

A frozen run is scored by its head on the stored test features (the body's output for those
images, computed once by extract): the same numbers up to float noise, without re-running the body.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from prefect import task

from headstart import tracking
from headstart.augment import TTA_VIEWS, tta_view
from headstart.backbones import CLASSIFIER, StagedNet
from headstart.caching import cached, run_logger
from headstart.calibration import averaged_probabilities, expected_calibration_error, reliability_figure, softmax
from headstart.checkpoints import ModelSpec, load_model
from headstart.config import EvaluateParams, StreamParams
from headstart.datasets import Split, load_task
from headstart.extraction import sample_keys
from headstart.files import atomic_write
from headstart.fit import predict_logits
from headstart.metrics import classification_report, confusion_figure, mistakes_figure
from headstart.records import EvaluateRecord, ExtractRecord, Output, TaskMeta, TrainRecord, absolute
from headstart.serving import image_logits
from headstart.streaming import keyed_rows, stored_rows
from headstart.views import tta_keys


def calibration_report(logits: torch.Tensor, labels: np.ndarray, spec: ModelSpec) -> dict[str, float]:
    """The test split's calibration error, raw and temperature-scaled; with a "none" threshold, the share it rejects.

    The test images are all of the model's own classes, so every rejected one is a wrong "none".
    """
    calibrated = softmax(logits, spec.temperature)
    report = {
        "temperature": spec.temperature,
        "ece": expected_calibration_error(softmax(logits), labels),
        "ece_calibrated": expected_calibration_error(calibrated, labels),
    }
    if spec.reject_below is not None:
        report["reject_below"] = spec.reject_below
        report["rejected_known"] = float((calibrated.max(axis=1) < spec.reject_below).mean())
    return report


def mlflow_metrics(report: dict) -> dict[str, float]:
    """Test metrics as MLflow names them: test_accuracy, test_macro_f1, test_precision.<class>, ..."""
    metrics = {"test_accuracy": report["accuracy"], "test_macro_f1": report["macro_f1"]}
    metrics["test_balanced_accuracy"] = report["balanced_accuracy"]
    metrics |= {"test_ece": report["ece"], "test_ece_calibrated": report["ece_calibrated"]}
    if "tta_accuracy" in report:
        metrics["test_tta_accuracy"] = report["tta_accuracy"]
    if "rejected_known" in report:
        metrics["test_rejected_known"] = report["rejected_known"]
    for name, scores in report["per_class"].items():
        for key in ("precision", "recall"):
            metrics[f"test_{key}.{name}"] = scores[key]
    return metrics


def logits_on_test(
    net: StagedNet, spec: ModelSpec, trained: str, images: np.ndarray, extract_record: ExtractRecord | None,
    stream: StreamParams,
) -> torch.Tensor:  # fmt: skip
    """The model's logits on the test images: a frozen run's head on the stored features (read as `stream` says),
    else the whole network."""
    if trained == "frozen":
        if extract_record is None:
            raise ValueError("a frozen run is scored on stored features and needs the extract record")
        return predict_logits(net.stages[CLASSIFIER], stored_rows(extract_record, images, spec.cut, stream))
    net.eval()
    return image_logits(net, spec, images)


def tta_logits(
    net: StagedNet, spec: ModelSpec, trained: str, images: np.ndarray, extract_record: ExtractRecord | None, n: int,
    stream: StreamParams,
) -> list[torch.Tensor]:  # fmt: skip
    """Logits on each of the first `n` test-time views of the test images: a frozen run's from the views the store
    holds (no forward pass through the backbone), any other run's through its network."""
    names = TTA_VIEWS[:n]
    if trained != "frozen":
        net.eval()
        return [image_logits(net, spec, tta_view(images, name)) for name in names]
    if extract_record is None or extract_record.tta < n:
        held = 0 if extract_record is None else extract_record.tta
        raise ValueError(
            f"evaluate.tta {n}: a frozen run averages the test-time views its store holds, and the store holds {held}; "
            f"set extract.tta to {n} or more (or evaluate.tta to at most {held})"
        )
    head = net.stages[CLASSIFIER]
    return [
        predict_logits(head, keyed_rows(extract_record, keys, spec.cut, stream))
        for keys in tta_keys(sample_keys(images), names)
    ]


def tta_report(logit_sets: list[torch.Tensor], labels: np.ndarray, spec: ModelSpec) -> dict[str, float]:
    """Accuracy of the calibrated probabilities averaged over the plain images and their test-time views."""
    probs = averaged_probabilities(logit_sets, spec.temperature)
    return {"tta_views": len(logit_sets) - 1, "tta_accuracy": float((probs.argmax(axis=1) == labels).mean())}


def write_reports(
    out: Path, run_name: str, report: dict, logits: torch.Tensor, test: Split, spec: ModelSpec
) -> list[Path]:
    """`metrics.json` (one compact row for `dvc metrics`), `per_class.json` and the three figures; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    detail = {"per_class", "confusion_matrix"}
    calibrated = softmax(logits, spec.temperature)
    texts = {
        "metrics.json": json.dumps({k: v for k, v in report.items() if k not in detail}, indent=2),
        "per_class.json": json.dumps({k: report[k] for k in sorted(detail)}, indent=2),
    }
    accuracy = f"{run_name}: test accuracy {report['accuracy']:.4f}"
    figures = {
        "confusion.png": confusion_figure(
            np.asarray(report["confusion_matrix"]), spec.class_names, accuracy
        ),
        "reliability.png": reliability_figure(
            softmax(logits), calibrated, test.labels, f"{run_name}: test, temperature {spec.temperature:.2f}"
        ),
        "mistakes.png": mistakes_figure(
            test.images, calibrated, test.labels, spec.class_names, f"{run_name}: the most confident mistakes on test"
        ),
    }  # fmt: skip
    for name, text in texts.items():
        with atomic_write(out / name) as tmp:
            tmp.write_text(text)
    for name, figure in figures.items():
        with atomic_write(out / name) as tmp:
            figure.savefig(tmp, format="png")
    return [out / name for name in (*texts, *figures)]


@task(**cached("evaluate"))
def evaluate(
    run_name: str,
    train_record: TrainRecord,
    extract_record: ExtractRecord | None,
    task_meta: TaskMeta,
    params: EvaluateParams,
    data_dir: Path,
    reports_dir: Path,
) -> EvaluateRecord:
    """Score, write `reports/<run>/` (metrics, per-class scores, figures), log them to the train run, register."""
    model_path = absolute(train_record.path)
    net, spec = load_model(model_path, train_record.sha256)
    test = load_task(Path(data_dir), "target").test
    logits = logits_on_test(net, spec, train_record.trained, test.images, extract_record, params.stream)
    report = classification_report(test.labels, logits.argmax(1).numpy(), spec.class_names)
    report |= calibration_report(logits, test.labels, spec)
    if params.tta:
        views = tta_logits(net, spec, train_record.trained, test.images, extract_record, params.tta, params.stream)
        report |= tta_report([logits, *views], test.labels, spec)
    written = write_reports(Path(reports_dir) / run_name, run_name, report, logits, test, spec)
    tags = {"stage": "train", tracking.MODEL_SHA_TAG: train_record.sha256}
    with tracking.training_run(run_name, {}, tags, run_id=tracking.run_of_model(train_record.sha256)):
        mlflow.log_metrics(mlflow_metrics(report))
        for path in written:
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        tracking.log_model(
            model_path, train_record.sha256, spec, register_as=params.register_as, score=train_record.val_accuracy
        )
    run_logger().info(
        "%s: test accuracy %.4f, balanced accuracy %.4f, macro-F1 %.4f, ECE %.4f (%.4f at temperature %.2f)",
        run_name, report["accuracy"], report["balanced_accuracy"], report["macro_f1"], report["ece"],
        report["ece_calibrated"], spec.temperature,
    )  # fmt: skip
    return EvaluateRecord(
        run_name=run_name, test_accuracy=report["accuracy"], balanced_accuracy=report["balanced_accuracy"],
        macro_f1=report["macro_f1"], ece=report["ece"], ece_calibrated=report["ece_calibrated"],
        tta_accuracy=report.get("tta_accuracy"), outputs=[Output.of(path) for path in written],
    )  # fmt: skip
