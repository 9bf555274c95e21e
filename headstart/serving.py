"""How a trained model answers: raw or encoded images, or stored features, in; class and probability out.

`headstart predict`, `headstart export` and the registered MLflow model
(headstart.mlflow_model) all answer through these functions, so every request is preprocessed
exactly as in training (headstart.images decodes files as the training data was). MLflow is not
imported here: `headstart predict` would pay a second for it. Accepted inputs
(docs/operations.md): uint8 images (N,H,W) or (N,H,W,3); base64
PNG/JPEG strings (a list, or a DataFrame column `image`); `{"features": ...}` (activations at
the model's cut, answered by its head alone).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from headstart.backbones import CLASSIFIER, StagedNet, feature_shape, preprocess
from headstart.checkpoints import ModelSpec
from headstart.fit import predict_logits
from headstart.images import Decode, decode_image

IMAGE_COLUMN = "image"
FEATURES_KEY = "features"
IMAGES_KEY = "images"


def answer(net: StagedNet, spec: ModelSpec, request: Any) -> np.ndarray:
    """Class probabilities for one request in any accepted form; a malformed request is a ValueError saying why."""
    import pandas as pd

    if isinstance(request, pd.DataFrame):
        if IMAGE_COLUMN not in request.columns:
            raise ValueError(f"a DataFrame request needs a column {IMAGE_COLUMN!r} of base64 PNG/JPEG strings")
        return predict_images(
            net, spec, [decode_base64(v, spec.decoding(), i) for i, v in enumerate(request[IMAGE_COLUMN])]
        )
    if isinstance(request, dict):
        if set(request) == {FEATURES_KEY}:
            return head_proba(net, spec, request[FEATURES_KEY])
        if set(request) == {IMAGES_KEY}:
            return answer(net, spec, request[IMAGES_KEY])
        raise ValueError(
            f"a named request holds exactly one of {IMAGES_KEY!r} or {FEATURES_KEY!r}, got {sorted(request)}"
        )
    array = np.asarray(request)
    if array.dtype.kind in "OUS":
        return predict_images(net, spec, [decode_base64(v, spec.decoding(), i) for i, v in enumerate(array.ravel())])
    return predict_images(net, spec, list(uint8_images(array)))


def table(spec: ModelSpec, probs: np.ndarray) -> Any:
    """The response: one row per input with the most likely class and its probability."""
    import pandas as pd

    return pd.DataFrame({"class": answers(spec, probs), "probability": probs.max(axis=1)})


NONE = "none"
"""The answer for an image the model is not confident enough about (its spec's `reject_below`)."""


def answers(spec: ModelSpec, probs: np.ndarray) -> list[str]:
    """The most likely class per row, or "none" below the model's rejection threshold."""
    best, top = probs.argmax(axis=1), probs.max(axis=1)
    below = spec.reject_below if spec.reject_below is not None else -1.0
    return [NONE if p < below else spec.class_names[k] for k, p in zip(best, top, strict=True)]


def uint8_images(array: np.ndarray) -> np.ndarray:
    """(N,H,W) grey or (N,H,W,3) RGB pixel values 0-255 as uint8; anything else is refused, not cast."""
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] not in (1, 3)):
        raise ValueError(f"images must be (N, H, W) grey or (N, H, W, 3) RGB pixel values, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array[..., 0] if array.ndim == 4 and array.shape[-1] == 1 else array
    if (
        array.dtype.kind not in "iuf"
        or array.size
        and (array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.round(array)))
    ):
        raise ValueError("image pixels must be whole numbers from 0 to 255")
    return uint8_images(array.astype(np.uint8))


def decode_base64(value: Any, decode: Decode, index: int) -> np.ndarray:
    if not isinstance(value, str | bytes):
        raise ValueError(f"image {index}: expected a base64 PNG/JPEG string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"image {index}: not valid base64") from None
    return decode_image(raw, decode, f"image {index}")


def predict_images(net: StagedNet, spec: ModelSpec, images: Sequence[np.ndarray]) -> np.ndarray:
    """Probabilities for images of any sizes, in order: images of one size are preprocessed as one batch."""
    net.eval()
    probs = np.zeros((len(images), spec.num_classes), dtype=np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for idx in by_shape.values():
        probs[idx] = predict_proba(net, spec, np.stack([images[i] for i in idx]))
    return probs


def head_proba(net: StagedNet, spec: ModelSpec, features: Any) -> np.ndarray:
    """Probabilities from the head alone, for activations at the model's cut (as the feature store holds them)."""
    if spec.cut is None:
        raise ValueError(f"this {spec.arch} model has no cut point: it takes images, not features")
    x = np.asarray(features, dtype=np.float32)
    shape = feature_shape(net, spec.cut, spec.preprocess)
    size = int(np.prod(shape))
    if x.ndim < 2 or x[0].size != size:
        raise ValueError(
            f"features must be (N, {', '.join(map(str, shape))}) or (N, {size}): activations at cut {spec.cut!r}, "
            f"got shape {x.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))  # not store's helper: zarr stays unimported
    if len(bad):
        raise ValueError(f"features of rows {bad[:10].tolist()} hold NaN or infinite values; activations never do")
    logits = predict_logits(net.stages[CLASSIFIER], x.reshape(len(x), *shape))
    return torch.softmax(logits / spec.temperature, dim=1).numpy()


def image_logits(net: torch.nn.Module, spec: ModelSpec, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Logits for uint8 images, preprocessed exactly as in training."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(net(preprocess(images[i : i + batch], spec.preprocess)))
    return torch.cat(out) if out else torch.zeros((0, spec.num_classes))


def predict_proba(net: torch.nn.Module, spec: ModelSpec, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Calibrated class probabilities for uint8 images: softmax of the logits over the model's temperature."""
    return torch.softmax(image_logits(net, spec, images, batch) / spec.temperature, dim=1).numpy()


def __getattr__(name: str) -> Any:
    """Models registered before headstart.mlflow_model existed load `headstart.serving.HeadstartModel`."""
    if name == "HeadstartModel":
        from headstart.mlflow_model import HeadstartModel

        return HeadstartModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
