"""Benchmark 5: peak memory of the extract task at N and 10N samples (a process per run).

Run as `python -m bench.memory DATA_DIR WEIGHTS_JSON STORE_ROOT` it is one such process: it runs
the extract task (WEIGHTS_JSON: a SourceWeights record) and prints its peak resident set size, and
the size before the task began.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.timing import Goal, Row, Stat, repeat, stat
from tests.tiny import REPO

if TYPE_CHECKING:
    from bench.workspace import Workspace
    from headstart.records import SourceWeights

NAME = "memory"
GOAL = Goal("<=", 1.2)
ARCH, SIZE = "fmnist_cnn", 28


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB.

    Linux's VmHWM, not getrusage's ru_maxrss: the latter survives exec, so a child started by a
    large parent reports the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def json_process(module: str, *args: str) -> dict[str, Any]:
    """`python -m module args` in a process of its own (so its peak RSS is its own); the JSON of its last line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_process(data_dir: Path, weights_record: SourceWeights, store_root: Path) -> dict[str, float]:
    return json_process("bench.memory", str(data_dir), weights_record.model_dump_json(), str(store_root))


def run(ws: Workspace) -> list[Row]:
    n = ws.size(300, 3_500)
    record = ws.weights(ARCH, SIZE)
    saved = {size: ws.save(ws.rows(size), f"memory-{size}") for size in (n, 10 * n)}

    def once(rep: int) -> dict[str, float]:
        sample = {}
        for size, label in ((n, "small"), (10 * n, "large")):
            store_root = ws.fresh_dir("memory")
            measured = one_process(saved[size][0], record, store_root)
            ws.drop(store_root)
            sample[label], sample[f"{label}_base"] = measured["peak_mb"], measured["before_mb"]
        return {**sample, "ratio": sample["large"] / sample["small"]}

    samples = repeat(once, ws.process_repeats, NAME)
    return [
        Row(
            f"5. memory: peak RSS of extract, {ARCH}@{record.cut}, {n} vs {10 * n} img",
            [
                (f"{n} img", stat(samples, "small", "MB")),
                (f"{10 * n} img", stat(samples, "large", "MB")),
                ("before the task (imports)", stat(samples, "small_base", "MB")),
            ],
            Stat(tuple(s["ratio"] for s in samples)),
            GOAL,
        )
    ]


def main(data_dir: Path, weights_json: str, store_root: Path) -> None:
    """Run the extract task on the data set written in `data_dir`; print peak RSS before and after as JSON."""
    from headstart.config import ExtractParams, load_params
    from headstart.datasets import load_task
    from headstart.records import SourceWeights, TaskMeta
    from tasks.extract import extract

    params: ExtractParams = load_params(REPO / "params.yaml").extract
    weights = SourceWeights.model_validate_json(weights_json)
    task_meta = TaskMeta.read(data_dir / "target.json")
    if store_root.exists() and any(store_root.iterdir()):
        raise RuntimeError(f"{store_root} is not empty: the measured run must compute every row")
    before = peak_rss_mb()
    record = extract.fn(weights, task_meta, params, data_dir, store_root)
    peak = peak_rss_mb()
    total = sum(len(load_task(data_dir, "target").split(s)) for s in ("train", "val", "test"))
    if record.rows != total:  # a fresh store: the rows it holds are the rows this run computed
        raise RuntimeError(f"extract computed {record.rows} rows, not the whole data set ({total})")
    print(json.dumps({"before_mb": before, "peak_mb": peak}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
