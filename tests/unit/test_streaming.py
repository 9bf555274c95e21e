"""Streamed head training: the metrics of in-memory training, a bounded read-ahead, damaged chunks refused."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import zarr

from headstart import strategies
from headstart.config import HeadParams, OptimParams, StreamParams
from headstart.extraction import provenance
from headstart.fingerprint import row_keys
from headstart.fit import predict_logits
from headstart.images import Preprocess
from headstart.order import epoch_windows, window_rows
from headstart.store import MARKER, FeatureStore, MissingRowsError, NonFiniteError, StoreError, store_path
from headstart.strategies import Recipe, train_frozen_head
from headstart.streaming import StoredRows, rebatch

PRE = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))
SHAPE = (12,)
CHUNK = 16
ROWS = 300
OPTIM = OptimParams(epochs=5, batch_size=24, lr=1e-2, patience=10)
LOADED = StreamParams(mode="never", window_mb=40 * 48 / 2**20)
"""In memory, with a window of 40 rows (48 bytes each): several windows per epoch."""
STREAMED = LOADED.model_copy(update={"mode": "always", "read_ahead": 2})


def prov() -> dict:
    return provenance("ab" * 32, "fmnist_cnn", "block2", PRE)


class Stored:
    """A store of ROWS rows of separable clusters (3 classes), and a shuffled train/val split of its rows."""

    def __init__(self, root: Path):
        rng = np.random.default_rng(0)
        self.keys = row_keys(rng.integers(0, 256, size=(ROWS, 5, 5), dtype=np.uint8))
        self.labels = rng.integers(0, 3, ROWS)
        centres = np.random.default_rng(9).normal(0, 2, (3, *SHAPE))
        self.features = (centres[self.labels] + rng.normal(0, 1, (ROWS, *SHAPE))).astype(np.float32)
        store = FeatureStore.open_or_create(store_path(root, prov()), prov(), SHAPE, CHUNK)
        store.extend(self.keys, lambda idx: self.features[idx])
        self.path = store.path
        order = rng.permutation(ROWS)  # a split's rows are not in store order
        self.train, self.val = order[:200], order[200:260]

    def rows(self, split: np.ndarray, params: StreamParams) -> StoredRows:
        return StoredRows(FeatureStore.open(self.path, prov()), self.keys[split], "block2", params)

    def fit(self, params: StreamParams, seed: int = 3) -> tuple[list[dict], dict[str, torch.Tensor]]:
        train = (self.rows(self.train, params), self.labels[self.train])
        val = (self.rows(self.val, params), self.labels[self.val])
        head, result = train_frozen_head(train, val, 3, Recipe(HeadParams(hidden=[8]), OPTIM, seed, "cpu"))
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
        return history, head.state_dict()


@pytest.fixture
def stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Stored:
    # One thread count for both trainings a test compares: head_threads() follows the idle cores, which
    # change under a loaded suite, and one suite run saw the two sides differ in the 9th digit then.
    monkeypatch.setattr(strategies, "head_threads", lambda: 1)
    return Stored(tmp_path)


def test_streamed_and_in_memory_training_give_identical_metrics_and_weights(stored: Stored) -> None:
    rows = stored.rows(stored.train, STREAMED)
    assert rows.streamed and len(epoch_windows(rows._chunk_of, rows.window_rows, torch.Generator())) > 2
    loaded, streamed = stored.fit(LOADED), stored.fit(STREAMED)
    assert streamed[0] == loaded[0]  # exact equality of every epoch's losses and accuracies
    assert all(torch.equal(a, b) for a, b in zip(loaded[1].values(), streamed[1].values(), strict=True))
    assert loaded[0][-1]["val_accuracy"] > 0.9  # it learned: the block shuffle still mixes the classes


def test_a_split_within_one_window_trains_as_the_array_in_memory(stored: Stored) -> None:
    """One window is one permutation of every row: the numbers of training on the plain array, unchanged."""
    whole = StreamParams()  # 1 GiB window: this split is one window, loaded
    train = (stored.features[stored.train], stored.labels[stored.train])
    val = (stored.features[stored.val], stored.labels[stored.val])
    head, result = train_frozen_head(train, val, 3, Recipe(HeadParams(hidden=[8]), OPTIM, 3, "cpu"))
    history, state = stored.fit(whole)
    assert history == [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), state.values(), strict=True))


def test_the_same_seed_gives_the_same_streamed_metrics_another_seed_others(stored: Stored) -> None:
    assert stored.fit(STREAMED, seed=3)[0] == stored.fit(STREAMED, seed=3)[0]
    assert stored.fit(STREAMED, seed=4)[0] != stored.fit(STREAMED, seed=3)[0]


def test_streamed_prediction_reads_the_rows_in_order(stored: Stored) -> None:
    head = torch.nn.Linear(12, 3)
    streamed = predict_logits(head, stored.rows(stored.val, STREAMED), batch_size=7)
    assert torch.equal(streamed, predict_logits(head, stored.rows(stored.val, LOADED), batch_size=7))
    assert torch.equal(streamed, predict_logits(head, stored.features[stored.val], batch_size=7))


def test_every_row_once_in_windows_of_whole_chunks() -> None:
    chunk_of = np.random.default_rng(1).integers(0, 9, 100)
    windows = epoch_windows(chunk_of, 30, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(windows).tolist()) == list(range(100))
    chunks = [set(chunk_of[w.numpy()].tolist()) for w in windows]
    assert all(not (a & b) for i, a in enumerate(chunks) for b in chunks[i + 1 :])  # a chunk lies in one window
    sizes = np.bincount(chunk_of)
    assert all(len(w) <= 30 or len(c) == 1 for w, c in zip(windows, chunks, strict=True))
    assert all(len(w) == sizes[list(c)].sum() for w, c in zip(windows, chunks, strict=True))
    again = epoch_windows(chunk_of, 30, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))
    one = epoch_windows(chunk_of, 100, torch.Generator().manual_seed(5))
    assert len(one) == 1 and torch.equal(one[0], torch.randperm(100, generator=torch.Generator().manual_seed(5)))


def test_window_rows_and_rebatch() -> None:
    assert window_rows(1, (256,)) == 1024 and window_rows(1e-9, (256,)) == 1
    pieces = [(torch.arange(0, 5), torch.arange(0, 5.0)), (torch.arange(5, 12), torch.arange(5, 12.0))]
    batches = list(rebatch(pieces, 4))
    assert [b[0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert all(torch.equal(i.float(), x) for i, x in batches)


def counting(store: FeatureStore) -> list[int]:
    """Count the chunk reads a StoredRows makes through this store (one FeatureStore.read per chunk)."""
    calls: list[int] = []
    read = store.read

    def counted(keys: np.ndarray, tap: str | None = None) -> np.ndarray:
        calls.append(len(keys))
        return read(keys, tap)

    store.read = counted
    return calls


def settled(count: Callable[[], int], wait_s: float = 2.0) -> int:
    """The value `count` stops changing at (the reader thread has filled its read-ahead)."""
    last, deadline = -1, time.monotonic() + wait_s
    while time.monotonic() < deadline:
        now = count()
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    return count()


def test_read_ahead_is_bounded_and_a_stopped_epoch_stops_its_reader(stored: Stored) -> None:
    store = FeatureStore.open(stored.path, prov())
    one_chunk = StreamParams(mode="always", window_mb=CHUNK * 48 / 2**20, read_ahead=2)
    rows = StoredRows(store, stored.keys[np.sort(stored.train)], "block2", one_chunk)
    calls = counting(store)
    batches = rows.shuffled(4, torch.Generator().manual_seed(0))
    next(batches)  # the first window (one chunk) is in; training is slower than reading from here on
    assert settled(lambda: len(calls)) == 1 + one_chunk.read_ahead
    assert len(set(rows._chunk_of.tolist())) > 10  # far more chunks than that to read
    batches.close()
    assert not any(t.name.startswith("store-reader") for t in threading.enumerate())
    assert sum(len(b[0]) for b in rows.shuffled(4, torch.Generator())) == len(rows)  # a whole epoch reads it all


def test_a_damaged_chunk_while_streaming_raises_and_condemns_the_store(stored: Stored) -> None:
    rows = stored.rows(stored.train, STREAMED)
    chunk = stored.path / "features" / "block2" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"(?s)features/block2: rows 16\.\.32 unreadable .*now marked incomplete"):
        list(rows.shuffled(8, torch.Generator()))
    assert not (stored.path / MARKER).exists()  # both orchestrators now rerun extraction, which repairs it
    assert not any(t.name.startswith("store-reader") for t in threading.enumerate())


def test_non_finite_rows_while_streaming_raise_and_condemn_the_store(stored: Stored) -> None:
    rows = stored.rows(stored.val, STREAMED)
    zarr.open_array(stored.path / "features" / "block2", mode="r+")[stored.val[0]] = np.nan  # crc rewritten
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        predict_logits(torch.nn.Linear(12, 3), rows)
    assert not (stored.path / MARKER).exists()


def test_keys_the_store_lacks_are_refused(stored: Stored) -> None:
    unknown = row_keys(np.zeros((2, 5, 5), dtype=np.uint8))
    with pytest.raises(MissingRowsError, match="2 of 3 keys have no stored features"):
        StoredRows(FeatureStore.open(stored.path, prov()), np.concatenate([stored.keys[:1], unknown]), "block2", LOADED)


@pytest.mark.parametrize("bad", [{"mode": "sometimes"}, {"window_mb": 0}, {"read_ahead": 0}, {"ahead": 2}])
def test_stream_params_are_validated(bad: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        StreamParams(**bad)
