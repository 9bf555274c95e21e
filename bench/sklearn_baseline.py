"""Benchmark 7: scikit-learn's LogisticRegression on the same stored features against the project's head.

What a user would pick instead of training a head: a standardised logistic regression with
scikit-learn's defaults (lbfgs, at most 100 iterations), fitted on the train split's stored
features, scored on the test split's. The head is trained as the train
stage trains it (params.yaml) and scored on the same test features.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.timing import Row, Stat, repeat, stat, timed
from bench.workspace import SHARED, Workspace
from headstart.fit import predict_logits
from headstart.strategies import train_frozen_head
from tasks.train import recipe_of

NAME = "sklearn_baseline"


def case(ws: Workspace, arch: str) -> Row:
    stored = ws.shared(arch)
    task, recipe = stored.task, recipe_of("frozen", ws.train_params)
    train_x, val_x, test_x = (stored.features(s) for s in ("train", "val", "test"))
    flat = [x.reshape(len(x), -1) for x in (train_x, test_x)]

    def once(rep: int) -> dict[str, float]:
        (head, result), head_s = timed(
            lambda: train_frozen_head((train_x, task.train.labels), (val_x, task.val.labels), task.num_classes, recipe)
        )
        head_acc = float((predict_logits(head, test_x).argmax(1).numpy() == task.test.labels).mean())
        model = make_pipeline(StandardScaler(), LogisticRegression())
        _, lr_s = timed(lambda: model.fit(flat[0], task.train.labels))
        lr_acc = float(np.mean(model.predict(flat[1]) == task.test.labels))
        iterations = int(np.max(model[-1].n_iter_))
        return {
            "head_s": head_s,
            "lr_s": lr_s,
            "head": head_acc,
            "lr": lr_acc,
            "diff": 100 * (head_acc - lr_acc),
            "iterations": iterations,
            "epochs": result.epochs,
        }

    samples = repeat(once, ws.repeats, f"{NAME} {arch}")
    return Row(
        f"7. vs scikit-learn LogisticRegression, {arch}@{stored.weights.cut} "
        f"{stored.preprocess.image_size}px, {len(task.train)} train img",
        [
            ("head fit", stat(samples, "head_s", "s")),
            ("head epochs", stat(samples, "epochs")),
            ("LogisticRegression fit", stat(samples, "lr_s", "s")),
            ("lbfgs iterations (max 100)", stat(samples, "iterations")),
            ("test accuracy head", stat(samples, "head")),
            ("LogisticRegression", stat(samples, "lr")),
            ("head - LR", stat(samples, "diff", "pt")),
        ],
        Stat(tuple(s["lr_s"] / s["head_s"] for s in samples)),
    )


def run(ws: Workspace) -> list[Row]:
    return [
        Row(f"7. vs scikit-learn LogisticRegression, {arch}", skipped=why)
        if (why := ws.unavailable(arch))
        else case(ws, arch)
        for arch in SHARED
    ]
