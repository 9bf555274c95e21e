"""One cell of the data-fraction sweep: a strategy trained on a nested share of the target's training split, one seed.

Pure functions draw the subset, pick the cut frozen and partial cells train at, train through
headstart.strategies and score the result on the test split. The `sweep` task runs one cell
as an MLflow child run of the sweep's parent run and writes its per-epoch history atomically; it is
cached by content, so an interrupted sweep redoes only the cells it had not finished.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from prefect import task
from torch.nn import functional as F

from headstart import tracking
from headstart.backbones import StagedNet, preprocess
from headstart.caching import cached, run_logger
from headstart.config import (
    BEST_CUT,
    STORED,
    Device,
    HeadParams,
    OptimParams,
    StreamParams,
    SweepStrategy,
    UpperInit,
    base_strategy,
)
from headstart.datasets import Split, TaskData, load_task
from headstart.extraction import source_network
from headstart.files import atomic_write
from headstart.fit import EpochCallback, FitResult, predict_logits, resolve_device
from headstart.images import Preprocess
from headstart.metrics import accuracy
from headstart.records import AdviseRecord, ExtractRecord, Output, SourceWeights, TaskMeta
from headstart.splits import nested_fraction
from headstart.strategies import (
    Labelled,
    Recipe,
    end_to_end_net,
    partial_net,
    train_end_to_end,
    train_frozen_head,
    train_partial,
)
from headstart.streaming import stored_rows, viewed_rows

UPPER_INIT: UpperInit = "pretrained"
"""Partial cells start the layers above the cut from the source's weights: the transfer the sweep measures."""


def sweep_cut(setting: str, advice: AdviseRecord | None) -> str:
    """The stored cut frozen and partial cells train at: `best` is the advise stage's top-ranked cut, else `setting`.

    The probe ranks the cuts once, on its stratified subset of the whole training split, and that one
    cut serves every fraction, so each strategy's curve over the fractions is one network. It peeks at
    no image a cell lacks when advise.seed is the cell's seed (both 0 by default): the subsets are
    nested, so the probe's (200 a class, 3.7% of FMNIST-1) lies inside every fraction's from 5% up.
    """
    if setting != BEST_CUT:
        return setting
    if advice is None:
        raise ValueError(f"sweep.cut is {BEST_CUT!r}: it needs the advise stage's ranking of the stored cuts")
    return advice.ranking[0]


def cell_name(strategy: str, fraction: float, seed: int) -> str:
    """Readable and unique within a sweep: `finetune-25pct-s0`."""
    return f"{strategy}-{fraction * 100:g}pct-s{seed}"


def subset(split: Split, fraction: float, seed: int) -> Split:
    """The nested, stratified `fraction` of a split (the 5% subset lies inside the 10% one for a given seed)."""
    idx = nested_fraction(split.labels, fraction, seed)
    return Split(split.images[idx], split.labels[idx])


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


def image_scores(net: StagedNet, test: Split, pre: Preprocess, device: Device) -> dict[str, float]:
    """A whole network's scores on the test images (preprocessed as the source's weights expect)."""
    net = net.to(resolve_device(device))  # partial trained only the layers above the cut on `device`
    return scores_on_test(
        predict_logits(net, test.images, transform=partial(preprocess, spec=pre), device=device), test.labels
    )


def frozen_cell(
    train: Labelled,
    val: Labelled,
    test: Labelled,
    num_classes: int,
    recipe: Recipe,
    on_epoch: EpochCallback | None = None,
) -> tuple[FitResult, dict[str, float]]:
    """A new head on stored features (the frozen strategy), scored on the stored test features."""
    head, result = train_frozen_head(train, val, num_classes, recipe, on_epoch)
    return result, scores_on_test(predict_logits(head, test[0], device=recipe.device), test[1])


def partial_cell(
    source_net: StagedNet,
    arch: str,
    cut: str,
    train: Labelled,
    val: Labelled,
    target: TaskData,
    pre: Preprocess,
    recipe: Recipe,
    on_epoch: EpochCallback | None = None,
) -> tuple[FitResult, dict[str, float]]:
    """The source's layers above `cut` (from its pretrained weights) plus a new head, trained on the stored
    activations at `cut` (the partial strategy), then scored as a whole network on the test images."""
    net = partial_net(source_net, arch, cut, target.num_classes, recipe.head, pre, recipe.seed, UPPER_INIT)
    result = train_partial(net, cut, train, val, recipe, on_epoch)
    return result, image_scores(net, target.test, pre, recipe.device)


def end_to_end_cell(
    source_net: StagedNet,
    arch: str,
    strategy: str,
    target: TaskData,
    pre: Preprocess,
    recipe: Recipe,
    on_epoch: EpochCallback | None = None,
) -> tuple[FitResult, dict[str, float]]:
    """The whole network from pretrained (finetune) or random (scratch) weights, scored on the test images."""
    net = end_to_end_net(source_net, arch, strategy, target.num_classes, recipe.head, pre, recipe.seed)
    result = train_end_to_end(net, target, pre, recipe, on_epoch)
    return result, image_scores(net, target.test, pre, recipe.device)


