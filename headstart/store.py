"""The Zarr v3 feature store: frozen activations keyed by sample content, append-only, read only when complete.

One store per extractor (weights, architecture, cut, preprocessing, code): its key is the hash of
that provenance, which is also kept in the group attributes and checked on every open. Rows are
keyed by the sha256 of each sample's pixels, so a new dataset version only computes the samples
the store lacks. Progress is committed a whole chunk at a time (attribute `rows`, written after
the chunk), so a killed extraction resumes where it stopped; a reader accepts a store only when
the completion marker `COMMITTED.json` (written last) agrees with `rows` and the stored keys.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from headstart.backbones import Preprocess
from headstart.checkpoints import atomic_write
from headstart.fingerprint import files_version, sha256_bytes, sha256_json

FORMAT = 1
KEY_BYTES = 32
MARKER = "COMMITTED.json"
LOCK = ".writer.lock"
EXTRACTOR_CODE = ("headstart/backbones.py", "headstart/store.py", "tasks/extract.py")
"""The source files that decide what an activation is: any change to them makes a new store."""
_READ_BYTES = 64 << 20
"""Upper bound on one read call's chunk span, so reading many keys never loads the whole store."""


class StoreError(RuntimeError):
    """A feature store cannot be used as asked; the message names the store's path."""


class ProvenanceError(StoreError):
    """The store at this path was made by another extractor (or its attributes were edited)."""


class IncompleteStoreError(StoreError):
    """The store has no valid completion marker: an extraction is running, was killed, or it was altered."""


class MissingRowsError(StoreError):
    """Some requested keys have no stored features."""


def provenance(weights_sha256: str, arch: str, cut: str, pre: Preprocess) -> dict[str, Any]:
    """Everything that determines the activations, as JSON-able group attributes."""
    return {
        "weights_sha256": weights_sha256,
        "arch": arch,
        "cut": cut,
        "preprocess": pre.model_dump(mode="json"),
        "code_version": files_version(EXTRACTOR_CODE),
        "torch": torch.__version__,
    }


def store_key(prov: dict[str, Any]) -> str:
    return sha256_json(prov)


def store_path(root: Path | str, prov: dict[str, Any]) -> Path:
    """Where the store for this provenance lives: `<root>/<key>.zarr`."""
    return Path(root) / f"{store_key(prov)}.zarr"


