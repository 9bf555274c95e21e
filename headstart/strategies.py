"""The training strategies: what trains, on what, from which starting point.

frozen: only a new head trains, on activations stored once by the extract stage (the speed-up).
partial: the source layers above the cut (pretrained or re-initialised) plus the head train on the
stored activations at the cut: the same as training end to end with the layers up to it frozen.
finetune: the source network up to its last cut plus the new head, every layer training on images.
scratch: the same architecture and head freshly initialised: the baseline transfer must beat.
Whatever the strategy, the trained network predicts from raw images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from headstart.backbones import CLASSIFIER, StagedNet, create_model, feature_shape, preprocess
from headstart.config import STORED, Device, FeatureAugmentParams, HeadParams, OptimParams, UpperInit
from headstart.datasets import TaskData
from headstart.feature_augment import FeatureAugmenter
from headstart.fit import EpochCallback, FitResult, Inputs, fit, predict_logits, resolve_device
from headstart.heads import make_head
from headstart.images import Preprocess
from headstart.threads import head_threads, torch_threads

Features = tuple[np.ndarray | Inputs, np.ndarray | Inputs]
"""Stored activations at one cut for the training and validation images (in memory, or streamed from the store)."""
Labelled = tuple[np.ndarray | Inputs, np.ndarray]
"""Inputs (stored activations, in memory or streamed) and their labels."""


@dataclass(frozen=True)
class Recipe:
    """What one training needs besides its data: the new head, the optimiser, the seed and the device."""

    head: HeadParams
    optim: OptimParams
    seed: int
    device: Device = "auto"
    class_weights: tuple[float, ...] | None = None
    """Per-class loss weights (train.class_weights: auto); None weighs every image the same."""
    feature_augment: FeatureAugmentParams | None = None
    """Random changes to stored activation maps of training batches (frozen, partial); None or all off: none."""
    body_lr: float = 1.0
    """End to end: the share of the learning rate the layers below the new head train at (finetune's slower body)."""

    def augmenter(self) -> FeatureAugmenter | None:
        """The training batches' feature-space augmentation, seeded with the run's seed; None when off."""
        if self.feature_augment is None:
            return None
        augmenter = FeatureAugmenter(self.feature_augment, self.seed)
        return augmenter if augmenter.active else None


def body_dropout(body: nn.Module) -> float:
    """The dropout rate built into the kept source stages (0 when none), recorded so the spec rebuilds them."""
    return next((m.p for m in body.modules() if isinstance(m, nn.Dropout)), 0.0)


def seeded_head(rows: np.ndarray | Inputs, num_classes: int, head: HeadParams, seed: int) -> nn.Sequential:
    """A new head for rows shaped like `rows`, initialised from `seed` alone: the same seed, the same start."""
    torch.manual_seed(seed)
    return make_head(tuple(rows.shape[1:]), num_classes, head)


def train_frozen_head(
    train: Labelled,
    val: Labelled,
    num_classes: int,
    recipe: Recipe,
    on_epoch: EpochCallback | None = None,
) -> tuple[nn.Module, FitResult]:
    """A seeded new head trained on stored features (rows of the shape the features have)."""
    head = seeded_head(train[0], num_classes, recipe.head, recipe.seed)
    with torch_threads(head_threads()):  # bitwise the same at any count: fitted to the idle cores
        result = fit(
            head,
            train,
            val,
            recipe.optim,
            recipe.seed,
            recipe.device,
            on_epoch=on_epoch,
            class_weights=recipe.class_weights,
            train_augment=recipe.augmenter(),
        )
    return head, result


def end_to_end_net(
    source_net: StagedNet, arch: str, strategy: str, num_classes: int, head: HeadParams, pre: Preprocess, seed: int
) -> StagedNet:
    """The source's stages up to its last cut plus a new head, all trainable.

    finetune keeps the pretrained weights; scratch re-initialises the very same stages the way
    the architecture initialises itself (seeded), so the two differ only in their starting point.
    """
    cut = source_net.cut_names[-1]
    torch.manual_seed(seed)
    body = copy.deepcopy(source_net.upto(cut))
    if strategy == "scratch":
        body.load_state_dict(create_model(arch, num_classes).upto(cut).state_dict())
    elif strategy != "finetune":
        raise ValueError(f"strategy {strategy!r} does not train end to end; expected finetune or scratch")
    net = body.with_classifier(make_head(feature_shape(body, cut, pre), num_classes, head))
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def train_end_to_end(
    net: StagedNet,
    target: TaskData,
    pre: Preprocess,
    recipe: Recipe,
    on_epoch: EpochCallback | None = None,
    keep_start: bool = False,
) -> FitResult:
    """Train every parameter of `net` that requires grad on the target's images (the body at `recipe.body_lr`).

    `keep_start`: the starting network is a candidate too (finetune after its head-first phase is never
    handed back worse on validation than that phase left it)."""
    head = list(net.stages[CLASSIFIER].parameters())
    ids = {id(p) for p in head}
    body = [p for p in net.parameters() if id(p) not in ids]
    return fit(
        net,
        (target.train.images, target.train.labels),
        (target.val.images, target.val.labels),
        recipe.optim,
        recipe.seed,
        recipe.device,
        transform=partial(preprocess, spec=pre),
        on_epoch=on_epoch,
        class_weights=recipe.class_weights,
        lr_shares=None if recipe.body_lr == 1.0 else [(body, recipe.body_lr), (head, 1.0)],
        keep_start=keep_start,
    )


def train_head_first(
    net: StagedNet, target: TaskData, pre: Preprocess, recipe: Recipe, features: Features | None = None
) -> FitResult:
    """Train only `net`'s new head, its body frozen: on `features` (the stored activations at the body's last
    cut, for the training and validation images) when given, else on images through the frozen body.

    This is finetune's first phase: a pretrained body receives gradients only from a head that already
    fits the target, as a frozen run's head does.
    """
    head, transform = net.stages[CLASSIFIER], None
    train_x, val_x = (features[0], features[1]) if features is not None else (target.train.images, target.val.images)
    if features is None:  # the body's activations computed as the extract stage computes them: eval mode, no grad
        device = resolve_device(recipe.device)
        body = net.upto(net.cut_names[-1]).to(device).eval()

        def transform(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return body(preprocess(x, pre).to(device))

    return fit(
        head, (train_x, target.train.labels), (val_x, target.val.labels), recipe.optim, recipe.seed, recipe.device,
        transform=transform, class_weights=recipe.class_weights,
    )  # fmt: skip


def check_partial(source_net: StagedNet, arch: str, cut: str) -> None:
    """partial trains source stages above the cut: a network of one stage (a library model's) has none to train."""
    if len(source_net.cut_names) == 1:
        raise ValueError(
            f"partial on {arch} at {cut!r}: headstart holds this model as one stage, so no source layer lies above "
            "the cut; use frozen or finetune, or an architecture split into stages (mobilenet_v2, "
            "mobilenet_v3_small, resnet18, fmnist_cnn)"
        )


def partial_net(
    source_net: StagedNet,
    arch: str,
    cut: str,
    num_classes: int,
    head: HeadParams,
    pre: Preprocess,
    seed: int,
    upper_init: UpperInit = "pretrained",
) -> StagedNet:
    """The source up to its last cut plus a new head: stages up to `cut` frozen, the ones above it trainable.

    The layers above the cut keep the pretrained weights, or (`random`) are re-initialised the way
    the architecture initialises itself (seeded). The source network itself is left untouched.
    """
    last = source_net.cut_names[-1]
    torch.manual_seed(seed)
    body = copy.deepcopy(source_net.upto(last))
    if upper_init == "random":
        body.between(cut).load_state_dict(create_model(arch, num_classes).between(cut).state_dict())
    elif upper_init != "pretrained":
        raise ValueError(f"upper_init {upper_init!r}: expected pretrained or random")
    net = body.with_classifier(make_head(feature_shape(body, last, pre), num_classes, head))
    for p in net.parameters():
        p.requires_grad_(True)
    for p in net.upto(cut).parameters():
        p.requires_grad_(False)
    return net


def above_cut(net: StagedNet, cut: str) -> StagedNet:
    """The stages after `cut`, classifier included (the same modules): what a partial run trains."""
    names = net.stage_names
    return StagedNet({n: net.stages[n] for n in names[names.index(cut) + 1 :]})


def train_partial(
    net: StagedNet,
    cut: str,
    train: Labelled,
    val: Labelled,
    recipe: Recipe,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train the layers of a `partial_net` above `cut` on the stored activations at `cut` (updates `net`).

    The frozen stages would compute exactly these activations every epoch, so this gives end-to-end
    training with them frozen (`train_end_to_end` with the same recipe) without running them.
    """
    return fit(
        above_cut(net, cut), train, val, recipe.optim, recipe.seed, recipe.device, on_epoch=on_epoch,
        class_weights=recipe.class_weights, train_augment=recipe.augmenter(),
    )  # fmt: skip


@dataclass(frozen=True)
class Trained:
    """One strategy's trained network (it predicts from images), the cut its spec records, its history."""

    strategy: str
    net: StagedNet
    spec_cut: str
    result: FitResult

    @property
    def val_accuracy(self) -> float:
        return self.result.best["val_accuracy"]


def train_strategy(
    strategy: str,
    source_net: StagedNet,
    arch: str,
    target: TaskData,
    pre: Preprocess,
    recipe: Recipe,
    cut: str,
    features: Features | None = None,
    upper_init: UpperInit = "pretrained",
    on_epoch: EpochCallback | None = None,
    head_first: tuple[Recipe, Features | None] | None = None,
) -> Trained:
    """Train one strategy; frozen and partial need `features`, the stored activations at `cut`.

    finetune with `head_first` (the head's recipe, and the stored activations at the body's last cut
    or None) trains the new head on the frozen body first, then every layer (`recipe.body_lr`).
    """
    if strategy in STORED:
        if features is None:
            raise ValueError(f"strategy {strategy!r} trains on stored activations at {cut!r}: pass `features`")
        train_xy, val_xy = (features[0], target.train.labels), (features[1], target.val.labels)
    if strategy == "frozen":
        head, result = train_frozen_head(train_xy, val_xy, target.num_classes, recipe, on_epoch)
        return Trained(strategy, source_net.upto(cut).with_classifier(head), cut, result)
    if strategy == "partial":
        check_partial(source_net, arch, cut)
        net = partial_net(source_net, arch, cut, target.num_classes, recipe.head, pre, recipe.seed, upper_init)
        result = train_partial(net, cut, train_xy, val_xy, recipe, on_epoch)
        return Trained(strategy, net, net.cut_names[-1], result)
    net = end_to_end_net(source_net, arch, strategy, target.num_classes, recipe.head, pre, recipe.seed)
    first = strategy == "finetune" and head_first is not None
    if first:
        train_head_first(net, target, pre, *head_first)
    result = train_end_to_end(net, target, pre, recipe, on_epoch, keep_start=first)
    return Trained(strategy, net, net.cut_names[-1], result)


def val_logits(
    trained: Trained, target: TaskData, pre: Preprocess, cut: str, features: Features | None, device: Device = "auto"
) -> torch.Tensor:
    """The trained network's logits on the validation images (from the stored activations it trained on, if any)."""
    if trained.strategy == "frozen":
        return predict_logits(trained.net.stages[CLASSIFIER], features[1], device=device)
    if trained.strategy == "partial":
        return predict_logits(above_cut(trained.net, cut), features[1], device=device)
    return predict_logits(trained.net, target.val.images, transform=partial(preprocess, spec=pre), device=device)


def distinct_units(head: nn.Module) -> int | None:
    """Distinct units of the head's first hidden layer (weights and bias, to 6 decimals); None without one.

    Fewer than the layer's width means units stayed copies of each other: the symmetry a constant init causes.
    """
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        return None
    first = torch.cat([linears[0].weight, linears[0].bias[:, None]], dim=1).detach()
    return len(torch.unique(torch.round(first, decimals=6), dim=0))


def negative_transfer(transfer_val_accuracy: float, scratch_val_accuracy: float) -> bool:
    """Transfer hurt: the scratch baseline trained on the same data scored higher on validation."""
    return scratch_val_accuracy > transfer_val_accuracy


def needs_baseline(strategy: str, baseline: bool, chosen: str) -> bool:
    """A run trains a scratch baseline when asked to (or when auto) and does not already train scratch."""
    return (baseline or strategy == "auto") and chosen != "scratch"


@dataclass(frozen=True)
class Outcome:
    """What a run keeps: its network, the transfer's validation accuracy, and with a baseline, that and the verdict."""

    kept: Trained
    transfer_val_accuracy: float
    baseline: Trained | None = None
    negative_transfer: bool | None = None


def keep(trained: Trained, baseline: Trained | None, auto: bool) -> Outcome:
    """The negative-transfer verdict against the baseline, and what is kept: auto keeps scratch when it won."""
    if baseline is None:
        return Outcome(trained, trained.val_accuracy)
    lost = negative_transfer(trained.val_accuracy, baseline.val_accuracy)
    return Outcome(baseline if lost and auto else trained, trained.val_accuracy, baseline, lost)
