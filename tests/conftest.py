"""Every test session gets its own project root: Prefect home, MLflow store, torch cache, results.

Set before Prefect or MLflow is imported (they read their settings once), so nothing leaks
between sessions or into the developer's own project state.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="headstart-tests-"))
for key in ("HEADSTART_ROOT", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "TORCH_HOME", "DVC_SITE_CACHE_DIR"):
    os.environ.pop(key, None)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # workers share the cores: one torch thread each, or their threads wait on each other (headstart/threads.py)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from headstart.env import configure_environment  # noqa: E402

configure_environment(_ROOT)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The session's project root (all project-local state lives here)."""
    return _ROOT


LONGEST_FIRST = (
    "tests/e2e/test_dvc.py",
    "tests/e2e/test_own_images.py",
    "tests/e2e/test_sweep_cli.py",
    "tests/e2e/test_cli_fmnist.py",
    "tests/ops/test_schedule.py",
    "tests/ops/test_dask_extract.py",
    "tests/flow/test_pipeline.py",
)
"""The files that take minutes (measured: `pytest --durations`), started first so that the workers of
`make test` (one file each at a time) finish together instead of one waiting on the last long file."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.path).relative_to(REPO).as_posix(), len(rank)))
