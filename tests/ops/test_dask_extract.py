"""Scale-out extraction: `extract.runner: dask` on a real LocalCluster of 2 worker processes.

The extraction runs as a user's would, in its own process (Prefect's local server, the cluster's
scheduler, nannies and workers are its children); the tests compare its store bitwise with the
single-process one, SIGKILL one worker mid-way and rerun, and check with psutil that not one
process of either run is left. Each run pays Prefect's local server and the cluster's start (about
25 s on 2 busy cores): one to two minutes in all, marked slow.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from headstart.config import ExtractParams
from headstart.datasets import SPLITS, Split, TaskData, save_task
from headstart.extraction import provenance
from headstart.fingerprint import row_keys
from headstart.images import FMNIST_DECODE, Preprocess
from headstart.records import ExtractRecord, TaskMeta
from headstart.store import MARKER, SHARDS, FeatureStore, IncompleteStoreError, plan_shards
from tasks.extract import extract
from tests.ops.conftest import assert_all_gone
from tests.tiny import random_cnn_weights, tiny_images

REPO = Path(__file__).resolve().parents[2]
PRE = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))
TAPS = ["block1", "block2", "fc1"]
LOCAL = ExtractParams(batch_size=8, chunk_mb=0.5, device="cpu")  # block1 rows are 25 KiB: 16-row chunks
DASK = LOCAL.model_copy(update={"runner": "dask", "dask_workers": 2, "shard_chunks": 2})
N = 300  # 19 chunks (the last one partial), 10 shards
pytestmark = pytest.mark.slow

_CHILD = """
import functools, json, logging, os, sys, time
from pathlib import Path

logging.basicConfig(level=logging.INFO)  # before Prefect is imported, as `headstart stage` does
from headstart.config import ExtractParams
from headstart.records import SourceWeights, TaskMeta
from tasks.extract import extract


def note(log, delay, stop):
    # test hook, run in the Dask worker after each chunk it writes: which process wrote it; slow enough to kill
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {stop}\\n")
    time.sleep(delay)


args = json.loads(sys.argv[1])
record = extract.fn(
    SourceWeights.model_validate(args["weights"]), TaskMeta.model_validate(args["task_meta"]),
    ExtractParams(**args["params"]), Path(args["data_dir"]), Path(args["root"]), taps=args["taps"],
    on_chunk=functools.partial(note, args["log"], args["delay"]),
)
print("RECORD " + record.model_dump_json())
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny target data, a random source CNN's weights, and the single-process store to compare with."""
    root = tmp_path_factory.mktemp("dask-extract")
    images, labels = tiny_images(N, seed=3)
    labels = (labels % 5).astype(np.int64)
    a, b = int(N * 0.6), int(N * 0.8)
    task = TaskData(
        "target",
        [f"c{i}" for i in range(5)],
        Split(images[:a], labels[:a]),
        Split(images[a:b], labels[a:b]),
        Split(images[b:], labels[b:]),
    )
    meta = TaskMeta(**save_task(task, root / "data", FMNIST_DECODE))
    weights = random_cnn_weights(root / "source.safetensors", PRE)
    committed: list[int] = []  # the store's committed rows after each chunk this call computed
    local = extract.fn(weights, meta, LOCAL, root / "data", root / "local", taps=TAPS, on_chunk=committed.append)
    assert local.rows == N and committed == sorted(committed) and committed[-1] == N  # all N computed by this call
    keys = row_keys(np.concatenate([task.split(s).images for s in SPLITS]))
    return {"root": root, "weights": weights, "meta": meta, "local": local, "keys": keys}


