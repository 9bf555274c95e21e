"""The Zarr v3 feature store: frozen activations keyed by sample content, append-only, read only when complete.

One store per extractor (weights, architecture, taps, preprocessing, code: headstart.extraction's
`provenance`): its key is the hash of that provenance, which is also kept in the group attributes
and checked on every open. A store
holds one array per tap (`features/<tap>`: the activations after that stage, all from one forward
pass), so a run can pick any stored cut without extracting again; a reader names the taps it
needs and is refused when the store lacks one. Rows are keyed by the sha256 of each sample's
pixels, so a new dataset version only computes the samples the store lacks. Every array has the
same rows per chunk and progress is committed a whole chunk at a time (attribute `rows`, written
after the chunk of every tap), so a killed extraction resumes where it stopped; a reader accepts a
store only when the completion marker `COMMITTED.json` (written last) agrees with `rows` and the
stored keys.

Every chunk carries a crc32c checksum, so a damaged chunk file fails to decode instead of giving
wrong numbers, whichever codec compressed it (`CODECS`: none, lz4, zstd; chosen when a store is
made, recorded in Zarr's own array metadata, so a reader opens a store whatever its codec). The
codec is lossless and not provenance; the stored dtype (float32 or float16) is: it is in the
provenance, hence the key. Readers always get float32 (float16 is upcast), and a float16 store
refuses activations beyond float16's range instead of storing infinities.

`scan` decodes every committed chunk (what `headstart verify` runs). A reader that
meets an unreadable or non-finite chunk removes the completion marker, so both orchestrators see
the extract stage's output changed and rerun it; `repair` (run by every extraction of an
incomplete store) then recomputes exactly the damaged chunks' rows. Rows whose key is unreadable,
or whose image the data no longer holds, are forgotten (their key becomes `TOMBSTONE`): the
images still in the data are then stored again as new rows.

An extension can also be split into shards of whole chunks written by separate processes (Dask
workers): the coordinator holds the writer lock, grows the arrays and hands each shard to one
worker; a worker writes only its shard's chunk files, then the shard's done marker; the
coordinator checks every marker, then commits `rows` and writes `COMMITTED.json`, as a single
writer would. Zarr does not synchronise writers, but separate chunk files are separate files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from headstart.files import atomic_write
from headstart.fingerprint import sha256_bytes, sha256_json

FORMAT = 3
"""Layout version: 2 stores one array per tap under `features/`; 3 adds the stored dtype and the codec."""
KEY_BYTES = 32
MARKER = "COMMITTED.json"
LOCK = ".writer.lock"
SHARDS = ".shards"
"""Folder of per-shard done markers of a sharded extension in progress; removed when it is committed."""
_READ_BYTES = 64 << 20
"""Upper bound on one read call's chunk span, so reading many keys never loads the whole store."""
TOMBSTONE = bytes(KEY_BYTES)
"""The key of a forgotten row (repaired away): no sample's sha256 is 32 zero bytes."""
LEASE = "lease.json"
"""In `.shards/`: who coordinates a sharded extension, so a worker that sees another file system is refused."""
CODECS: dict[str, tuple[BytesBytesCodec, ...]] = {
    "none": (),
    "lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),),
    "zstd-1": (ZstdCodec(level=1),),
    "zstd-3": (ZstdCodec(level=3),),
}
"""`extract.codec` -> the compressor before the crc32c of every feature chunk. Blosc's lz4 is Zarr v3's own
codec (no numcodecs wrapper for readers to need); byte shuffling made post-ReLU activations larger, not smaller
(their zero runs are what compresses), so it is off."""
DTYPES = ("float32", "float16")
"""`extract.dtype`: how activations are stored; reads always return float32."""
FLOAT16_MAX = float(np.finfo(np.float16).max)
_WRITE_CONFIG = {"write_empty_chunks": True}
"""Zarr's default skips a chunk equal to the fill value, found by comparing every element as raw bytes (numpy's
void `array_equal`): more than half the CPU time of writing an uncompressed chunk. Chunks here are whole and
rarely all zero, so every one is written (a missing chunk would read as zeros either way)."""

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A feature store cannot be used as asked; the message names the store's path."""


