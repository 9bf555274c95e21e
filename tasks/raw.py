"""The raw stage: what the raw data is right now (each file's sha256), so a changed file reruns the data stage.

DVC cannot see files outside the project (Debian's Fashion-MNIST) or named only by a param, so
this stage is `always_changed` in dvc.yaml: it runs on every `dvc repro` (hashing about 30 MB,
well under a second) and rewrites `data/raw.json` with the same bytes when nothing changed, so the
data stage reruns only when a file did. `headstart run` computes the same record first, and the
data task's cache key contains it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.config import DataParams
from headstart.fingerprint import sha256_file
from headstart.fmnist import OFFICIAL_MD5, SYSTEM_DIR, idx_files
from headstart.records import RawRecord, absolute


def folder_files(folder: Path) -> list[Path]:
    """The files the data stage reads from an image folder: non-hidden files of non-hidden class folders."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [f for c in classes for f in sorted(c.iterdir()) if f.is_file() and not f.name.startswith(".")]


@task(name="raw", cache_policy=NO_CACHE, persist_result=False)
def raw(params: DataParams) -> RawRecord:
    """Fingerprint the Fashion-MNIST IDX files (or the pinned md5s a download is verified by) and the image folder."""
    root = absolute(str(params.root)) if params.root is not None else SYSTEM_DIR
    files = idx_files(root)
    if files is not None:
        origin = "root" if params.root is not None else "system"
        fmnist = {p.name: sha256_file(p) for p in files.values()}
    elif params.root is not None:
        raise FileNotFoundError(f"{root}: data.root lacks the Fashion-MNIST IDX files (train/t10k images and labels)")
    else:
        origin, fmnist = "download", {name: f"md5:{md5}" for name, md5 in OFFICIAL_MD5.items()}
    folder = None
    if params.image_folder is not None:
        path = absolute(str(params.image_folder))
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: data.image_folder is not a folder")
        folder = {f.relative_to(path).as_posix(): sha256_file(f) for f in folder_files(path)}
    return RawRecord(fmnist_origin=origin, fmnist=dict(sorted(fmnist.items())), image_folder=folder)
