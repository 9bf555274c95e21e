"""The raw stage: what the raw data is right now (each file's sha256), so a changed file reruns the data stage.

It is `always_changed` in dvc.yaml: it runs on every `dvc repro` and rewrites `data/raw.json`
with the same bytes when nothing changed, so the data stage reruns only when a file did.
`headstart run` computes the same record first, and the data task's cache key contains it.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.config import DataParams
from headstart.raw import raw_record
from headstart.records import RawRecord


@task(name="raw", task_run_name="raw", cache_policy=NO_CACHE, persist_result=False)
def raw(params: DataParams, with_source: bool = True) -> RawRecord:
    """Fingerprint the files the data stage will read: Fashion-MNIST when a task comes from it, the image folder."""
    return raw_record(params, with_source)