class ProvenanceError(StoreError):
    """The store at this path was made by another extractor (or its attributes were edited)."""


class IncompleteStoreError(StoreError):
    """The store has no valid completion marker: an extraction is running, was killed, or it was altered."""


def non_finite_rows(array: np.ndarray) -> np.ndarray:
    """Positions of the rows holding a NaN or an infinity."""
    if len(array) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))


class NonFiniteError(StoreError):
    """Activations with NaN or infinity: refused when written, and when read (a store altered after extraction)."""


class OutOfRangeError(StoreError):
    """Activations beyond what the store's dtype holds (float16: 65504): refused, never stored as infinities."""


class MissingRowsError(StoreError):
    """Some requested keys have no stored features."""


@dataclass(frozen=True)
class Damage:
    """One committed chunk that cannot be used: which array, its rows, and why."""

    array: str
    start: int
    stop: int
    reason: str

    def __str__(self) -> str:
        return f"{self.array} rows {self.start}..{self.stop}: {self.reason}"


Features = Mapping[str, np.ndarray] | np.ndarray
"""What `extend`'s compute returns: float32 activations per tap (a bare array when the store has one tap)."""


def store_key(prov: dict[str, Any]) -> str:
    return sha256_json(prov)


def store_path(root: Path | str, prov: dict[str, Any]) -> Path:
    """Where the store for this provenance lives: `<root>/<key>.zarr`."""
    return Path(root) / f"{store_key(prov)}.zarr"


def rows_per_chunk(feature_shape: tuple[int, ...], chunk_mb: float, batch_size: int, itemsize: int = 4) -> int:
    """Rows in one chunk of about `chunk_mb` MiB (uncompressed, `itemsize` bytes a value), a multiple of the
    batch size when larger."""
    row_bytes = itemsize * math.prod(feature_shape)
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


