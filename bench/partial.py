"""Benchmark 8: an epoch of the partial strategy on stored activations against end to end with the same layers frozen.

Both sides build the same `partial_net` (layers up to the cut frozen, the ones above it and the new
head trainable, same seed) and run the project's one training loop with the same batches: one on
the activations the extract stage stored at the cut, the other on images through the frozen layers
every epoch. They should reach the same accuracy; the stored side skips the frozen forward.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from bench.timing import Goal, Row, Stat, repeat, stat
from bench.workspace import Workspace
from headstart.backbones import StagedNet, preprocess
from headstart.config import TrainParams
from headstart.datasets import TaskData
from headstart.fit import predict_logits
from headstart.images import Preprocess
from headstart.metrics import accuracy
from headstart.sources import load_source
from headstart.strategies import partial_net, train_end_to_end, train_partial
from tasks.train import recipe_of

NAME = "partial"
GOAL = Goal(">=", 3.0)
ACCURACY_GOAL = Goal("<=", 0.5)
EPOCHS = 3
"""Epochs per side in full mode (quick: 2), early stopping off so both run them all."""


def accuracy_on_test(net: StagedNet, task: TaskData, pre: Preprocess) -> float:
    """The whole network's accuracy on the test images (how either side's model is used)."""
    logits = predict_logits(net, task.test.images, transform=partial(preprocess, spec=pre))
    return accuracy(task.test.labels, logits.argmax(1).numpy())


def compare_partial(
    source_net: StagedNet,
    arch: str,
    cut: str,
    task: TaskData,
    pre: Preprocess,
    features: tuple[np.ndarray, np.ndarray],
    params: TrainParams,
) -> dict[str, Any]:
    """Train the partial strategy both ways, side by side; seconds per epoch and test accuracy of each.

    `features` are the stored activations at `cut` of the training and validation images.
    """
    k, train, val = task.num_classes, task.train, task.val
    recipe = recipe_of("partial", params)  # train.partial's optimiser on both sides, as the train stage uses it
    stored_net = partial_net(source_net, arch, cut, k, params.head, pre, params.seed)
    stored = train_partial(stored_net, cut, (features[0], train.labels), (features[1], val.labels), recipe)
    images_net = partial_net(source_net, arch, cut, k, params.head, pre, params.seed)
    images = train_end_to_end(images_net, task, pre, recipe)
    out = {
        "stored_epoch": float(np.median([h["seconds"] for h in stored.history])),
        "e2e_epoch": float(np.median([h["seconds"] for h in images.history])),
        "stored_test": accuracy_on_test(stored_net, task, pre),
        "e2e_test": accuracy_on_test(images_net, task, pre),
        "stored_val": stored.best["val_accuracy"],
        "e2e_val": images.best["val_accuracy"],
        "epochs": (stored.epochs, images.epochs),
    }
    out["ratio"] = out["e2e_epoch"] / out["stored_epoch"]
    out["gap"] = 100 * abs(out["stored_test"] - out["e2e_test"])
    return out


def run(ws: Workspace) -> list[Row]:
    arch = "fmnist_cnn"
    label = f"8. partial on stored activations vs end to end, {arch}"
    if why := ws.unavailable(arch):
        return [Row(label, skipped=why)]
    stored = ws.shared(arch)
    cut = stored.weights.cut
    epochs = ws.size(2, EPOCHS)
    params = ws.params.train
    no_early_stop = params.partial.model_copy(update={"epochs": epochs, "patience": epochs})
    params = params.model_copy(update={"partial": no_early_stop})
    features = (stored.features("train"), stored.features("val"))

    def once(rep: int) -> dict[str, float]:
        return compare_partial(load_source(stored.weights), arch, cut, stored.task, stored.preprocess, features, params)

    samples = repeat(once, ws.repeats, f"{NAME} {arch}")
    size = f"{len(stored.task.train)}+{len(stored.task.val)} img, layers above {cut} + head, {epochs} epochs"
    return [
        Row(
            f"{label}@{cut}, {size}",
            [
                ("epoch on stored activations", stat(samples, "stored_epoch", "s")),
                ("epoch through the frozen layers", stat(samples, "e2e_epoch", "s")),
                ("test accuracy stored", stat(samples, "stored_test")),
                ("end to end", stat(samples, "e2e_test")),
            ],
            Stat(tuple(s["ratio"] for s in samples)),
            GOAL,
        ),
        Row(
            f"{label}@{cut}: test accuracy gap (points)",
            [("|stored - end to end|", stat(samples, "gap", "pt"))],
            Stat(tuple(s["gap"] for s in samples)),
            ACCURACY_GOAL,
        ),
    ]
