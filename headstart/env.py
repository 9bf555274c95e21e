"""Project-local state and telemetry off, set before Prefect, MLflow or DVC are imported.

Every tool keeps its state inside the project (ignored by git) so that a clone is
self-contained and tests can point everything at a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from headstart.threads import available_cores


def configure_environment(root: Path | str | None = None) -> Path:
    """Fill in the embedded defaults for `root` (default: the working directory); values already set win.

    Must run before `prefect` is imported: Prefect reads its settings once at import.
    """
    root = Path(root or os.environ.get("HEADSTART_ROOT") or Path.cwd()).resolve()
    defaults = {
        "HEADSTART_ROOT": str(root),
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "DO_NOT_TRACK": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(root / ".dvc" / "site_cache"),
        "TORCH_HOME": str(root / ".torch"),
        "GIT_PYTHON_REFRESH": "quiet",
        # MKL's strict reproducibility: a matrix product gives the same bits on 1 or N threads (on AVX-512
        # CPUs it does not by default), so the same params and seed give the same features and metrics
        # whatever the thread count, and Dask workers (one thread) write bitwise the local store's rows
        "MKL_CBWR": "AUTO,STRICT",
        # torch's threads: the cores this process may use (affinity, a container's CPU quota), not the host's count
        "OMP_NUM_THREADS": str(available_cores()),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return root


def project_root() -> Path:
    """The folder all relative paths in params.yaml are resolved against."""
    return Path(os.environ.get("HEADSTART_ROOT") or Path.cwd()).resolve()
