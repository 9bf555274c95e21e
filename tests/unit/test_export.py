"""ONNX export: the graph answers the torch model's calibrated probabilities and carries the spec in its metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import torch

from headstart.checkpoints import ModelSpec, build_model
from headstart.export import INPUT, OUTPUT, export_onnx, onnx_input
from headstart.images import Decode, Preprocess
from headstart.serving import predict_proba


def test_the_exported_graph_matches_torch_on_images_of_another_size(tmp_path):
    pre = Preprocess(image_size=32, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    spec = ModelSpec(
        arch="mobilenet_v3_small", num_classes=3, class_names=["a", "b", "c"], preprocess=pre, cut="features_3",
        decode=Decode(mode="RGB", size=40, resize=46), temperature=1.7,
    )  # fmt: skip
    torch.manual_seed(0)
    net = build_model(spec)  # seeded, untrained: the export's check needs weights, not training
    net.eval()
    grey = np.random.default_rng(0).integers(0, 256, (5, 40, 40), dtype=np.uint8)  # grey, resized inside preprocess
    path = tmp_path / "model.onnx"
    diff = export_onnx(net, spec, path, grey, "f" * 64)
    assert diff < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert ModelSpec.model_validate_json(meta["headstart_spec"]) == spec and json.loads(meta["classes"]) == [
        "a",
        "b",
        "c",
    ]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rgb = np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)  # another batch size
    got = session.run([OUTPUT], {INPUT: onnx_input(rgb, pre)})[0]
    assert got.shape == (7, 3) and np.allclose(got, predict_proba(net, spec, rgb), atol=1e-5)
    assert not list(tmp_path.glob("*.partial"))
