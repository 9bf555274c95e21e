"""Augmented and test-time views of uint8 images, each drawn reproducibly from its own seed (torchvision v2).

A view must be the same pixels whenever and wherever it is computed (a resumed extraction, a
Dask worker, a test recomputing it), so every image's view is drawn from a seed of its own (taken
from the view's store key by headstart.views), never from a generator shared across a batch.
The pipeline is a list of torchvision `transforms.v2` names and arguments from params; the
test-time views are a fixed, deterministic list (flips and corner crops) that needs no seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from headstart.threads import torch_threads

AUGMENTS = (
    "RandomResizedCrop",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "RandomRotation",
    "RandomAffine",
    "ColorJitter",
    "RandomErasing",
)
"""The torchvision.transforms.v2 classes a view may use: each keeps a uint8 image's size and dtype."""
SIZED = ("RandomResizedCrop", "RandomCrop")
"""Transforms whose `size` defaults to the image's own (a view has the plain image's shape)."""
TTA_VIEWS = (
    "hflip",
    "crop_tl",
    "crop_tr",
    "crop_bl",
    "crop_br",
    "hflip_crop_tl",
    "hflip_crop_tr",
    "hflip_crop_bl",
    "hflip_crop_br",
)
"""The deterministic test-time views, in the order `evaluate.tta: N` takes the first N."""
TTA_CROP = 0.875
"""A corner crop keeps this share of each side (224 of 256, as ImageNet's evaluation crop), resized back."""

Pipeline = Callable[[torch.Tensor], torch.Tensor]


def build_pipeline(spec: Sequence[dict[str, dict[str, Any]]], size: tuple[int, int] | None = None) -> Pipeline:
    """The transforms.v2 pipeline a spec names (a list of one-key {name: kwargs}); errors name the item.

    `size` (height, width) fills in `size` for the cropping transforms that are not given one.
    """
    from torchvision.transforms import v2  # torchvision's import is slow: only where views are drawn

    steps = []
    for i, item in enumerate(spec):
        if len(item) != 1:
            raise ValueError(f"augment[{i}]: expected one {{name: arguments}} pair, got {sorted(item)}")
        ((name, kwargs),) = item.items()
        if name not in AUGMENTS:
            raise ValueError(f"augment[{i}]: unknown transform {name!r}; expected one of {', '.join(AUGMENTS)}")
        kwargs = dict(kwargs or {})
        if name in SIZED and "size" not in kwargs:
            kwargs["size"] = list(size) if size is not None else [32, 32]
        try:
            steps.append(getattr(v2, name)(**kwargs))
        except (TypeError, ValueError) as err:
            raise ValueError(f"augment[{i}] {name}{kwargs}: {err}") from None
    return v2.Compose(steps)


def _chw(image: np.ndarray) -> torch.Tensor:
    """One uint8 image (H, W) or (H, W, 3) as the (C, H, W) tensor torchvision transforms take."""
    t = torch.from_numpy(np.ascontiguousarray(image))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def _hwc(t: torch.Tensor, like: np.ndarray) -> np.ndarray:
    return (t[0] if like.ndim == 2 else t.permute(1, 2, 0)).contiguous().numpy()


def augmented(images: np.ndarray, seeds: Sequence[int], spec: Sequence[dict[str, dict[str, Any]]]) -> np.ndarray:
    """Each image's augmented view, drawn from its own seed; the same shape and dtype as `images`.

    torchvision's random transforms draw from torch's global generator, so each image seeds it
    inside a forked RNG state: the caller's random state is left as it was. One image's transforms
    are operations on a few thousand pixels, run on one thread: on two threads they ran 10x slower
    whenever another process shared the cores.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    pipeline = build_pipeline(spec, size=images.shape[1:3])
    out = np.empty_like(images)
    with torch.random.fork_rng(devices=[]), torch_threads(1):  # tiny ops: threads would only wait on each other
        for i, seed in enumerate(seeds):
            torch.manual_seed(seed)
            out[i] = _hwc(pipeline(_chw(images[i])), images[i])
    return out


def tta_view(images: np.ndarray, name: str) -> np.ndarray:
    """One deterministic test-time view (a `TTA_VIEWS` name) of every image; the same shape and dtype."""
    from torchvision.transforms.v2 import functional as F

    if name not in TTA_VIEWS:
        raise ValueError(f"unknown test-time view {name!r}; expected one of {', '.join(TTA_VIEWS)}")
    flip, _, corner = name.partition("crop_") if "crop_" in name else (name, "", "")
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    if corner:
        ch, cw = max(1, round(h * TTA_CROP)), max(1, round(w * TTA_CROP))
        top = 0 if corner[0] == "t" else h - ch
        left = 0 if corner[1] == "l" else w - cw
        x = F.resized_crop(x, top, left, ch, cw, [h, w], antialias=True)
    if flip.startswith("hflip"):
        x = F.horizontal_flip(x)
    x = x[:, 0] if images.ndim == 3 else x.permute(0, 2, 3, 1)
    return x.contiguous().numpy()


def render(
    images: np.ndarray,
    image: np.ndarray,
    view: np.ndarray,
    seeds: Sequence[int],
    spec: Sequence[dict[str, dict[str, Any]]],
    tta_names: Sequence[str],
) -> np.ndarray:
    """The pixels of some store rows: `images[image[i]]` as is (view 0), augmented from `seeds[i]` (view k > 0),
    or as test-time view `tta_names[-k - 1]` (view k < 0)."""
    out = images[image].copy()
    drawn = np.flatnonzero(view > 0)
    if len(drawn):
        out[drawn] = augmented(out[drawn], [seeds[i] for i in drawn], spec)
    for k in np.unique(view[view < 0]).tolist():
        rows = np.flatnonzero(view == k)
        out[rows] = tta_view(out[rows], tta_names[-k - 1])
    return out


class AugmentedImages:
    """uint8 training images as `headstart.fit.Inputs` whose batches are augmented afresh every epoch.

    The on-the-fly way (what stored views replace): every epoch shuffles the images and draws a new
    view of each from the training loop's own generator, so the same seed gives the same batches.
    Prediction (`in_order`) reads the plain images.
    """

    def __init__(self, images: np.ndarray, spec: Sequence[dict[str, dict[str, Any]]]):
        self.images, self.spec = np.asarray(images), list(spec)
        build_pipeline(self.spec)  # a bad spec is refused before training starts

    @property
    def shape(self) -> tuple[int, ...]:
        return self.images.shape

    def __len__(self) -> int:
        return len(self.images)

    def shuffled(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self), generator=generator)
        seeds = torch.randint(1 << 62, (len(self),), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            pixels = augmented(self.images[idx.numpy()], [seeds[j] for j in idx.tolist()], self.spec)
            yield idx, torch.from_numpy(pixels)

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), batch_size):
            yield torch.from_numpy(self.images[i : i + batch_size])
