"""The one timing and table helper every benchmark shares: repetitions, median [min-max], goals, the table."""

from __future__ import annotations

import math
import operator
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
COLUMNS = ("benchmark", "measured: median [min-max]", "ratio", "goal", "met")


def fmt(x: float) -> str:
    """Three significant digits, no exponent for the magnitudes benchmarks produce."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{digits}f}"


@dataclass(frozen=True)
class Stat:
    """Repeated measurements of one quantity: the median is the figure, min and max its spread."""

    values: tuple[float, ...]
    unit: str = ""

    @property
    def median(self) -> float:
        s = sorted(self.values)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        spread = f" [{fmt(min(self.values))}-{fmt(max(self.values))}]" if len(self.values) > 1 else " (n=1)"
        return f"{fmt(self.median)}{spread}{unit}"


def stat(samples: Sequence[dict[str, float]], key: str, unit: str = "") -> Stat:
    """The Stat of `key` over per-repetition sample dicts."""
    return Stat(tuple(float(s[key]) for s in samples), unit)


@dataclass(frozen=True)
class Goal:
    """A bound the median ratio must meet, e.g. `Goal(">=", 0.9)`."""

    op: str
    bound: float

    def met(self, value: float) -> bool:
        return {">=": operator.ge, "<=": operator.le}[self.op](value, self.bound)

    def __str__(self) -> str:
        return f"{self.op} {fmt(self.bound)}"


@dataclass
class Row:
    """One line of the results table; `skipped` (a reason) replaces the measurements."""

    benchmark: str
    measured: list[tuple[str, Stat | str]] = field(default_factory=list)
    ratio: Stat | None = None
    goal: Goal | None = None
    skipped: str = ""

    @property
    def met(self) -> str:
        if self.skipped or self.ratio is None or self.goal is None:
            return "-"
        return "yes" if self.goal.met(self.ratio.median) else "no"

    def cells(self) -> list[str]:
        measured = f"skipped: {self.skipped}" if self.skipped else "; ".join(f"{k} {v}" for k, v in self.measured)
        ratio = "-" if self.skipped or self.ratio is None else str(self.ratio)
        return [self.benchmark, measured, ratio, str(self.goal) if self.goal else "-", self.met]


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn's result and its wall-clock seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def repeat(fn: Callable[[int], dict[str, Any]], repeats: int, label: str) -> list[dict[str, Any]]:
    """Run one repetition `repeats` times (each measures its side-by-side pair itself); progress on stderr."""
    samples = []
    for rep in range(repeats):
        log(f"{label}: repetition {rep + 1}/{repeats}")
        samples.append(fn(rep))
    return samples


def log(message: str) -> None:
    """Progress for the person waiting; the table alone goes to stdout."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def render_text(rows: Sequence[Row]) -> str:
    """The table as aligned plain text."""
    table = [list(COLUMNS)] + [r.cells() for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: Sequence[Row], preamble: Sequence[str] = ()) -> str:
    """The table as Markdown, after `preamble` lines (machine, command)."""
    escape = str.maketrans({"|": "\\|"})
    lines = [*preamble, "" if preamble else None, "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    lines += ["| " + " | ".join(c.translate(escape) for c in r.cells()) + " |" for r in rows]
    return "\n".join(line for line in lines if line is not None) + "\n"
