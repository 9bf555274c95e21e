"""A stage's code: the project files its module imports, transitively, found by reading the imports.

One set serves both orchestrators: it is the stage's `deps` in dvc.yaml (a contract test checks
them against this closure) and the code version in its Prefect cache key. The feature store's key
uses the closure of the extraction core, so every file that decides an activation is covered
without a hand-written list. Imports inside functions count (a lazy import still runs that code).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from headstart.fingerprint import files_version

PROJECT = Path(__file__).resolve().parent.parent
"""The checkout holding the project's packages (the code, not the user's project state)."""
PACKAGES = ("headstart", "tasks", "flows")
"""Top-level packages whose files are project code; everything else is a third-party dependency."""


def _module_file(module: str) -> str | None:
    """`headstart.store` -> `headstart/store.py` (or a package's `__init__.py`), None when not project code."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = PROJECT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").relative_to(PROJECT).as_posix()
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").relative_to(PROJECT).as_posix()
    return None


def direct_imports(path: str) -> set[str]:
    """Project files that the file at `path` (relative to the project) imports, anywhere in its body."""
    tree = ast.parse((PROJECT / path).read_text(), filename=path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from headstart import tracking` names a module; `from headstart.x import f` a module's member
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                target = _module_file(".".join(parts[:i]))
                if target is not None and target != path:
                    found.add(target)
    return found


@cache
def import_closure(path: str) -> tuple[str, ...]:
    """`path` and every project file it imports, transitively, sorted (project-relative, posix)."""
    seen, todo = {path}, [path]
    while todo:
        for dep in direct_imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return tuple(sorted(seen))


def stage_code(module_path: str) -> tuple[str, ...]:
    """The files a stage's task module runs, without empty package markers (they decide nothing)."""
    return tuple(p for p in import_closure(module_path) if (PROJECT / p).stat().st_size > 0)


@cache
def code_version(module_path: str) -> str:
    """Hash of the files `module_path` runs: the same change reruns the same stages under DVC and Prefect."""
    return files_version(stage_code(module_path))
