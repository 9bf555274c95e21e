"""The benchmarks still run: two of them in quick mode, in this process, through the real extract and train code.

Nothing here asserts a speed (timings belong in `python -m bench`): only that the table has the
expected rows, numeric ratios, and the work figures that do not depend on the machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.suite import run_benchmarks
from bench.timing import Goal, Row, Stat, render_markdown, render_text
from bench.workspace import Workspace


def table_lines(markdown: str) -> int:
    return sum(line.startswith("| ") for line in markdown.splitlines())


def test_stat_goal_and_tables_render_what_they_hold() -> None:
    s = Stat((3.0, 1.0, 2.0), "s")
    assert s.median == 2.0 and str(s) == "2.00 [1.00-3.00] s"
    assert Stat((1.0, 4.0)).median == 2.5
    assert Goal("<=", 0.05).met(0.05) and not Goal(">=", 0.9).met(0.5)
    rows = [Row("a", [("x", s)], Stat((0.5, 0.6, 0.7)), Goal(">=", 0.9)), Row("b", skipped="no data")]
    assert [r.met for r in rows] == ["no", "-"]
    text = render_text(rows)
    assert "skipped: no data" in text and text.splitlines()[0].startswith("benchmark")
    md = render_markdown(rows, ["Machine: test."])
    assert md.startswith("Machine: test.") and table_lines(md) == 3  # header + two rows


@pytest.mark.slow
def test_quick_incremental_and_store_reads_give_the_expected_rows(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, quick=True)
    rows = run_benchmarks(ws, ["incremental", "store_reads"])
    names = [r.benchmark for r in rows]
    assert len(rows) == 3
    assert names[0].startswith("4. incremental: rows computed") and names[1].startswith("4. incremental: time")
    assert names[2].startswith("6. store reads")
    for row in rows:
        assert not row.skipped
        assert row.ratio is not None and len(row.ratio.values) == 3
        assert all(math.isfinite(v) and v > 0 for v in row.ratio.values)
    # 1% new samples: exactly 10 of the 1000 rows are computed again, whatever the machine
    assert rows[0].ratio.values == (0.01, 0.01, 0.01) and rows[0].met == "yes"
    assert rows[1].met in ("yes", "no") and rows[2].met == "-"
    assert table_lines(render_markdown(rows)) == 4