def cell_params(strategy: str, fraction: float, seed: int, cut: str | None, train_size: int, head: HeadParams,
                optim: OptimParams, weights: SourceWeights) -> dict[str, Any]:  # fmt: skip
    """What a cell's MLflow run records as params."""
    return {
        "strategy": strategy, "fraction": fraction, "seed": seed, "train_size": train_size, "cut": cut,
        **({"upper_init": UPPER_INIT} if base_strategy(strategy) == "partial" else {}),
        "source": {"name": weights.source, "arch": weights.arch},
        "head": head.model_dump(mode="json"), "optim": optim.model_dump(mode="json"),
    }  # fmt: skip


def train_cell(
    name: str, strategy: str, cut: str | None, weights: SourceWeights, extract_record: ExtractRecord | None,
    target: TaskData, recipe: Recipe, stream: StreamParams,
) -> tuple[FitResult, dict[str, float]]:  # fmt: skip
    """Train one cell's network (frozen and partial on the stored activations at `cut`, read as `stream` says)
    and score it on test."""
    pre, arch, trains = weights.preprocess, weights.arch, base_strategy(strategy)
    if trains not in STORED:
        return end_to_end_cell(source_network(weights), arch, strategy, target, pre, recipe, tracking.log_epoch)
    if extract_record is None:
        raise ValueError(f"sweep cell {name!r} trains on stored activations: it needs the extract record")
    if trains != strategy and not extract_record.views:
        raise ValueError(f"sweep cell {name!r} trains on stored augmented views, and the store holds none: "
                         "set extract.views (4, say) and rerun the extract stage")  # fmt: skip
    rows = viewed_rows if trains != strategy else stored_rows
    train_xy = (rows(extract_record, target.train.images, cut, stream), target.train.labels)
    val_xy = (stored_rows(extract_record, target.val.images, cut, stream), target.val.labels)
    if trains == "frozen":
        test_xy = (stored_rows(extract_record, target.test.images, cut, stream), target.test.labels)
        return frozen_cell(train_xy, val_xy, test_xy, target.num_classes, recipe, tracking.log_epoch)
    return partial_cell(source_network(weights), arch, cut, train_xy, val_xy, target, pre, recipe, tracking.log_epoch)


@task(**cached("sweep"))
def sweep(
    strategy: SweepStrategy,
    fraction: float,
    seed: int,
    cut: str | None,
    head: HeadParams,
    optim: OptimParams,
    device: Device,
    weights: SourceWeights,
    extract_record: ExtractRecord | None,
    task_meta: TaskMeta,
    data_dir: Path,
    out_dir: Path,
    stream: StreamParams,
) -> dict:
    """Train and score one cell as a child of the active (parent) MLflow run; write `out_dir/<cell>.json`.

    `cut` is the stored cut a frozen or partial cell trains at (None for finetune and scratch, which
    train every layer, so a different cut does not recompute them).
    """
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("a sweep cell logs a nested MLflow run: start the sweep's parent run first (flows/sweep.py)")
    name = cell_name(strategy, fraction, seed)
    if (base_strategy(strategy) in STORED) != (cut is not None):
        raise ValueError(
            f"sweep cell {name!r}: frozen and partial cells take a stored cut, the others none; got {cut!r}"
        )
    target = load_task(Path(data_dir), "target")
    target = dataclasses.replace(target, train=subset(target.train, fraction, seed))
    run_logger().info("%s: %s%s on %d of the target's training images", name, strategy, f" at {cut}" if cut else "",
                      len(target.train))  # fmt: skip
    tags = {"stage": "sweep", "strategy": strategy, "source": weights.source, "data_fingerprint": task_meta.fingerprint,
            "weights_sha256": weights.sha256, "git_commit": tracking.git_commit()}  # fmt: skip
    if base_strategy(strategy) in STORED and extract_record is not None:
        tags["feature_store_key"] = extract_record.store_key
    cell = {"cell": name, "strategy": strategy, "cut": cut, "fraction": fraction, "seed": seed,
            "train_size": len(target.train)}  # fmt: skip
    with mlflow.start_run(run_name=name, nested=True, experiment_id=parent.info.experiment_id) as child:
        mlflow.log_params(tracking.flatten(cell_params(strategy, fraction, seed, cut, len(target.train), head, optim,
                                                       weights)))  # fmt: skip
        result, scores = train_cell(
            name, strategy, cut, weights, extract_record, target, Recipe(head, optim, seed, device), stream
        )
        mlflow.set_tags(tags)
        summary = cell_summary(result, scores)
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        path = Path(out_dir) / f"{name}.json"
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({**cell, **summary, "history": result.history}, indent=2))
    run_logger().info(
        "%s: test accuracy %.4f, final train loss %.4f, best val loss %.4f (%d epochs, %.1f s)", name,
        summary["test_accuracy"], summary["final_train_loss"], summary["best_val_loss"], summary["epochs"],
        summary["seconds"],
    )  # fmt: skip
    return {**cell, **summary, "mlflow_run_id": child.info.run_id, "outputs": [Output.of(path).model_dump()]}
