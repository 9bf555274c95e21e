"""Augmented and test-time views in the feature store: keyed, incremental, deterministic, resumable, read back.

The views are rows of the image's own store (headstart.views keys them, headstart.augment draws
them); these tests run the real extract task into a real Zarr store on tiny random images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from headstart.augment import TTA_VIEWS, AugmentedImages, augmented, render, tta_view
from headstart.backbones import create_model, preprocess
from headstart.checkpoints import ModelSpec, load_weights
from headstart.config import ExtractParams, HeadParams, ParamsError, StreamParams, load_params, parse_params
from headstart.datasets import Split
from headstart.fingerprint import row_keys
from headstart.heads import make_head
from headstart.records import SourceWeights
from headstart.store import FeatureStore
from headstart.streaming import StoredRows, ViewedRows, viewed_rows
from headstart.views import augment_digest, augmented_keys, seeds_of
from tasks.evaluate import tta_logits
from tasks.extract import extract
from tests.tiny import random_cnn_weights
from tests.unit.test_extract import _CHILD, PARAMS, PRE, REPO, all_images, committed_rows, make_task, save

VIEWS = PARAMS.model_copy(update={"views": 2, "tta": 2})


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> SourceWeights:
    return random_cnn_weights(tmp_path_factory.mktemp("weights") / "source.safetensors", PRE)


def rows_of(record) -> int:
    return committed_rows(record.store_dir())


def test_views_are_rows_of_their_own_keyed_by_image_index_and_spec(tmp_path: Path, weights: SourceWeights) -> None:
    task = make_task(60)  # 36 train, 12 val, 12 test
    data_dir, root = tmp_path / "data", tmp_path / "features"
    meta = save(task, data_dir)

    plain = extract.fn(weights, meta, PARAMS, data_dir, root)
    assert plain.rows == 60 and plain.views == 0 and plain.tta == 0 and plain.augment_digest is None

    viewed = extract.fn(weights, meta, VIEWS, data_dir, root)  # the same store: views are not provenance
    assert viewed.store == plain.store and viewed.provenance == plain.provenance
    assert viewed.rows == 60 + 2 * 36 + 2 * 12 and (viewed.views, viewed.tta) == (2, 2)
    assert viewed.augment_digest == augment_digest(VIEWS.augment)

    again = extract.fn(weights, meta, VIEWS, data_dir, root)
    assert again.rows == viewed.rows and again.outputs == viewed.outputs  # nothing computed, nothing rewritten

    more = extract.fn(weights, meta, VIEWS.model_copy(update={"views": 3}), data_dir, root)
    assert more.rows == viewed.rows + 36  # only the third view of each training image

    flips = [{"RandomHorizontalFlip": {"p": 1.0}}]
    respec = extract.fn(weights, meta, VIEWS.model_copy(update={"views": 3, "augment": flips}), data_dir, root)
    assert respec.rows == more.rows + 3 * 36 and respec.augment_digest != more.augment_digest  # plain rows kept

    extra = np.random.default_rng(9).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    grown = replace(task, train=Split(np.concatenate([task.train.images, extra]),
                                      np.concatenate([task.train.labels, np.zeros(5, np.int64)])))  # fmt: skip
    grown_meta = save(grown, data_dir)
    after = extract.fn(weights, grown_meta, VIEWS.model_copy(update={"views": 3, "augment": flips}), data_dir, root)
    assert after.rows == respec.rows + 5 + 3 * 5  # the new images' plain rows and their views only

    store = FeatureStore.open(after.store_dir(), after.provenance_for())
    keys = row_keys(grown.train.images)
    for view_keys in augmented_keys(keys, 3, after.augment_digest):
        assert store.read(view_keys).shape == (41, 64, 7, 7)


def test_a_view_row_is_the_network_on_that_view_and_a_view_is_its_seeds(tmp_path: Path, weights: SourceWeights) -> None:
    task = make_task(30)
    data_dir, root = tmp_path / "data", tmp_path / "features"
    record = extract.fn(weights, save(task, data_dir), VIEWS, data_dir, root)
    keys = row_keys(task.train.images)
    view_keys = augmented_keys(keys, 2, record.augment_digest)[2]
    pixels = augmented(task.train.images, seeds_of(view_keys), VIEWS.augment)
    assert not np.array_equal(pixels, task.train.images)
    net = create_model("fmnist_cnn", 5, state_dict=load_weights(weights.path, weights.sha256)[0]).eval()
    with torch.no_grad():
        direct = net.upto("block2")(preprocess(pixels, PRE)).numpy()
    stored = FeatureStore.open(record.store_dir(), record.provenance_for()).read(view_keys)
    np.testing.assert_allclose(stored, direct, rtol=1e-5, atol=1e-5)

    seeds = seeds_of(view_keys)
    alone = augmented(task.train.images[3:4], seeds[3:4], VIEWS.augment)
    np.testing.assert_array_equal(alone[0], pixels[3])  # a view does not depend on what it is computed with
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    augmented(task.train.images, seeds, VIEWS.augment)
    assert torch.equal(torch.rand(1), before)  # the caller's random state is left alone
    other = augmented(task.train.images, [s + 1 for s in seeds], VIEWS.augment)
    assert not np.array_equal(other, pixels)
    mixed = render(task.train.images, np.array([0, 3, 3]), np.array([0, 2, -1]), [0, seeds[3], 0], VIEWS.augment,
                   TTA_VIEWS)  # fmt: skip
    np.testing.assert_array_equal(mixed[0], task.train.images[0])
    np.testing.assert_array_equal(mixed[1], pixels[3])
    np.testing.assert_array_equal(mixed[2], task.train.images[3][:, ::-1])  # hflip


def test_test_time_views_are_deterministic_and_keep_the_shape() -> None:
    grey = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    rgb = np.random.default_rng(1).integers(0, 256, size=(4, 20, 24, 3), dtype=np.uint8)
    for images in (grey, rgb):
        for name in TTA_VIEWS:
            view = tta_view(images, name)
            assert view.shape == images.shape and view.dtype == np.uint8
            np.testing.assert_array_equal(view, tta_view(images, name))
        np.testing.assert_array_equal(tta_view(images, "hflip"), images[:, :, ::-1])
        np.testing.assert_array_equal(tta_view(tta_view(images, "crop_tl"), "hflip"), tta_view(images, "hflip_crop_tl"))
    with pytest.raises(ValueError, match="unknown test-time view 'rot90'"):
        tta_view(grey, "rot90")


def test_an_augmentation_param_is_refused_naming_the_item(tmp_path: Path, weights: SourceWeights) -> None:
    with pytest.raises(ValidationError, match="RandomSpin"):
        ExtractParams(views=1, augment=[{"RandomSpin": {}}])
    with pytest.raises(ValidationError, match=r"augment\[0\]: expected one"):
        ExtractParams(views=1, augment=[{"RandomHorizontalFlip": {}, "RandomVerticalFlip": {}}])
    task = make_task(20)
    data_dir = tmp_path / "data"
    bad = VIEWS.model_copy(update={"augment": [{"RandomHorizontalFlip": {}}, {"RandomRotation": {"degreez": 10}}]})
    with pytest.raises(ValueError, match=r"augment\[1\] RandomRotation.*degreez"):
        extract.fn(weights, save(task, data_dir), bad, data_dir, tmp_path / "features")
    assert not (tmp_path / "features").exists()  # refused before any store was made


def test_tta_from_the_store_equals_tta_through_the_network(tmp_path: Path, weights: SourceWeights) -> None:
    task = make_task(40)
    data_dir, root = tmp_path / "data", tmp_path / "features"
    record = extract.fn(weights, save(task, data_dir), VIEWS.model_copy(update={"tta": 5}), data_dir, root)
    torch.manual_seed(0)
    source = create_model("fmnist_cnn", 5, state_dict=load_weights(weights.path, weights.sha256)[0])
    net = source.upto("block2").with_classifier(make_head((64, 7, 7), 5, HeadParams())).eval()
    spec = ModelSpec(arch="fmnist_cnn", num_classes=5, class_names=task.class_names, preprocess=PRE, cut="block2")
    stream = StreamParams()
    stored = tta_logits(net, spec, "frozen", task.test.images, record, 5, stream)
    direct = tta_logits(net, spec, "finetune", task.test.images, record, 5, stream)  # through the network
    assert len(stored) == len(direct) == 5
    for a, b in zip(stored, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stored[0], stored[1])
    with pytest.raises(ValueError, match="evaluate.tta 6: .* the store holds 5; set extract.tta to 6"):
        tta_logits(net, spec, "frozen", task.test.images, record, 6, stream)


def _batches(inputs, seed: int, epochs: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [b for _ in range(epochs) for b in inputs.shuffled(16, g)]


def test_training_rows_draw_a_seeded_view_per_image_and_epoch(tmp_path: Path, weights: SourceWeights) -> None:
    task = make_task(60)
    data_dir, root = tmp_path / "data", tmp_path / "features"
    record = extract.fn(weights, save(task, data_dir), VIEWS, data_dir, root)
    store = FeatureStore.open(record.store_dir(), record.provenance_for())
    sets = augmented_keys(row_keys(task.train.images), 2, record.augment_digest)
    rows = np.stack([store.read(k) for k in sets])  # (views + 1, images, ...)

    loaded = ViewedRows(store, sets, "block2", StreamParams())
    window = 50 * 64 * 7 * 7 * 4 / 2**20  # one split fits a window, its three rows per image do not
    per_epoch = ViewedRows(store, sets, "block2", StreamParams(window_mb=window))
    assert loaded._loaded is not None and per_epoch._loaded is None and loaded.shape == (36, 64, 7, 7)
    a, b = _batches(loaded, 0), _batches(per_epoch, 0)
    drawn = set()
    for (ia, xa), (ib, xb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)  # reading the drawn rows each epoch: the same batches
        for i, x in zip(ia.tolist(), xa, strict=True):  # each batch row is one of that image's stored rows
            (hit,) = [v for v in range(3) if torch.equal(x, torch.from_numpy(rows[v, i]))]
            drawn.add(hit)
    assert drawn == {0, 1, 2}
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, _batches(loaded, 0), strict=True))  # same seed
    assert not all(torch.equal(x, y) for (_, x), (_, y) in zip(a, _batches(loaded, 1), strict=True))
    for inputs in (loaded, per_epoch):  # prediction reads the plain rows
        np.testing.assert_array_equal(torch.cat(list(inputs.in_order(16))).numpy(), rows[0])
    streamed = ViewedRows(store, sets, "block2", StreamParams(mode="always", window_mb=window / 4))
    for _, x in _batches(streamed, 0):
        assert x.shape[1:] == (64, 7, 7) and len(x) <= 16
    assert sum(len(i) for i, _ in _batches(streamed, 0, epochs=1)) == 36
    assert isinstance(viewed_rows(record.model_copy(update={"views": 0}), task.train.images, "block2",
                                  StreamParams()), StoredRows)  # fmt: skip


@pytest.mark.faults
def test_sigkill_during_view_extraction_resumes_bitwise_equal(tmp_path: Path, weights: SourceWeights) -> None:
    task = make_task(120)  # 72 train: 120 plain rows, then 144 view rows and 48 test-time rows
    data_dir = tmp_path / "data"
    meta = save(task, data_dir)
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    path = extract.fn(weights, meta, PARAMS, data_dir, killed_root).store_dir()  # plain rows first: kill among views
    args = {"taps": [], "weights": weights.model_dump(mode="json"), "record": meta.model_dump(mode="json"),
            "params": VIEWS.model_dump(), "data_dir": str(data_dir), "root": str(killed_root),
            "threads": torch.get_num_threads()}  # fmt: skip
    slow = _CHILD.replace("time.sleep(0.25)", "time.sleep(1.0)")  # 6 view chunks: room to land the kill under load
    child = subprocess.Popen([sys.executable, "-c", slow, json.dumps(args)], cwd=REPO, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while committed_rows(path) < 120 + 64 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.poll() is None, f"the extraction ended (exit {child.returncode}) before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert 120 + 64 <= committed_rows(path) < 312
    resumed = extract.fn(weights, meta, VIEWS, data_dir, killed_root)
    clean = extract.fn(weights, meta, VIEWS, data_dir, clean_root)
    assert resumed.rows == clean.rows == 312
    a = FeatureStore.open(resumed.store_dir(), resumed.provenance_for())
    b = FeatureStore.open(clean.store_dir(), clean.provenance_for())
    np.testing.assert_array_equal(a.committed_keys(), b.committed_keys())
    keys = b.committed_keys()
    assert np.array_equal(a.read(keys).view(np.uint32), b.read(keys).view(np.uint32))  # bitwise
    assert len(all_images(task)) == 120


def test_on_the_fly_augmentation_draws_new_views_each_epoch_from_the_loops_generator() -> None:
    """The baseline stored views replace (bench/views.py): fresh seeded views every epoch, plain for prediction."""
    images = make_task(30).train.images
    inputs = AugmentedImages(images, VIEWS.augment)
    assert inputs.shape == images.shape and len(inputs) == 18
    two = _batches(inputs, 0, epochs=2)  # 2 batches an epoch
    first, second = two[:2], two[2:]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(two, _batches(inputs, 0, epochs=2), strict=True))  # seeded
    by_image = {int(i): x for idx, xs in first for i, x in zip(idx, xs, strict=True)}
    later = {int(i): x for idx, xs in second for i, x in zip(idx, xs, strict=True)}
    assert sorted(by_image) == list(range(18)) and any(not torch.equal(by_image[i], later[i]) for i in range(18))
    assert all(not torch.equal(by_image[i], torch.from_numpy(images[i])) for i in range(3))
    np.testing.assert_array_equal(torch.cat(list(inputs.in_order(8))).numpy(), images)
    with pytest.raises(ValueError, match=r"augment\[0\] RandomRotation"):
        AugmentedImages(images, [{"RandomRotation": {}}])


def test_evaluate_tta_beyond_the_stored_views_is_refused_when_params_load() -> None:
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    bad = {**raw, "evaluate": {**raw["evaluate"], "tta": 2}}  # params.yaml's frozen runs, extract.tta 0
    with pytest.raises(ParamsError, match=r"evaluate.tta is 2 and extract.tta 0: frozen run\(s\) .*set extract.tta"):
        parse_params(bad, "params.yaml")
    fine = {**bad, "extract": {**raw["extract"], "tta": 2}}
    assert parse_params(fine, "params.yaml").evaluate.tta == 2
    only_finetune = {**bad, "train": {**raw["train"], "runs": {"f": {"source": "fmnist", "strategy": "finetune"}}}}
    assert parse_params(only_finetune, "params.yaml").evaluate.tta == 2  # runs its network on the views
