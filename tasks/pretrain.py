"""The pretrain stage: the source network trained on the source task (FMNIST-2), saved and registered.

This is the "someone else's pretrained network" of the notes, made here so the whole transfer
experiment is reproducible from the raw data.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import torch
from prefect import task

from headstart import tracking
from headstart.backbones import StagedNet, create_model, get_architecture, preprocess
from headstart.caching import cached, run_logger
from headstart.checkpoints import ModelSpec, save_model
from headstart.config import PretrainParams
from headstart.datasets import TaskData, load_task
from headstart.files import atomic_write
from headstart.fit import EpochCallback, FitResult, fit, predict_logits
from headstart.images import FMNIST_DECODE, Preprocess
from headstart.metrics import classification_report, curves_figure
from headstart.records import Output, PretrainRecord, TaskMeta, relative

IMAGE_SIZE = 28


def source_preprocess(arch: str, image_size: int = IMAGE_SIZE) -> Preprocess:
    """The architecture's own channels and normalisation at the source images' size."""
    spec = get_architecture(arch)
    return Preprocess(image_size=image_size, channels=spec.channels, mean=spec.mean, std=spec.std)


def train_source(
    task_data: TaskData, params: PretrainParams, on_epoch: EpochCallback | None = None
) -> tuple[StagedNet, ModelSpec, FitResult]:
    """A freshly initialised (seeded) network trained on the task's train split, early-stopped on val."""
    pre = source_preprocess(params.arch)
    torch.manual_seed(params.seed)
    net = create_model(params.arch, task_data.num_classes, dropout=params.dropout)
    result = fit(
        net,
        (task_data.train.images, task_data.train.labels),
        (task_data.val.images, task_data.val.labels),
        params,
        params.seed,
        params.device,
        transform=partial(preprocess, spec=pre),
        on_epoch=on_epoch,
    )
    spec = ModelSpec(
        arch=params.arch,
        num_classes=task_data.num_classes,
        class_names=task_data.class_names,
        preprocess=pre,
        cut=None,
        dropout=params.dropout,
        decode=FMNIST_DECODE,
    )
    return net, spec, result


def predict_labels(net: StagedNet, pre: Preprocess, images: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Predicted class of each uint8 image."""
    return predict_logits(net, images, transform=partial(preprocess, spec=pre), device=device).argmax(1).numpy()


@task(**cached("pretrain"))
def pretrain(params: PretrainParams, task_meta: TaskMeta, data_dir: Path, out_dir: Path) -> PretrainRecord:
    """Train, test, save and register the source model; one MLflow run holds all of it."""
    log = run_logger()
    source = load_task(Path(data_dir), "source")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "pretraining %s on %s: %d train / %d val images",
        params.arch,
        source.class_names,
        *map(len, (source.train, source.val)),
    )
    with tracking.training_run(
        "pretrain", params.model_dump(mode="json"), {"stage": "pretrain", "data_fingerprint": source.fingerprint()}
    ):
        net, spec, result = train_source(source, params, tracking.log_epoch)
        y_pred = predict_labels(net, spec.preprocess, source.test.images, params.device)
        report = classification_report(source.test.labels, y_pred, spec.class_names)
        model_path, metrics_path = out_dir / "model.safetensors", out_dir / "metrics.json"
        sha256 = save_model(net, spec, model_path)
        mlflow.set_tag(tracking.MODEL_SHA_TAG, sha256)
        metrics = {"test_accuracy": report["accuracy"], "test_macro_f1": report["macro_f1"], "n_test": report["n_test"]}
        metrics |= {"epochs": result.epochs, "best_epoch": result.best_epoch}
        with atomic_write(metrics_path) as tmp:  # content only (no timings): DVC and Prefect gate on it
            tmp.write_text(json.dumps({**metrics, "per_class": report["per_class"]}, indent=2))
        mlflow.log_metrics(
            {"test_accuracy": report["accuracy"], "test_macro_f1": report["macro_f1"], "seconds": result.seconds}
        )
        mlflow.log_figure(curves_figure(result.history, f"pretrain {params.arch}"), "curves.png")
        tracking.log_model(model_path, sha256, spec, register_as=params.register_as)
    log.info(
        "source model: test accuracy %.4f after %d epochs (%.1f s)", report["accuracy"], result.epochs, result.seconds
    )
    return PretrainRecord(
        path=relative(model_path),
        sha256=sha256,
        arch=params.arch,
        test_accuracy=report["accuracy"],
        epochs=result.epochs,
        best_epoch=result.best_epoch,
        outputs=[Output.of(model_path), Output.of(metrics_path)],
    )
