"""Benchmark 1b: the extract task per store codec and dtype, against the bare forward pass, with the disk per row.

Every (codec, dtype) pair is extracted into a fresh store in each repetition, right after a bare
forward pass over the same images, so each ratio's two sides share the machine's state; the pairs
run interleaved in every repetition, so a neighbour's load spreads over all of them. The figures
are what `extract.codec` and `extract.dtype` defaults were chosen from (params.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from bench.extraction import GOAL, batches, forward_loop
from bench.timing import Row, Stat, repeat, stat, timed
from bench.workspace import Workspace
from headstart.config import StoreCodec, StoreDtype
from headstart.extraction import stored_taps
from headstart.fit import resolve_device
from headstart.sources import load_source

NAME = "extraction_codecs"
CASES = (("fmnist_cnn", 28, 4_008, True, 4.0), ("resnet18", 32, 2_000, False, 1.0))
"""(architecture, image size, images in full mode, with params.yaml's taps, extract.chunk_mb); quick mode uses
100 images. The sizes fill whole chunks at both dtypes (Zarr stores a store's last chunk at full size, so a
partial one would inflate the disk per row): the CNN's chunks hold 167 float32 or 334 float16 rows at 4 MiB,
resnet18's pool features 500 or 1000 at 1 MiB."""
REPEATS = (1, 2)
"""Repetitions (quick, full): 16 extractions each, so the full benchmark stays near 2 minutes on 2 cores."""
PAIRS = tuple((codec, dtype) for dtype in get_args(StoreDtype) for codec in get_args(StoreCodec))


def disk_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`: chunks, keys and metadata, what DVC tracks."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def case(ws: Workspace, arch: str, size: int, n: int, with_taps: bool, chunk_mb: float) -> list[Row]:
    task = ws.rows(n)
    data_dir, task_meta = ws.save(task, f"extraction-{n}")
    record = ws.weights(arch, size)
    device = resolve_device(ws.params.extract.device)
    net = load_source(record)
    taps = [t for s in ws.params.sources.values() if s.arch == arch for t in s.taps] if with_taps else []
    stored = stored_taps(net, record.cut, taps)
    body = net.upto(stored[-1]).eval().to(device)
    ready = batches(task.train.images, record.preprocess, ws.params.extract.batch_size, device)
    forward_loop(body, ready[:1])  # warm-up: first-call allocations are not throughput

    def once(rep: int) -> dict[str, float]:
        sample = {}
        for codec, dtype in PAIRS:
            params = ws.params.extract.model_copy(update={"codec": codec, "dtype": dtype, "chunk_mb": chunk_mb})
            _, forward = timed(lambda: forward_loop(body, ready))
            store_root = ws.fresh_dir("codecs")
            extracted, seconds = ws.extract(record, data_dir, task_meta, store_root, taps, params)
            if (computed := ws.computed(extracted)) != n:
                raise RuntimeError(f"the extract task computed {computed} rows, expected {n}")
            sample |= {
                f"{codec}/{dtype}/extract": n / seconds,
                f"{codec}/{dtype}/forward": n / forward,
                f"{codec}/{dtype}/bytes": disk_bytes(extracted.store_dir()) / n,
                f"{codec}/{dtype}/ratio": forward / seconds,
            }
            ws.drop(store_root)
        return sample

    samples = repeat(once, ws.size(*REPEATS), f"{NAME} {arch} {size}px")
    return [
        Row(
            f"1b. extraction {arch}@{'+'.join(stored)} {size}px, {n} img, {codec} {dtype}",
            [
                ("extract task", stat(samples, f"{codec}/{dtype}/extract", "img/s")),
                ("bare forward", stat(samples, f"{codec}/{dtype}/forward", "img/s")),
                ("disk", stat(samples, f"{codec}/{dtype}/bytes", "B/row")),
            ],
            Stat(tuple(s[f"{codec}/{dtype}/ratio"] for s in samples)),
            GOAL,
        )
        for codec, dtype in PAIRS
    ]


def run(ws: Workspace) -> list[Row]:
    return [
        row
        for arch, size, full, taps, chunk_mb in CASES
        for row in case(ws, arch, size, ws.size(100, full), taps, chunk_mb)
    ]
