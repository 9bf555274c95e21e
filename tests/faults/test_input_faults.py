"""Inputs that do not fit: a checkpoint of another shape, images of the wrong shape or channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from headstart.backbones import create_model
from headstart.checkpoints import CheckpointError, save_weights
from headstart.extraction import segment_features, source_network
from headstart.images import Preprocess
from headstart.records import SourceWeights
from tests.tiny import random_cnn_weights

PRE = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))


def test_a_checkpoint_whose_tensors_do_not_fit_names_the_file_and_the_architecture(tmp_path: Path) -> None:
    state = create_model("fmnist_cnn", 5).state_dict()
    name = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    state[name] = torch.zeros(state[name].shape[0] * 2, *state[name].shape[1:])  # a wider first convolution
    path = tmp_path / "wider.safetensors"
    sha = save_weights(state, path)
    weights = SourceWeights(
        source="mine", uri=str(path), path=str(path), sha256=sha, arch="fmnist_cnn", cut="block2", preprocess=PRE
    )
    with pytest.raises(
        CheckpointError, match=rf"wider\.safetensors: its tensors do not fit architecture 'fmnist_cnn'.*{name}"
    ):
        source_network(weights)


def test_images_of_other_channels_or_sizes_get_the_documented_conversion_or_a_clear_error(tmp_path: Path) -> None:
    net = source_network(random_cnn_weights(tmp_path / "w.safetensors", PRE))
    grey = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)

    def feats(images: np.ndarray) -> np.ndarray:
        return segment_features(net, images, PRE, ["block2"], 2, torch.device("cpu"))["block2"]

    rgb = np.repeat(grey[..., None], 3, axis=-1)  # RGB into a grey network: averaged to grey
    np.testing.assert_allclose(feats(rgb), feats(grey), atol=1e-6)
    assert feats(np.zeros((4, 40, 33), np.uint8)).shape == feats(grey).shape  # any size: resized to the square
    for shape in [(4, 28, 28, 4), (4, 28, 28, 2), (28, 28), (1, 4, 28, 28, 3)]:
        with pytest.raises(ValueError, match=r"images of shape \(\d+, .*expected \(n, H, W\) grey or"):
            feats(np.zeros(shape, np.uint8))