def rows_per_chunk(feature_shape: tuple[int, ...], chunk_mb: float, batch_size: int) -> int:
    """Rows in one chunk of about `chunk_mb` MiB (uncompressed), a multiple of the batch size when larger."""
    row_bytes = 4 * math.prod(feature_shape)
    rows = max(1, int(chunk_mb * (1 << 20) // row_bytes))
    if rows > batch_size:
        rows -= rows % batch_size
    return rows


def _check_keys(keys: np.ndarray) -> None:
    if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != KEY_BYTES:
        raise ValueError(
            f"row keys must be uint8 of shape (n, {KEY_BYTES}) (fingerprint.row_keys); got {keys.dtype} {keys.shape}"
        )


def _split_keys(keys: np.ndarray) -> list[bytes]:
    blob = np.ascontiguousarray(keys).tobytes()
    return [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]


class FeatureStore:
    """One extractor's stored activations. `open` to read a complete store; `open_or_create` to extend one."""

    def __init__(self, path: Path, mode: str):
        self.path = path
        self._mode = mode
        self._load()

    # --- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, prov: dict[str, Any]) -> FeatureStore:
        """A complete store with this provenance; anything else raises (naming the path and the reason)."""
        store = cls._open(Path(path), prov, mode="r")
        problem = store._marker_problem()
        if problem is not None:
            raise IncompleteStoreError(
                f"{store.path}: not a complete feature store ({problem}); run the extract stage to finish it"
            )
        return store

    @classmethod
    def open_or_create(
        cls, path: Path | str, prov: dict[str, Any], feature_shape: tuple[int, ...], chunk_rows: int
    ) -> FeatureStore:
        """The store to extend: created empty (atomically) when absent, else checked like `open` minus completeness."""
        path = Path(path)
        if not path.exists():
            cls._create(path, prov, tuple(feature_shape), chunk_rows)
        store = cls._open(path, prov, mode="r+")
        if store.feature_shape != tuple(feature_shape):
            raise StoreError(
                f"{path}: stores features of shape {store.feature_shape}, the extractor gives {feature_shape}"
            )
        return store

    @classmethod
    def _create(cls, path: Path, prov: dict[str, Any], feature_shape: tuple[int, ...], chunk_rows: int) -> None:
        """Build the empty group in a temporary folder, then rename it into place (never seen half-made)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
        try:
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            codecs = {"compressors": (ZstdCodec(), Crc32cCodec()), "fill_value": 0}
            group.create_array("keys", shape=(0, KEY_BYTES), chunks=(chunk_rows, KEY_BYTES), dtype="uint8", **codecs)
            group.create_array(
                "features", shape=(0, *feature_shape), chunks=(chunk_rows, *feature_shape), dtype="float32", **codecs
            )
            group.attrs.update(
                {
                    **prov,
                    "headstart_store": FORMAT,
                    "store_key": store_key(prov),
                    "feature_shape": list(feature_shape),
                    "rows": 0,
                    "complete": False,
                }
            )
            try:
                os.rename(tmp, path)
            except OSError:
                if not (path / "zarr.json").is_file():  # not a concurrent creator winning the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def _open(cls, path: Path, prov: dict[str, Any], mode: str) -> FeatureStore:
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: no feature store here (no zarr.json); run the extract stage")
        store = cls(path, mode)
        for name, expected in {**prov, "headstart_store": FORMAT, "store_key": store_key(prov)}.items():
            actual = store._attrs.get(name, "<missing>")
            if actual != expected:
                raise ProvenanceError(
                    f"{path}: attribute {name!r} is {actual!r} but the extractor has {expected!r}; "
                    "this store belongs to another extractor (or its attributes were edited)"
                )
        return store

    def _load(self) -> None:
        """(Re)read the group's attributes and arrays from disk."""
        try:
            self._group = zarr.open_group(self.path, mode=self._mode, zarr_format=3)
            self._keys = self._group["keys"]
            self._features = self._group["features"]
        except Exception as err:
            raise StoreError(f"{self.path}: not a readable feature store: {err}") from err
        self._attrs = dict(self._group.attrs)
        self._committed: np.ndarray | None = None
        self._index: dict[bytes, int] | None = None
        rows = self._attrs.get("rows")
        if not isinstance(rows, int) or not 0 <= rows <= self._keys.shape[0] or self._features.shape[0] < rows:
            raise StoreError(
                f"{self.path}: attribute 'rows' is {rows!r}, outside the arrays' {self._keys.shape[0]} rows"
            )

    # --- what is stored ---------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Committed rows; anything stored beyond them is an interrupted write and does not exist."""
        return int(self._attrs["rows"])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self._attrs["feature_shape"])

    @property
    def chunk_rows(self) -> int:
        return int(self._features.chunks[0])

    @property
    def complete(self) -> bool:
        return self._marker_problem() is None

    def committed_keys(self) -> np.ndarray:
        if self._committed is None:
            self._committed = np.asarray(self._keys[: self.rows], dtype=np.uint8)
        return self._committed

    def _marker_problem(self) -> str | None:
        """Why the store is not complete, or None when the marker, `rows` and the keys agree."""
        try:
            marker = json.loads((self.path / MARKER).read_text())
        except FileNotFoundError:
            return f"no {MARKER} completion marker"
        except ValueError:
            return f"{MARKER} is not valid JSON"
        if self._attrs.get("complete") is not True:
            return "attribute 'complete' is not true"
        if not isinstance(marker, dict) or marker.get("rows") != self.rows:
            return f"{MARKER} is stale: it records {marker.get('rows')!r} rows, attribute 'rows' is {self.rows}"
        if marker.get("store_key") != self._attrs.get("store_key"):
            return f"{MARKER} names store {marker.get('store_key')!r}, not {self._attrs.get('store_key')!r}"
        if marker.get("keys_sha256") != sha256_bytes(self.committed_keys().tobytes()):
            return f"{MARKER} is stale: its keys fingerprint does not match the stored keys"
        return None

    def _lookup(self) -> dict[bytes, int]:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(_split_keys(self.committed_keys()))}
        return self._index

    def missing(self, keys: np.ndarray) -> np.ndarray:
        """Indices (into `keys`) of the keys not stored, duplicates dropped, in the given order."""
        _check_keys(keys)
        index = self._lookup()
        seen: set[bytes] = set()
        todo = []
        for i, k in enumerate(_split_keys(keys)):
            if k not in index and k not in seen:
                seen.add(k)
                todo.append(i)
        return np.asarray(todo, dtype=np.int64)

    # --- reading ----------------------------------------------------------------------------------

    def read(self, keys: np.ndarray) -> np.ndarray:
        """Features for `keys`, in their order; reads whole chunk spans, each at most once."""
        _check_keys(keys)
        index = self._lookup()
        rows = np.fromiter((index.get(k, -1) for k in _split_keys(keys)), dtype=np.int64, count=len(keys))
        absent = int((rows < 0).sum())
        if absent:
            raise MissingRowsError(
                f"{self.path}: {absent} of {len(keys)} keys have no stored features; "
                "run the extract stage on this data first"
            )
        out = np.empty((len(keys), *self.feature_shape), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for lo, hi in self._spans(np.unique(sorted_rows // self.chunk_rows)):
            a, b = np.searchsorted(sorted_rows, [lo, hi])
            try:
                block = self._features[lo:hi]
            except Exception as err:
                raise StoreError(f"{self.path}/features: rows {lo}..{hi} unreadable (corrupt chunk?): {err}") from err
            out[order[a:b]] = block[sorted_rows[a:b] - lo]
        return out

    def _spans(self, chunks: np.ndarray) -> Iterator[tuple[int, int]]:
        """Row ranges covering runs of consecutive touched chunks, each at most `_READ_BYTES`."""
        r = self.chunk_rows
        most = max(1, _READ_BYTES // (r * 4 * math.prod(self.feature_shape)))
        start = prev = None
        for c in chunks.tolist():
            if start is not None and (c != prev + 1 or c - start >= most):
                yield start * r, min((prev + 1) * r, self.rows)
                start = None
            if start is None:
                start = c
            prev = c
        if start is not None:
            yield start * r, min((prev + 1) * r, self.rows)

    # --- writing ----------------------------------------------------------------------------------

    def extend(
        self,
        keys: np.ndarray,
        compute: Callable[[np.ndarray], np.ndarray],
        on_chunk: Callable[[int], None] | None = None,
    ) -> int:
        """Store features for every key not yet stored; return how many rows were computed.

        `compute(indices)` gets indices into `keys` for the rows of one chunk (the first may be the
        rest of a partial chunk) and returns their float32 features. Segments always start at the
        same chunk boundaries, so batches formed inside them are the same whether or not an earlier
        run was interrupted: resumed features are bitwise those of an uninterrupted run.
        `on_chunk(rows)` runs after each committed chunk (tests use it to slow a run and kill it).
        """
        _check_keys(keys)
        with self._writer_lock():
            self._load()  # another writer may have committed rows since this store was opened
            todo = self.missing(keys)
            if len(todo) == 0 and self.complete:
                return 0
            (self.path / MARKER).unlink(missing_ok=True)
            self._set_attrs(complete=False)
            start, end, r = self.rows, self.rows + len(todo), self.chunk_rows
            self._keys.resize((end, KEY_BYTES))
            self._features.resize((end, *self.feature_shape))
            pos = start
            while pos < end:
                stop = min((pos // r + 1) * r, end)
                idx = todo[pos - start : stop - start]
                feats = np.asarray(compute(idx), dtype=np.float32)
                expected = (len(idx), *self.feature_shape)
                if feats.shape != expected:
                    raise StoreError(f"{self.path}: computed features of shape {feats.shape}, expected {expected}")
                self._features[pos:stop] = feats
                self._keys[pos:stop] = keys[idx]
                self._set_attrs(rows=stop)
                if on_chunk is not None:
                    on_chunk(stop)
                pos = stop
            self._publish()
        return len(todo)

    def _set_attrs(self, **values: Any) -> None:
        self._group.attrs.update(values)
        self._attrs.update(values)
        self._committed = self._index = None

    def _publish(self) -> None:
        """Mark complete: the attribute, then the marker file (atomically, last)."""
        self._set_attrs(complete=True)
        marker = {
            "rows": self.rows,
            "store_key": self._attrs["store_key"],
            "keys_sha256": sha256_bytes(self.committed_keys().tobytes()),
        }
        with atomic_write(self.path / MARKER) as tmp:
            tmp.write_text(json.dumps(marker, indent=2, sort_keys=True))

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """One writer per store (Zarr does not synchronise writers); the OS drops the lock if the holder dies."""
        with open(self.path / LOCK, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"{self.path}: another process is extracting into this store") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
