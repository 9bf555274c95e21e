"""The data stage on tiny generated IDX files and images, a real HTTP server on 127.0.0.1, and real Fashion-MNIST."""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import math
import re
import struct
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.config import DataParams
from headstart.datasets import load_task
from headstart.download import DownloadError
from headstart.fingerprint import ChecksumError, sha256_file
from headstart.fmnist import (
    CLASS_NAMES,
    IDX_FILES,
    SYSTEM_DIR,
    check_pair,
    class_names_for,
    idx_files,
    parse_idx,
    read_fmnist,
    read_idx,
    resolve_source,
    select_labels,
)
from headstart.images import FMNIST_DECODE, Decode, decode_image
from headstart.records import DataRecord, RawRecord, TaskMeta, absolute
from headstart.splits import nested_fraction, stratified_split
from tasks.data import data, fmnist_task, read_image_folder
from tasks.raw import raw

# ---------------------------------------------------------------- helpers


def idx_bytes(a: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format."""
    return struct.pack(">I", 0x800 | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def write_idx(path: Path, a: np.ndarray | bytes, gz: bool) -> Path:
    raw = a if isinstance(a, bytes) else idx_bytes(a)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def fake_fmnist(per_class_train: int = 12, per_class_test: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, n in (("train", per_class_train), ("test", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
        arrays[f"{part}_images"] = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        arrays[f"{part}_labels"] = labels
    return arrays


def write_fmnist(folder: Path, gz: bool = True, **kw: int) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = fake_fmnist(**kw)
    for role, base in IDX_FILES.items():
        write_idx(folder / base, arrays[role], gz)
    return arrays


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def save_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def make_image_folder(root: Path, classes: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            if i % 3 == 0:
                save_image(root / name / f"{i}.jpg", (40, 30), "RGB", seed=10 * c + i)
            elif i % 3 == 1:
                save_image(root / name / f"{i}.png", (20, 20), "L", seed=10 * c + i)
            else:
                save_image(root / name / f"{i}.png", (33, 50), "RGBA", seed=10 * c + i)
    return root


def rgb(size: int) -> Decode:
    """How the data stage decodes an image folder's pictures: RGB, resized to a square of `size`."""
    return Decode(mode="RGB", size=size)


def run_data(params: DataParams, out_dir: Path, download_dir: Path) -> tuple[RawRecord, DataRecord]:
    """The raw stage's record of the files, then the data task given it (as both runners chain them)."""
    raw_record = raw.fn(params)
    return raw_record, data.fn(params, raw_record, out_dir, download_dir)


@pytest.fixture
def http_server(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving `served/`; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()
    thread.join()


# ---------------------------------------------------------------- IDX parsing and checks


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_parse_gzipped_or_plain(tmp_path: Path, gz: bool) -> None:
    arrays = write_fmnist(tmp_path, gz=gz)
    files = idx_files(tmp_path)
    assert files is not None and all(p.suffix == (".gz" if gz else "") for p in files.values())
    train, test = read_fmnist(files)
    np.testing.assert_array_equal(train.images, arrays["train_images"])
    np.testing.assert_array_equal(test.labels, arrays["test_labels"])
    assert train.labels.dtype == np.int64 and train.images.shape == (120, 28, 28)


def test_wrong_magic_is_refused_naming_the_file(tmp_path: Path) -> None:
    labels = write_idx(tmp_path / "labels", np.zeros(5, np.uint8), gz=False)
    with pytest.raises(ValueError, match=r"labels: .*magic number 0x00000801, expected 0x00000803"):
        read_idx(labels, ndim=3)
    int32_file = struct.pack(">I", 0x00000C01) + struct.pack(">I", 1) + b"\0\0\0\0"
    with pytest.raises(ValueError, match=r"^weird.idx: .*0x00000c01"):
        parse_idx(int32_file, "weird.idx")
    with pytest.raises(ValueError, match="tiny.idx: .*too short"):
        parse_idx(b"\0\0", "tiny.idx")


def test_truncated_and_trailing_bytes_are_refused(tmp_path: Path) -> None:
    raw = idx_bytes(np.ones((3, 28, 28), np.uint8))
    path = write_idx(tmp_path / "imgs", raw[:-1], gz=True)
    with pytest.raises(ValueError, match=r"imgs.gz: truncated: dims \(3, 28, 28\) need 2368 bytes .* found 2367"):
        read_idx(path, ndim=3)
    with pytest.raises(ValueError, match=r"imgs: 2 trailing bytes: .*need 2368 bytes.*found 2370"):
        parse_idx(raw + b"\0\0", "imgs", ndim=3)
    with pytest.raises(ValueError, match=r"imgs: truncated IDX header: expected 16 bytes"):
        parse_idx(raw[:10], "imgs", ndim=3)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="bad.gz: not a readable gzip file"):
        read_idx(tmp_path / "bad.gz", ndim=1)


def test_pair_checks_name_the_files() -> None:
    good_images, good_labels = np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 9, 3], np.uint8)
    check_pair(good_images, good_labels, "i.idx", "l.idx")
    with pytest.raises(ValueError, match=r"i.idx: images have shape \(4, 28, 20\), expected \(N, 28, 28\)"):
        check_pair(np.zeros((4, 28, 20), np.uint8), good_labels, "i.idx", "l.idx")
    with pytest.raises(ValueError, match=r"l.idx: 3 labels, but i.idx holds 4 images"):
        check_pair(good_images, good_labels[:3], "i.idx", "l.idx")
    with pytest.raises(ValueError, match=r"l.idx: labels must be in 0..9; found 10 at index 2"):
        check_pair(good_images, np.array([0, 1, 10, 3], np.uint8), "i.idx", "l.idx")


