"""Feature-space augmentation (FroFA) of stored activation maps: seeded, shape-keeping, training batches only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headstart.config import FeatureAugmentParams, HeadParams, OptimParams
from headstart.feature_augment import FeatureAugmenter
from headstart.strategies import Recipe, train_frozen_head

MAPS = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0))


def test_off_is_no_augmenter_and_each_change_is_what_it_says() -> None:
    assert Recipe(HeadParams(), OptimParams(), 0, feature_augment=FeatureAugmentParams()).augmenter() is None
    assert Recipe(HeadParams(), OptimParams(), 0).augmenter() is None

    flipped = FeatureAugmenter(FeatureAugmentParams(flip=True), 0)(MAPS)
    same = [torch.equal(flipped[i], MAPS[i]) for i in range(8)]
    mirrored = [torch.equal(flipped[i], MAPS[i].flip(-1)) for i in range(8)]
    assert all(a or b for a, b in zip(same, mirrored, strict=True)) and any(same) and any(mirrored)

    cropped = FeatureAugmenter(FeatureAugmentParams(crop=0.2), 0)(MAPS)
    assert cropped.shape == MAPS.shape and not torch.equal(cropped, MAPS)
    shifted = [i for i in range(8) if not torch.equal(cropped[i], MAPS[i])]
    i = shifted[0]  # a shifted map still holds the original's interior, moved by at most the padding (1 cell)
    assert any(
        torch.equal(cropped[i, :, 1:-1, 1:-1], MAPS[i, :, 1 + dy : 5 + dy, 1 + dx : 5 + dx])
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    )

    toned = FeatureAugmenter(FeatureAugmentParams(brightness=0.5, contrast=0.5), 0)(MAPS)
    ratio = toned.std(dim=(2, 3)) / MAPS.std(dim=(2, 3))  # contrast scales each channel's spread by 1 +- 0.5
    assert toned.shape == MAPS.shape and ((ratio > 0.5 - 1e-4) & (ratio < 1.5 + 1e-4)).all()
    assert ratio.std() > 0.05  # drawn per sample and channel, not one factor for all


def test_the_same_seed_draws_the_same_changes() -> None:
    params = FeatureAugmentParams(flip=True, crop=0.2, brightness=0.3, contrast=0.3)
    a, b = FeatureAugmenter(params, 7), FeatureAugmenter(params, 7)
    for _ in range(3):
        assert torch.equal(a(MAPS), b(MAPS))
    assert not torch.equal(FeatureAugmenter(params, 8)(MAPS), FeatureAugmenter(params, 7)(MAPS))


def test_flat_features_are_refused_naming_their_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(1280,\)"):
        FeatureAugmenter(FeatureAugmentParams(flip=True), 0)(torch.zeros(2, 1280))


def test_a_head_trains_on_augmented_batches_and_validates_on_plain_ones() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4, 6, 6)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64)
    optim = OptimParams(epochs=3, batch_size=16, lr=1e-2, patience=3)

    def trained(augment: FeatureAugmentParams | None, seed: int = 0):
        recipe = Recipe(HeadParams(), optim, seed, "cpu", feature_augment=augment)
        return train_frozen_head((x, y), (x, y), 2, recipe)

    plain_head, plain = trained(None)
    off_head, _ = trained(FeatureAugmentParams())
    on_head, on = trained(FeatureAugmentParams(flip=True, brightness=0.5))
    again_head, _ = trained(FeatureAugmentParams(flip=True, brightness=0.5))
    weights = [next(h.parameters()).detach() for h in (plain_head, off_head, on_head, again_head)]
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[2], weights[3])
    assert not torch.equal(weights[0], weights[2])
    assert plain.history[0]["train_loss"] != on.history[0]["train_loss"]
    with torch.no_grad():  # validation scored the plain rows: the restored head's loss on them is the recorded one
        loss = torch.nn.functional.cross_entropy(on_head(torch.from_numpy(x)), torch.from_numpy(y)).item()
    assert loss == pytest.approx(on.best["val_loss"], rel=1e-5)
