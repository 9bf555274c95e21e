"""A damaged feature store is found, named and repaired by rerunning extraction; clashing writers are refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from headstart.fingerprint import row_keys
from headstart.store import (
    MARKER,
    SHARDS,
    TOMBSTONE,
    FeatureStore,
    IncompleteStoreError,
    NonFiniteError,
    Shard,
    StoreError,
    plan_shards,
    store_path,
)
from tests.unit.test_store import CHUNK, SHAPE, Counter, expected_features, images, new_store, prov


def flip_byte(chunk: Path) -> None:
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))


def full_store(root: Path, n: int = 20) -> tuple[FeatureStore, np.ndarray]:
    keys = row_keys(images(n))
    store = new_store(root)
    store.extend(keys, Counter(keys))
    return store, keys


def rerun_extract(store: FeatureStore, keys: np.ndarray) -> tuple[int, int]:
    """What the extract stage does with a store: repair, then extend; (rows repaired, rows appended)."""
    repair, extend = Counter(keys), Counter(keys)
    store.repair(keys, repair)
    store.extend(keys, extend)
    return repair.rows, extend.rows


def test_a_corrupt_feature_chunk_is_named_marks_the_store_and_the_rerun_recomputes_only_its_rows(
    tmp_path: Path,
) -> None:
    store, keys = full_store(tmp_path)
    flip_byte(store.path / "features" / "block2" / "c" / "1" / "0" / "0")
    reader = FeatureStore.open(store.path, prov())
    with pytest.raises(StoreError, match=r"rows 8\.\.16 unreadable .*marked incomplete: rerun the extract stage"):
        reader.read(keys)
    assert not (store.path / MARKER).exists()  # both orchestrators now see the extract output changed
    with pytest.raises(IncompleteStoreError):
        FeatureStore.open(store.path, prov())

    assert rerun_extract(store, keys) == (8, 0)  # exactly the damaged chunk, nothing appended
    repaired = FeatureStore.open(store.path, prov())
    np.testing.assert_array_equal(repaired.read(keys), expected_features(keys))
    assert repaired.scan() == []


def test_scan_names_every_damaged_chunk_with_its_array_and_rows(tmp_path: Path) -> None:
    store, keys = full_store(tmp_path)
    flip_byte(store.path / "features" / "block2" / "c" / "0" / "0" / "0")
    flip_byte(store.path / "keys" / "c" / "2" / "0")
    damage = FeatureStore(store.path, "r").scan()
    assert [(d.array, d.start, d.stop) for d in damage] == [("features/block2", 0, 8), ("keys", 16, 20)]
    assert all("checksum" in d.reason for d in damage)


def test_unreadable_keys_forget_their_rows_and_their_images_are_stored_again(tmp_path: Path) -> None:
    store, keys = full_store(tmp_path)
    flip_byte(store.path / "keys" / "c" / "1" / "0")
    with pytest.raises(IncompleteStoreError, match="stored keys are unreadable"):
        FeatureStore.open(store.path, prov())
    assert not (store.path / MARKER).exists()

    assert rerun_extract(store, keys) == (0, 8)  # rows 8..16 forgotten, their 8 images appended
    repaired = FeatureStore.open(store.path, prov())
    assert repaired.rows == 28
    assert [bytes(k) for k in repaired.committed_keys()[8:16]] == [TOMBSTONE] * 8
    np.testing.assert_array_equal(repaired.read(keys), expected_features(keys))


def test_nan_in_a_stored_row_is_refused_then_recomputed(tmp_path: Path) -> None:
    store, keys = full_store(tmp_path)
    FeatureStore(store.path, "r+")._features["block2"][3] = np.nan
    with pytest.raises(NonFiniteError, match=r"rows \[3\] .*marked incomplete"):
        FeatureStore.open(store.path, prov()).read(keys)
    assert rerun_extract(store, keys) == (8, 0)
    np.testing.assert_array_equal(FeatureStore.open(store.path, prov()).read(keys), expected_features(keys))


def test_damaged_rows_of_images_no_longer_in_the_data_are_forgotten(tmp_path: Path) -> None:
    store, keys = full_store(tmp_path)
    flip_byte(store.path / "features" / "block2" / "c" / "1" / "0" / "0")
    FeatureStore.open(store.path, prov()).condemn()
    kept = np.concatenate([keys[:10], keys[16:]])  # the data now lacks rows 10..16
    assert rerun_extract(store, kept) == (2, 0)
    repaired = FeatureStore.open(store.path, prov())
    np.testing.assert_array_equal(repaired.read(kept), expected_features(kept))
    assert len(repaired.missing(keys)) == 6  # readable again only if recomputed


def test_a_complete_store_is_trusted_without_a_scan(tmp_path: Path) -> None:
    store, keys = full_store(tmp_path)
    flip_byte(store.path / "features" / "block2" / "c" / "1" / "0" / "0")
    assert rerun_extract(store, keys) == (0, 0)  # not yet known to be damaged: nothing read
    assert FeatureStore(store.path, "r").scan()  # what `headstart verify` finds


def test_a_second_writer_is_told_who_holds_the_store(tmp_path: Path) -> None:
    store, keys = full_store(tmp_path)
    more = row_keys(images(30, seed=1))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from pathlib import Path
            from headstart.fingerprint import row_keys
            from tests.unit.test_store import images, new_store

            def compute(idx):
                print("locked", flush=True)
                time.sleep(60)

            new_store(Path({str(tmp_path)!r})).extend(row_keys(images(30, seed=1)), compute)
        """)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"another process .*\(pid {holder.pid} on host {socket.gethostname()}\)"):
            store.extend(more, Counter(more))
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert store.extend(more, Counter(more)) == 30  # the lock died with its holder


