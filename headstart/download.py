"""HTTP(S) downloads into a cache: streamed while hashing, verified, renamed into place, retried on network errors only.

A checksum mismatch is never retried: the server is serving other bytes than were pinned, and
asking again would only hide it. Nothing but a verified file ever reaches its final name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from tqdm import tqdm

from headstart.caching import run_logger
from headstart.fingerprint import ChecksumError, sha256_file

_BLOCK = 1 << 20
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class DownloadError(OSError):
    """A URL could not be fetched (after the retries, for network errors)."""


class _Transient(Exception):
    """A failure worth another try: the network or the server, not the content."""


def matches(actual: str, expected: str, algorithm: str = "sha256") -> bool:
    """A full digest must be equal; a shorter sha256 (torchvision's file-name prefix) must be its start."""
    expected = expected.lower()
    if algorithm != "sha256" or len(expected) == 64:
        return actual == expected
    return len(expected) >= 8 and actual.startswith(expected)


def _digest_file(path: Path, algorithm: str) -> str:
    if algorithm == "sha256":
        return sha256_file(path)
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    dest: Path,
    expected: str,
    *,
    retries: int,
    timeout_s: float,
    backoff_s: float = 0.5,
    algorithm: str = "sha256",
) -> str:
    """Fetch `url` to `dest` unless a verified copy is already there; return the file's digest.

    `expected` is a full sha256 or a hex prefix of one (or, with `algorithm="md5"`, the full md5 an
    upstream publishes, as for Fashion-MNIST). A file already at `dest` is re-hashed, never
    trusted; one that fails is replaced by a fresh download.
    """
    log = run_logger()
    if dest.is_file():
        actual = _digest_file(dest, algorithm)
        if matches(actual, expected, algorithm):
            return actual
        log.warning("%s: cached file has %s %s, expected %s: downloading it again", dest, algorithm, actual, expected)
        dest.unlink()
    fresh_dir = not dest.parent.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch_with_retries(url, dest, expected, retries, timeout_s, backoff_s, algorithm)
    except BaseException:
        if fresh_dir:
            with suppress(OSError):
                dest.parent.rmdir()  # only if still empty: a failed fetch leaves no trace
        raise


def _fetch_with_retries(
    url: str, dest: Path, expected: str, retries: int, timeout_s: float, backoff_s: float, algorithm: str
) -> str:
    for attempt in range(retries + 1):
        try:
            return _fetch_once(url, dest, expected, timeout_s, algorithm)
        except _Transient as err:
            if attempt == retries:
                raise DownloadError(f"{url}: giving up after {attempt + 1} attempt(s): {err}") from None
            wait = backoff_s * 2**attempt
            run_logger().warning("%s: %s; retrying in %.1f s (%d/%d)", url, err, wait, attempt + 1, retries)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _fetch_once(url: str, dest: Path, expected: str, timeout_s: float, algorithm: str) -> str:
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest, size = _stream(url, out, timeout_s, algorithm)
        if not matches(digest, expected, algorithm):
            raise ChecksumError(
                f"{url}: {algorithm} mismatch: expected {expected.lower()}, got {digest} ({size} bytes); "
                "the file was not kept"
            )
        os.replace(tmp, dest)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out: BinaryIO, timeout_s: float, algorithm: str) -> tuple[str, int]:
    """Copy the response body into `out` while hashing it; transient failures raise `_Transient`."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    size = 0
    try:
        with _opener(url).open(url, timeout=timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(urlsplit(url).path).name, disable=None) as bar:
                while block := resp.read(_BLOCK):
                    h.update(block)
                    out.write(block)
                    size += len(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as err:
        if err.code >= 500 or err.code == 429:
            raise _Transient(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as err:
        raise _Transient(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
    if total is not None and size != total:
        raise _Transient(f"connection closed after {size} of {total} bytes")
    return h.hexdigest(), size


def _opener(url: str) -> urllib.request.OpenerDirector:
    """The default opener, except that loopback addresses never go through a proxy."""
    if urlsplit(url).hostname in _LOOPBACK:
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()
