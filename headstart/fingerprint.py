"""Content fingerprints: the one truth both DVC and Prefect caching key on.

A fingerprint depends on content only, never on a path, a run id or a time, so two
orchestrators (and two machines) agree on what changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

_BLOCK = 1 << 20
_PROJECT = Path(__file__).resolve().parent.parent


def _file_digest(path: Path | str, h: hashlib._Hash) -> str:
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path | str) -> str:
    """Full sha256 of a file, streamed in 1 MiB blocks."""
    return _file_digest(path, hashlib.sha256())


def md5_file(path: Path | str) -> str:
    """The md5 DVC names a file's cache object by (not a security hash), streamed."""
    return _file_digest(path, hashlib.md5(usedforsecurity=False))


class ChecksumError(ValueError):
    """A file's sha256 is not the one it was pinned to."""


def verify_sha256(path: Path | str, expected: str) -> str:
    """Raise unless the file's full sha256 is `expected`; return it."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(f"{path}: sha256 mismatch: expected {expected.lower()}, got {actual}")
    return actual


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(value: Any) -> str:
    """Hash of a JSON-able value (pydantic models included) with sorted keys."""
    return sha256_bytes(canonical_json(value).encode())


def canonical_json(value: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, BaseModel):
            return o.model_dump(mode="json")
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot fingerprint {type(o).__name__}")

    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=default)


def sha256_array(array: np.ndarray) -> str:
    """Hash of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
    return h.hexdigest()


def row_keys(images: np.ndarray) -> np.ndarray:
    """Per-sample content hashes (raw 32-byte sha256 digests, shape (n, 32) uint8) of an image array.

    Features depend only on the pixels and the extractor, so the pixels alone key a row.
    """
    a = np.ascontiguousarray(images)
    out = np.empty((len(a), 32), dtype=np.uint8)
    for i in range(len(a)):
        out[i] = np.frombuffer(hashlib.sha256(a[i].data).digest(), dtype=np.uint8)
    return out


def combine(*parts: str) -> str:
    """One fingerprint from several (order matters)."""
    return sha256_bytes("\x1f".join(parts).encode())


def code_version(modules: Iterable[str] = ("headstart", "tasks")) -> str:
    """Hash of the project's library source: any change to it invalidates every cached result."""
    h = hashlib.sha256()
    for package in modules:
        for path in sorted((_PROJECT / package).rglob("*.py")):
            h.update(str(path.relative_to(_PROJECT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def files_version(paths: Iterable[str]) -> str:
    """Hash of named project files (paths relative to the project): a narrower code version for one stage."""
    h = hashlib.sha256()
    for rel in paths:
        h.update(rel.encode())
        h.update((_PROJECT / rel).read_bytes())
    return h.hexdigest()


def file_digests(paths: Iterable[str]) -> dict[str, str]:
    """A short hash per named project file: which file of a stage's code changed, for `headstart status`."""
    return {rel: hashlib.sha256((_PROJECT / rel).read_bytes()).hexdigest()[:16] for rel in paths}