def test_bad_files_in_a_folder_are_reported_by_path(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    write_idx(tmp_path / IDX_FILES["test_labels"], np.full(30, 11, np.uint8), gz=True)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: labels must be in 0..9; found 11"):
        read_fmnist(idx_files(tmp_path))


# ---------------------------------------------------------------- class selection and splits


def test_select_labels_relabels_in_the_order_given() -> None:
    labels = np.array([7, 2, 5, 2, 7, 0])
    images = np.arange(6)[:, None, None] * np.ones((6, 28, 28), np.uint8)
    kept_images, new = select_labels(images, labels, [7, 2])
    np.testing.assert_array_equal(new, [0, 1, 1, 0])
    np.testing.assert_array_equal(kept_images[:, 0, 0], [0, 1, 3, 4])
    assert new.dtype == np.int64
    assert class_names_for([7, 2]) == ["Sneaker", "Pullover"]
    assert class_names_for([5, 6, 7, 8, 9]) == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[0] == "T-shirt/top"
    with pytest.raises(ValueError, match="distinct"):
        select_labels(images, labels, [2, 2])


def test_stratified_split_is_disjoint_covering_balanced_and_seeded() -> None:
    labels = np.repeat([0, 1, 2], [100, 50, 20])
    train, val = stratified_split(labels, 0.1, seed=3)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.bincount(labels[val]).tolist() == [10, 5, 2]
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again = stratified_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(stratified_split(labels, 0.1, seed=4)[1], val)
    with pytest.raises(ValueError, match="class 1 has 1 sample"):
        stratified_split(np.array([0, 0, 1]), 0.5, seed=0)


def test_nested_fraction_subsets_nest_and_stay_stratified() -> None:
    sizes = [100, 60, 40]
    labels = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], sizes))
    subsets = {f: nested_fraction(labels, f, seed=7) for f in (0.05, 0.1, 0.5, 1.0)}
    for small, large in ((0.05, 0.1), (0.1, 0.5), (0.5, 1.0)):
        assert set(subsets[small]) < set(subsets[large])
    for f, idx in subsets.items():
        assert np.bincount(labels[idx]).tolist() == [max(1, math.ceil(f * n)) for n in sizes]
        assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(subsets[1.0], np.arange(len(labels)))
    assert nested_fraction(labels, 0.001, seed=7).size == 3  # at least one per class
    np.testing.assert_array_equal(nested_fraction(labels, 0.1, seed=7), subsets[0.1])
    assert not np.array_equal(nested_fraction(labels, 0.1, seed=8), subsets[0.1])
    with pytest.raises(ValueError, match="train_fraction must be in"):
        nested_fraction(labels, 0.0, seed=0)


