"""Pretrained weights named by a URI: parsed, fetched into a cache, verified by full sha256, loaded as a StagedNet.

The forms: a local path; `https://...` with a pinned sha256; `torchvision:<model>/<ENUM>`
(torchvision's own hub cache); `models:/<name>@<alias>` or `models:/<name>/<version>` (the
MLflow registry, verified against the version's `weights_sha256` tag).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from headstart.backbones import CLASSIFIER, StagedNet, create_model
from headstart.caching import run_logger
from headstart.checkpoints import (
    SPEC_KEY,
    CheckpointError,
    ModelSpec,
    build_model,
    load_into,
    load_weights,
    mismatch,
    read_spec,
)
from headstart.config import WeightsParams
from headstart.download import download, matches
from headstart.env import project_root
from headstart.fingerprint import ChecksumError, sha256_file, verify_sha256
from headstart.records import SourceWeights
from headstart.uris import HASH_IN_NAME, WEIGHTS_SHA_TAG, WeightsURI, local_path, parse_uri, registry_version

if TYPE_CHECKING:
    import torchvision

KNOWN_SHA256 = {
    "mobilenet_v2/IMAGENET1K_V1": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
}
"""Full sha256s of torchvision weights files checked by hand; torchvision itself pins only 8 hex digits."""


@dataclass(frozen=True)
class Fetched:
    """A verified local weights file and what it says about its preprocessing."""

    path: Path
    sha256: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    spec: ModelSpec | None = None
    image_size: int | None = None
    """The input size the weights were evaluated at (torchvision's crop size), when the source says."""


def torchvision_weights(model: str, member: str) -> torchvision.models.WeightsEnum:
    """The weights enum member, or an error listing the valid models or members."""
    import torchvision  # on first use: it costs 1.5 s to import (its ops load torch._dynamo)

    try:
        enum = torchvision.models.get_model_weights(model)
    except ValueError:
        raise ValueError(
            f"unknown torchvision model {model!r}; expected one of {torchvision.models.list_models()}"
        ) from None
    try:
        return enum[member]
    except KeyError:
        raise ValueError(
            f"torchvision:{model}/{member}: {enum.__name__} has no member {member!r}; "
            f"expected one of {[w.name for w in enum]}"
        ) from None


def fetch(uri: str, sha256: str | None, params: WeightsParams, cache_dir: Path) -> Fetched:
    """Make the weights a URI names available as a verified local file."""
    parsed = parse_uri(uri)
    if parsed.kind == "path":
        return _fetch_local(parsed.target, sha256)
    if parsed.kind == "url":
        if sha256 is None:
            raise ValueError(f"weights URL {uri!r}: pin its sha256")
        dest = cache_dir / sha256 / Path(urlsplit(parsed.target).path).name
        download(parsed.target, dest, sha256, retries=params.retries, timeout_s=params.timeout_s)
        return _with_spec(dest, sha256)
    if parsed.kind == "torchvision":
        return _fetch_torchvision(parsed, sha256, params)
    return _fetch_registry(parsed, uri, sha256, cache_dir)


def load_source(weights: SourceWeights) -> StagedNet:
    """The source network a weights record describes, its full sha256 verified again on this load.

    A headstart model is rebuilt from the spec in its metadata; other checkpoints (staged or
    torchvision-native keys) go through `create_model`.
    """
    path = weights.local()
    if not path.is_file():
        raise FileNotFoundError(f"source {weights.source!r}: weights file {path} is gone: rerun the weights stage")
    state, metadata = load_weights(path, weights.sha256)
    if SPEC_KEY in metadata:
        spec = read_spec(metadata, path)
        if spec.arch != weights.arch:
            raise CheckpointError(
                f"{path}: holds a {spec.arch!r} model, but source {weights.source!r} says {weights.arch!r}"
            )
        net = build_model(spec)
        load_into(net, state, path, spec.arch)
        return net
    try:
        return create_model(weights.arch, _num_classes(state), state_dict=state)
    except RuntimeError as err:
        raise mismatch(path, weights.arch, err) from None


def _num_classes(state: Mapping[str, torch.Tensor]) -> int:
    """The classifier's output size in a staged state dict; torchvision-native checkpoints are ImageNet's 1000."""
    weights = [
        v for k, v in state.items() if k.startswith(f"stages.{CLASSIFIER}.") and k.endswith("weight") and v.ndim == 2
    ]
    return int(weights[-1].shape[0]) if weights else 1000


def _fetch_local(target: str, sha256: str | None) -> Fetched:
    path = local_path(target)
    if not path.is_file():
        hint = ""
        if path.resolve().is_relative_to(project_root() / "models"):
            hint = ": run the pretrain stage first (it writes this file)"
        raise FileNotFoundError(f"weights file {path} not found{hint}")
    digest = verify_sha256(path, sha256) if sha256 else sha256_file(path)
    return _with_spec(path, digest)


def _with_spec(path: Path, sha256: str) -> Fetched:
    """Attach the ModelSpec (and its mean/std) a headstart safetensors file carries."""
    if path.suffix != ".safetensors":
        return Fetched(path, sha256)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a valid safetensors file: {err}") from None
    if SPEC_KEY not in metadata:
        return Fetched(path, sha256)
    spec = read_spec(metadata, path)
    return Fetched(path, sha256, spec.preprocess.mean, spec.preprocess.std, spec)


def _fetch_torchvision(parsed: WeightsURI, sha256: str | None, params: WeightsParams) -> Fetched:
    weights = torchvision_weights(parsed.target, parsed.member or "")
    log = run_logger()
    if parsed.member != weights.name:
        log.warning(
            "torchvision:%s/%s is an alias of %s; pin the member itself", parsed.target, parsed.member, weights.name
        )
    dest = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(weights.url).path).name
    expected = sha256 or KNOWN_SHA256.get(f"{parsed.target}/{weights.name}")
    if expected is None:
        found = HASH_IN_NAME.search(dest.name)
        if not found:
            raise ChecksumError(f"{weights.url}: no sha256 known and none in the file name: pin the source's sha256")
        expected = found.group(1)
    if dest.is_file():
        actual = sha256_file(dest)
        if not matches(actual, expected):
            raise ChecksumError(
                f"{dest} (torchvision's cache for {weights.url}): sha256 {actual} does not match {expected}; "
                "delete it to download it again"
            )
    else:
        actual = download(weights.url, dest, expected, retries=params.retries, timeout_s=params.timeout_s)
    if len(expected) < 64:
        log.warning(
            "trust on first use: no full sha256 is known for torchvision:%s/%s; %s matches the %s prefix in its name "
            "and its full sha256 %s is recorded; pin it as the source's sha256",
            parsed.target, weights.name, dest, expected, actual,
        )  # fmt: skip
    transforms = weights.transforms()
    crop = getattr(transforms, "crop_size", None)
    size = int(crop[0]) if crop else None
    return Fetched(dest, actual, tuple(transforms.mean), tuple(transforms.std), image_size=size)


