"""Which rows a feature store holds for an image: its plain row, K augmented views, N test-time views, by key.

A view is stored as a row of its own in the image's feature store, keyed by the sha256 of the
image's content key, what drew the view (the augmentation spec's digest, or the test-time view's
name), its index and the code that renders it (headstart/augment.py's closure, torchvision's
version). So adding images computes only their views, raising K computes only the new views,
changing the spec computes new views while the plain rows stay, and a changed renderer never serves
old views. The plain rows are untouched: a store without views is the store it always was.
The same key seeds the view's random draw, so a view is the same pixels wherever it is computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np

from headstart.codeversion import code_version
from headstart.fingerprint import sha256_json

RENDERER = "headstart/augment.py"
PLAIN = 0
"""`ViewRows.view` of a plain row; 1..K are augmented views, -1..-N test-time views."""


def augment_digest(spec: Sequence[dict[str, dict[str, Any]]]) -> str:
    """What decides an augmented view besides the image and its index: the spec and the code that draws it."""
    return sha256_json({"augment": list(spec), "code": code_version(RENDERER), "torchvision": version("torchvision")})


def tta_digest(name: str) -> str:
    """What decides a test-time view besides the image: its name and the code that renders it."""
    return sha256_json({"tta": name, "code": code_version(RENDERER), "torchvision": version("torchvision")})


def derived_keys(keys: np.ndarray, digest: str, index: int) -> np.ndarray:
    """The view rows' keys for these image keys ((n, 32) uint8): sha256(image key, digest, index)."""
    tail = f"\x1f{digest}\x1f{index}".encode()
    out = np.empty_like(keys)
    for i, k in enumerate(np.ascontiguousarray(keys)):
        out[i] = np.frombuffer(hashlib.sha256(k.tobytes() + tail).digest(), dtype=np.uint8)
    return out


def seeds_of(keys: np.ndarray) -> list[int]:
    """One seed per view row, from its key: the view is drawn the same whatever else is computed with it."""
    return [int.from_bytes(bytes(k[:8]), "little") & ((1 << 63) - 1) for k in keys]


@dataclass(frozen=True)
class ViewRows:
    """Every row an extraction stores: plain rows of all images, then augmented and test-time views.

    `image[i]` is the image row i is a view of; `view[i]` is PLAIN, k in 1..K (augmented view k)
    or -n (test-time view n).
    """

    keys: np.ndarray
    image: np.ndarray
    view: np.ndarray


def plan_rows(
    plain_keys: np.ndarray,
    augmented_images: np.ndarray,
    views: int,
    digest: str | None,
    tta_images: np.ndarray,
    tta_names: Sequence[str],
) -> ViewRows:
    """The rows of a store: every image plainly, `views` augmented views of `augmented_images` (indices into
    the images: the training split), and each test-time view of `tta_images` (the test split)."""
    keys, image, view = [plain_keys], [np.arange(len(plain_keys))], [np.full(len(plain_keys), PLAIN)]
    for k, view_keys in enumerate(augmented_keys(plain_keys[augmented_images], views, digest)[1:], start=1):
        keys.append(view_keys)
        image.append(augmented_images)
        view.append(np.full(len(augmented_images), k))
    for n, view_keys in enumerate(tta_keys(plain_keys[tta_images], tta_names), start=1):
        keys.append(view_keys)
        image.append(tta_images)
        view.append(np.full(len(tta_images), -n))
    return ViewRows(np.concatenate(keys), np.concatenate(image), np.concatenate(view))


def augmented_keys(plain_keys: np.ndarray, views: int, digest: str | None) -> list[np.ndarray]:
    """Per view index 0..K, the keys of those images' rows: the plain keys, then each augmented view's."""
    if views and digest is None:
        raise ValueError("augmented views need the augmentation spec's digest")
    return [plain_keys, *(derived_keys(plain_keys, digest, k) for k in range(1, views + 1))]


def tta_keys(plain_keys: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """Per test-time view name, the keys of those images' rows."""
    return [derived_keys(plain_keys, tta_digest(name), 0) for name in names]
