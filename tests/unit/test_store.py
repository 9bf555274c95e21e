"""The Zarr feature store: provenance checked on open, incremental append, completion marker, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from headstart.extraction import provenance
from headstart.fingerprint import row_keys
from headstart.images import Preprocess
from headstart.store import (
    MARKER,
    FeatureStore,
    IncompleteStoreError,
    MissingRowsError,
    ProvenanceError,
    StoreError,
    rows_per_chunk,
    store_path,
)

PRE = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))
SHAPE = (3, 4)
CHUNK = 8


def prov(cut: str = "block2") -> dict:
    return provenance("ab" * 32, "fmnist_cnn", cut, PRE)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 6, 6), dtype=np.uint8)


def expected_features(keys: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for a network: features derived from each key's bytes."""
    return (keys[:, :12].astype(np.float32) / 7.0).reshape(-1, *SHAPE)


class Counter:
    """compute() for FeatureStore.extend that records the size of every segment it is asked for."""

    def __init__(self, keys: np.ndarray, fail_after: int | None = None):
        self.keys = keys
        self.segments: list[int] = []
        self.fail_after = fail_after

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        if self.fail_after is not None and len(self.segments) >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.segments.append(len(idx))
        return expected_features(self.keys[idx])

    @property
    def rows(self) -> int:
        return sum(self.segments)


def new_store(root: Path, p: dict | None = None) -> FeatureStore:
    p = p or prov()
    return FeatureStore.open_or_create(store_path(root, p), p, SHAPE, CHUNK)


def test_rows_per_chunk_targets_the_chunk_size() -> None:
    assert rows_per_chunk((64, 7, 7), 4.0, 250) == 250  # 334 rows of 12544 B fit in 4 MiB
    assert rows_per_chunk((1280,), 4.0, 250) == 750
    assert rows_per_chunk((1280,), 4.0, 1000) == 819  # fewer rows than a batch: kept as is
    assert rows_per_chunk((10_000_000,), 1.0, 16) == 1


def test_read_returns_features_in_the_order_of_the_keys(tmp_path: Path) -> None:
    keys = row_keys(images(50))
    store = new_store(tmp_path)
    assert store.extend(keys, Counter(keys)) == 50
    reader = FeatureStore.open(store.path, prov())
    assert reader.rows == 50 and reader.feature_shape == SHAPE
    pick = np.random.default_rng(1).permutation(50)[:30]
    pick = np.concatenate([pick, pick[:3]])  # repeats are fine
    np.testing.assert_array_equal(reader.read(keys[pick]), expected_features(keys[pick]))
    assert reader.read(keys[:0]).shape == (0, *SHAPE)


def test_extend_computes_only_new_keys_in_chunk_aligned_segments(tmp_path: Path) -> None:
    first = row_keys(images(10))
    store = new_store(tmp_path)
    assert store.extend(first, Counter(first)) == 10

    more = np.concatenate([first, row_keys(images(10, seed=1))])
    count = Counter(more)
    assert store.extend(more, count) == 10
    # rows 10..16 finish the partial chunk, 16..20 start the next: segments follow chunk boundaries
    assert count.segments == [6, 4]
    assert count.rows == 10
    again = Counter(more)
    assert store.extend(more, again) == 0 and again.rows == 0
    reader = FeatureStore.open(store.path, prov())
    np.testing.assert_array_equal(reader.read(more), expected_features(more))


def test_duplicate_images_are_stored_once(tmp_path: Path) -> None:
    imgs = images(12)
    imgs = np.concatenate([imgs, imgs[[0, 5, 5]]])
    keys = row_keys(imgs)
    store = new_store(tmp_path)
    assert store.extend(keys, Counter(keys)) == 12
    reader = FeatureStore.open(store.path, prov())
    assert reader.rows == 12
    got = reader.read(keys)
    np.testing.assert_array_equal(got[12], got[0])
    np.testing.assert_array_equal(got[14], got[5])


def test_missing_keys_are_an_error_that_says_how_many(tmp_path: Path) -> None:
    keys = row_keys(images(5))
    store = new_store(tmp_path)
    store.extend(keys[:3], Counter(keys))
    reader = FeatureStore.open(store.path, prov())
    with pytest.raises(MissingRowsError, match=r"2 of 5 keys have no stored features.*extract"):
        reader.read(keys)
    with pytest.raises(ValueError, match=r"uint8 of shape \(n, 32\)"):
        reader.read(np.zeros((2, 16), dtype=np.uint8))


def test_another_extractors_store_is_refused_naming_attribute_and_values(tmp_path: Path) -> None:
    keys = row_keys(images(4))
    store = new_store(tmp_path)
    store.extend(keys, Counter(keys))
    with pytest.raises(ProvenanceError, match=r"'taps' is \['block2'\] but the extractor has \['block1'\]") as err:
        FeatureStore.open(store.path, prov(cut="block1"))
    assert str(store.path) in str(err.value)

    zarr.open_group(store.path, mode="r+").attrs.update({"weights_sha256": "cd" * 32})
    with pytest.raises(
        ProvenanceError, match=rf"'weights_sha256' is '{'cd' * 32}' but the extractor has '{'ab' * 32}'"
    ):
        FeatureStore.open(store.path, prov())
    with pytest.raises(ProvenanceError):
        FeatureStore.open_or_create(store.path, prov(), SHAPE, CHUNK)