def _fetch_registry(parsed: WeightsURI, uri: str, sha256: str | None, cache_dir: Path) -> Fetched:
    version = registry_version(parsed, uri)
    expected = version.tags.get(WEIGHTS_SHA_TAG)
    if not expected:
        raise CheckpointError(f"{uri} (version {version.version}): no {WEIGHTS_SHA_TAG!r} tag: not logged by headstart")
    if sha256 is not None and sha256 != expected:
        raise ChecksumError(f"{uri} (version {version.version}): pinned sha256 {sha256}, registry tag says {expected}")
    folder = cache_dir / expected
    for cached in sorted(folder.glob("*.safetensors")):
        if sha256_file(cached) == expected:
            return _with_spec(cached, expected)
    import mlflow  # only to download: a cached version is answered without importing it (2 s)

    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".registry-") as tmp:
        root = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}", dst_path=tmp))
        found = sorted((root / "artifacts").glob("*.safetensors"))
        if len(found) != 1:
            raise CheckpointError(
                f"{uri}: expected one .safetensors file under artifacts/, found {[p.name for p in found]}"
            )
        manifest_path = root / "artifacts" / "model.json"
        if not manifest_path.is_file():
            raise CheckpointError(f"{uri}: no artifacts/model.json: not logged by headstart")
        manifest_sha = json.loads(manifest_path.read_text()).get("sha256")
        if manifest_sha != expected:
            raise ChecksumError(
                f"{uri}: manifest sha256 {manifest_sha} disagrees with the {WEIGHTS_SHA_TAG} tag {expected}"
            )
        try:
            verify_sha256(found[0], expected)
        except ChecksumError as err:
            raise ChecksumError(f"{uri}: {err}") from None
        folder.mkdir(exist_ok=True)
        dest = folder / found[0].name
        os.replace(found[0], dest)
    return _with_spec(dest, expected)
