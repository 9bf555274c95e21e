"""Benchmark 13: augmentation that survives precompute. Stored views against on-the-fly augmentation.

The notes' experiment: a CNN pretrained on FMNIST-2 (here by the pretrain stage's own function),
frozen at its cut, and a new head for FMNIST-1 trained on 5% and 25% of its training split. Per
fraction, one run each, the same seed, head, optimiser and epochs (early stopping off, so every
side trains the same number of epochs):

- stored, K = 0: the head on the plain stored rows (what the pipeline did before views);
- stored, K views: the extract stage stores K augmented views per training image, the head draws
  one row per image and epoch (train.views: use);
- on the fly: every epoch augments every training image afresh (the same pipeline, extract.augment)
  and runs it through the frozen body (`headstart.augment.AugmentedImages`);
- FroFA: K = 0 with feature-space augmentation of the stored maps (train.feature_augment).

Test accuracy on the whole FMNIST-1 test split. The goal (issue 14): stored views recover at least
80% of the on-the-fly gain over K = 0, at most a fifth of its time. Time is everything it takes to a
trained head: the stored sides count their whole extraction (plain rows and views) and training.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from bench.timing import Goal, Row, Stat, log, timed
from bench.workspace import Workspace
from headstart.augment import AugmentedImages
from headstart.backbones import preprocess
from headstart.checkpoints import save_model
from headstart.config import ExtractParams, FeatureAugmentParams, PretrainParams, SourceParams
from headstart.datasets import SPLITS, Split, TaskData, load_task
from headstart.fit import fit, predict_logits
from headstart.heads import make_head
from headstart.records import ExtractRecord, SourceWeights
from headstart.sources import load_source
from headstart.strategies import Recipe, train_frozen_head
from headstart.streaming import stored_rows, viewed_rows
from tasks.pretrain import train_source
from tasks.weights import weights

NAME = "views"
GAIN = Goal(">=", 0.8)
TIME = Goal("<=", 0.2)
FROFA = {
    "flip+crop": FeatureAugmentParams(flip=True, crop=0.15),
    "brightness+contrast": FeatureAugmentParams(brightness=0.3, contrast=0.3),
}


def pretrained_source(ws: Workspace) -> SourceWeights:
    """The FMNIST-2 CNN as the pretrain stage trains it (params.yaml's pretrain section), through the weights stage."""
    params = ws.params.pretrain
    if ws.quick:
        params = params.model_copy(update={"epochs": 1})
    target = ws.target  # the data stage writes FMNIST-2 beside FMNIST-1
    source = load_task(ws.root / "data" / "fmnist", "source") if ws.has_fmnist else target
    if ws.quick:
        source = TaskData(source.name, source.class_names, *(first(source.split(s), 300) for s in SPLITS))
    (net, spec, result), seconds = timed(lambda: train_source(source, PretrainParams(**params.model_dump())))
    log(f"{NAME}: source CNN pretrained in {seconds:.0f} s, val accuracy {result.best['val_accuracy']:.4f}")
    path = ws.root / "weights-files" / "fmnist-source.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(net, spec, path)
    cut = ws.params.sources["fmnist"].cut
    record = weights.fn(
        sources={"fmnist": SourceParams(weights=str(path), arch=params.arch, cut=cut, image_size=28)},
        params=ws.params.weights, out_dir=ws.root / "weights", cache_dir=ws.root / ".cache" / "weights",
    )  # fmt: skip
    return record.sources["fmnist"]


def first(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n])


def accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(1).numpy() == labels).mean())


def stored_side(ws: Workspace, record: ExtractRecord, task: TaskData, recipe: Recipe, views: bool) -> float:
    """The head trained on the store (its views drawn when `views`): test accuracy."""
    stream = ws.params.train.stream
    rows = viewed_rows if views else stored_rows
    train = (rows(record, task.train.images, record.cut, stream), task.train.labels)
    val = (stored_rows(record, task.val.images, record.cut, stream), task.val.labels)
    head, _ = train_frozen_head(train, val, task.num_classes, recipe)
    return accuracy(predict_logits(head, stored_rows(record, task.test.images, record.cut, stream)), task.test.labels)


