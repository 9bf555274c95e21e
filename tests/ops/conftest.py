"""Operations tests: a tiny transfer model registered in this package's own MLflow store, and process hygiene helpers.

Servers are started by the tests as real processes on free 127.0.0.1 ports and stopped by them;
`assert_all_gone` checks with psutil that not one of their processes outlives the test.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import psutil
import pytest

from headstart.checkpoints import load_model
from headstart.config import EvaluateParams
from headstart.datasets import load_task
from headstart.records import absolute
from tasks.evaluate import evaluate
from tasks.train import train
from tests.unit.training_setup import prepare

MODEL = "ops-transfer"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants, as seen now."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def assert_all_gone(processes: list[psutil.Process], timeout_s: float = 10.0) -> None:
    """Every process listed has exited (zombies count as gone: they hold no resources but a table slot)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"


def clean_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a user in project `root`: none of this test session's Prefect/MLflow/headstart settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HEADSTART_"))}
    for key in ("TORCH_HOME", "DVC_SITE_CACHE_DIR"):
        env.pop(key, None)
    return {**env, "HEADSTART_ROOT": str(root), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


@pytest.fixture(scope="package")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A frozen transfer model (3 classes, cut block2) trained and registered as `ops-transfer@champion`.

    The MLflow store is this package's own sqlite file; the session's store is restored afterwards.
    """
    root = tmp_path_factory.mktemp("ops-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous_env, previous_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        setup = prepare(root)
        trained = train.fn(
            run_name="frozen",
            run=setup.params.runs["frozen"],
            source=setup.source,
            params=setup.params,
            weights=setup.weights,
            extract_record=setup.extract_record,
            task_meta=setup.task_meta,
            data_dir=setup.data_dir,
            out_dir=root / "models" / "frozen",
        )
        evaluated = evaluate.fn(
            run_name="frozen",
            train_record=trained,
            extract_record=setup.extract_record,
            task_meta=setup.task_meta,
            params=EvaluateParams(register_as=MODEL),
            data_dir=setup.data_dir,
            reports_dir=root / "reports",
        )
        net, spec = load_model(absolute(trained.path), trained.sha256)
        yield {
            "root": root,
            "uri": uri,
            "setup": setup,
            "trained": trained,
            "evaluated": evaluated,
            "net": net,
            "spec": spec,
            "test": load_task(setup.data_dir, "target").test,
        }
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
