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