def on_the_fly(source: SourceWeights, task: TaskData, recipe: Recipe, augment: list) -> float:
    """Every epoch's training images augmented afresh and run through the frozen body: test accuracy."""
    body = load_source(source).upto(source.cut)
    for p in body.parameters():
        p.requires_grad_(False)
    torch.manual_seed(recipe.seed)  # the same head initialisation as train_frozen_head's
    shape = tuple(body(torch.zeros(1, 1, 28, 28)).shape[1:])
    torch.manual_seed(recipe.seed)
    net = body.with_classifier(make_head(shape, task.num_classes, recipe.head))
    pre = partial(preprocess, spec=source.preprocess)
    fit(net, (AugmentedImages(task.train.images, augment), task.train.labels), (task.val.images, task.val.labels),
        recipe.optim, recipe.seed, recipe.device, transform=pre)  # fmt: skip
    return accuracy(predict_logits(net, task.test.images, transform=pre), task.test.labels)


def case(ws: Workspace, source: SourceWeights, fraction: float, ks: tuple[int, int]) -> list[Row]:
    target = ws.target
    n_train = round((2000 if ws.quick else len(target.train)) * fraction)  # quick: 100 and 500 images
    task = ws.subset(n_train, *((100, 200) if ws.quick else (len(target.val), len(target.test))))
    data_dir, meta = ws.save(task, f"views-{n_train}")
    epochs = ws.size(2, 15)
    optim = ws.params.train.frozen.model_copy(update={"epochs": epochs, "patience": epochs})
    recipe = Recipe(ws.params.train.head, optim, ws.params.train.seed, "cpu")
    base = ExtractParams(**{**ws.params.extract.model_dump(), "views": 0})
    root = ws.root / "features" / f"views-{n_train}"
    label = f"13. views, FMNIST-1 {fraction:.0%} ({n_train} img), {source.arch}@{source.cut}, {epochs} epochs"

    plain, plain_s = ws.extract(source, data_dir, meta, root, params=base)
    acc0, head_s = timed(lambda: stored_side(ws, plain, task, recipe, views=False))
    otf, otf_s = timed(lambda: on_the_fly(source, task, recipe, base.augment))
    gain = otf - acc0
    rows = [Row(f"{label}: on the fly vs K=0", [("K=0 test acc", Stat((acc0,))), ("on the fly", Stat((otf,))),
                ("K=0 time", Stat((plain_s + head_s,), "s")), ("on-the-fly time", Stat((otf_s,), "s"))])]  # fmt: skip
    record, views_s = plain, plain_s
    for k in ks:  # K=4 then 8: the second extraction computes only the new views
        record, more_s = ws.extract(source, data_dir, meta, root, params=base.model_copy(update={"views": k}))
        views_s += more_s
        acc, train_s = timed(lambda record=record: stored_side(ws, record, task, recipe, views=True))
        total = views_s + train_s
        recovered = (acc - acc0) / gain if gain > 0 else float("nan")
        rows.append(Row(f"{label}: stored K={k}, share of the on-the-fly gain",
                        [("test acc", Stat((acc,))), ("extraction", Stat((views_s,), "s")),
                         ("training", Stat((train_s,), "s")), ("time / on the fly", Stat((total / otf_s,)))],
                        Stat((recovered,)), GAIN))  # fmt: skip
        rows.append(Row(f"{label}: stored K={k}, time against on the fly", [("total", Stat((total,), "s"))],
                        Stat((total / otf_s,)), TIME))  # fmt: skip
    for name, augment in FROFA.items():
        frofa = Recipe(recipe.head, recipe.optim, recipe.seed, "cpu", feature_augment=augment)
        acc, seconds = timed(lambda frofa=frofa: stored_side(ws, plain, task, frofa, views=False))
        rows.append(Row(f"{label}: FroFA {name} (K=0)", [("test acc", Stat((acc,))), ("gain", Stat((acc - acc0,))),
                        ("training", Stat((seconds,), "s"))]))  # fmt: skip
    return rows


def run(ws: Workspace) -> list[Row]:
    if not ws.has_fmnist and not ws.quick:
        return [Row("13. views", skipped=f"needs real Fashion-MNIST at {ws.fmnist_dir}")]
    source = pretrained_source(ws)
    ks = (1, 2) if ws.quick else (4, 8)
    return [row for fraction in (0.05, 0.25) for row in case(ws, source, fraction, ks)]