def test_shards_not_aligned_with_chunks_are_refused(tmp_path: Path) -> None:
    store, _ = full_store(tmp_path)
    more = row_keys(images(40, seed=2))
    writer = FeatureStore(store.path, "r+")
    writer._begin(more)  # grows the arrays to 60 rows, as a coordinator does
    lease = writer._take_lease()
    worker = FeatureStore.open_shard_writer(store.path, store.path.stem, lease)
    good = plan_shards(20, 60, CHUNK, 2)
    assert good[0].start == 20 and good[0].stop == 32  # the rest of chunk 2, then chunk 3: whole chunk files
    bad = Shard(20, 28, ((20, 28),))  # ends inside chunk 3, which the next shard also writes
    with pytest.raises(StoreError, match=r"shard 20-28 .*not aligned with the store's chunks of 8 rows"):
        worker.write_shard(bad, more[:8], lambda p: expected_features(more[p]))
    worker.write_shard(good[0], more[:12], lambda p: expected_features(more[p]))


def test_a_worker_that_sees_another_copy_of_the_store_is_refused(tmp_path: Path) -> None:
    store, keys = full_store(tmp_path / "here")
    more = row_keys(images(16, seed=3))
    writer = FeatureStore(store.path, "r+")
    writer._begin(more)
    lease = writer._take_lease()
    elsewhere = tmp_path / "there" / store.path.name  # what a worker on another machine would find
    shutil.copytree(store.path, elsewhere)
    (elsewhere / SHARDS / "lease.json").write_text(json.dumps({"nonce": "0" * 32}))
    with pytest.raises(StoreError, match="sees a copy of this store that its coordinator is not extending"):
        FeatureStore.open_shard_writer(elsewhere, store.path.stem, lease)
    with pytest.raises(StoreError, match="must see the project folder at the same path"):
        FeatureStore.open_shard_writer(tmp_path / "nowhere.zarr", store.path.stem, lease)
    FeatureStore.open_shard_writer(store.path, store.path.stem, lease)  # the coordinator's own store


CRASH = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from headstart.fingerprint import row_keys
    from headstart.store import FeatureStore
    from tests.unit.test_store import Counter, images, new_store
    from pathlib import Path

    def die(self):  # the process ends at this point, as under kill -9: no cleanup, no exception handling
        os._exit(137)

    FeatureStore.{point} = die
    keys = row_keys(images(20))
    store = new_store(Path(sys.argv[1]))
    store.extend(keys, Counter(keys))
    """
)


def test_a_crash_between_the_last_chunk_and_the_marker_leaves_an_incomplete_store_that_resumes_for_free(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", CRASH.format(point="_publish"), str(tmp_path)], env=env, timeout=120)
    assert proc.returncode == 137
    (path,) = tmp_path.glob("*.zarr")
    with pytest.raises(IncompleteStoreError, match="no COMMITTED.json"):
        FeatureStore.open(path, prov())
    keys = row_keys(images(20))
    store = FeatureStore.open_or_create(path, prov(), SHAPE, CHUNK)
    assert store.rows == 20 and rerun_extract(store, keys) == (0, 0)  # every chunk committed: nothing recomputed
    np.testing.assert_array_equal(FeatureStore.open(path, prov()).read(keys), expected_features(keys))


def test_a_full_disk_names_the_store_and_the_rerun_resumes(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        keys = row_keys(images(4000, seed=4))
        p = prov()
        wide = (64, 16)  # 4 KiB a row of noise, which zstd cannot shrink: 400 KiB hold about 90 rows
        noise = np.random.default_rng(0).standard_normal((4000, *wide)).astype(np.float32)
        store = FeatureStore.open_or_create(mount / "s.zarr", p, wide, 16)
        with pytest.raises(StoreError, match=r"s\.zarr: the disk is full; the \d+ rows committed so far are kept"):
            store.extend(keys, lambda idx: noise[idx])
        kept = FeatureStore(mount / "s.zarr", "r").rows
        assert kept > 0
        shutil.move(mount / "s.zarr", tmp_path / "s.zarr")  # more space
        store = FeatureStore.open_or_create(tmp_path / "s.zarr", p, wide, 16)
        assert store.extend(keys, lambda idx: noise[idx]) == 4000 - kept
        np.testing.assert_array_equal(FeatureStore.open(tmp_path / "s.zarr", p).read(keys), noise)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


TAP_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from headstart.fingerprint import row_keys
    from tests.unit.test_store import expected_features, images, new_store, prov

    keys = row_keys(images(40))

    def slow(idx):
        time.sleep(0.2)  # both writers are in the middle of their stores at once
        return expected_features(keys[idx])

    store = new_store(Path(sys.argv[1]), prov(sys.argv[2]))
    print(store.path, store.extend(keys, slow), flush=True)
    """
)


def test_two_processes_writing_different_taps_of_one_source_write_separate_stores(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TAP_WRITER, str(tmp_path), tap], stdout=subprocess.PIPE, text=True, env=env
        )
        for tap in ("block1", "block2")
    ]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    paths = {Path(path) for path, _ in outputs}
    assert len(paths) == 2 and [n for _, n in outputs] == ["40", "40"]  # the taps are in the store key
    keys = row_keys(images(40))
    for tap in ("block1", "block2"):
        stored = FeatureStore.open(store_path(tmp_path, prov(tap)), prov(tap)).read(keys)
        np.testing.assert_array_equal(stored, expected_features(keys))