def chunk_segments(start: int, end: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Rows `start..end` cut at chunk boundaries: the units `compute` gets, whichever runner calls it.

    The first segment may be the rest of a partial chunk; batches formed inside a segment therefore
    start at the same rows whether a run was interrupted, resumed or sharded.
    """
    segments, pos = [], start
    while pos < end:
        stop = min((pos // chunk_rows + 1) * chunk_rows, end)
        segments.append((pos, stop))
        pos = stop
    return segments


@dataclass(frozen=True)
class Shard:
    """Consecutive chunk segments (rows `start..stop`) that one worker computes and writes alone."""

    start: int
    stop: int
    segments: tuple[tuple[int, int], ...]

    @property
    def name(self) -> str:
        return f"{self.start}-{self.stop}"


def plan_shards(start: int, end: int, chunk_rows: int, shard_chunks: int) -> list[Shard]:
    """Rows `start..end` as shards of `shard_chunks` chunk segments each: no chunk file belongs to two shards."""
    segments = chunk_segments(start, end, chunk_rows)
    groups = [tuple(segments[i : i + shard_chunks]) for i in range(0, len(segments), shard_chunks)]
    return [Shard(g[0][0], g[-1][1], g) for g in groups]


@dataclass(frozen=True)
class ShardJob:
    """A shard of one extension and the indices (into the extension's `keys`) of the samples it stores."""

    shard: Shard
    indices: np.ndarray
    lease: str
    """The coordinator's lease (`.shards/lease.json`): a worker writes only into the store that holds it."""


class ShardsFailedError(StoreError):
    """Some shards of a sharded extension did not finish; the finished ones are kept for the rerun."""


class FeatureStore:
    """One extractor's stored activations. `open` to read a complete store; `open_or_create` to extend one."""

    def __init__(self, path: Path, mode: str, wanted: Sequence[str] = ()):
        self.path = path
        self._mode = mode
        self._wanted = list(wanted)
        self._load()

    # --- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, prov: dict[str, Any]) -> FeatureStore:
        """A complete store holding (at least) the taps of `prov`; anything else raises, naming path and reason."""
        store = cls._open(Path(path), prov, mode="r", exact=False)
        problem = store._marker_problem()
        if problem is not None:
            raise IncompleteStoreError(
                f"{store.path}: not a complete feature store ({problem}); run the extract stage to finish it"
            )
        return store

    @classmethod
    def open_or_create(
        cls,
        path: Path | str,
        prov: dict[str, Any],
        shapes: Mapping[str, tuple[int, ...]] | tuple[int, ...],
        chunk_rows: int,
        codec: str = "zstd-1",
    ) -> FeatureStore:
        """The store to extend: created empty (atomically) when absent, else checked like `open` minus completeness.

        `shapes` maps each tap of `prov` to one sample's activation shape (a bare shape for one tap).
        `codec` (a key of `CODECS`) applies to a new store only: an existing one keeps its own (see `codec`).
        """
        path = Path(path)
        shapes = _tap_shapes(prov["taps"], shapes)
        if codec not in CODECS:
            raise ValueError(f"unknown store codec {codec!r}; expected one of {list(CODECS)}")
        if prov["dtype"] not in DTYPES:
            raise ValueError(f"unknown store dtype {prov['dtype']!r}; expected one of {list(DTYPES)}")
        if not path.exists():
            cls._create(path, prov, shapes, chunk_rows, codec)
        store = cls._open(path, prov, mode="r+", exact=True)
        for tap, shape in shapes.items():
            if store.tap_shapes[tap] != shape:
                raise StoreError(
                    f"{path}: at {tap!r} stores features of shape {store.tap_shapes[tap]}, the extractor gives {shape}"
                )
        return store

    @classmethod
    def _create(
        cls, path: Path, prov: dict[str, Any], shapes: dict[str, tuple[int, ...]], chunk_rows: int, codec: str
    ) -> None:
        """Build the empty group in a temporary folder, then rename it into place (never seen half-made).

        The keys are sha256 digests, which no codec shrinks: they get the crc32c alone.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
        try:
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            group.create_array(
                "keys", shape=(0, KEY_BYTES), chunks=(chunk_rows, KEY_BYTES), dtype="uint8",
                compressors=(Crc32cCodec(),), fill_value=0,
            )  # fmt: skip
            features = group.create_group("features")
            for tap, shape in shapes.items():
                features.create_array(
                    tap, shape=(0, *shape), chunks=(chunk_rows, *shape), dtype=prov["dtype"],
                    compressors=(*CODECS[codec], Crc32cCodec()), fill_value=0,
                )  # fmt: skip
            group.attrs.update(
                {
                    **prov,
                    "headstart_store": FORMAT,
                    "store_key": store_key(prov),
                    "codec": codec,
                    "tap_shapes": {tap: list(shape) for tap, shape in shapes.items()},
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
    def _open(cls, path: Path, prov: dict[str, Any], mode: str, exact: bool) -> FeatureStore:
        """Check the attributes against `prov`: all equal for a writer; a reader needs only its taps to be stored."""
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: no feature store here (no zarr.json); run the extract stage")
        store = cls(path, mode, prov["taps"])
        expected = {**prov, "headstart_store": FORMAT}
        if exact:
            expected["store_key"] = store_key(prov)
        else:  # the stored provenance must still hash to the store's own key (attributes not edited)
            stored = {k: store._attrs.get(k) for k in prov}
            expected.pop("taps")
            expected["store_key"] = store_key(stored)
        for name, value in expected.items():
            actual = store._attrs.get(name, "<missing>")
            if actual != value:
                raise ProvenanceError(
                    f"{path}: attribute {name!r} is {actual!r} but the extractor has {value!r}; "
                    "this store belongs to another extractor (or its attributes were edited)"
                )
        if store.dtype != prov["dtype"]:
            raise ProvenanceError(
                f"{path}: its arrays hold {store.dtype}, its attributes say {prov['dtype']!r}; the store was altered"
            )
        absent = [t for t in prov["taps"] if t not in store.taps]
        if absent:
            raise ProvenanceError(
                f"{path}: attribute 'taps' is {store.taps!r} but the extractor has {prov['taps']!r}: "
                f"no stored activations at {absent}; add them to the source's taps and run the extract stage"
            )
        return store

    def _load(self) -> None:
        """(Re)read the group's attributes and arrays from disk."""
        try:
            self._group = zarr.open_group(self.path, mode=self._mode, zarr_format=3)
            self._attrs = dict(self._group.attrs)
            self._keys = self._group["keys"].with_config(_WRITE_CONFIG)
            self._features = {
                tap: self._group[f"features/{tap}"].with_config(_WRITE_CONFIG) for tap in self._attrs["tap_shapes"]
            }
        except Exception as err:
            raise StoreError(f"{self.path}: not a readable feature store: {err}") from err
        self._committed: np.ndarray | None = None
        self._index: dict[bytes, int] | None = None
        rows = self._attrs.get("rows")
        if (
            not isinstance(rows, int)
            or not 0 <= rows <= self._keys.shape[0]
            or any(a.shape[0] < rows for a in self._features.values())
        ):
            raise StoreError(
                f"{self.path}: attribute 'rows' is {rows!r}, outside the arrays' {self._keys.shape[0]} rows"
            )

    # --- what is stored ---------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Committed rows; anything stored beyond them is an interrupted write and does not exist."""
        return int(self._attrs["rows"])

    @property
    def taps(self) -> list[str]:
        """The stages whose activations this store holds, in network order."""
        return list(self._attrs["tap_shapes"])

    @property
    def tap_shapes(self) -> dict[str, tuple[int, ...]]:
        return {tap: tuple(shape) for tap, shape in self._attrs["tap_shapes"].items()}

    @property
    def dtype(self) -> str:
        """How the activations are stored (float32 or float16); `read` returns float32 either way."""
        return str(next(iter(self._features.values())).dtype)

    @property
    def codec(self) -> str:
        """The codec (a key of `CODECS`) the store was made with; Zarr's array metadata tells readers the same."""
        return str(self._attrs["codec"])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """One sample's activation shape at the tap this store was opened for (see `tap`)."""
        return self.tap_shapes[self.tap()]

    def tap(self, name: str | None = None) -> str:
        """`name` when stored; by default the one tap asked for on opening (or the store's only tap)."""
        if name is not None:
            if name not in self._features:
                raise KeyError(f"{self.path}: no stored activations at {name!r}; it holds {self.taps}")
            return name
        candidates = self._wanted if len(self._wanted) == 1 else self.taps
        if len(candidates) != 1:
            raise ValueError(f"{self.path}: holds taps {self.taps}; name the one to read")
        return candidates[0]

    @property
    def chunk_rows(self) -> int:
        return int(self._keys.chunks[0])

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
        try:
            stored = self.committed_keys()
        except Exception as err:
            return f"its stored keys are unreadable ({type(err).__name__}: {err}); {self.condemn()}"
        if marker.get("keys_sha256") != sha256_bytes(stored.tobytes()):
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

    def read(self, keys: np.ndarray, tap: str | None = None) -> np.ndarray:
        """Activations at `tap` (see `tap()`) for `keys`, in their order; reads whole chunk spans, each at most once."""
        _check_keys(keys)
        tap = self.tap(tap)
        shape, array = self.tap_shapes[tap], self._features[tap]
        index = self._lookup()
        rows = np.fromiter((index.get(k, -1) for k in _split_keys(keys)), dtype=np.int64, count=len(keys))
        absent = int((rows < 0).sum())
        if absent:
            raise MissingRowsError(
                f"{self.path}: {absent} of {len(keys)} keys have no stored features; "
                "run the extract stage on this data first"
            )
        out = np.empty((len(keys), *shape), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for lo, hi in self._spans(np.unique(sorted_rows // self.chunk_rows), shape):
            a, b = np.searchsorted(sorted_rows, [lo, hi])
            try:
                block = array[lo:hi]
            except Exception as err:
                bad = [f"{a}..{b}" for a, b in self.chunk_ranges() if lo <= a < hi and not _decodes(array, a, b)]
                raise StoreError(
                    f"{self.path}/features/{tap}: rows {', '.join(bad) or f'{lo}..{hi}'} unreadable (corrupt chunk?): "
                    f"{err}; {self.condemn()}"
                ) from err
            out[order[a:b]] = block[sorted_rows[a:b] - lo]
        bad = non_finite_rows(out)
        if len(bad):
            raise NonFiniteError(
                f"{self.path}/features/{tap}: stored rows {np.sort(rows[bad])[:10].tolist()} ({len(bad)} in all) hold "
                f"NaN or infinite values, which extraction never writes: the store was altered; {self.condemn()}"
            )
        return out

    def condemn(self) -> str:
        """After a failed read: drop the completion marker, so both orchestrators rerun extraction, which repairs."""
        try:
            (self.path / MARKER).unlink(missing_ok=True)
        except OSError:
            return f"delete its {MARKER} and rerun the extract stage to recompute them"
        return "the store is now marked incomplete: rerun the extract stage (headstart run, dvc repro) to redo them"

    # --- verifying and repairing ------------------------------------------------------------------

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """The committed rows, one range per chunk."""
        r = self.chunk_rows
        return [(lo, min(lo + r, self.rows)) for lo in range(0, self.rows, r)]

    def scan(self) -> list[Damage]:
        """Every committed chunk of every array decoded (its crc32c checked), the features checked finite.

        Reads one chunk at a time, so memory stays at one chunk whatever the store's size.
        """
        arrays = {"keys": self._keys, **{f"features/{tap}": a for tap, a in self._features.items()}}
        damage = []
        for lo, hi in self.chunk_ranges():
            for name, array in arrays.items():
                try:
                    block = np.asarray(array[lo:hi])
                except Exception as err:
                    damage.append(Damage(name, lo, hi, f"unreadable ({type(err).__name__}: {err})"))
                    continue
                if name != "keys" and len(bad := non_finite_rows(block)):
                    damage.append(Damage(name, lo, hi, f"{len(bad)} row(s) hold NaN or infinite values"))
        return damage

    def repair(self, keys: np.ndarray, compute: Callable[[np.ndarray], Features]) -> int:
        """Recompute the rows of every damaged chunk of an incomplete store; return how many were recomputed.

        `keys` are the data's row keys and `compute` works as in `extend`. A complete store is
        trusted as it is (a failed read or `headstart verify` removes the marker of a damaged one).
        A damaged chunk is rewritten whole: its rows whose key is readable and still in the data
        get fresh features, the others are forgotten (`TOMBSTONE`) and their images, when still in
        the data, become new rows at the next `extend`. The store is left incomplete for it.
        """
        _check_keys(keys)
        with self._writer_lock():
            self._load()
            if self.complete:
                return 0
            damaged = sorted({(d.start, d.stop) for d in self.scan()})
            if not damaged:
                return 0
            self._keys.resize((self.rows, KEY_BYTES))  # uncommitted rows go, so each damaged chunk is rewritten whole
            for tap, array in self._features.items():
                array.resize((self.rows, *self.tap_shapes[tap]))
            position = {k: i for i, k in enumerate(_split_keys(keys))}
            recomputed = 0
            for lo, hi in damaged:
                try:
                    stored = np.array(self._keys[lo:hi], dtype=np.uint8)
                except Exception:
                    stored = np.zeros((hi - lo, KEY_BYTES), dtype=np.uint8)
                where = np.array([position.get(k, -1) for k in _split_keys(stored)], dtype=np.int64)
                kept = np.flatnonzero(where >= 0)
                feats = {t: np.zeros((hi - lo, *s), dtype=np.float32) for t, s in self.tap_shapes.items()}
                if len(kept):
                    for tap, values in self._checked(compute(where[kept]), len(kept)).items():
                        feats[tap][kept] = values
                stored[where < 0] = np.frombuffer(TOMBSTONE, dtype=np.uint8)
                self.write_rows(lo, stored, feats)
                recomputed += len(kept)
                log.warning("%s: rows %d..%d repaired (%d recomputed, %d forgotten)", self.path, lo, hi,
                            len(kept), hi - lo - len(kept))  # fmt: skip
            self._committed = self._index = None  # the stored keys changed
        return recomputed

    def _spans(self, chunks: np.ndarray, shape: tuple[int, ...]) -> Iterator[tuple[int, int]]:
        """Row ranges covering runs of consecutive touched chunks, each at most `_READ_BYTES`."""
        r = self.chunk_rows
        most = max(1, _READ_BYTES // (r * 4 * math.prod(shape)))
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
        compute: Callable[[np.ndarray], Features],
        on_chunk: Callable[[int], None] | None = None,
    ) -> int:
        """Store features for every key not yet stored; return how many rows were computed.

        `compute(indices)` gets indices into `keys` for the rows of one chunk (the first may be the
        rest of a partial chunk) and returns their float32 activations at every tap. Segments always
        start at the same chunk boundaries, so batches formed inside them are the same whether or not
        an earlier run was interrupted: resumed features are bitwise those of an uninterrupted run.
        `on_chunk(rows)` runs after each committed chunk (tests use it to slow a run and kill it).

        One background thread writes and commits chunk k (compression and file writes) while the
        caller's thread computes chunk k+1; chunks are still committed one at a time, in order.
        """
        _check_keys(keys)

        def commit(a: int, b: int, chunk_keys: np.ndarray, feats: Features) -> None:
            self.write_rows(a, chunk_keys, feats)
            self._set_attrs(rows=b)
            if on_chunk is not None:
                on_chunk(b)

        with self._writer_lock():
            todo = self._begin(keys)
            if todo is None:
                return 0
            start = self.rows
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as writer:
                writing: Future[None] | None = None
                for a, b in chunk_segments(start, start + len(todo), self.chunk_rows):
                    idx = todo[a - start : b - start]
                    feats = compute(idx)
                    if writing is not None:
                        writing.result()  # the previous chunk is committed (or its error raised) first
                    writing = writer.submit(commit, a, b, keys[idx], feats)
                if writing is not None:
                    writing.result()
            self._publish()
        return len(todo)

    def extend_sharded(
        self, keys: np.ndarray, shard_chunks: int, run: Callable[[list[ShardJob]], None]
    ) -> tuple[int, int]:
        """Like `extend`, but the rows are computed by `run(jobs)` elsewhere, one shard per job.

        `run` must have every job written with `write_shard` (in any process sharing this store)
        before it returns, and raise when one failed. Shards an interrupted earlier call left done
        are not handed out again. Returns (rows computed by this call, rows newly committed).
        """
        _check_keys(keys)
        with self._writer_lock():  # held throughout: the workers write under the coordinator's lock
            todo = self._begin(keys)
            if todo is None:
                return 0, 0
            start = self.rows
            lease = self._take_lease()
            jobs = [
                ShardJob(shard, todo[shard.start - start : shard.stop - start], lease)
                for shard in plan_shards(start, start + len(todo), self.chunk_rows, shard_chunks)
            ]
            pending = [job for job in jobs if not self._shard_done(job, keys)]
            run(pending)
            undone = [job.shard.name for job in jobs if not self._shard_done(job, keys)]
            if undone:
                raise ShardsFailedError(f"{self.path}: shards {undone} have no valid done marker after the run")
            self._set_attrs(rows=start + len(todo))
            self._publish()
        return sum(len(job.indices) for job in pending), len(todo)

    def _begin(self, keys: np.ndarray) -> np.ndarray | None:
        """Under the writer lock: the indices of the keys to store, the arrays grown to hold them; None if complete."""
        self._load()  # another writer may have committed rows since this store was opened
        todo = self.missing(keys)
        if len(todo) == 0 and self.complete:
            return None
        (self.path / MARKER).unlink(missing_ok=True)
        self._set_attrs(complete=False)
        end = self.rows + len(todo)
        self._keys.resize((end, KEY_BYTES))
        for tap, array in self._features.items():
            array.resize((end, *self.tap_shapes[tap]))
        return todo

    def write_rows(self, start: int, keys: np.ndarray, feats: Features) -> None:
        """Write rows `start..start+len(keys)` of every tap, then their keys; commits nothing (`rows` is unchanged)."""
        feats = self._checked(feats, len(keys))
        for tap, array in feats.items():
            self._refuse_unstorable(tap, array, start)
        stop = start + len(keys)
        for tap, array in self._features.items():
            array[start:stop] = feats[tap].astype(array.dtype, copy=False)
        self._keys[start:stop] = keys

    def _refuse_unstorable(self, tap: str, array: np.ndarray, start: int) -> None:
        """NaN or infinity (from the network), or for float16 a value past its range, raise naming tap and rows.

        The fast path is two reductions (min and max: NaN and infinities propagate into them), with no
        temporary the size of the chunk; the rows are located only when something is wrong.
        """
        if array.size == 0:
            return
        lo, hi = float(array.min()), float(array.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = non_finite_rows(array)
            raise NonFiniteError(
                f"{self.path}: the source network emitted NaN or infinite activations at {tap!r} for "
                f"{len(bad)} image(s), store rows {(start + bad)[:10].tolist()}; nothing of them is stored "
                "(check the weights and the images: a backbone that emits them cannot be transferred from)"
            )
        if self.dtype == "float16" and max(-lo, hi) > FLOAT16_MAX:
            bad = np.flatnonzero((np.abs(array.reshape(len(array), -1)) > FLOAT16_MAX).any(axis=1))
            raise OutOfRangeError(
                f"{self.path}: activations at {tap!r} range over [{lo:.6g}, {hi:.6g}] for store rows "
                f"{(start + bad)[:10].tolist()} ({len(bad)} image(s)), beyond float16's largest value "
                f"{FLOAT16_MAX:g}: stored as float16 they would become infinite; nothing of them is stored. "
                "Store this source as float32 (extract.dtype: float32)"
            )

    # --- sharded writing (worker side) ------------------------------------------------------------

    def _take_lease(self) -> str:
        """Under the writer lock: a fresh lease for this sharded extension, written where every worker must see it."""
        lease = {"nonce": os.urandom(16).hex(), "host": socket.gethostname(), "pid": os.getpid()}
        (self.path / SHARDS).mkdir(exist_ok=True)
        with atomic_write(self.path / SHARDS / LEASE) as tmp:
            tmp.write_text(json.dumps(lease))
        return lease["nonce"]

    @classmethod
    def open_shard_writer(cls, path: Path | str, key: str, lease: str) -> FeatureStore:
        """The store a coordinator is extending, for a worker to write one shard into; no lock is taken.

        The coordinator holds the writer lock (a lock of its own host's file system) and gives each
        shard (whole chunks) to one worker, so no chunk file has two writers. `key` guards against
        writing into another extractor's store, `lease` against a worker that sees another copy of
        it (a Dask worker on a machine without the project's file system): such a worker is refused.
        """
        path = Path(path)
        where = f"worker on host {socket.gethostname()!r}"
        if not (path / "zarr.json").is_file():
            raise StoreError(
                f"{path}: no feature store here for the {where}; Dask workers must see the project folder at the "
                "same path (a shared file system), or run with extract.runner: local"
            )
        store = cls(path, "r+")
        if store._attrs.get("store_key") != key:
            raise ProvenanceError(f"{path}: store key is {store._attrs.get('store_key')!r}, the shard is for {key!r}")
        try:
            held = json.loads((path / SHARDS / LEASE).read_text())
        except (OSError, ValueError):
            held = {}
        if held.get("nonce") != lease:
            raise StoreError(
                f"{path}: the {where} sees a copy of this store that its coordinator is not extending (lease "
                f"{held.get('nonce')!r}, expected {lease!r}); Dask workers must share the project's file system: "
                "the store's writer lock guards only the coordinator's"
            )
        return store

    def write_shard(
        self,
        shard: Shard,
        keys: np.ndarray,
        compute: Callable[[np.ndarray], Features],
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        """Compute and write the shard's chunks, then its done marker (atomically, last).

        `keys` are the shard's rows' keys in order; `compute(positions)` gets positions into them
        for one chunk segment, the same segments `extend` would use, so the features are bitwise
        those of a single-process run. `on_chunk(stop)` runs after each segment (a test hook).
        """
        _check_keys(keys)
        if len(keys) != shard.stop - shard.start:
            raise ValueError(f"shard {shard.name} holds {shard.stop - shard.start} rows, got {len(keys)} keys")
        self._check_aligned(shard)
        for a, b in shard.segments:
            positions = np.arange(a - shard.start, b - shard.start)
            self.write_rows(a, keys[positions], compute(positions))
            if on_chunk is not None:
                on_chunk(b)
        folder = self.path / SHARDS
        folder.mkdir(exist_ok=True)
        with atomic_write(folder / f"{shard.name}.json") as tmp:
            tmp.write_text(json.dumps(_shard_marker(shard, keys), sort_keys=True))

    def _check_aligned(self, shard: Shard) -> None:
        """A shard must own whole chunk files: it starts at a chunk boundary (or the committed rows) and ends at one."""
        r, end = self.chunk_rows, self._keys.shape[0]
        if (
            shard.segments != tuple(chunk_segments(shard.start, shard.stop, r))
            or (shard.start % r and shard.start != self.rows)
            or (shard.stop % r and shard.stop != end)
            or shard.stop > end
        ):
            raise StoreError(
                f"{self.path}: shard {shard.name} (segments {list(shard.segments)}) is not aligned with the store's "
                f"chunks of {r} rows (committed {self.rows}, arrays of {end} rows): two writers would share a "
                "chunk file; plan shards with headstart.store.plan_shards"
            )

    def _shard_done(self, job: ShardJob, keys: np.ndarray) -> bool:
        """The shard's marker names exactly its rows and keys, and those keys are stored there."""
        try:
            marker = json.loads((self.path / SHARDS / f"{job.shard.name}.json").read_text())
        except (FileNotFoundError, ValueError):
            return False
        expected = keys[job.indices]
        if marker != _shard_marker(job.shard, expected):
            return False
        return np.array_equal(np.asarray(self._keys[job.shard.start : job.shard.stop]), expected)

    def _checked(self, feats: Features, n: int) -> dict[str, np.ndarray]:
        """compute()'s result as float32 per tap, every stored tap present with the stored shape."""
        if isinstance(feats, np.ndarray):
            if len(self.taps) != 1:
                raise StoreError(f"{self.path}: holds taps {self.taps}; compute must return one array per tap")
            feats = {self.taps[0]: feats}
        out = {}
        for tap, shape in self.tap_shapes.items():
            if tap not in feats:
                raise StoreError(f"{self.path}: computed features lack tap {tap!r} (got {sorted(feats)})")
            out[tap] = np.asarray(feats[tap], dtype=np.float32)
            if out[tap].shape != (n, *shape):
                raise StoreError(
                    f"{self.path}: computed features at {tap!r} of shape {out[tap].shape}, expected {(n, *shape)}"
                )
        return out

    def _set_attrs(self, **values: Any) -> None:
        self._group.attrs.update(values)
        self._attrs.update(values)
        self._committed = self._index = None

    def _publish(self) -> None:
        """Mark complete: the attribute, then the marker file (atomically, last)."""
        self._set_attrs(complete=True)
        shutil.rmtree(self.path / SHARDS, ignore_errors=True)  # committed: the shard markers are spent
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
        with open(self.path / LOCK, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "a process that has not written its name yet"
                raise StoreError(
                    f"{self.path}: another process is extracting into this store ({holder}); wait for it, "
                    "or stop it: its committed rows are kept"
                ) from None
            try:
                f.truncate(0)
                f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
                f.flush()
                yield
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                raise StoreError(
                    f"{self.path}: the disk is full; the {self.rows} rows committed so far are kept: free space "
                    "and rerun the extract stage, which resumes after them"
                ) from err
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _decodes(array: zarr.Array, start: int, stop: int) -> bool:
    try:
        array[start:stop]
    except Exception:
        return False
    return True


def _shard_marker(shard: Shard, keys: np.ndarray) -> dict[str, Any]:
    """What a shard's done marker holds: its rows and the fingerprint of the keys written there."""
    return {"start": shard.start, "stop": shard.stop, "keys_sha256": sha256_bytes(np.ascontiguousarray(keys).tobytes())}


def _tap_shapes(
    taps: Sequence[str], shapes: Mapping[str, tuple[int, ...]] | tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """`shapes` for exactly `taps`, in their order; a bare shape is accepted for a single tap."""
    if not isinstance(shapes, Mapping):
        if len(taps) != 1:
            raise ValueError(f"taps {list(taps)}: give one activation shape per tap, got the single shape {shapes}")
        shapes = {taps[0]: shapes}
    if set(shapes) != set(taps):
        raise ValueError(f"activation shapes given for {sorted(shapes)}, but the taps are {list(taps)}")
    return {tap: tuple(int(d) for d in shapes[tap]) for tap in taps}
