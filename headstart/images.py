"""The one image decoder: file bytes -> uint8 pixels, the same for the data stage, `headstart predict` and serving.

How a task's images were decoded is part of its record (`Decode`), and a trained model carries
it in its spec, so a file reaches the network as the same tensor whichever path reads it.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

FORMATS = ("PNG", "JPEG")
"""The image formats headstart reads; Pillow is told to try no other decoder."""
SUFFIXES = (".png", ".jpg", ".jpeg")


class Decode(BaseModel):
    """How image files become the uint8 arrays a task holds: colour mode, then a square resize."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["L", "RGB"]
    """L: grey (PIL's ITU-R 601 luma); RGB: grey and palette images expanded, alpha dropped."""
    size: int | None = Field(default=None, ge=1)
    """Side of the square the image is resized to (PIL bilinear); None keeps the file's size."""


FMNIST_DECODE = Decode(mode="L", size=28)
"""A file given to a model trained on Fashion-MNIST is decoded to the IDX images' form."""


def decode_image(raw: bytes, decode: Decode, name: str = "image") -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (H, W) for L or (H, W, 3) for RGB; ValueError naming `name` if unreadable."""
    try:
        with Image.open(io.BytesIO(raw), formats=FORMATS) as img:
            img = img.convert(decode.mode)
            if decode.size is not None and img.size != (decode.size, decode.size):
                img = img.resize((decode.size, decode.size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as err:
        raise ValueError(f"{name}: not a readable PNG/JPEG image: {err}") from None