def test_feature_shape_mismatch_is_refused(tmp_path: Path) -> None:
    new_store(tmp_path)
    with pytest.raises(StoreError, match=r"shape \(3, 4\), the extractor gives \(5,\)"):
        FeatureStore.open_or_create(store_path(tmp_path, prov()), prov(), (5,), CHUNK)


def test_store_without_a_valid_marker_is_not_complete(tmp_path: Path) -> None:
    keys = row_keys(images(20))
    store = new_store(tmp_path)
    assert not store.complete  # freshly created, nothing published
    with pytest.raises(IncompleteStoreError, match="no COMMITTED.json"):
        FeatureStore.open(store.path, prov())
    store.extend(keys, Counter(keys))
    marker = store.path / MARKER
    good = marker.read_text()
    assert FeatureStore.open(store.path, prov()).complete

    marker.unlink()
    with pytest.raises(IncompleteStoreError, match=rf"{store.path}.*no COMMITTED.json.*run the extract stage"):
        FeatureStore.open(store.path, prov())

    stale = json.loads(good) | {"rows": 8}
    marker.write_text(json.dumps(stale))
    with pytest.raises(IncompleteStoreError, match="stale: it records 8 rows, attribute 'rows' is 20"):
        FeatureStore.open(store.path, prov())

    marker.write_text(json.dumps(json.loads(good) | {"keys_sha256": "0" * 64}))
    with pytest.raises(IncompleteStoreError, match="keys fingerprint does not match"):
        FeatureStore.open(store.path, prov())

    marker.write_text(good)
    zarr.open_group(store.path, mode="r+").attrs.update({"complete": False})
    with pytest.raises(IncompleteStoreError, match="'complete' is not true"):
        FeatureStore.open(store.path, prov())


