"""The benchmarks in table order, run against one workspace; and the machine they ran on."""

from __future__ import annotations

import importlib
import os
import platform
import time
from collections.abc import Sequence

import torch

from bench import BENCHMARKS
from bench.timing import Row, log
from bench.workspace import Workspace


def run_benchmarks(ws: Workspace, only: Sequence[str] = ()) -> list[Row]:
    """Every benchmark (or those named in `only`), in table order."""
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; expected some of {list(BENCHMARKS)}")
    rows: list[Row] = []
    for name in BENCHMARKS:
        if only and name not in only:
            continue
        log(f"--- {name}")
        started = time.perf_counter()
        rows += importlib.import_module(f"bench.{name}").run(ws)
        log(f"{name}: {time.perf_counter() - started:.0f} s")
    return rows


def machine() -> str:
    """CPU model, cores and torch threads: the context every figure needs."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}"
    )
