"""The shared training loop: deterministic, frozen means frozen, early stopping keeps the best epoch."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from headstart.backbones import create_model, preprocess
from headstart.config import HeadParams, OptimParams
from headstart.fit import fit, predict_logits, resolve_device
from headstart.heads import make_head
from headstart.images import Preprocess

OPTIM = OptimParams(epochs=4, batch_size=32, lr=1e-2, patience=10)


def blobs(n: int, dim: int = 8, classes: int = 3, seed: int = 0, flip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable Gaussian clusters; `flip` shifts the labels (a validation set that disagrees with training)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = np.random.default_rng(99).normal(0, 3, (classes, dim))
    x = centres[y] + rng.normal(0, 1, (n, dim))
    return x.astype(np.float32), (y + flip) % classes


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def strip_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_same_seed_same_history_and_weights():
    train, val = blobs(200), blobs(60, seed=1)
    a, b = mlp(0), mlp(0)
    ra = fit(a, train, val, OPTIM, seed=3)
    rb = fit(b, train, val, OPTIM, seed=3)
    assert strip_time(ra.history) == strip_time(rb.history)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert set(ra.history[0]) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"}
    assert ra.best["val_accuracy"] > 0.9  # it learned the clusters

    rc = fit(mlp(0), train, val, OPTIM, seed=4)  # another shuffling order gives other numbers
    assert strip_time(rc.history) != strip_time(ra.history)


def test_frozen_parameters_and_their_batchnorm_never_change():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
    head = nn.Linear(16, 3)
    model = nn.Sequential(body, head)
    for p in body.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    head_before = head.weight.detach().clone()

    opt = OptimParams(epochs=3, batch_size=16, lr=1e-2, weight_decay=0.1, patience=5)
    fit(model, blobs(100), blobs(30, seed=1), opt, seed=0)

    after = body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen layer (or its BN statistics) changed"
    assert not torch.equal(head_before, head.weight)


def test_early_stopping_stops_and_restores_the_best_epoch():
    train = blobs(200)
    val = blobs(60, seed=1, flip=1)  # validation labels disagree: the more it learns, the worse validation gets
    model = mlp(0)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(epoch: int, metrics: dict[str, float]) -> None:
        snapshots[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    opt = OptimParams(epochs=20, batch_size=32, lr=1e-2, patience=2)
    result = fit(model, train, val, opt, seed=0, on_epoch=snapshot)

    losses = [row["val_loss"] for row in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert result.stopped_early and result.epochs == result.best_epoch + opt.patience < opt.epochs
    best = snapshots[result.best_epoch]
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items()), "the best epoch's weights were not kept"
    restored_loss = nn.functional.cross_entropy(predict_logits(model, val[0]), torch.as_tensor(val[1])).item()
    assert restored_loss == pytest.approx(result.best["val_loss"], rel=1e-6)


def test_images_are_preprocessed_per_batch():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 48)
    images = np.where(labels[:, None, None] == 1, 200, 30).astype(np.uint8) + rng.integers(0, 40, (48, 28, 28)).astype(
        np.uint8
    )
    pre = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))
    torch.manual_seed(0)
    net = create_model("fmnist_cnn", 2)
    opt = OptimParams(epochs=2, batch_size=16, lr=1e-3, patience=2)
    result = fit(
        net, (images[:32], labels[:32]), (images[32:], labels[32:]), opt, 0, transform=partial(preprocess, spec=pre)
    )
    assert result.epochs == 2
    assert result.best["val_accuracy"] == 1.0


def hidden_units_spread(head: nn.Sequential) -> float:
    """Largest difference between any hidden unit's incoming weights and the first unit's."""
    w = head[1].weight.detach()
    return float((w - w[0]).abs().max())


@pytest.mark.parametrize("init", ["zeros", "ones", "kaiming"])
def test_constant_head_init_keeps_hidden_units_identical(init: str):
    torch.manual_seed(0)
    head = make_head((8,), 3, HeadParams(hidden=[16], init=init))
    start = head[1].weight.detach().clone()
    opt = OptimParams(epochs=5, batch_size=32, lr=1e-2, patience=5)
    fit(head, blobs(200), blobs(60, seed=1), opt, seed=0)
    if init == "kaiming":
        assert hidden_units_spread(head) > 0.1, "random init: hidden units differ"
        assert not torch.equal(start, head[1].weight)
    else:
        # every unit gets the same gradient, so all stay equal (zeros: ReLU'(0)=0, they never move at all)
        assert hidden_units_spread(head) <= 1e-5 * max(1.0, float(head[1].weight.detach().abs().max()))
        if init == "ones":
            assert not torch.equal(start, head[1].weight), "they did train, just in lockstep"


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="differ in length"):
        fit(mlp(0), (np.zeros((5, 8), np.float32), np.zeros(4, np.int64)), blobs(3), OPTIM, 0)
    frozen = mlp(0).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        fit(frozen, blobs(10), blobs(3), OPTIM, 0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("auto").type in {"cpu", "cuda"}


def test_the_start_is_a_candidate_when_asked_so_a_fitted_network_never_comes_back_worse() -> None:
    """keep_start: scored before the first epoch; when no epoch beats it, the starting weights are restored."""
    train, val = blobs(200), blobs(60, seed=1)
    model = mlp(0)
    fit(model, train, val, OPTIM, seed=0)  # a network that already fits
    fitted = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = blobs(200, flip=1)  # training on shifted labels can only make validation worse
    kept = fit(model, wrong, val, OPTIM.model_copy(update={"patience": 2}), seed=0, keep_start=True)
    assert kept.best_epoch == 0 and kept.best == kept.start and kept.start["epoch"] == 0
    assert kept.epochs == 2 and all(r["val_loss"] > kept.start["val_loss"] for r in kept.history)
    assert all(torch.equal(v, fitted[k]) for k, v in model.state_dict().items())
    plain = fit(mlp(0), train, val, OPTIM, seed=0)  # without it: the best epoch, never the start
    assert plain.best_epoch >= 1 and plain.start is None