def run_child(project: dict[str, Any], features: Path, log: Path, delay: float, kill_after_shards: int = 0) -> dict:
    """Run the dask extraction in its own process; optionally SIGKILL one worker once some shards are done.

    Returns its exit code, record (when it finished), output, the worker pids seen, the pid killed,
    and every process it started (all must be gone afterwards).
    """
    args = {
        "weights": project["weights"].model_dump(mode="json"),
        "task_meta": project["meta"].model_dump(mode="json"),
        "params": DASK.model_dump(),
        "data_dir": str(project["root"] / "data"),
        "root": str(features),
        "taps": TAPS,
        "log": str(log),
        "delay": delay,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: dict[int, psutil.Process] = {}
    cmdlines: dict[int, str] = {}
    killed = None
    try:
        parent = psutil.Process(child.pid)
        deadline = time.monotonic() + 240
        while child.poll() is None and time.monotonic() < deadline:
            try:
                for p in parent.children(recursive=True):
                    if p.pid not in seen:
                        seen[p.pid], cmdlines[p.pid] = p, " ".join(_cmdline(p))
            except psutil.NoSuchProcess:
                break
            if kill_after_shards and killed is None and len(list(features.glob(f"*.zarr/{SHARDS}/*.json"))) >= 2:
                killed = _busy_worker(seen, log)
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    record = next(
        (ExtractRecord.model_validate_json(line[7:]) for line in out.splitlines() if line.startswith("RECORD ")), None
    )
    workers = {pid for pid, line in cmdlines.items() if "spawn_main" in line}  # multiprocessing's spawned workers
    return {"rc": child.returncode, "record": record, "out": out, "workers": workers, "killed": killed, "seen": seen}


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _busy_worker(seen: dict[int, psutil.Process], log: Path) -> int:
    """The worker process that wrote the latest chunk: it is inside a shard now (sleeping in the hook)."""
    last = int(log.read_text().splitlines()[-1].split()[0])
    assert last in seen, f"chunk writer {last} is not a process of the run"
    return last


def chunk_log(log: Path) -> list[tuple[int, int]]:
    """(worker pid, segment stop) per chunk written, in order."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [(int(pid), int(stop)) for pid, stop in (line.split() for line in lines)]


def computed_rows(out: str) -> int:
    """The rows the extract task computed in this run, as its summary log line reports them."""
    (n,) = re.findall(r"extract fmnist at .*, (\d+) computed in ", out)
    return int(n)


def assert_bitwise_equal(project: dict[str, Any], record: ExtractRecord) -> None:
    prov = provenance(project["weights"].sha256, "fmnist_cnn", TAPS, PRE)
    local = FeatureStore.open(project["local"].store_dir(), prov)
    dask = FeatureStore.open(record.store_dir(), prov)
    assert record.store_key == project["local"].store_key  # the runner is not provenance
    np.testing.assert_array_equal(dask.committed_keys(), local.committed_keys())
    for tap in TAPS:
        a, b = dask.read(project["keys"], tap), local.read(project["keys"], tap)
        assert a.dtype == b.dtype == np.float32
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), tap  # bitwise, not just close


def test_dask_runner_on_two_worker_processes_is_bitwise_the_local_store(project: dict[str, Any], tmp_path: Path):
    run = run_child(project, tmp_path / "features", tmp_path / "chunks.log", delay=0.0)
    try:
        assert run["rc"] == 0, run["out"][-3000:]
        record = run["record"]
        assert computed_rows(run["out"]) == N and record.rows == N
        assert "computed by 2 worker processes" in run["out"]
        writers = {pid for pid, _ in chunk_log(tmp_path / "chunks.log")}
        assert len(run["workers"]) == 2 and writers == run["workers"]  # both real workers wrote chunks, nobody else
        store = record.store_dir()
        assert (store / MARKER).is_file() and not (store / SHARDS).exists()
        assert_bitwise_equal(project, record)
    finally:
        assert_all_gone(list(run["seen"].values()), timeout_s=30)


@pytest.mark.faults
def test_a_killed_worker_fails_the_run_and_the_rerun_computes_only_the_missing_shards(
    project: dict[str, Any], tmp_path: Path
) -> None:
    features, log = tmp_path / "features", tmp_path / "chunks.log"
    first = run_child(project, features, log, delay=0.4, kill_after_shards=2)
    try:
        assert first["killed"] in first["workers"], first["out"][-3000:]
        assert first["rc"] != 0 and first["record"] is None
        assert "KilledWorker" in first["out"] and "rerunning the extract stage computes only the rest" in first["out"]
        (store,) = features.glob("*.zarr")
        assert not (store / MARKER).exists()
        with pytest.raises(IncompleteStoreError):
            FeatureStore.open(store, provenance(project["weights"].sha256, "fmnist_cnn", TAPS, PRE))
    finally:
        assert_all_gone(list(first["seen"].values()), timeout_s=30)

    shards = plan_shards(0, N, 16, DASK.shard_chunks)
    done = {p.stem for p in (store / SHARDS).glob("*.json")}
    missing = [s for s in shards if s.name not in done]
    assert done and missing, (done, missing)  # the kill left some shards finished and some not
    written = len(chunk_log(log))

    second = run_child(project, features, log, delay=0.0)
    try:
        assert second["rc"] == 0, second["out"][-3000:]
        redone = sorted(stop for _, stop in chunk_log(log)[written:])
        assert redone == sorted(b for s in missing for _, b in s.segments)  # exactly the unmarked shards' chunks
        assert computed_rows(second["out"]) == sum(s.stop - s.start for s in missing)
        assert second["record"].rows == N and not (store / SHARDS).exists()
        assert_bitwise_equal(project, second["record"])
    finally:
        assert_all_gone(list(second["seen"].values()), timeout_s=30)
