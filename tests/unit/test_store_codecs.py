"""The store's codec and dtype (extract.codec, extract.dtype): round trips, provenance, damage detection, errors."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from headstart.config import ParamsError, StoreCodec, StoreDtype, load_params
from headstart.extraction import provenance
from headstart.fingerprint import row_keys
from headstart.images import Preprocess
from headstart.store import (
    CODECS,
    DTYPES,
    FeatureStore,
    OutOfRangeError,
    ProvenanceError,
    StoreError,
    store_path,
)

REPO = Path(__file__).resolve().parents[2]
PRE = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))
SHAPE = (4, 5)
CHUNK = 8
PAIRS = [(codec, dtype) for codec in CODECS for dtype in DTYPES]


def prov(dtype: str) -> dict:
    return provenance("ab" * 32, "fmnist_cnn", "block2", PRE, dtype)


def keys_of(n: int) -> np.ndarray:
    return row_keys(np.random.default_rng(0).integers(0, 256, size=(n, 6, 6), dtype=np.uint8))


def values(n: int) -> np.ndarray:
    """Post-ReLU-like activations: many zeros, the rest with more digits than float16 keeps."""
    x = np.random.default_rng(1).normal(0.0, 3.0, size=(n, *SHAPE)).astype(np.float32)
    return np.maximum(x, 0.0)


def filled(root: Path, codec: str, dtype: str, feats: np.ndarray) -> FeatureStore:
    keys = keys_of(len(feats))
    p = prov(dtype)
    store = FeatureStore.open_or_create(store_path(root, p), p, SHAPE, CHUNK, codec)
    store.extend(keys, lambda idx: feats[idx])
    return store


def test_the_params_offer_exactly_the_stores_codecs_and_dtypes() -> None:
    assert get_args(StoreCodec) == tuple(CODECS) and get_args(StoreDtype) == DTYPES


@pytest.mark.parametrize(("codec", "dtype"), PAIRS)
def test_every_codec_and_dtype_round_trips_and_reads_as_float32(tmp_path: Path, codec: str, dtype: str) -> None:
    feats = values(20)
    store = filled(tmp_path, codec, dtype, feats)
    reader = FeatureStore.open(store.path, prov(dtype))
    got = reader.read(keys_of(20))
    assert got.dtype == np.float32 and reader.dtype == dtype and reader.codec == codec
    expected = feats if dtype == "float32" else feats.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, expected)  # float32 bitwise; float16 exactly its rounding of the values
    if dtype == "float16":
        np.testing.assert_allclose(got, feats, rtol=2**-11, atol=0)
    assert reader.scan() == []


@pytest.mark.parametrize("codec", list(CODECS))
def test_a_damaged_chunk_is_found_under_every_codec(tmp_path: Path, codec: str) -> None:
    store = filled(tmp_path, codec, "float16", values(20))
    chunk = store.path / "features" / "block2" / "c" / "1" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    damage = FeatureStore(store.path, "r").scan()
    assert [(d.array, d.start, d.stop) for d in damage] == [("features/block2", 8, 16)]
    reader = FeatureStore.open(store.path, prov("float16"))
    with pytest.raises(StoreError, match=r"features/block2: rows 8\.\.16 unreadable"):
        reader.read(keys_of(20)[10:11])


def test_the_dtype_is_provenance_the_codec_is_not(tmp_path: Path) -> None:
    assert store_path(tmp_path, prov("float16")) != store_path(tmp_path, prov("float32"))
    half = filled(tmp_path, "lz4", "float16", values(10))
    with pytest.raises(ProvenanceError, match=r"attribute 'dtype' is 'float16' but the extractor has 'float32'"):
        FeatureStore.open(half.path, prov("float32"))
    # another codec asked of an existing store: the same store, kept as it was made, still complete
    again = FeatureStore.open_or_create(half.path, prov("float16"), SHAPE, CHUNK, "zstd-3")
    assert again.codec == "lz4" and again.complete


def test_float16_overflow_is_refused_naming_tap_range_and_the_fix(tmp_path: Path) -> None:
    feats = values(16)
    feats[11, 0, 0] = 70_000.0  # beyond float16's 65504: it would be stored as infinity
    p = prov("float16")
    store = FeatureStore.open_or_create(store_path(tmp_path, p), p, SHAPE, CHUNK, "none")
    with pytest.raises(
        OutOfRangeError, match=r"'block2' range over \[0, 70000\] for store rows \[11\].*extract.dtype: float32"
    ):
        store.extend(keys_of(16), lambda idx: feats[idx])
    assert FeatureStore(store.path, "r").rows == 8  # the first chunk was fine and is kept; nothing of the second
    as_float32 = filled(tmp_path, "none", "float32", feats)
    assert FeatureStore.open(as_float32.path, prov("float32")).read(keys_of(16))[11, 0, 0] == 70_000.0


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("codec", "gzip", "'none', 'lz4', 'zstd-1' or 'zstd-3'"), ("dtype", "float64", "'float32' or 'float16'")],
)
def test_bad_codec_or_dtype_params_name_the_key_and_the_choices(key: str, value: str, expected: str) -> None:
    with pytest.raises(ParamsError) as err:
        load_params(REPO / "params.yaml", {f"extract.{key}": value})
    assert f"extract.{key}: Input should be {expected} (got {value!r})" in str(err.value)
