"""The registered model as an MLflow pyfunc: raw uint8 images in, class and probability out.

It rebuilds the network from the logged spec and weights (sha256 verified, safetensors), so
nothing but tensors is ever unpickled from the model's files.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from headstart.backbones import preprocess
from headstart.checkpoints import ModelSpec, load_model


class HeadstartModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        manifest = json.loads(open(context.artifacts["manifest"]).read())
        self.net, self.spec = load_model(context.artifacts["weights"], manifest["sha256"])
        self.net.eval()

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (MLflow reads type hints as a schema)
        import pandas as pd

        images = np.asarray(model_input, dtype=np.uint8)
        probs = predict_proba(self.net, self.spec, images)
        best = probs.argmax(axis=1)
        return pd.DataFrame({"class": [self.spec.class_names[i] for i in best], "probability": probs.max(axis=1)})


def predict_proba(net: torch.nn.Module, spec: ModelSpec, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class probabilities for uint8 images, preprocessed exactly as in training."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = net(preprocess(images[i : i + batch], spec.preprocess))
            out.append(torch.softmax(logits, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, spec.num_classes), dtype=np.float32)
