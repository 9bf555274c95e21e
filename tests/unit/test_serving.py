"""The request forms the served model accepts, and how encoded images become the pixels a model takes."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from headstart.backbones import preprocess
from headstart.checkpoints import ModelSpec, build_model
from headstart.config import HeadParams
from headstart.images import FMNIST_DECODE, Decode, Preprocess, decode_image
from headstart.serving import answer, predict_proba, uint8_images

GREY = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))
RGB = Preprocess(image_size=32, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def decoding(pre: Preprocess) -> Decode:
    """How serving decodes files for a model of this preprocessing saved without the training data's decoding."""
    spec = ModelSpec(arch="fmnist_cnn", num_classes=3, class_names=["a", "b", "c"], preprocess=pre)
    return spec.decoding()


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    spec = ModelSpec(
        arch="fmnist_cnn", num_classes=3, class_names=["a", "b", "c"], preprocess=GREY, cut="block2", head=HeadParams()
    )
    net = build_model(spec).eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28)).astype(np.uint8)
    return net, spec, images


def test_a_grey_png_at_the_model_size_decodes_to_the_same_pixels():
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28)).astype(np.uint8)
    assert np.array_equal(decode_image(encode(pixels), FMNIST_DECODE), pixels)
    assert np.array_equal(decode_image(encode(pixels), decoding(GREY)), pixels)


def test_rgb_is_made_grey_for_a_one_channel_model_and_grey_rgb_for_a_three_channel_one():
    rgb = np.zeros((20, 20, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red: luma 0.299 * 255
    assert decoding(GREY) == Decode(mode="L") and decoding(RGB) == Decode(mode="RGB")
    grey = decode_image(encode(rgb), decoding(GREY))
    assert grey.shape == (20, 20) and grey.dtype == np.uint8 and abs(int(grey[0, 0]) - 76) <= 1
    out = decode_image(encode(np.full((20, 20), 9, dtype=np.uint8)), decoding(RGB))
    assert out.shape == (20, 20, 3) and (out == 9).all()


def test_a_decode_size_resizes_to_it_and_none_leaves_the_size_to_preprocess():
    """A model carries its training data's decoding (FMNIST: 28x28); one saved without it keeps the file's size."""
    assert decode_image(encode(np.zeros((300, 200, 3), dtype=np.uint8), "JPEG"), FMNIST_DECODE).shape == (28, 28)
    assert decode_image(encode(np.zeros((16, 20), dtype=np.uint8)), FMNIST_DECODE).shape == (28, 28)
    assert decode_image(encode(np.zeros((16, 20), dtype=np.uint8)), decoding(GREY)).shape == (16, 20)  # preprocess
    assert decode_image(encode(np.zeros((300, 200, 3), dtype=np.uint8), "JPEG"), decoding(GREY)).shape == (300, 200)


def test_unreadable_bytes_name_the_image():
    with pytest.raises(ValueError, match="upload.png: not a readable PNG/JPEG"):
        decode_image(b"not an image", decoding(GREY), "upload.png")


def test_pixel_arrays_must_be_whole_numbers_from_0_to_255():
    assert uint8_images(np.array([[[0, 255]]], dtype=np.int64)).dtype == np.uint8
    assert uint8_images(np.zeros((2, 5, 5, 1), dtype=np.uint8)).shape == (2, 5, 5)
    for bad in (np.array([[[256]]]), np.array([[[-1]]]), np.array([[[0.5]]])):
        with pytest.raises(ValueError, match="0 to 255"):
            uint8_images(bad)
    with pytest.raises(ValueError, match="got shape"):
        uint8_images(np.zeros((5, 5)))


def test_every_request_form_gives_the_same_answer(model):
    net, spec, images = model
    expected = predict_proba(net, spec, images)
    encoded = [base64.b64encode(encode(im)).decode() for im in images]
    with torch.no_grad():
        features = net.upto(spec.cut)(preprocess(images, spec.preprocess)).numpy()
    forms = [
        images.astype(np.int64),
        {"images": images},
        np.array(encoded),
        pd.DataFrame({"image": encoded}),
        {"features": features},
        {"features": features.reshape(len(features), -1)},
    ]
    for form in forms:
        np.testing.assert_allclose(answer(net, spec, form), expected, rtol=1e-5, atol=1e-6)
    decoded = spec.model_copy(update={"decode": FMNIST_DECODE})  # a model that carries its data's decoding
    for form in (np.array(encoded), pd.DataFrame({"image": encoded})):
        np.testing.assert_allclose(answer(net, decoded, form), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pd.DataFrame({"pixels": ["x"]}), "column 'image'"),
        ({"images": 1, "features": 2}, "exactly one of"),
        (np.array(["bm90IGFuIGltYWdl"]), "image 0: not a readable"),
        (np.array(["***"]), "image 0: not valid base64"),
        ({"features": np.zeros((2, 7))}, "activations at cut 'block2'"),
        ({"features": np.where(np.arange(3 * 3136) == 4000, np.nan, 0.0).reshape(3, 3136)}, r"rows \[1\] hold NaN"),
    ],
)
def test_malformed_requests_say_what_is_expected(model, request_, message: str):
    net, spec, _ = model
    with pytest.raises(ValueError, match=message):
        answer(net, spec, request_)