def test_interrupted_extend_commits_whole_chunks_and_resumes_without_recomputing(tmp_path: Path) -> None:
    keys = row_keys(images(30))
    store = new_store(tmp_path)
    crash = Counter(keys, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        store.extend(keys, crash)
    assert crash.rows == 2 * CHUNK
    with pytest.raises(IncompleteStoreError):
        FeatureStore.open(store.path, prov())
    again = new_store(tmp_path)
    assert again.rows == 2 * CHUNK and not again.complete
    resume = Counter(keys)
    assert again.extend(keys, resume) == 30 - 2 * CHUNK
    assert resume.segments == [8, 6]
    reader = FeatureStore.open(store.path, prov())
    np.testing.assert_array_equal(reader.read(keys), expected_features(keys))
    np.testing.assert_array_equal(reader.committed_keys(), keys)


@pytest.mark.faults
def test_one_writer_at_a_time(tmp_path: Path) -> None:
    keys = row_keys(images(10))
    first = new_store(tmp_path)
    second = new_store(tmp_path)
    errors: list[Exception] = []

    def compute(idx: np.ndarray) -> np.ndarray:
        try:
            second.extend(keys, Counter(keys))
        except StoreError as err:
            errors.append(err)
        return expected_features(keys[idx])

    first.extend(keys, compute)
    assert errors and "another process is extracting" in str(errors[0])


@pytest.mark.faults
def test_corrupt_chunk_raises(tmp_path: Path) -> None:
    keys = row_keys(images(20))
    store = new_store(tmp_path)
    store.extend(keys, Counter(keys))
    chunk = store.path / "features" / "block2" / "c" / "1" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    reader = FeatureStore.open(store.path, prov())
    np.testing.assert_array_equal(reader.read(keys[:8]), expected_features(keys[:8]))  # chunk 0 is intact
    with pytest.raises(StoreError, match=r"features/block2: rows 8\.\.16 unreadable"):
        reader.read(keys[10:11])


# --- several taps in one store -----------------------------------------------------------------

TAPS = {"block1": (2, 3), "block2": (3, 4), "fc1": (5,)}


def tap_features(keys: np.ndarray) -> dict[str, np.ndarray]:
    """Per-tap stand-ins derived from the keys, different at every tap."""
    base = keys.astype(np.float32)
    return {
        "block1": (base[:, :6] / 3.0).reshape(-1, 2, 3),
        "block2": expected_features(keys),
        "fc1": -base[:, 20:25],
    }


def multi_prov(taps: list[str] | None = None) -> dict:
    return provenance("ab" * 32, "fmnist_cnn", taps or list(TAPS), PRE)


def test_one_store_holds_every_tap_and_readers_pick_any(tmp_path: Path) -> None:
    keys = row_keys(images(21))
    p = multi_prov()
    store = FeatureStore.open_or_create(store_path(tmp_path, p), p, TAPS, CHUNK)
    assert store.extend(keys, lambda idx: tap_features(keys[idx])) == 21
    attrs = zarr.open_group(store.path, mode="r").attrs
    assert attrs["taps"] == ["block1", "block2", "fc1"]  # the tap list is part of the provenance (and the key)
    assert store.path == store_path(tmp_path, p) != store_path(tmp_path, multi_prov(["block2"]))
    group = zarr.open_group(store.path, mode="r")
    assert {group[f"features/{t}"].chunks[0] for t in TAPS} == {CHUNK}  # every array chunks rows alike

    expected = tap_features(keys)
    everything = FeatureStore.open(store.path, p)
    for tap in TAPS:
        np.testing.assert_array_equal(everything.read(keys, tap), expected[tap])
    with pytest.raises(ValueError, match="name the one to read"):
        everything.read(keys)
    with pytest.raises(KeyError, match="no stored activations at 'pool'"):
        everything.read(keys, "pool")

    one = FeatureStore.open(store.path, multi_prov(["fc1"]))  # a reader asks only for what it needs
    assert one.feature_shape == (5,)
    np.testing.assert_array_equal(one.read(keys[::-1]), expected["fc1"][::-1])
    with pytest.raises(ProvenanceError, match=r"no stored activations at \['pool'\].*taps and run the extract"):
        FeatureStore.open(store.path, multi_prov(["block2", "pool"]))


def test_writer_must_match_the_tap_list_and_compute_every_tap(tmp_path: Path) -> None:
    keys = row_keys(images(5))
    p = multi_prov()
    store = FeatureStore.open_or_create(store_path(tmp_path, p), p, TAPS, CHUNK)
    with pytest.raises(ProvenanceError, match="'taps'"):
        FeatureStore.open_or_create(store.path, multi_prov(["block2"]), TAPS["block2"], CHUNK)
    with pytest.raises(StoreError, match=r"lack tap 'fc1'"):
        store.extend(keys, lambda idx: {k: v for k, v in tap_features(keys[idx]).items() if k != "fc1"})
    with pytest.raises(StoreError, match=r"at 'block1' of shape \(5, 6\), expected \(5, 2, 3\)"):
        store.extend(keys, lambda idx: tap_features(keys[idx]) | {"block1": np.zeros((len(idx), 6))})
    with pytest.raises(ValueError, match="one activation shape per tap"):
        FeatureStore.open_or_create(tmp_path / "other.zarr", p, (3, 4), CHUNK)
    assert not FeatureStore.open_or_create(store.path, p, TAPS, CHUNK).complete  # nothing half-written published


def test_interrupted_multi_tap_extend_resumes_every_tap_from_the_same_chunk(tmp_path: Path) -> None:
    keys = row_keys(images(30))
    p = multi_prov()
    calls: list[int] = []

    def crash_after_two(idx: np.ndarray) -> dict[str, np.ndarray]:
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(len(idx))
        return tap_features(keys[idx])

    store = FeatureStore.open_or_create(store_path(tmp_path, p), p, TAPS, CHUNK)
    with pytest.raises(KeyboardInterrupt):
        store.extend(keys, crash_after_two)
    again = FeatureStore.open_or_create(store.path, p, TAPS, CHUNK)
    assert again.rows == 2 * CHUNK and not again.complete
    assert again.extend(keys, lambda idx: tap_features(keys[idx])) == 30 - 2 * CHUNK
    reader = FeatureStore.open(store.path, p)
    for tap, values in tap_features(keys).items():
        np.testing.assert_array_equal(reader.read(keys, tap), values)


@pytest.mark.faults
def test_non_finite_activations_are_refused_when_written_and_when_read(tmp_path: Path) -> None:
    from headstart.store import NonFiniteError

    keys = row_keys(images(20))

    def emits_nan(idx: np.ndarray) -> np.ndarray:
        feats = expected_features(keys[idx])
        feats[idx == 13] = np.nan  # image 13: a backbone that overflows on it
        return feats

    store = new_store(tmp_path)
    with pytest.raises(
        NonFiniteError, match=r"NaN or infinite activations at 'block2' for 1 image\(s\), store rows \[13\]"
    ):
        store.extend(keys, emits_nan)
    assert store.extend(keys, Counter(keys)) == 12  # the first chunk (rows 0..7) was kept; 8..19 redone
    reader = FeatureStore.open(store.path, prov())
    np.testing.assert_array_equal(reader.read(keys), expected_features(keys))
    # a row altered on disk afterwards: every read of it says which rows and what to do
    array = zarr.open_group(str(store.path), mode="r+")["features"]["block2"]
    array[5, 0, 0] = np.inf
    with pytest.raises(NonFiniteError, match=r"block2: stored rows \[5\] \(1 in all\) hold NaN or infinite.*rerun"):
        FeatureStore.open(store.path, prov()).read(keys[3:7])
    with pytest.raises(IncompleteStoreError):  # until the extract stage repairs it (tests/faults)
        FeatureStore.open(store.path, prov())
