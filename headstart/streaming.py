"""Stored activations as a training loop's `Inputs`: loaded whole, or streamed chunk by chunk with bounded read-ahead.

A split's activations at one tap may not fit in memory (a million `block2` rows are 12.5 GB), so
`StoredRows` can stream them: a background thread decodes the chunks an epoch visits, at most
`read_ahead` ahead of training, into one window's buffer at a time. Loaded or streamed, the rows
come in the order headstart.order draws from the chunk layout, and every batch and prediction
batch holds the same rows as fresh tensors, so the two modes give bitwise the same metrics.
Chunks are read with `FeatureStore.read`, so a damaged chunk raises (and condemns the store)
exactly as a whole read does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from headstart.config import StreamParams
from headstart.extraction import sample_keys
from headstart.order import epoch_windows, window_rows
from headstart.records import ExtractRecord
from headstart.store import KEY_BYTES, FeatureStore, MissingRowsError
from headstart.views import augmented_keys

Batch = tuple[torch.Tensor, torch.Tensor]
"""Row indices and their inputs."""
Piece = tuple[np.ndarray, np.ndarray]
"""Positions in a segment's buffer and the row indices whose activations go there (all in one chunk)."""
_POLL_S = 0.1
"""How often a reader waiting for room checks whether its consumer has gone."""


def store_rows(store: FeatureStore, keys: np.ndarray) -> np.ndarray:
    """The committed store row holding each key, without a per-key Python object (a million keys stay small)."""
    as_void = np.dtype((np.void, KEY_BYTES))
    stored = np.ascontiguousarray(store.committed_keys()).view(as_void).ravel()
    wanted = np.ascontiguousarray(keys).view(as_void).ravel()
    by_key = np.argsort(stored, kind="stable")
    at = np.minimum(np.searchsorted(stored[by_key], wanted), max(len(stored) - 1, 0))
    found = stored[by_key[at]] == wanted if len(stored) else np.zeros(len(wanted), dtype=bool)
    if not found.all():
        raise MissingRowsError(
            f"{store.path}: {int((~found).sum())} of {len(keys)} keys have no stored features; "
            "run the extract stage on this data first"
        )
    return by_key[at]


def rebatch(pieces: Iterable[Batch], batch_size: int) -> Iterator[Batch]:
    """Consecutive (indices, inputs) pieces cut into batches of `batch_size` rows (the last may be short).

    The batches are those of the pieces' concatenated order, as fresh tensors: a view into a
    buffer would start at another memory alignment than a gathered batch, which can change the
    arithmetic (and so the metrics) of the layer it feeds.
    """
    held: list[Batch] = []
    count = 0
    for idx, x in pieces:
        start = 0
        while start < len(idx):
            take = min(batch_size - count, len(idx) - start)
            held.append((idx[start : start + take], x[start : start + take]))
            count, start = count + take, start + take
            if count == batch_size:
                yield _joined(held)
                held, count = [], 0
    if held:
        yield _joined(held)


