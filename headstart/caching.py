"""Prefect caching keyed on content, and the check that a cached result's files still exist.

Prefect's default policy includes the run id (never reused across runs) and hashes a Path as
its string. Here a key is the task name, the library's code version and the call's arguments
as canonical JSON: typed params and upstream records, which carry content fingerprints.
Results are small JSON records; the large data they point at lives in files whose sha256 the
record lists, so a deleted or altered output turns a cache hit into a recompute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from headstart.env import project_root
from headstart.fingerprint import canonical_json, code_version, combine, sha256_bytes, sha256_file


@lru_cache(maxsize=1)
def _code_version() -> str:
    return code_version()


def _relative(value: Any) -> Any:
    """Paths inside the project become relative, so moving the project keeps every key."""
    if isinstance(value, Path):
        try:
            return str(value.resolve().relative_to(project_root()))
        except ValueError:
            return str(value)
    if isinstance(value, dict):
        return {k: _relative(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_relative(v) for v in value]
    return value


def content_key(task_name: str, parameters: dict[str, Any]) -> str:
    """The cache key of one call: task name + code version + arguments (content, not identity)."""
    return combine(task_name, _code_version(), sha256_bytes(canonical_json(_relative(parameters)).encode()))


def cached(task_name: str, content: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Options for `@task(**cached("extract"))`: content key, JSON results persisted in the project.

    `content(parameters)` adds what the arguments only name: the current bytes behind a path
    (a data folder, a weights file rewritten by another stage) or a registry alias. Without it
    such an input could change while the key stays the same.
    """

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        extra = {"current_content": content(parameters)} if content is not None else {}
        return content_key(task_name, {**parameters, **extra})

    return {
        "name": task_name,
        "cache_key_fn": key_fn,
        "persist_result": True,
        "result_serializer": "json",
        "result_storage": results_dir(),
    }


def results_dir() -> Path:
    return project_root() / ".prefect" / "results"


def output(path: Path) -> dict[str, str]:
    """One entry of a record's `outputs`: the file (project-relative) and the sha256 it must still have."""
    return {"path": _relative(Path(path)), "sha256": sha256_file(path)}


def outputs_intact(record: Any) -> bool:
    """True when every file a record lists exists with the sha256 it was written with."""
    if not isinstance(record, dict):
        return False
    for entry in record.get("outputs", []):
        path = Path(entry["path"])
        if not path.is_absolute():
            path = project_root() / path
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            return False
    return True


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, the module logger outside (DVC stages, tests)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("headstart")
