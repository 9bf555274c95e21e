"""Feature-space augmentation (FroFA, CVPR 2024): cheap random changes to stored activation maps at training time.

Stored views (headstart.views) cost K forward passes per image; these cost nothing but a few tensor
operations per batch, because they act on the stored activations themselves: a random crop of the
map (padded back to its size), a left-right flip, and per-channel brightness (a shift) and contrast
(a scale about the channel's mean). They apply to training batches only, drawn from a generator of
their own seeded with the run's seed, so the same seed trains the same head. The shift and scale are
relative to each map's own per-channel spread, so one setting suits any backbone's activation scale.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from headstart.config import FeatureAugmentParams


class FeatureAugmenter:
    """Applies `FeatureAugmentParams` to (batch, channels, height, width) activations; a no-op when all are off."""

    def __init__(self, params: FeatureAugmentParams, seed: int):
        self.params = params
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def active(self) -> bool:
        p = self.params
        return p.flip or p.crop > 0 or p.brightness > 0 or p.contrast > 0

    def _uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator) * (high - low) + low

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(
                f"train.feature_augment acts on spatial activations (channels, height, width); these rows have shape "
                f"{tuple(x.shape[1:])}: cut where the map is spatial, or turn feature_augment off"
            )
        p, (n, c, h, w) = self.params, x.shape
        if p.crop > 0:
            pad_h, pad_w = max(1, round(h * p.crop)), max(1, round(w * p.crop))
            padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
            tops = torch.randint(0, 2 * pad_h + 1, (n,), generator=self.generator).tolist()
            lefts = torch.randint(0, 2 * pad_w + 1, (n,), generator=self.generator).tolist()
            x = torch.stack(
                [padded[i, :, t : t + h, s : s + w] for i, (t, s) in enumerate(zip(tops, lefts, strict=True))]
            )
        if p.flip:
            flip = torch.rand(n, generator=self.generator) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        if p.brightness > 0 or p.contrast > 0:
            mean = x.mean(dim=(2, 3), keepdim=True)
            spread = x.std(dim=(2, 3), keepdim=True)
            scale = self._uniform((n, c, 1, 1), 1 - p.contrast, 1 + p.contrast)
            shift = self._uniform((n, c, 1, 1), -p.brightness, p.brightness) * spread
            x = (x - mean) * scale + mean + shift
        return x
