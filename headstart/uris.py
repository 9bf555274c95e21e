"""Weights URIs: parsed, and pinned to what they name right now, without loading torch.

`headstart status` and the weights stage's cache key pin a URI's content through this module, so
they stay as cheap as reading a file's hash (headstart/sources.py fetches and loads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from headstart.env import project_root
from headstart.fingerprint import sha256_file
from headstart.registry_db import RegistryVersion, lookup

FORMS = (
    "a local path, https://<host>/<file> (with sha256), torchvision:<model>/<WEIGHTS_ENUM>, "
    "models:/<name>@<alias> or models:/<name>/<version>"
)
_TORCHVISION = re.compile(r"^torchvision:(\w+)/(\w+)$")
_REGISTRY = re.compile(r"^models:/([^/@]+)(?:@([^/@]+)|/(\d+))$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
WEIGHTS_SHA_TAG = "weights_sha256"
"""The MLflow model version tag holding its weights file's full sha256 (what a registry URI is verified by)."""
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")
"""The sha256 prefix torchvision writes into its weights file names (`mobilenet_v2-b0353104.pth`)."""


@dataclass(frozen=True)
class WeightsURI:
    """A parsed weights URI."""

    kind: Literal["path", "url", "torchvision", "registry"]
    target: str
    """The path, the URL, the torchvision model, or the registered model's name."""
    member: str | None = None
    """torchvision: the weights enum member; registry: the alias."""
    version: str | None = None
    """registry: the version number (when no alias is given)."""


def parse_uri(uri: str) -> WeightsURI:
    """Recognise one of the weights URI forms; anything else is an error that lists them."""
    uri = uri.strip()
    if not uri:
        raise ValueError(f"empty weights URI; expected {FORMS}")
    if uri.startswith(("https://", "http://")):
        parts = urlsplit(uri)
        if not parts.hostname or not Path(parts.path).name:
            raise ValueError(f"weights URL {uri!r} must name a host and a file")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"weights URL {uri!r}: plain http is accepted only for 127.0.0.1; use https")
        return WeightsURI("url", uri)
    if uri.startswith("torchvision:"):
        m = _TORCHVISION.match(uri)
        if not m:
            raise ValueError(
                f"weights URI {uri!r}: expected torchvision:<model>/<WEIGHTS_ENUM>, "
                "e.g. torchvision:resnet18/IMAGENET1K_V1"
            )
        return WeightsURI("torchvision", m.group(1), member=m.group(2))
    if uri.startswith("models:"):
        m = _REGISTRY.match(uri)
        if not m:
            raise ValueError(f"weights URI {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
        return WeightsURI("registry", m.group(1), member=m.group(2), version=m.group(3))
    scheme = _SCHEME.match(uri)
    if scheme:
        raise ValueError(f"weights URI {uri!r}: unsupported scheme {scheme.group(1)!r}; expected {FORMS}")
    return WeightsURI("path", uri)


def local_path(target: str) -> Path:
    """A params path: absolute as given, else relative to the project root."""
    path = Path(target).expanduser()
    return path if path.is_absolute() else project_root() / path


def content_pin(uri: str, sha256: str | None) -> str:
    """What a URI names right now, for cache keys: a local file's or a registry alias's content can change under it."""
    parsed = parse_uri(uri)
    if parsed.kind == "path":
        path = local_path(parsed.target)
        return sha256_file(path) if path.is_file() else f"missing:{path}"
    if parsed.kind == "registry":
        version = registry_version(parsed, uri)
        return f"{version.name}/{version.version}/{version.tags.get(WEIGHTS_SHA_TAG)}"
    return sha256 or uri  # a URL or a torchvision enum names fixed bytes


def registry_version(parsed: WeightsURI, uri: str) -> RegistryVersion:
    """The version a registry URI names now, with its tags: from MLflow's sqlite file when it can answer
    (headstart.registry_db: no MLflow import), else from MLflow, whose errors name what is missing."""
    found = lookup(parsed.target, parsed.member, parsed.version)
    if found is not None:
        return found
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        if parsed.member is not None:
            version = client.get_model_version_by_alias(parsed.target, parsed.member)
        else:
            version = client.get_model_version(parsed.target, parsed.version)
    except mlflow.exceptions.MlflowException as err:
        raise LookupError(f"{uri}: not in the MLflow registry at {mlflow.get_tracking_uri()}: {err.message}") from None
    return RegistryVersion(version.name, str(version.version), dict(version.tags))


def weights_content(parameters: dict[str, Any]) -> dict[str, str]:
    """What each source's URI names right now (the weights stage's cache key): a local file rewritten by
    pretrain or a registry alias moved to another version changes it while the URI stays the same."""
    from headstart.config import SourceParams

    sources = {name: SourceParams.model_validate(s) for name, s in parameters["sources"].items()}
    return {name: content_pin(s.weights, s.sha256) for name, s in sources.items()}
