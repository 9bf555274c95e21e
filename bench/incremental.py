"""Benchmark 4: 1% new target samples; the extract task's update of an existing store against a full extraction."""

from __future__ import annotations

from dataclasses import replace

from bench.timing import Goal, Row, Stat, repeat, stat
from bench.workspace import Workspace
from headstart.datasets import Split

NAME = "incremental"
GOAL = Goal("<=", 0.05)
ARCH, SIZE = "fmnist_cnn", 28


def run(ws: Workspace) -> list[Row]:
    grown = ws.rows(ws.size(1_000, 35_000))
    added = round(len(grown.train) / 101)  # 1% of the rows there were before
    images, labels = grown.train.images, grown.train.labels
    base = replace(grown, train=Split(images[:-added], labels[:-added]))
    base_dir, base_meta = ws.save(base, f"incremental-base-{len(base.train)}")
    grown_dir, grown_meta = ws.save(grown, f"incremental-grown-{len(grown.train)}")
    record = ws.weights(ARCH, SIZE)

    def once(rep: int) -> dict[str, float]:
        updated, scratch = ws.fresh_dir("incremental"), ws.fresh_dir("full")
        first, _ = ws.extract(record, base_dir, base_meta, updated)
        incremental, incremental_s = ws.extract(record, grown_dir, grown_meta, updated)
        full, full_s = ws.extract(record, grown_dir, grown_meta, scratch)
        ws.drop(updated)
        ws.drop(scratch)
        incremental_rows, full_rows = ws.computed(incremental, before=first), ws.computed(full)
        return {
            "incremental_rows": incremental_rows,
            "full_rows": full_rows,
            "rows_ratio": incremental_rows / full_rows,
            "incremental_s": incremental_s,
            "full_s": full_s,
            "ratio": incremental_s / full_s,
        }

    samples = repeat(once, ws.repeats, NAME)
    where = f"{ARCH}@{record.cut}, {len(base.train)} + {added} img"
    return [
        Row(
            f"4. incremental: rows computed, {where}",
            [("update", stat(samples, "incremental_rows", "rows")), ("full", stat(samples, "full_rows", "rows"))],
            Stat(tuple(s["rows_ratio"] for s in samples)),
            GOAL,
        ),
        Row(
            f"4. incremental: time, {where}",
            [("update", stat(samples, "incremental_s", "s")), ("full", stat(samples, "full_s", "s"))],
            Stat(tuple(s["ratio"] for s in samples)),
            GOAL,
        ),
    ]
