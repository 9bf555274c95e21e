"""A user's image folder: its class folders, its files, and each file's split decided by its content.

Two layouts are read: `FOLDER/<class>/<image>` (every image's split drawn from its sha256 and the
seed, so adding photos never moves one already there), or `FOLDER/train|val|test/<class>/<image>`
(the user's own splits, used as given; a missing `val` or `test` is drawn from `train` the same way).
Only PNG and JPEG files are images; other files are skipped and counted, hidden ones ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from headstart.fingerprint import md5_file
from headstart.images import SUFFIXES

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
"""Sub-folder names that mark the user's own splits, and the split each one is."""


@dataclass(frozen=True)
class FolderImage:
    path: str
    """Relative to the image folder, POSIX."""
    label: str
    """Its class folder's name."""
    given_split: str | None
    """train, val or test when the folder has split sub-folders, else None (drawn from the content)."""


@dataclass(frozen=True)
class FolderScan:
    images: list[FolderImage]
    classes: list[str]
    skipped: dict[str, int]
    """Suffix -> count of files that are not PNG/JPEG (the log says how many were left out)."""


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_files(class_dir: Path, root: Path, given: str | None, skipped: Counter) -> list[FolderImage]:
    """The class folder's images (sub-folders too); a class folder without any is an error naming it."""
    images, other = [], 0
    for f in sorted(class_dir.rglob("*")):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(class_dir).parts):
            continue
        if f.suffix.lower() not in SUFFIXES:
            skipped[f.suffix.lower() or "(none)"] += 1
            other += 1
            continue
        images.append(FolderImage(f.relative_to(root).as_posix(), class_dir.name, given))
    if not images:
        raise ValueError(
            f"{class_dir}: class folder holds no PNG/JPEG images ({other} other files); add some or remove it"
        )
    return images


def scan_folder(folder: Path) -> FolderScan:
    """Every image file of the folder with its class (and given split); errors name the folder and what it holds."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: data.image_folder is not a folder")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))
    split_layout = (
        bool(subdirs) and "train" in {p.name for p in subdirs} and all(p.name in SPLIT_FOLDERS for p in subdirs)
    )
    skipped: Counter = Counter()
    images: list[FolderImage] = []
    if split_layout:
        for split_dir in subdirs:
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and _visible(p)):
                images += _class_files(class_dir, folder, SPLIT_FOLDERS[split_dir.name], skipped)
        classes = sorted({i.label for i in images if i.given_split == "train"})
    else:
        for class_dir in subdirs:
            images += _class_files(class_dir, folder, None, skipped)
        classes = sorted({i.label for i in images})
    if len(classes) < 2:
        where = f"{folder}/train" if split_layout else str(folder)
        raise ValueError(
            f"{where}: expected at least 2 class sub-folders holding PNG/JPEG images (one folder a class), "
            f"found {classes or 'none'}"
        )
    unknown = sorted({i.label for i in images} - set(classes))
    if unknown:
        raise ValueError(f"{folder}: classes {unknown} have images in val/test but none in train/")
    return FolderScan(images=images, classes=classes, skipped=dict(sorted(skipped.items())))


def dvc_dir_md5(folder: Path) -> str:
    """The hash `dvc add` gives the folder: md5 of the sorted JSON list of its files' md5 and relative paths, + `.dir`.

    Every file counts, as for DVC (hidden ones too), except the `.partial` files .dvcignore leaves out.
    """
    entries = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not f.name.endswith(".partial"):
            entries.append({"md5": md5_file(f), "relpath": f.relative_to(folder).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode(), usedforsecurity=False).hexdigest() + ".dir"


def dvc_object(repo: Path, md5: str) -> Path:
    """Where DVC keeps the cache object of this md5 (`.dir` listings included) in the repo at `repo`."""
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def damaged_checkout(folder: Path) -> list[str]:
    """Files of a `dvc add`ed folder whose bytes came from a damaged DVC cache object, named with the object.

    `dvc checkout` copies or links cache objects without hashing them, so a damaged object would
    reach the data stage as a photo. A file that differs from the version `<folder>.dvc` records,
    where that version's cache object no longer hashes to its name either, is such a file (an
    edited photo differs too, but its recorded object is intact). Empty without a `.dvc` pointer.
    """
    pointer, repo = folder.parent / f"{folder.name}.dvc", folder.parent
    if not pointer.is_file():
        return []
    outs = (yaml.safe_load(pointer.read_text()) or {}).get("outs") or [{}]
    md5 = str(outs[0].get("md5", ""))
    listing = dvc_object(repo, md5)
    if not md5.endswith(".dir") or not listing.is_file():
        return []
    if md5_file(listing) != md5.removesuffix(".dir"):
        return [f"{pointer.name}: DVC cache object {listing} (the folder's file listing) is damaged"]
    damaged = []
    for entry in json.loads(listing.read_text()):
        file, obj = folder / entry["relpath"], dvc_object(repo, entry["md5"])
        if file.is_file() and obj.is_file() and md5_file(file) != entry["md5"] and md5_file(obj) != entry["md5"]:
            damaged.append(f"{file}: checked out from the damaged DVC cache object {obj}")
    return damaged


def unit_draw(sha256: str, seed: int, purpose: str) -> float:
    """A number in [0, 1) fixed by the image's content, the seed and what it decides: never moved by other images."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def content_split(
    sha256: str, seed: int, val_fraction: float, test_fraction: float, given: str | None, given_splits: set[str]
) -> str:
    """train, val or test for one image: as given, else drawn from its content.

    A train image of a folder with split sub-folders is drawn into val (or test) only when the
    user gave no val (or test) folder.
    """
    if given in ("val", "test"):
        return given
    test = test_fraction if "test" not in given_splits else 0.0
    val = val_fraction if "val" not in given_splits else 0.0
    u = unit_draw(sha256, seed, "split")
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def check_splits(labels: list[str], splits: list[str], classes: list[str], folder: Path) -> None:
    """Every class needs training images, and validation and test need some images: else say which class lacks them."""
    per_class = Counter(labels)
    train = Counter(lab for lab, s in zip(labels, splits, strict=True) if s == "train")
    for cls in classes:
        if train[cls] == 0:
            raise ValueError(
                f"{folder}/{cls}: class {cls!r} has {per_class[cls]} image(s) and none fell in the train split; "
                "add images to it (about 10 per class at the least) or lower data.val_fraction/test_fraction"
            )
    for split in ("val", "test"):
        if split not in splits:
            raise ValueError(
                f"{folder}: no image fell in the {split} split ({len(labels)} images); add images or raise "
                f"data.{split}_fraction"
            )