def test_fmnist_task_subsets_only_the_target_train_split(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    train, test = read_fmnist(idx_files(tmp_path))
    params = DataParams(train_fraction=0.25, val_fraction=0.25)
    full = fmnist_task("target", train, test, [0, 1, 2, 3, 4], params.model_copy(update={"train_fraction": 1.0}), True)
    part = fmnist_task("target", train, test, [0, 1, 2, 3, 4], params, subset=True)
    assert full.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert (len(full.train), len(full.val), len(full.test)) == (45, 15, 15)
    assert len(part.train) == 5 * math.ceil(0.25 * 9)
    np.testing.assert_array_equal(part.val.images, full.val.images)
    np.testing.assert_array_equal(part.test.labels, full.test.labels)
    full_rows = {r.tobytes() for r in full.train.images}
    assert all(r.tobytes() in full_rows for r in part.train.images)


# ---------------------------------------------------------------- source resolution and download


def test_root_without_the_files_is_an_error_naming_folder_and_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        resolve_source(tmp_path / "empty", tmp_path / "dl", system_dir=tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "empty") in message
    assert all(base in message for base in IDX_FILES.values())


def test_system_folder_is_used_when_no_root_is_given(tmp_path: Path) -> None:
    write_fmnist(tmp_path / "system", gz=False)
    files, origin = resolve_source(
        None, tmp_path / "dl", system_dir=tmp_path / "system", base_url="http://127.0.0.1:1/"
    )
    assert origin == f"system:{tmp_path / 'system'}"
    assert files["train_images"] == tmp_path / "system" / "train-images-idx3-ubyte"
    assert not (tmp_path / "dl").exists()


def test_download_lands_verified_files_and_reuses_them(tmp_path: Path, http_server: tuple[Path, str]) -> None:
    served, url = http_server
    arrays = write_fmnist(served)
    md5s = {p.name: md5(p) for p in served.iterdir()}
    dl = tmp_path / "dl"
    files, origin = resolve_source(None, dl, system_dir=tmp_path / "nowhere", base_url=url, md5s=md5s)
    assert origin == f"download:{url}"
    assert sorted(p.name for p in dl.iterdir()) == sorted(md5s)
    train, _ = read_fmnist(files)
    np.testing.assert_array_equal(train.images, arrays["train_images"])
    # A second resolution reuses the verified cache: the server is no longer needed.
    again, _ = resolve_source(None, dl, system_dir=tmp_path / "nowhere", base_url="http://127.0.0.1:1/", md5s=md5s)
    assert again == files


def test_corrupted_download_is_refused_and_nothing_is_kept(tmp_path: Path, http_server: tuple[Path, str]) -> None:
    served, url = http_server
    write_fmnist(served)
    md5s = {p.name: md5(p) for p in served.iterdir()}
    corrupt = served / "train-images-idx3-ubyte.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:-7] + b"garbage")
    dl = tmp_path / "dl"
    with pytest.raises(ChecksumError) as err:
        resolve_source(None, dl, system_dir=tmp_path / "nowhere", base_url=url, md5s=md5s)
    message = str(err.value)
    assert md5s[corrupt.name] in message and md5(corrupt) in message
    assert url + corrupt.name in message
    assert list(dl.iterdir()) == []


def test_missing_file_on_the_server_names_the_url(tmp_path: Path, http_server: tuple[Path, str]) -> None:
    _, url = http_server
    md5s = {f"{b}.gz": "0" * 32 for b in IDX_FILES.values()}
    with pytest.raises(DownloadError, match=rf"^{re.escape(url)}train-images-idx3-ubyte.gz: HTTP 404 "):
        resolve_source(None, tmp_path / "dl", system_dir=tmp_path / "nowhere", base_url=url, md5s=md5s)
    assert list((tmp_path / "dl").iterdir()) == []


# ---------------------------------------------------------------- image folders


def test_image_folder_reads_resizes_and_names_classes(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "pets", {"PetB": 8, "None": 7, "PetA": 9})
    (folder / "README.txt").write_text("top-level files are not classes")
    (folder / "PetA" / ".DS_Store").write_bytes(b"\0junk")
    params = DataParams(test_fraction=0.2, val_fraction=0.2, seed=1)
    task = read_image_folder(folder, rgb(16), params)
    assert task.class_names == ["None", "PetA", "PetB"]
    images = np.concatenate([task.split(s).images for s in ("train", "val", "test")])
    labels = np.concatenate([task.split(s).labels for s in ("train", "val", "test")])
    assert images.shape == (24, 16, 16, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [7, 9, 8]
    grey = decode_image((folder / "PetA" / "1.png").read_bytes(), rgb(16))  # saved as a grey ("L") image
    assert np.array_equal(grey[..., 0], grey[..., 1]) and grey.std() > 0
    assert any(np.array_equal(grey, row) for row in images)
    assert all(len(task.split(s)) > 0 for s in ("train", "val", "test"))


def test_all_unreadable_images_are_listed_in_one_error(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    (folder / "a" / "broken.png").write_bytes((folder / "a" / "1.png").read_bytes()[:40])
    (folder / "b" / "fake.jpg").write_text("not an image")
    (folder / "b" / "notes.txt").write_text("not an image either, but not named like one: skipped")
    with pytest.raises(ValueError) as err:
        read_image_folder(folder, rgb(8), DataParams())
    message = str(err.value)
    assert "2 unreadable images" in message
    assert str(folder / "a" / "broken.png") in message and str(folder / "b" / "fake.jpg") in message
    assert "notes.txt" not in message


def test_empty_class_folder_and_single_class_are_errors(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    (folder / "c").mkdir()
    (folder / "c" / "photo.webp").write_bytes(b"RIFF")
    with pytest.raises(ValueError, match=rf"{folder / 'c'}: class folder holds no PNG/JPEG images \(1 other files\)"):
        read_image_folder(folder, rgb(8), DataParams())
    single = make_image_folder(tmp_path / "single", {"only": 3})
    with pytest.raises(ValueError, match=rf"{single}: expected at least 2 class sub-folders .*\['only'\]"):
        read_image_folder(single, rgb(8), DataParams())
    with pytest.raises(FileNotFoundError, match="missing: data.image_folder is not a folder"):
        read_image_folder(tmp_path / "missing", rgb(8), DataParams())


# ---------------------------------------------------------------- the task, end to end


def test_data_task_writes_both_tasks_that_load_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "fmnist"
    write_fmnist(root, gz=True, per_class_train=20, per_class_test=4)
    params = DataParams(root=root, train_fraction=0.1, seed=2)
    with caplog.at_level(logging.INFO, logger="headstart"):
        raw_record, record = run_data(params, tmp_path / "out", tmp_path / "dl")
    # The record says what kind of origin (no path of this machine); the raw record pins the files read.
    assert record.origin == raw_record.fmnist_origin == "root"
    assert raw_record.fmnist == {p.name: sha256_file(p) for p in idx_files(root).values()}
    assert f"Fashion-MNIST IDX files from root:{root}" in caplog.text
    assert sorted(Path(o.path).name for o in record.outputs) == [
        "source.json",
        "source.npz",
        "target.json",
        "target.npz",
    ]
    assert all(sha256_file(absolute(o.path)) == o.sha256 for o in record.outputs) and record.intact()
    assert record.source.counts == {"train": 90, "val": 10, "test": 20}
    assert record.target.counts == {"train": 5 * math.ceil(0.1 * 18), "val": 10, "test": 20}
    assert record.source.decode == record.target.decode == FMNIST_DECODE
    assert TaskMeta.read(tmp_path / "out" / "source.json") == record.source
    assert TaskMeta.read(tmp_path / "out" / "target.json") == record.target
    source, target = load_task(tmp_path / "out", "source"), load_task(tmp_path / "out", "target")
    assert source.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert target.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert source.fingerprint() == record.source.fingerprint
    assert set(np.unique(target.train.labels)) == {0, 1, 2, 3, 4}
    _, rerun = run_data(params, tmp_path / "out2", tmp_path / "dl")
    assert rerun.target.fingerprint == record.target.fingerprint


def test_data_task_with_an_image_folder_replaces_the_target(tmp_path: Path) -> None:
    write_fmnist(tmp_path / "fmnist", gz=False)
    folder = make_image_folder(tmp_path / "pets", {"PetA": 6, "PetB": 6, "None": 6})
    params = DataParams(root=tmp_path / "fmnist", image_folder=folder, folder_image_size=12, test_fraction=0.34)
    raw_record, record = run_data(params, tmp_path / "out", tmp_path / "dl")
    target = load_task(tmp_path / "out", "target")
    assert target.class_names == ["None", "PetA", "PetB"]
    assert target.train.images.shape[1:] == (12, 12, 3)
    assert sum(record.target.counts.values()) == 18 and min(record.target.counts.values()) > 0
    assert record.target.class_counts["train"].keys() == {"None", "PetA", "PetB"}
    assert record.source.counts["test"] == 15
    assert record.target.decode == rgb(12) and record.source.decode == FMNIST_DECODE
    assert raw_record.image_folder is not None and len(raw_record.image_folder) == 18


def test_params_bound_the_new_fields() -> None:
    with pytest.raises(ValueError, match="folder_image_size"):
        DataParams(folder_image_size=4)
    with pytest.raises(ValueError, match="test_fraction"):
        DataParams(test_fraction=1.0)


# ---------------------------------------------------------------- the real Fashion-MNIST


@pytest.mark.skipif(
    idx_files(SYSTEM_DIR) is None, reason=f"real Fashion-MNIST not installed in {SYSTEM_DIR} (dataset-fashion-mnist)"
)
def test_real_fashion_mnist(tmp_path: Path) -> None:
    files, origin = resolve_source(None, tmp_path / "dl")
    assert origin == f"system:{SYSTEM_DIR}"
    train, test = read_fmnist(files)
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    source = fmnist_task("source", train, test, [5, 6, 7, 8, 9], DataParams(), subset=False)
    assert source.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert source.num_classes == 5
    assert (len(source.train) + len(source.val), len(source.val), len(source.test)) == (30000, 3000, 5000)
