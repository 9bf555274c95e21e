"""How images reach a network: the one decoder (file bytes -> uint8 pixels) and the input spec (`Preprocess`).

The decoder is the same for the data stage, `headstart predict` and serving; `Preprocess` (how
pixels become a normalised tensor) is stored with every model and feature store. Neither needs torch.

How a task's images were decoded is part of its record (`Decode`), and a trained model carries
it in its spec, so a file reaches the network as the same tensor whichever path reads it.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMATS = ("PNG", "JPEG")
"""The image formats headstart reads; Pillow is told to try no other decoder."""
SUFFIXES = (".png", ".jpg", ".jpeg")


class Decode(BaseModel):
    """How image files become the uint8 arrays a task holds: colour mode, then a square of side `size`.

    Without `resize` the picture is stretched to the square (Fashion-MNIST's files already are
    one); with it, the shorter side is scaled to `resize` and the centre `size` square is cut, the
    aspect-keeping resize and centre crop ImageNet weights were evaluated with (256, then 224).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["L", "RGB"]
    """L: grey (PIL's ITU-R 601 luma); RGB: grey and palette images expanded, alpha dropped."""
    size: int | None = Field(default=None, ge=1)
    """Side of the square the image becomes (PIL bilinear); None keeps the file's size."""
    resize: int | None = Field(default=None, ge=1)
    """Shorter side before the centre crop to `size` (at least `size`); None: stretch to the square."""

    @model_validator(mode="after")
    def _crop_fits(self) -> Decode:
        if self.resize is not None and (self.size is None or self.resize < self.size):
            raise ValueError(f"resize {self.resize} needs a size no larger than it, got size {self.size}")
        return self


class Preprocess(BaseModel):
    """How raw uint8 images become the network's input; stored with every model and feature store.

    Grey images are repeated to 3 channels for ImageNet backbones (and RGB averaged to grey for
    1-channel ones), resized bilinearly to `image_size`, scaled to [0, 1], then normalised with
    the mean and std the weights were trained with.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


FMNIST_DECODE = Decode(mode="L", size=28)
"""A file given to a model trained on Fashion-MNIST is decoded to the IDX images' form."""


def _fit(img: Image.Image, decode: Decode) -> Image.Image:
    if decode.size is None:
        return img
    side = decode.size
    if decode.resize is None:
        return img if img.size == (side, side) else img.resize((side, side), Image.Resampling.BILINEAR)
    w, h = img.size
    scale = decode.resize / min(w, h)
    w, h = max(side, round(w * scale)), max(side, round(h * scale))
    img = img.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def decode_image(raw: bytes, decode: Decode, name: str = "image") -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (H, W) for L or (H, W, 3) for RGB; ValueError naming `name` if unreadable."""
    try:
        with Image.open(io.BytesIO(raw), formats=FORMATS) as img:
            return np.asarray(_fit(img.convert(decode.mode), decode), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not a readable PNG/JPEG image: {_what(raw)}") from None
    except (OSError, Image.DecompressionBombError, ValueError) as err:
        raise ValueError(f"{name}: not a readable PNG/JPEG image: {err}") from None


def _what(raw: bytes) -> str:
    """What bytes that are no PNG/JPEG are, by Pillow's detection (nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return f"the file is {img.format} (only {' and '.join(FORMATS)} are read; convert it)"
    except Exception:
        return f"no image format Pillow knows ({len(raw)} bytes, starting {raw[:8]!r})"
