"""Cache keys from content, the same for both orchestrators, and Prefect's options for a cached task.

Prefect's default policy includes the run id (never reused across runs) and hashes a Path as
its string. Here a stage's key is its name, its code version (the project files its task module
imports, transitively: headstart.codeversion) and the call's arguments as canonical JSON: typed
params and upstream records, which carry content fingerprints, with project paths made relative
(a moved or copied project keeps every key). A task may add what its arguments only name (the
bytes behind a weights URI). The runner in flows/stages.py computes the same key to reuse a
stage's record on disk whichever orchestrator wrote it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from headstart.codeversion import code_version, stage_code
from headstart.env import project_root
from headstart.fingerprint import canonical_json, combine, file_digests, sha256_bytes
from headstart.uris import weights_content

CONTENT: dict[str, Callable[[dict[str, Any]], Any]] = {"weights": weights_content}
"""Task name -> what its arguments only name: without it such an input could change while the key stays the same."""


def _relative(value: Any) -> Any:
    """Paths inside the project become relative, so moving the project keeps every key; callables are not inputs."""
    if isinstance(value, Path):
        try:
            return str(value.resolve().relative_to(project_root()))
        except ValueError:
            return str(value)
    if isinstance(value, dict):
        return {k: _relative(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, list | tuple):
        return [_relative(v) for v in value]
    return value


def _key_inputs(task_name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments plus what they only name, project paths made relative: what a key hashes."""
    content = CONTENT.get(task_name)
    extra = {"current_content": content(parameters)} if content is not None else {}
    return _relative({**parameters, **extra})


def stage_key(task_name: str, parameters: dict[str, Any], module: str | None = None) -> str:
    """The key of one call: task name + the code version of `module` (default tasks/<name>.py) + inputs."""
    inputs = canonical_json(_key_inputs(task_name, parameters))
    return combine(task_name, code_version(module or f"tasks/{task_name}.py"), sha256_bytes(inputs.encode()))


def stage_inputs(task_name: str, parameters: dict[str, Any]) -> dict[str, str]:
    """The key's parts, one short hash each (the code per file): what `headstart status` compares to say why."""
    parts = {f"code:{path}": digest for path, digest in file_digests(stage_code(f"tasks/{task_name}.py")).items()}
    for name, value in _key_inputs(task_name, parameters).items():
        parts[name] = sha256_bytes(canonical_json(value).encode())[:16]
    return parts


def bound_arguments(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments a call binds, defaults included: what Prefect hands a cache key function."""
    bound = inspect.signature(fn).bind(**kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def cached(task_name: str) -> dict[str, Any]:
    """Options for `@task(**cached("extract"))`: the content key, JSON results persisted in the project."""

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        return stage_key(task_name, parameters)

    return {
        "name": task_name,
        "task_run_name": _run_name(task_name),
        "cache_key_fn": key_fn,
        "persist_result": True,
        "result_serializer": "json",
        "result_storage": results_dir(),
    }


def _run_name(task_name: str) -> Callable[[], str]:
    """The Prefect task run's name: the stage as dvc.yaml names it (`train-frozen`, `extract-imagenet`)."""

    def name() -> str:
        from prefect.runtime import task_run

        params = task_run.parameters or {}
        item = params.get("run_name") or getattr(params.get("weights"), "source", None)
        return f"{task_name}-{item}" if item else task_name

    return name


def results_dir() -> Path:
    return project_root() / ".prefect" / "results"


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, the module logger outside (DVC stages, tests)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("headstart")
