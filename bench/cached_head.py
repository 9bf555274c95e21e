"""Benchmark 2: an epoch of the head on stored features against an epoch with the frozen body run every time.

The baseline is what one writes by hand in plain PyTorch: the frozen body and the new head as one
network, the body's parameters frozen, every batch of images preprocessed and sent through the
body, every epoch. Both sides run the project's one training loop (`headstart.fit.fit`) with the
same seed, head, optimiser and batches, so after the same epochs they should reach the same accuracy.
"""

from __future__ import annotations

from functools import partial

import torch

from bench.timing import Goal, Row, Stat, repeat, stat
from bench.workspace import SHARED, Workspace
from headstart.backbones import preprocess
from headstart.fit import fit
from headstart.heads import make_head
from headstart.sources import load_source
from headstart.strategies import train_frozen_head
from tasks.train import recipe_of

NAME = "cached_head"
GOAL = Goal(">=", 20.0)
EPOCHS = {"fmnist_cnn": 3, "mobilenet_v2": 2}
"""Epochs per side in full mode (quick: 2); the frozen-body side of the ImageNet source costs ~10 s an epoch."""


def case(ws: Workspace, arch: str, epochs: int) -> Row:
    stored = ws.shared(arch)
    train, val = stored.task.train, stored.task.val
    train_x, val_x = stored.features("train"), stored.features("val")
    params = ws.train_params
    no_early_stop = params.frozen.model_copy(update={"epochs": epochs, "patience": epochs})
    params = params.model_copy(update={"frozen": no_early_stop})
    recipe = recipe_of("frozen", params)  # as the train stage trains a frozen run under these params
    in_shape, classes = stored.feature_shape, stored.task.num_classes
    cut = stored.weights.cut

    def frozen_every_epoch() -> tuple[float, float]:
        body = load_source(stored.weights).upto(cut)
        for p in body.parameters():
            p.requires_grad_(False)
        torch.manual_seed(params.seed)  # the same head initialisation as train_frozen_head's
        net = body.with_classifier(make_head(in_shape, classes, params.head))
        result = fit(
            net,
            (train.images, train.labels),
            (val.images, val.labels),
            params.frozen,
            params.seed,
            params.device,
            transform=partial(preprocess, spec=stored.preprocess),
        )
        return result.seconds / result.epochs, result.history[-1]["val_accuracy"]

    def once(rep: int) -> dict[str, float]:
        _, cached = train_frozen_head((train_x, train.labels), (val_x, val.labels), classes, recipe)
        end_to_end, e2e_acc = frozen_every_epoch()
        cached_epoch = cached.seconds / cached.epochs
        acc = cached.history[-1]["val_accuracy"]
        return {
            "cached": cached_epoch,
            "e2e": end_to_end,
            "ratio": end_to_end / cached_epoch,
            "acc": acc,
            "diff": 100 * (acc - e2e_acc),
        }

    samples = repeat(once, ws.repeats, f"{NAME} {arch}")
    return Row(
        f"2. cached head vs frozen end to end, {arch}@{cut} {stored.preprocess.image_size}px, "
        f"{len(train)}+{len(val)} img, {epochs} epochs",
        [
            ("epoch on stored features", stat(samples, "cached", "s")),
            ("epoch through the frozen body", stat(samples, "e2e", "s")),
            ("val accuracy", stat(samples, "acc")),
            ("difference", stat(samples, "diff", "pt")),
            ("one-off extraction", Stat((stored.extract_seconds,), "s")),
        ],
        Stat(tuple(s["ratio"] for s in samples)),
        GOAL,
    )


def run(ws: Workspace) -> list[Row]:
    return [
        Row(f"2. cached head vs frozen end to end, {arch}", skipped=why)
        if (why := ws.unavailable(arch))
        else case(ws, arch, ws.size(2, EPOCHS[arch]))
        for arch in SHARED
    ]
