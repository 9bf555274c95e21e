"""`headstart verify`: every chunk of every feature store decoded (crc32c checked), the stores against the data, and
the DVC cache objects of the current version re-hashed.

`dvc checkout` copies or links a cache object without checking it, so a damaged object would
reach a stage as data; here every object that dvc.lock and the `.dvc` files name is hashed again.

A damaged store is marked incomplete (its completion marker removed), so the next `headstart run`
or `dvc repro` sees the extract stage's output changed and recomputes exactly the damaged rows
(headstart.store's `repair`). Nothing is deleted and nothing is recomputed here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from flows.layout import Layout
from headstart.datasets import load_task
from headstart.extraction import sample_keys
from headstart.fingerprint import md5_file
from headstart.folder import dvc_object
from headstart.records import ExtractRecord
from headstart.store import Damage, FeatureStore, StoreError

log = logging.getLogger(__name__)


@dataclass
class StoreReport:
    """What verification found in one store; `ok` when there is nothing to do."""

    source: str
    path: Path
    current: bool
    """The store the source's extract record names (the one training reads)."""
    rows: int = 0
    chunks: int = 0
    damage: list[Damage] = field(default_factory=list)
    problem: str | None = None
    missing: int = 0
    """Images of the prepared data without a row here (only counted for the current store)."""

    @property
    def ok(self) -> bool:
        return not self.damage and self.problem is None and self.missing == 0


def data_keys(layout: Layout) -> np.ndarray | None:
    """The row keys of every prepared target image, or None before the data stage has run."""
    if not (layout.data / "target.npz").is_file():
        return None
    task = load_task(layout.data, "target")
    return sample_keys(task.all_images())


def verify_store(source: str, path: Path, current: bool, keys: np.ndarray | None) -> StoreReport:
    """Scan one store; mark it incomplete when a chunk is damaged."""
    report = StoreReport(source, path, current)
    try:
        store = FeatureStore(path, "r")
    except StoreError as err:
        report.problem = str(err)
        return report
    report.rows, report.chunks = store.rows, len(store.chunk_ranges())
    report.damage = store.scan()
    if report.damage:
        store.condemn()
        return report
    if not store.complete:
        report.problem = "incomplete (no valid completion marker): an extraction was interrupted or is running"
    if current and keys is not None:
        report.missing = len(store.missing(keys))
    return report


def verify_project(layout: Layout, sources: list[str]) -> list[StoreReport]:
    """Every store under each source's feature folder, the current one checked against the prepared data."""
    keys = data_keys(layout)
    reports = []
    for source in sources:
        record_path = layout.extract_record(source)
        current = ExtractRecord.read(record_path).store_dir().resolve() if record_path.is_file() else None
        for path in sorted(layout.store_root(source).glob("*.zarr")):
            reports.append(verify_store(source, path, path.resolve() == current, keys))
    return reports


def verify_before_dvc_reuse(layout: Layout, source: str) -> None:
    """Under `dvc repro`: scan the source's current store before its record may be reused.

    DVC reruns the extract stage when a dep or the store itself changed; when the record's key
    still matches, the store's files are what changed, so they are checked rather than trusted:
    a damaged store is marked incomplete and the stage repairs it.
    """
    record_path = layout.extract_record(source)
    if not record_path.is_file():
        return
    path = ExtractRecord.read(record_path).store_dir()
    if not (path / "zarr.json").is_file():
        return
    report = verify_store(source, path, True, None)
    for damage in report.damage:
        log.warning("extract %s: %s: %s; recomputing those rows", source, path, damage)


def _tracked(root: Path) -> Iterator[tuple[str, str]]:
    """(md5, path) of every output dvc.lock and the `.dvc` files record."""
    for lock in (root / "dvc.lock", root / "sweep" / "dvc.lock"):
        if lock.is_file():
            for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
                for out in stage.get("outs", []):
                    if "md5" in out:
                        yield out["md5"], str(lock.parent.relative_to(root) / out["path"])
    for pointer in sorted(p for p in root.glob("*.dvc") if p.is_file()):  # not the .dvc folder
        for out in (yaml.safe_load(pointer.read_text()) or {}).get("outs", []):
            if "md5" in out:
                yield out["md5"], out["path"]


def dvc_cache_damage(root: Path) -> list[str]:
    """The DVC cache objects of the current version whose bytes no longer hash to their name, with the path each holds.

    Objects absent from the cache are not damage (`dvc gc`, or never committed); a directory's
    listing (`.dir`) is checked, then every file it names.
    """
    damage, todo, seen = [], list(_tracked(root)), set()
    while todo:
        md5, where = todo.pop()
        obj = dvc_object(root, md5)
        if (md5, where) in seen or not obj.is_file():
            continue
        seen.add((md5, where))
        actual = md5_file(obj)
        if actual != md5.removesuffix(".dir"):
            damage.append(f"{where}: DVC cache object {obj.relative_to(root)} is damaged (its md5 is {actual})")
        elif md5.endswith(".dir"):
            todo += [(e["md5"], f"{where}/{e['relpath']}") for e in json.loads(obj.read_text())]
    return sorted(damage)


def report_text(reports: list[StoreReport], root: Path, dvc_damage: list[str] = ()) -> str:
    """One line per store, then each damaged chunk, the damaged DVC cache objects, then what to do."""
    lines = [] if reports else ["no feature stores yet: run `headstart run` (or `dvc repro`) first"]
    for r in reports:
        where = r.path.relative_to(root) if r.path.is_relative_to(root) else r.path
        state = "ok" if r.ok else "DAMAGED" if r.damage else "STALE" if r.missing else "PROBLEM"
        current = " (current)" if r.current else ""
        lines.append(f"{state:8} {r.source:12} {where}  {r.rows} rows, {r.chunks} chunks checked{current}")
        lines += [f"         {d}" for d in r.damage]
        if r.problem:
            lines.append(f"         {r.problem}")
        if r.missing:
            lines.append(f"         {r.missing} images of the prepared data have no row: the extract stage has not run")
    if any(r.damage for r in reports):
        lines.append(
            "damaged stores are now marked incomplete: `headstart run` or `dvc repro` recomputes exactly those rows"
        )
    lines += [f"DAMAGED  {d}" for d in dvc_damage]
    if dvc_damage:
        lines.append(
            "a damaged DVC cache object must not be checked out: delete it, then `dvc fetch` it from a remote, or "
            "restore the file and `dvc add`/`dvc commit` it again (`dvc repro --force` recomputes a stage's outputs)"
        )
    return "\n".join(lines)
