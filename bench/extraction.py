"""Benchmark 1: the extract task's throughput against the bare forward pass of the same frozen body."""

from __future__ import annotations

import numpy as np
import torch

from bench.timing import Goal, Row, Stat, repeat, stat, timed
from bench.workspace import Workspace
from headstart.backbones import preprocess
from headstart.extraction import stored_taps
from headstart.fit import resolve_device
from headstart.images import Preprocess
from headstart.sources import load_source

NAME = "extraction"
GOAL = Goal(">=", 0.9)
CASES = (
    ("fmnist_cnn", 28, 10_000, False),
    ("fmnist_cnn", 28, 10_000, True),
    ("resnet18", 32, 5_000, False),
    ("resnet18", 64, 2_500, False),
)
"""(architecture, image size, images in full mode, with params.yaml's taps); quick mode uses 300 images.
Without taps the store holds the cut only; with them, every tap params.yaml's source of that
architecture stores, and the limit is the forward pass up to the deepest one."""


def batches(images: np.ndarray, pre: Preprocess, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    return [preprocess(images[i : i + batch_size], pre).to(device) for i in range(0, len(images), batch_size)]


def forward_loop(body: torch.nn.Module, inputs: list[torch.Tensor]) -> None:
    """The limit: only the frozen body's forward, on inputs already preprocessed, in a tight loop."""
    with torch.no_grad():
        for x in inputs:
            body(x)


def case(ws: Workspace, arch: str, size: int, n: int, with_taps: bool) -> Row:
    task = ws.rows(n)
    data_dir, task_meta = ws.save(task, f"extraction-{n}")
    record = ws.weights(arch, size)
    pre = record.preprocess
    device = resolve_device(ws.params.extract.device)
    net = load_source(record)
    taps = [t for s in ws.params.sources.values() if s.arch == arch for t in s.taps] if with_taps else []
    stored = stored_taps(net, record.cut, taps)
    body = net.upto(stored[-1]).eval().to(device)
    bs = ws.params.extract.batch_size
    images = task.train.images
    ready = batches(images, pre, bs, device)
    forward_loop(body, ready[:1])  # warm-up: first-call allocations are not throughput

    def once(rep: int) -> dict[str, float]:
        store_root = ws.fresh_dir("extraction")
        extracted, seconds = ws.extract(record, data_dir, task_meta, store_root, taps)
        ws.drop(store_root)
        if (computed := ws.computed(extracted)) != n:  # a fresh store root: every row is computed
            raise RuntimeError(f"the extract task computed {computed} rows, expected {n}")
        _, forward = timed(lambda: forward_loop(body, ready))
        _, pre_forward = timed(lambda: forward_loop(body, batches(images, pre, bs, device)))
        return {"extract": n / seconds, "forward": n / forward, "pre": n / pre_forward, "ratio": forward / seconds}

    samples = repeat(once, ws.repeats, f"{NAME} {arch} {size}px")
    return Row(
        f"1. extraction {arch}@{'+'.join(stored)} {size}px, {n} img",
        [
            ("extract task", stat(samples, "extract", "img/s")),
            ("bare forward", stat(samples, "forward", "img/s")),
            ("preprocess+forward", stat(samples, "pre", "img/s")),
        ],
        Stat(tuple(s["ratio"] for s in samples)),
        GOAL,
    )


def run(ws: Workspace) -> list[Row]:
    return [case(ws, arch, size, ws.size(300, full), with_taps) for arch, size, full, with_taps in CASES]
