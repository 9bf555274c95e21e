"""The raw stage's record changes exactly when a file the data stage reads changes (added, removed, edited)."""

from __future__ import annotations

from pathlib import Path

import pytest

from headstart.config import DataParams
from headstart.fmnist import OFFICIAL_MD5
from tasks.raw import raw
from tests.tiny import IDX_FILES, write_tiny_fmnist


@pytest.fixture
def params(tmp_path: Path) -> DataParams:
    folder = tmp_path / "photos"
    for name in ("cats", "dogs"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            (folder / name / f"{i}.png").write_bytes(f"{name}{i}".encode())
    return DataParams(root=write_tiny_fmnist(tmp_path / "fmnist"), image_folder=folder)


def test_unchanged_files_give_the_same_record(params: DataParams) -> None:
    first = raw.fn(params=params)
    assert first == raw.fn(params=params)
    assert first.fmnist_origin == "root" and sorted(first.fmnist) == sorted(IDX_FILES.values())
    assert sorted(first.image_folder) == [f"{c}/{i}.png" for c in ("cats", "dogs") for i in range(3)]


def test_adding_removing_or_editing_a_photo_changes_the_record(params: DataParams) -> None:
    folder = params.image_folder
    before = raw.fn(params=params)
    (folder / "cats" / "3.png").write_bytes(b"new")
    added = raw.fn(params=params)
    (folder / "cats" / "3.png").unlink()
    assert raw.fn(params=params) == before
    (folder / "dogs" / "0.png").write_bytes(b"edited")
    edited = raw.fn(params=params)
    assert len({before.text(), added.text(), edited.text()}) == 3


def test_hidden_files_are_not_data(params: DataParams) -> None:
    before = raw.fn(params=params)
    (params.image_folder / "cats" / ".DS_Store").write_bytes(b"finder")
    (params.image_folder / ".git").mkdir()
    assert raw.fn(params=params) == before


def test_an_edited_idx_file_changes_the_record(params: DataParams) -> None:
    before = raw.fn(params=params)
    path = params.root / IDX_FILES[("test", "labels")]
    path.write_bytes(path.read_bytes() + b"\0")
    assert raw.fn(params=params).fmnist != before.fmnist


def test_without_local_files_the_record_is_the_pinned_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("headstart.raw.SYSTEM_DIR", tmp_path / "nowhere")
    record = raw.fn(params=DataParams())
    assert record.fmnist_origin == "download"
    assert record.fmnist == {name: f"md5:{md5}" for name, md5 in OFFICIAL_MD5.items()}


def test_a_root_without_the_idx_files_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        raw.fn(params=DataParams(root=tmp_path))
