"""Benchmark 10: a head's training epoch on stored features, idle and with a second heavy process on the cores.

Before: torch's fixed thread count (every available core). After: `head_threads()`, the idle
cores measured when training starts. Both train the same head on the same rows in the same
repetition; the second process is a one-thread matrix-product loop, as another user's job is.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from bench.timing import Goal, Row, Stat, repeat, stat
from headstart.config import HeadParams, OptimParams
from headstart.fit import fit
from headstart.heads import make_head
from headstart.threads import available_cores, head_threads, torch_threads

if TYPE_CHECKING:
    from bench.workspace import Workspace

NAME = "threads"
BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def epoch_seconds(x: np.ndarray, y: np.ndarray, threads: int) -> float:
    optim = OptimParams(epochs=1, batch_size=128, lr=1e-3, patience=10)
    with torch_threads(threads):
        torch.manual_seed(0)
        head = make_head(tuple(x.shape[1:]), 5, HeadParams())
        started = time.perf_counter()
        fit(head, (x, y), (x[:256], y[:256]), optim, seed=0)
        return time.perf_counter() - started


def run(ws: Workspace) -> list[Row]:
    rng = np.random.default_rng(0)
    n = ws.size(2000, 20000)
    x = rng.normal(size=(n, 3136)).astype(np.float32)  # the source CNN's block2 activations
    y = rng.integers(0, 5, size=n)
    cores = available_cores()

    def once(rep: int) -> dict[str, float]:
        sample = {"idle_before": epoch_seconds(x, y, cores), "idle_after": epoch_seconds(x, y, head_threads())}
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            time.sleep(1.0)  # the other job is running before training starts, as it would be
            chosen = head_threads()
            sample |= {"busy_before": epoch_seconds(x, y, cores), "busy_after": epoch_seconds(x, y, chosen)}
            sample["busy_threads"] = chosen
        finally:
            busy.kill()
            busy.wait()
        return {**sample, "idle": sample["idle_after"] / sample["idle_before"],
                "busy": sample["busy_after"] / sample["busy_before"]}  # fmt: skip

    samples = repeat(once, ws.repeats if not ws.quick else 1, NAME)
    return [
        Row(
            f"10. head epoch ({n} rows x 3136), idle: fitted threads / {cores}",
            [("before", stat(samples, "idle_before", "s")), ("after", stat(samples, "idle_after", "s"))],
            Stat(stat(samples, "idle").values),
            Goal("<=", 1.1),
        ),
        Row(
            "10. head epoch, a second heavy process on the cores: fitted / fixed",
            [
                ("before", stat(samples, "busy_before", "s")),
                ("after", stat(samples, "busy_after", "s")),
                ("threads chosen", stat(samples, "busy_threads")),
            ],
            Stat(stat(samples, "busy").values),
            Goal("<=", 0.5),
        ),
    ]
