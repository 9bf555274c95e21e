"""ONNX export: a trained network as one graph from scaled pixels to calibrated probabilities, checked by onnxruntime.

The graph holds the backbone up to the cut, the head, the normalisation and the calibrated
softmax; what comes before it (decoding the file, channels, resizing) is the model's spec,
written into the file's metadata (`headstart_spec`), so a consumer in any language can feed it
exactly what training saw. The export is run once through onnxruntime on real images and compared
with the torch model, and a file that disagrees is not kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headstart.backbones import StagedNet, preprocess
from headstart.checkpoints import ModelSpec
from headstart.files import atomic_path
from headstart.images import Preprocess
from headstart.serving import predict_proba

INPUT, OUTPUT = "pixels", "probabilities"
INPUT_DOC = (
    "float32 (N, channels, image_size, image_size): the decoded image (headstart_spec.decode) with its "
    "channels converted (grey repeated to RGB, or RGB averaged to grey) and resized bilinearly to image_size, "
    "scaled to [0, 1]; normalisation and the calibrated softmax are inside the graph"
)
TOLERANCE = 1e-4
"""The largest difference of a probability between onnxruntime and torch that an export may show."""


class _Probabilities(nn.Module):
    def __init__(self, net: StagedNet, spec: ModelSpec):
        super().__init__()
        self.net, self.temperature = net, spec.temperature
        self.register_buffer("mean", torch.tensor(spec.preprocess.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.preprocess.std).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((pixels - self.mean) / self.std) / self.temperature, dim=1)


def onnx_input(images: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 images as the graph takes them: channels converted, resized, scaled to [0, 1] (not normalised)."""
    x = preprocess(images, pre)
    mean, std = torch.tensor(pre.mean).view(1, -1, 1, 1), torch.tensor(pre.std).view(1, -1, 1, 1)
    return (x * std + mean).numpy()


def export_onnx(net: StagedNet, spec: ModelSpec, path: Path, check_images: np.ndarray, sha256: str) -> float:
    """Write `path` (atomically) and return the largest probability difference against torch on `check_images`.

    Raises ValueError, keeping no file, when onnxruntime disagrees by more than TOLERANCE.
    """
    import onnx
    import onnxruntime

    net.eval()
    model = _Probabilities(net, spec).eval()
    size, channels = spec.preprocess.image_size, spec.preprocess.channels
    example = torch.zeros(2, channels, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        model, (example,), input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=({0: batch},), dynamo=True,
        verbose=False,
    )  # fmt: skip
    proto = program.model_proto
    metadata = {
        "headstart_spec": spec.model_dump_json(),
        "headstart_weights_sha256": sha256,
        "input": INPUT_DOC,
        "classes": json.dumps(spec.class_names),
    }
    for key, value in metadata.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    tmp = atomic_path(path)
    try:
        onnx.save(proto, str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT], {INPUT: onnx_input(check_images, spec.preprocess)})[0]
        diff = float(np.abs(got - predict_proba(net, spec, check_images)).max()) if len(check_images) else 0.0
        if not diff <= TOLERANCE:
            raise ValueError(f"{path}: onnxruntime's probabilities differ from torch's by {diff:.2e} (> {TOLERANCE})")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff
