"""One cell of the data-fraction sweep: a strategy trained on a nested share of the target's training split, one seed.

Pure functions draw the subset, train through tasks.train's own functions and score the result on
the test split. The `sweep` task runs one cell as an MLflow child run of the sweep's parent run and
writes its per-epoch history atomically; it is cached by content, so an interrupted sweep redoes
only the cells it had not finished.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import torch
from prefect import task
from torch.nn import functional as F

from headstart import tracking
from headstart.backbones import Preprocess, StagedNet, preprocess
from headstart.caching import cached, output, run_logger
from headstart.checkpoints import atomic_write
from headstart.config import Device, HeadParams, OptimParams, SweepStrategy, TrainParams
from headstart.datasets import Split, TaskData, load_task
from headstart.fit import EpochCallback, FitResult, predict_logits
from headstart.metrics import accuracy
from headstart.sources import load_source
from headstart.store import provenance
from tasks.data import nested_fraction
from tasks.train import end_to_end_net, stored_features, train_end_to_end, train_frozen_head

ON_FEATURES: frozenset[SweepStrategy] = frozenset({"frozen"})
"""Cells trained on the extract stage's stored features; the others train the whole network on images.
The hook for "partial" (layers above the cut, on stored activations) and "frozen at the best stored
cut": add them to `headstart.config.SweepStrategy` and give them a branch in the `sweep` task."""


def cell_name(strategy: str, fraction: float, seed: int) -> str:
    """Readable and unique within a sweep: `finetune-25pct-s0`."""
    return f"{strategy}-{fraction * 100:g}pct-s{seed}"


def subset(split: Split, fraction: float, seed: int) -> Split:
    """The nested, stratified `fraction` of a split (the 5% subset lies inside the 10% one for a given seed)."""
    idx = nested_fraction(split.labels, fraction, seed)
    return Split(split.images[idx], split.labels[idx])


def cell_params(head: HeadParams, optim: OptimParams, seed: int, device: Device) -> TrainParams:
    """The train section tasks.train's functions expect, holding only what a cell uses."""
    return TrainParams(runs={}, head=head, frozen=optim, end_to_end=optim, seed=seed, device=device)


def scores_on_test(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Cross-entropy and accuracy of test-split logits."""
    y = torch.as_tensor(labels, dtype=torch.long)
    return {
        "test_loss": F.cross_entropy(logits, y).item(),
        "test_accuracy": accuracy(labels, logits.argmax(1).numpy()),
    }


def cell_summary(result: FitResult, scores: dict[str, float]) -> dict[str, float]:
    """What the sweep's table plots: the last epoch's training loss, the best validation loss, the test scores."""
    return {
        "final_train_loss": result.history[-1]["train_loss"],
        "best_val_loss": result.best["val_loss"],
        "best_val_accuracy": result.best["val_accuracy"],
        **scores,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 2),
    }


def frozen_cell(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    in_shape: tuple[int, ...],
    num_classes: int,
    params: TrainParams,
    on_epoch: EpochCallback | None = None,
) -> tuple[FitResult, dict[str, float]]:
    """A new head on stored features (tasks.train's frozen strategy), scored on the stored test features."""
    head, result = train_frozen_head(train, val, in_shape, num_classes, params, on_epoch)
    return result, scores_on_test(predict_logits(head, test[0], device=params.device), test[1])


def end_to_end_cell(
    source_net: StagedNet,
    arch: str,
    strategy: str,
    target: TaskData,
    pre: Preprocess,
    params: TrainParams,
    on_epoch: EpochCallback | None = None,
) -> tuple[FitResult, dict[str, float]]:
    """The whole network from pretrained (finetune) or random (scratch) weights, scored on the test images."""
    net = end_to_end_net(source_net, arch, strategy, target.num_classes, params.head, pre, params.seed)
    result = train_end_to_end(net, target, pre, params, on_epoch)
    logits = predict_logits(net, target.test.images, transform=partial(preprocess, spec=pre), device=params.device)
    return result, scores_on_test(logits, target.test.labels)


@task(**cached("sweep"))
def sweep(
    strategy: SweepStrategy,
    fraction: float,
    seed: int,
    head: HeadParams,
    optim: OptimParams,
    device: Device,
    weights_record: dict,
    extract_record: dict | None,
    data_record: dict,
    data_dir: Path,
    out_dir: Path,
) -> dict:
    """Train and score one cell as a child of the active (parent) MLflow run; write `out_dir/<cell>.json`."""
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("a sweep cell logs a nested MLflow run: start the sweep's parent run first (flows/sweep.py)")
    log = run_logger()
    name = cell_name(strategy, fraction, seed)
    target = load_task(Path(data_dir), "target")
    target = dataclasses.replace(target, train=subset(target.train, fraction, seed))
    pre = Preprocess.model_validate(weights_record["preprocess"])
    arch, cut = weights_record["arch"], weights_record["cut"]
    params = cell_params(head, optim, seed, device)
    log.info("%s: %s on %d of the target's training images", name, strategy, len(target.train))
    tags = {
        "stage": "sweep",
        "strategy": strategy,
        "source": weights_record["source"],
        "data_fingerprint": data_record["fingerprint"],
        "weights_sha256": weights_record["sha256"],
    }
    run_params = {
        "strategy": strategy,
        "fraction": fraction,
        "seed": seed,
        "train_size": len(target.train),
        "source": {"name": weights_record["source"], "arch": arch, "cut": cut},
        "head": head.model_dump(mode="json"),
        "optim": optim.model_dump(mode="json"),
    }
    with mlflow.start_run(run_name=name, nested=True, experiment_id=parent.info.experiment_id) as child:
        mlflow.log_params(tracking.flatten(run_params))
        if strategy in ON_FEATURES:
            if extract_record is None:
                raise ValueError(f"sweep cell {name!r} trains on stored features: it needs the extract record")
            tags["feature_store_key"] = extract_record["store_key"]
            prov = provenance(weights_record["sha256"], arch, cut, pre)
            splits = [target.train, target.val, target.test]
            result, scores = frozen_cell(
                *((stored_features(extract_record["store_path"], prov, s.images), s.labels) for s in splits),
                tuple(extract_record["feature_shape"]),
                target.num_classes,
                params,
                tracking.log_epoch,
            )
        else:
            source_net = load_source(weights_record)
            result, scores = end_to_end_cell(source_net, arch, strategy, target, pre, params, tracking.log_epoch)
        mlflow.set_tags({"git_commit": tracking.git_commit(), **tags})
        summary = cell_summary(result, scores)
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        cell = {"cell": name, "strategy": strategy, "fraction": fraction, "seed": seed, "train_size": len(target.train)}
        path = Path(out_dir) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({**cell, **summary, "history": result.history}, indent=2))
    log.info(
        "%s: test accuracy %.4f, final train loss %.4f, best val loss %.4f (%d epochs, %.1f s)",
        name,
        summary["test_accuracy"],
        summary["final_train_loss"],
        summary["best_val_loss"],
        summary["epochs"],
        summary["seconds"],
    )
    return {**cell, **summary, "mlflow_run_id": child.info.run_id, "outputs": [output(path)]}
