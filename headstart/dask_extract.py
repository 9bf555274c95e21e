"""Sharded extraction on Dask: each shard of whole Zarr chunks is a Prefect task run on a Dask worker.

The extract task (tasks/extract.py) stays the coordinator: it holds the store's writer lock, plans
the shards, skips those an interrupted run already finished, and commits. This module is the
fan-out: the shard tasks are submitted to prefect-dask's `DaskTaskRunner`, on a `LocalCluster` it
starts and stops, or on a running cluster's scheduler (`extract.dask_address`). Each shard task
computes its rows with the same chunk segments and batches as the single-process path and writes
only its own chunk files, then its done marker (`FeatureStore.write_shard`).

The runner is entered here rather than given to a sub-flow: a flow's parameters travel with the
context of every task it submits, and the shards' pixels must travel only with their own shard.
The shard task runs belong to the flow run around the extract task (`headstart run`), or stand
alone under DVC (`headstart stage extract`).

It is kept out of headstart/extraction.py because that file's import closure is the store's code
version: how rows are scheduled must not change which store they belong to.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from distributed import LocalCluster
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from headstart.backbones import StagedNet
from headstart.caching import run_logger
from headstart.config import ExtractParams
from headstart.extraction import segment_features, source_network
from headstart.fit import resolve_device
from headstart.records import SourceWeights
from headstart.store import FeatureStore, Shard, ShardJob, ShardsFailedError


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """A LocalCluster of `workers` processes, one thread each, no dashboard; a lost worker fails its shard.

    `allowed_failures=0`: Dask would otherwise rerun a task whose worker died (up to 3 times) under
    the same Prefect task run; failing it instead leaves a clear state (the shard has no done
    marker) and the rerun of the stage computes exactly the shards without one.
    """
    return {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "scheduler_kwargs": {"allowed_failures": 0},
    }


def _local_cluster(**kwargs: Any) -> LocalCluster:
    """A LocalCluster whose workers report their task runs to this process's Prefect API.

    Without PREFECT_API_URL every worker process would start a Prefect server of its own (about
    8 s each, on the same database); with it they use the one this process already talks to.
    Under DVC the shard task runs have no flow run, so their logs stay local (not a warning each).
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    env = {"PREFECT_API_URL": api_url, "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}
    return LocalCluster(env=env, **kwargs)


def task_runner(params: ExtractParams) -> DaskTaskRunner:
    """The running cluster at `dask_address`, else a LocalCluster started (and stopped) by the sub-flow."""
    if params.dask_address:
        return DaskTaskRunner(address=params.dask_address)
    return DaskTaskRunner(cluster_class=_local_cluster, cluster_kwargs=local_cluster_kwargs(params.dask_workers))


@lru_cache(maxsize=2)
def _source_net(weights_record_json: str) -> StagedNet:
    """The source network, loaded (and its sha256 verified) once per worker process, not once per shard."""
    return source_network(SourceWeights.model_validate_json(weights_record_json))


@task(name="extract_shard", cache_policy=NO_CACHE, persist_result=False)
def extract_shard(
    store_path: str,
    store_key: str,
    lease: str,
    shard: Shard,
    keys: np.ndarray,
    images: np.ndarray,
    weights_record: dict,
    taps: Sequence[str],
    batch_size: int,
    device: str,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Compute one shard's rows on this worker, write its chunks, then its done marker.

    Torch runs on one thread: Dask runs one shard per worker thread, and threads per shard times
    shards at once must not exceed the cores. One thread gives bitwise the features of the
    single-process path (checked by tests/ops/test_dask_extract.py). Not cached by Prefect: the
    done marker in the store is the durable record.
    """
    torch.set_num_threads(1)
    started = time.perf_counter()
    dev = resolve_device(device)
    weights = SourceWeights.model_validate(weights_record)
    net = _source_net(weights.model_dump_json()).to(dev)
    pre = weights.preprocess
    store = FeatureStore.open_shard_writer(store_path, store_key, lease)

    def compute(positions: np.ndarray) -> dict[str, np.ndarray]:
        return segment_features(net, images[positions], pre, taps, batch_size, dev)

    store.write_shard(shard, keys, compute, on_chunk)
    return {"shard": shard.name, "rows": len(keys), "seconds": time.perf_counter() - started, "pid": os.getpid()}


def collect(futures: Sequence[Any], advance: Callable[[int], None]) -> tuple[list[dict[str, Any]], list[str]]:
    """Wait for every shard (a failure does not stop the others: their chunks are kept); (results, errors)."""
    done, failed = [], []
    for future in futures:
        try:
            result = future.result()
        except Exception as err:  # a lost worker (KilledWorker) or an error inside the shard
            failed.append(f"{type(err).__name__}: {err}")
            continue
        done.append(result)
        advance(result["rows"])
    return done, failed


def extend_on_dask(
    store: FeatureStore,
    keys: np.ndarray,
    images: np.ndarray,
    weights: SourceWeights,
    taps: Sequence[str],
    params: ExtractParams,
    advance: Callable[[int], None],
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Store the missing rows of `keys`, sharded over Dask workers; return the rows computed by this run.

    `advance(rows)` runs in this process as each shard finishes (the progress bar and artifact).
    """
    log = run_logger()
    where = params.dask_address or f"a LocalCluster of {params.dask_workers} worker processes"
    stats: dict[str, Any] = {}

    def run(jobs: list[ShardJob]) -> None:
        if not jobs:
            return
        log.info("extract: %d shards of up to %d chunks on %s", len(jobs), params.shard_chunks, where)
        with task_runner(params) as runner:
            futures = [
                runner.submit(
                    extract_shard,
                    parameters={
                        "store_path": str(store.path),
                        "store_key": store.path.stem,
                        "lease": job.lease,
                        "shard": job.shard,
                        "keys": keys[job.indices],
                        "images": images[job.indices],
                        "weights_record": weights.model_dump(mode="json"),
                        "taps": list(taps),
                        "batch_size": params.batch_size,
                        "device": params.device,
                        "on_chunk": on_chunk,
                    },
                )
                for job in jobs
            ]
            done, failed = collect(futures, advance)
        if failed:
            raise ShardsFailedError(
                f"{store.path}: {len(failed)} of {len(jobs)} shards failed (first: {failed[0]}); the "
                f"{len(done)} finished shards are kept, so rerunning the extract stage computes only the rest"
            )
        stats.update(shards=len(done), workers=len({r["pid"] for r in done}))

    computed, committed = store.extend_sharded(keys, params.shard_chunks, run)
    if stats:
        log.info(
            "extract: %d shards (%d rows) computed by %d worker processes; %d rows were already in finished shards",
            stats["shards"],
            computed,
            stats["workers"],
            committed - computed,
        )
    return computed
