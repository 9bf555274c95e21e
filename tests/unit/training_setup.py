"""Tiny generated tasks, a source model and a real feature store for the training tests (seconds, no real data)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from headstart.backbones import create_model
from headstart.checkpoints import ModelSpec, save_model
from headstart.config import ExtractParams, HeadParams, OptimParams, RunParams, SourceParams, TrainParams
from headstart.datasets import Split, TaskData, save_task
from headstart.images import FMNIST_DECODE, Preprocess
from headstart.records import ExtractRecord, SourceWeights, TaskMeta
from tasks.extract import extract

PRE = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))


def split(n: int, classes: int, rng: np.random.Generator) -> Split:
    """Class c is a bright horizontal band at rows 5c..5c+4 over noise: learnable in a couple of epochs."""
    labels = np.arange(n, dtype=np.int64) % classes
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 5 * c : 5 * c + 5] = 220
    return Split(images, labels)


def tiny_task(name: str, classes: int = 3, sizes: tuple[int, int, int] = (60, 15, 15), seed: int = 0) -> TaskData:
    rng = np.random.default_rng(seed)
    names = [f"{name}-{c}" for c in range(classes)]
    return TaskData(name, names, *(split(n, classes, rng) for n in sizes))


def source_model(directory: Path, seed: int = 123, classes: int = 4) -> SourceWeights:
    """A saved (untrained, seeded) fmnist_cnn source model and the weights record the weights stage would write."""
    torch.manual_seed(seed)
    net = create_model("fmnist_cnn", classes, dropout=0.3)
    spec = ModelSpec(
        arch="fmnist_cnn", num_classes=classes, class_names=list("abcd")[:classes], preprocess=PRE, dropout=0.3
    )
    path = directory / "source.safetensors"
    sha256 = save_model(net, spec, path)
    return SourceWeights(
        source="fmnist", uri=str(path), path=str(path), sha256=sha256, arch="fmnist_cnn", cut="block2", preprocess=PRE
    )


@dataclass(frozen=True)
class Setup:
    """Everything the train and evaluate tasks take, built the way the upstream stages build it."""

    data_dir: Path
    task_meta: TaskMeta
    weights: SourceWeights
    extract_record: ExtractRecord
    source: SourceParams
    params: TrainParams


def prepare(root: Path) -> Setup:
    """A 3-class target task, a source model, and its real (Zarr) feature store from the extract task."""
    data_dir = root / "data"
    task_meta = TaskMeta(**save_task(tiny_task("target", classes=3), data_dir, FMNIST_DECODE))
    weights = source_model(root)
    extract_record = extract.fn(
        weights=weights,
        task_meta=task_meta,
        params=ExtractParams(batch_size=32, chunk_mb=0.5, device="cpu"),
        data_dir=data_dir,
        store_root=root / "features",
    )
    source = SourceParams(weights=weights.path, arch="fmnist_cnn", cut="block2")
    optim = OptimParams(epochs=3, batch_size=16, lr=2e-3, patience=2)
    params = TrainParams(
        runs={s: RunParams(source="fmnist", strategy=s) for s in ("frozen", "finetune", "scratch")},
        head=HeadParams(hidden=[8]),
        frozen=optim,
        end_to_end=optim.model_copy(update={"epochs": 2}),
        device="cpu",
    )
    return Setup(data_dir, task_meta, weights, extract_record, source, params)


def with_taps(base: Setup, root: Path, taps: list[str]) -> Setup:
    """The setup with its feature store made again holding `taps` too, and its source naming them."""
    record = extract.fn(
        weights=base.weights,
        task_meta=base.task_meta,
        params=ExtractParams(batch_size=32, chunk_mb=0.5, device="cpu"),
        data_dir=base.data_dir,
        store_root=root / "features-taps",
        taps=taps,
    )
    source = base.source.model_copy(update={"taps": [t for t in taps if t != base.source.cut]})
    return replace(base, extract_record=record, source=source)
