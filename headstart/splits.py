"""Seeded, stratified splits: every class keeps its balance, and smaller fractions lie inside larger ones."""

from __future__ import annotations

import math

import numpy as np


def _check_fraction(fraction: float, name: str, upper_inclusive: bool) -> None:
    if not (0.0 < fraction < 1.0 or (upper_inclusive and fraction == 1.0)):
        raise ValueError(f"{name} must be in (0, 1{']' if upper_inclusive else ')'}, got {fraction}")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split, so both parts keep the class balance; each class gets at least one of each."""
    _check_fraction(val_fraction, "val_fraction", upper_inclusive=False)
    if len(labels) == 0:
        raise ValueError("no samples to split")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < 2:
            raise ValueError(f"class {c} has {len(members)} sample; at least 2 are needed to split it")
        n_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def nested_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded, stratified subset: the first ceil(fraction * n) of a fixed per-class permutation.

    Because the permutation depends only on the seed, a smaller fraction's subset lies inside
    a larger one's, so learning curves over fractions add data instead of swapping it.
    """
    _check_fraction(fraction, "train_fraction", upper_inclusive=True)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, math.ceil(round(fraction * len(members), 9)))
        chosen.append(members[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
