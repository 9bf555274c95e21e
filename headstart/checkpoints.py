"""Checkpoints are data, not code: safetensors (or weights-only torch files), full sha256 verified on every load.

A model file carries its `ModelSpec` in the safetensors metadata, so whoever loads it rebuilds
exactly the network and preprocessing it was trained with.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from headstart.backbones import StagedNet, create_model, feature_shape
from headstart.config import HeadParams
from headstart.files import atomic_path
from headstart.fingerprint import sha256_file, verify_sha256
from headstart.heads import make_head
from headstart.images import Decode, Preprocess

SPEC_KEY = "headstart.spec"


class CheckpointError(ValueError):
    """A file is not a loadable, weights-only checkpoint."""


class ModelSpec(BaseModel):
    """Everything needed to rebuild a trained network from its weights, and to feed it images."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    arch: str
    num_classes: int
    class_names: list[str]
    preprocess: Preprocess
    cut: str | None = None
    """None: the architecture's own classifier (a source model). Else: stages up to `cut`, then `head`."""
    head: HeadParams | None = None
    dropout: float = 0.0
    decode: Decode | None = None
    """How an image file becomes the pixels this model was trained on (the training data's own decoding)."""
    temperature: float = Field(default=1.0, gt=0.0)
    """Probabilities are softmax(logits / temperature), fitted on validation (headstart.calibration)."""
    reject_below: float | None = Field(default=None, ge=0.0, le=1.0)
    """An image whose top calibrated probability is below this is answered "none" (chosen on validation)."""

    def decoding(self) -> Decode:
        """`decode`, or for a model saved without it: grey or RGB by its channels, the file's size kept."""
        return self.decode or Decode(mode="L" if self.preprocess.channels == 1 else "RGB")


def build_model(spec: ModelSpec) -> StagedNet:
    """The (untrained) network a spec describes."""
    net = create_model(spec.arch, spec.num_classes, dropout=spec.dropout)
    if spec.cut is None:
        return net
    body = net.upto(spec.cut)
    head = make_head(feature_shape(net, spec.cut, spec.preprocess), spec.num_classes, spec.head or HeadParams())
    return body.with_classifier(head)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically; return its sha256."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def load_weights(path: Path | str, sha256: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Verify the full sha256, then load tensors without running any code.

    safetensors files hold tensors only; other files go through `torch.load(weights_only=True)`,
    which refuses pickled objects (and never executes them).
    """
    path = Path(path)
    verify_sha256(path, sha256)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(str(path)), metadata
        except SafetensorError as err:
            raise CheckpointError(f"{path}: not a valid safetensors file: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointError(
            f"{path}: refused: not a weights-only checkpoint (it holds objects other than tensors): {err}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors")
    return obj, {}


def save_model(net: StagedNet, spec: ModelSpec, path: Path | str) -> str:
    """A trained network with its spec in the metadata; returns the file's sha256."""
    return save_weights(net.state_dict(), path, {SPEC_KEY: spec.model_dump_json()})


def read_spec(metadata: dict[str, str], path: Path | str) -> ModelSpec:
    if SPEC_KEY not in metadata:
        raise CheckpointError(f"{path}: no {SPEC_KEY!r} in the safetensors metadata: not a headstart model")
    return ModelSpec.model_validate(json.loads(metadata[SPEC_KEY]))


def mismatch(path: Path | str, arch: str, err: RuntimeError) -> CheckpointError:
    """torch's `size mismatch for ...` / `Missing key(s)` said with the file and the architecture it was loaded as."""
    detail = " ".join(str(err).split())
    return CheckpointError(
        f"{path}: its tensors do not fit architecture {arch!r} (wrong file, or the source's arch is wrong): "
        f"{detail[:600]}"
    )


def load_into(net: StagedNet, state: dict[str, torch.Tensor], path: Path | str, arch: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise mismatch(path, arch, err) from None


def load_model(path: Path | str, sha256: str) -> tuple[StagedNet, ModelSpec]:
    """Rebuild a model saved by `save_model`, after verifying its sha256."""
    state, metadata = load_weights(path, sha256)
    spec = read_spec(metadata, path)
    net = build_model(spec)
    load_into(net, state, path, spec.arch)
    return net, spec
