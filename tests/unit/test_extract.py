"""The extract stage: end to end into a real Zarr store, incremental, and resumed after SIGKILL bitwise equal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from headstart.backbones import create_model, preprocess
from headstart.checkpoints import load_weights
from headstart.config import ExtractParams
from headstart.datasets import SPLITS, Split, TaskData, save_task
from headstart.extraction import extract_taps, provenance, stored_features, stored_taps
from headstart.fingerprint import row_keys
from headstart.images import FMNIST_DECODE, Preprocess
from headstart.records import ExtractRecord, SourceWeights, TaskMeta
from headstart.store import FeatureStore, IncompleteStoreError, ProvenanceError, store_path
from tasks.extract import extract
from tests.tiny import random_cnn_weights

REPO = Path(__file__).resolve().parents[2]
PRE = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))
PARAMS = ExtractParams(batch_size=16, chunk_mb=0.5, device="cpu")  # 12544 B rows: 32-row chunks, 10 per 300


def make_task(n: int = 300, seed: int = 0) -> TaskData:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 5, size=n).astype(np.int64)
    a, b = int(n * 0.6), int(n * 0.8)
    return TaskData(
        "target",
        [f"c{i}" for i in range(5)],
        Split(imgs[:a], labels[:a]),
        Split(imgs[a:b], labels[a:b]),
        Split(imgs[b:], labels[b:]),
    )


def all_images(task: TaskData) -> np.ndarray:
    return np.concatenate([task.split(s).images for s in SPLITS])


def save(task: TaskData, data_dir: Path) -> TaskMeta:
    """Write the task as the data stage does; its TaskMeta is what extract checks the file against."""
    return TaskMeta(**save_task(task, data_dir, FMNIST_DECODE))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> SourceWeights:
    return random_cnn_weights(tmp_path_factory.mktemp("weights") / "source.safetensors", PRE)


def prov(weights: SourceWeights) -> dict:
    return provenance(weights.sha256, "fmnist_cnn", "block2", PRE)


def run_extract(
    weights: SourceWeights, task_meta: TaskMeta, data_dir: Path, root: Path, taps: Sequence[str] = ()
) -> tuple[ExtractRecord, int]:
    """The extract task's record and how many rows it computed.

    A record holds content, not history, so the count is read from the store: its committed rows
    before and after, and the on_chunk hook (called once per committed chunk, never when nothing
    was computed).
    """
    cuts = stored_taps(create_model(weights.arch, 5), weights.cut, taps)
    path = store_path(root, provenance(weights.sha256, weights.arch, cuts, weights.preprocess))
    before = committed_rows(path)
    chunks: list[int] = []
    record = extract.fn(weights, task_meta, PARAMS, data_dir, root, taps=taps, on_chunk=chunks.append)
    assert record.store_dir() == path
    computed = committed_rows(path) - before
    assert record.rows == committed_rows(path)
    if computed == 0:
        assert chunks == []
    else:
        assert chunks[-1] == record.rows
    return record, computed


def test_extract_end_to_end_then_incremental(tmp_path: Path, weights: SourceWeights) -> None:
    task = make_task()
    data_dir, root = tmp_path / "data", tmp_path / "features"
    record = save(task, data_dir)

    first, computed = run_extract(weights, record, data_dir, root)
    assert computed == 300 and first.rows == 300
    assert first.tap_shapes[first.cut] == [64, 7, 7]
    assert first.store_dir() == store_path(root, prov(weights))
    assert first.provenance_for() == prov(weights) and first.weights_sha256 == weights.sha256
    assert first.intact()

    keys = row_keys(all_images(task))
    stored = FeatureStore.open(first.store_dir(), prov(weights)).read(keys)
    net = create_model("fmnist_cnn", 5, state_dict=load_weights(weights.path, weights.sha256)[0])
    with torch.no_grad():
        direct = net.eval().upto("block2")(preprocess(all_images(task), PRE)).numpy()
    np.testing.assert_allclose(stored, direct, rtol=1e-5, atol=1e-5)

    second, computed = run_extract(weights, record, data_dir, root)
    assert computed == 0 and second.rows == 300
    assert second.outputs == first.outputs

    extra = np.random.default_rng(9).integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    grown = replace(
        task,
        train=Split(
            np.concatenate([task.train.images, extra]), np.concatenate([task.train.labels, np.zeros(30, np.int64)])
        ),
    )
    third, computed = run_extract(weights, save(grown, data_dir), data_dir, root)
    assert computed == 30 and third.rows == 330
    reader = FeatureStore.open(third.store_dir(), prov(weights))
    np.testing.assert_array_equal(reader.read(keys), stored)  # old rows untouched


def test_stale_data_record_is_refused(tmp_path: Path, weights: SourceWeights) -> None:
    data_dir = tmp_path / "data"
    record = save(make_task(20), data_dir)
    stale = record.model_copy(update={"fingerprint": "0" * 64})
    with pytest.raises(ValueError, match="rerun the data stage"):
        extract.fn(weights, stale, PARAMS, data_dir, tmp_path / "f")


def test_extract_taps_yields_batches_from_the_first_image(weights: SourceWeights) -> None:
    net = create_model("fmnist_cnn", 5)
    imgs = make_task(20).train.images
    batches = list(extract_taps(net, imgs, PRE, ["block1"], 5))
    assert [len(b["block1"]) for b in batches] == [5, 5, 2] and all(set(b) == {"block1"} for b in batches)
    assert all(b["block1"].dtype == np.float32 and b["block1"].shape[1:] == (32, 14, 14) for b in batches)
    assert not net.stages["block1"].training  # the frozen stages run in eval mode


def test_one_forward_pass_gives_every_tap_as_the_bodies_cut_there_would(weights: SourceWeights) -> None:
    net = create_model("fmnist_cnn", 5, state_dict=load_weights(weights.path, weights.sha256)[0]).eval()
    imgs = make_task(20).train.images
    assert stored_taps(net, "block2", ["fc1", "block1", "block2"]) == ["block1", "block2", "fc1"]
    with pytest.raises(KeyError, match=r"unknown cut point\(s\) \['fc9'\]"):
        stored_taps(net, "block2", ["fc9"])
    (batch,) = extract_taps(net, imgs, PRE, ["fc1", "block1"], 32)
    assert set(batch) == {"fc1", "block1"}
    with torch.no_grad():
        for tap in ("block1", "fc1"):
            np.testing.assert_array_equal(batch[tap], net.upto(tap)(preprocess(imgs, PRE)).numpy())


def test_multi_tap_store_serves_any_stored_cut_without_extracting_again(tmp_path: Path, weights: SourceWeights) -> None:
    task = make_task(80)
    data_dir, root = tmp_path / "data", tmp_path / "features"
    record = save(task, data_dir)
    first, computed = run_extract(weights, record, data_dir, root, taps=["fc1", "block1"])
    assert first.taps == ["block1", "block2", "fc1"] and first.cut == "block2"
    assert first.tap_shapes == {"block1": [32, 14, 14], "block2": [64, 7, 7], "fc1": [128]}
    assert first.tap_shapes[first.cut] == [64, 7, 7] and computed == 80
    taps_prov = provenance(weights.sha256, "fmnist_cnn", first.taps, PRE)
    assert first.provenance == taps_prov
    assert first.store_dir() == store_path(root, taps_prov) != store_path(root, prov(weights))
    assert zarr.open_group(first.store_dir(), mode="r").attrs["taps"] == first.taps

    again, computed = run_extract(weights, record, data_dir, root, taps=["block1", "fc1", "block2"])
    assert computed == 0 and again.store == first.store  # tap order does not matter

    keys = row_keys(all_images(task))
    net = create_model("fmnist_cnn", 5, state_dict=load_weights(weights.path, weights.sha256)[0]).eval()
    for tap in first.taps:  # a run cutting at any stored tap reads it with the usual single-cut provenance
        assert first.provenance_for(tap) == provenance(weights.sha256, "fmnist_cnn", tap, PRE)
        stored = FeatureStore.open(first.store_dir(), first.provenance_for(tap))
        with torch.no_grad():
            direct = net.upto(tap)(preprocess(all_images(task), PRE)).numpy()
        np.testing.assert_allclose(stored.read(keys), direct, rtol=1e-5, atol=1e-5)


def test_a_float16_extraction_is_a_store_of_its_own_read_as_float32(tmp_path: Path, weights: SourceWeights) -> None:
    task = make_task(40)
    data_dir, root = tmp_path / "data", tmp_path / "features"
    record = save(task, data_dir)
    half = extract.fn(weights, record, PARAMS.model_copy(update={"dtype": "float16", "codec": "lz4"}), data_dir, root)
    full, _ = run_extract(weights, record, data_dir, root)
    assert half.provenance["dtype"] == "float16" and full.provenance["dtype"] == "float32"
    assert half.store_key != full.store_key and half.store_dir() != full.store_dir()
    with pytest.raises(ProvenanceError, match="'dtype' is 'float16'"):
        FeatureStore.open(half.store_dir(), full.provenance_for())
    keys = row_keys(all_images(task))
    exact = FeatureStore.open(full.store_dir(), full.provenance_for()).read(keys)
    rounded = stored_features(half, all_images(task))
    assert rounded.dtype == np.float32
    np.testing.assert_array_equal(rounded, exact.astype(np.float16).astype(np.float32))


_CHILD = """
import json, sys, time
from pathlib import Path
import torch
from headstart.config import ExtractParams
from headstart.records import SourceWeights, TaskMeta
from tasks.extract import extract

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
extract.fn(
    SourceWeights.model_validate(args["weights"]), TaskMeta.model_validate(args["record"]),
    ExtractParams(**args["params"]), Path(args["data_dir"]), Path(args["root"]), taps=args["taps"],
    on_chunk=lambda rows: time.sleep(0.25),
)
"""


def committed_rows(path: Path) -> int:
    if not (path / "zarr.json").is_file():
        return 0
    return int(zarr.open_group(path, mode="r").attrs["rows"])


@pytest.mark.faults
def test_sigkill_mid_extraction_resumes_bitwise_equal(tmp_path: Path, weights: SourceWeights) -> None:
    task = make_task()
    data_dir = tmp_path / "data"
    record = save(task, data_dir)
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    taps = ["block1", "block2", "fc1"]  # every tap's array must resume from the same committed chunk
    path = store_path(killed_root, provenance(weights.sha256, "fmnist_cnn", taps, PRE))
    args = {
        "taps": taps,
        "weights": weights.model_dump(mode="json"),
        "record": record.model_dump(mode="json"),
        "params": PARAMS.model_dump(),
        "data_dir": str(data_dir),
        "root": str(killed_root),
        "threads": torch.get_num_threads(),
    }
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=REPO, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while committed_rows(path) < 64 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    done = committed_rows(path)
    assert 64 <= done < 300, done
    with pytest.raises(IncompleteStoreError):
        FeatureStore.open(path, prov(weights))
    group = zarr.open_group(path, mode="r")
    assert {group[f"features/{t}"].chunks[0] for t in taps} == {16}  # 0.5 MiB of block1 rows, for every tap

    resumed, computed = run_extract(weights, record, data_dir, killed_root, taps=taps)
    assert computed == 300 - done and resumed.store_dir() == path
    clean, computed = run_extract(weights, record, data_dir, clean_root, taps=taps)
    assert computed == 300

    keys = row_keys(all_images(task))
    a = FeatureStore.open(resumed.store_dir(), provenance(weights.sha256, "fmnist_cnn", taps, PRE))
    b = FeatureStore.open(clean.store_dir(), provenance(weights.sha256, "fmnist_cnn", taps, PRE))
    np.testing.assert_array_equal(a.committed_keys(), b.committed_keys())
    for tap in taps:
        fa, fb = a.read(keys, tap), b.read(keys, tap)
        assert fa.dtype == fb.dtype == np.float32
        assert np.array_equal(fa.view(np.uint32), fb.view(np.uint32)), tap  # bitwise, not just close