def _joined(parts: Sequence[Batch]) -> Batch:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class StoredRows:
    """One split's stored activations at one tap, as `headstart.fit.Inputs`: loaded or streamed (`StreamParams`)."""

    def __init__(self, store: FeatureStore, keys: np.ndarray, tap: str, params: StreamParams):
        self._store, self._keys, self._tap = store, keys, tap
        self._row_shape = store.tap_shapes[tap]
        self._chunk_of = store_rows(store, keys) // store.chunk_rows
        self.window_rows = window_rows(params.window_mb, self._row_shape)
        self.read_ahead = params.read_ahead
        self.streamed = params.mode == "always" or (params.mode == "auto" and len(keys) > self.window_rows)
        self._loaded = None if self.streamed else torch.from_numpy(store.read(keys, tap))

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._keys), *self._row_shape)

    def __len__(self) -> int:
        return len(self._keys)

    def shuffled(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """The epoch's batches in headstart.order's order (the windows are drawn before the first batch)."""
        windows = epoch_windows(self._chunk_of, self.window_rows, generator)
        if self._loaded is None:
            yield from rebatch(zip(windows, self._read(windows), strict=True), batch_size)
            return
        order = torch.cat(windows)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield idx, self._loaded[idx]

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Rows 0, 1, ... in batches; streamed, a window of whole batches at a time."""
        if self._loaded is not None:
            for i in range(0, len(self), batch_size):
                yield self._loaded[i : i + batch_size].clone()  # fresh, as the streamed batches are
            return
        step = max(batch_size, self.window_rows // batch_size * batch_size)
        segments = [torch.arange(a, min(a + step, len(self))) for a in range(0, len(self), step)]
        for buffer in self._read(segments):
            for i in range(0, len(buffer), batch_size):
                yield buffer[i : i + batch_size].clone()

    def _pieces(self, segment: torch.Tensor) -> list[Piece]:
        """The segment's rows grouped by store chunk: one `FeatureStore.read` each."""
        rows = segment.numpy()
        chunks = self._chunk_of[rows]
        by_chunk = np.argsort(chunks, kind="stable")
        bounds = np.flatnonzero(np.diff(chunks[by_chunk])) + 1
        return [(p, rows[p]) for p in np.split(by_chunk, bounds)]

    def _read(self, segments: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Each segment's rows (indices, in that order) as one buffer; a background thread decodes the chunks.

        The thread decodes at most `read_ahead` chunks that the buffer being filled has not taken
        yet, so memory stays at the buffers in use plus `read_ahead` chunks' rows. Its errors are
        raised here, at the buffer that needed the chunk; a consumer that stops early stops it.
        """
        plans = [self._pieces(s) for s in segments]
        room = threading.Semaphore(self.read_ahead)
        gone = threading.Event()
        decoded: queue.SimpleQueue[Piece | BaseException] = queue.SimpleQueue()

        def decode() -> None:
            try:
                for plan in plans:
                    for positions, rows in plan:
                        while not room.acquire(timeout=_POLL_S):
                            if gone.is_set():
                                return
                        if gone.is_set():
                            return
                        decoded.put((positions, self._store.read(self._keys[rows], self._tap)))
            except BaseException as err:  # handed to the consumer, which raises it
                decoded.put(err)

        reader = threading.Thread(target=decode, name=f"store-reader-{self._tap}", daemon=True)
        reader.start()
        try:
            for segment, plan in zip(segments, plans, strict=True):
                buffer = np.empty((len(segment), *self._row_shape), dtype=np.float32)
                for _ in plan:
                    item = decoded.get()
                    if isinstance(item, BaseException):
                        raise item
                    buffer[item[0]] = item[1]  # numpy's row scatter: many times torch's index_put here
                    room.release()
                yield torch.from_numpy(buffer)
        finally:
            gone.set()
            reader.join()


def stored_rows(record: ExtractRecord, images: np.ndarray, tap: str, params: StreamParams) -> StoredRows:
    """The stored activations at `tap` for these uint8 images, in their order, read as `params` say.

    The store is opened as `headstart.extraction.stored_features` opens it: provenance checked, complete.
    """
    return keyed_rows(record, sample_keys(images), tap, params)


def keyed_rows(record: ExtractRecord, keys: np.ndarray, tap: str, params: StreamParams) -> StoredRows:
    """The stored activations at `tap` of the rows with these keys (images, or their views: headstart.views)."""
    store = FeatureStore.open(record.store_dir(), record.provenance_for(tap))
    return StoredRows(store, keys, tap, params)


class ViewedRows:
    """One split's stored rows with K augmented views of each image, as `headstart.fit.Inputs`.

    Every epoch first draws, per image, which of its K + 1 rows (plain or a view) it contributes,
    then shuffles the images exactly as `StoredRows` would: seeded, so the same seed trains the same
    head. When all K + 1 rows fit in one window they are loaded once; otherwise each epoch reads
    (loaded or streamed, as `StoredRows` decides) only the rows it drew, so memory stays one split's.
    Prediction (`in_order`) reads the plain rows.
    """

    def __init__(self, store: FeatureStore, key_sets: Sequence[np.ndarray], tap: str, params: StreamParams):
        self._store, self._sets, self._tap, self._params = store, list(key_sets), tap, params
        self._row_shape = store.tap_shapes[tap]
        n, k = len(key_sets[0]), len(key_sets)
        fits = params.mode != "always" and n * k <= window_rows(params.window_mb, self._row_shape)
        self._loaded = None
        if fits:
            self._loaded = torch.from_numpy(store.read(np.concatenate(self._sets), tap)).view(k, n, *self._row_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._row_shape)

    def __len__(self) -> int:
        return len(self._sets[0])

    def shuffled(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        n = len(self)
        pick = torch.randint(len(self._sets), (n,), generator=generator)
        if self._loaded is None:
            keys = np.stack(self._sets)[pick.numpy(), np.arange(n)]
            yield from StoredRows(self._store, keys, self._tap, self._params).shuffled(batch_size, generator)
            return
        order = torch.randperm(n, generator=generator)  # what StoredRows draws for a split within one window
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield idx, self._loaded[pick[idx], idx]

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        if self._loaded is None:
            yield from StoredRows(self._store, self._sets[0], self._tap, self._params).in_order(batch_size)
            return
        for i in range(0, len(self), batch_size):
            yield self._loaded[0, i : i + batch_size].clone()


def viewed_rows(record: ExtractRecord, images: np.ndarray, tap: str, params: StreamParams) -> StoredRows | ViewedRows:
    """The training split's stored activations with the store's augmented views; plain `StoredRows` without views."""
    if not record.views:
        return stored_rows(record, images, tap, params)
    store = FeatureStore.open(record.store_dir(), record.provenance_for(tap))
    return ViewedRows(store, augmented_keys(sample_keys(images), record.views, record.augment_digest), tap, params)
