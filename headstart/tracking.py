"""MLflow: one run per training whichever orchestrator started it, models logged and registered by name.

The tracking URI comes from MLFLOW_TRACKING_URI (set to the project's sqlite database by
`headstart.env` unless the user points it at a server).
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from headstart.caching import run_logger
from headstart.checkpoints import ModelSpec
from headstart.env import project_root

log = logging.getLogger(__name__)

EXPERIMENT = "headstart"
CHAMPION = "champion"
WEIGHTS_SHA_TAG = "weights_sha256"
MODEL_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "safetensors", "numpy", "pillow", "pydantic"]


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"head": {"init": "zeros"}} -> {"head.init": "zeros"}, values as MLflow stores them."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def git_commit(root: Path | None = None) -> str:
    """The project's HEAD commit (with '-dirty' when files differ), or 'unknown' outside git."""
    cwd = root or project_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def experiment_id(name: str = EXPERIMENT) -> str:
    """Get or create the experiment; a local backend keeps artifacts in the project, not the cwd."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        location = (project_root() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


@contextmanager
def training_run(
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, with `run_id`) a run; an exception marks it FAILED before re-raising."""
    if run_id is not None:
        ctx = mlflow.start_run(run_id=run_id)
    else:
        ctx = mlflow.start_run(experiment_id=experiment_id(), run_name=run_name)
    with ctx as run:
        if run_id is None:
            mlflow.log_params(flatten(params))
            mlflow.set_tags({"git_commit": git_commit(), **tags})
        yield run


def log_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
    """One epoch's metrics into the active run (step = epoch) and the run's log (no progress bar outside a tty)."""
    mlflow.log_metrics(dict(metrics), step=epoch)
    run_logger().info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def log_model(
    weights: Path,
    sha256: str,
    spec: ModelSpec,
    register_as: str | None,
    score: float | None = None,
) -> ModelVersion | None:
    """Log a trained network as a pyfunc (weights + spec, no pickled model) into the active run.

    With `register_as`, a new registry version is created and tagged with the weights sha256;
    the `champion` alias moves to it when it has no score to beat or beats the current one.
    """
    from headstart.serving import HeadstartModel

    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "model.json"
        manifest.write_text(json.dumps({"sha256": sha256, "spec": spec.model_dump(mode="json")}, indent=2))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=HeadstartModel(),
            artifacts={"weights": str(weights), "manifest": str(manifest)},
            pip_requirements=MODEL_REQUIREMENTS,
        )
    if register_as is None:
        return None
    version = mlflow.register_model(info.model_uri, register_as, tags={WEIGHTS_SHA_TAG: sha256})
    client = MlflowClient()
    if score is not None:
        client.set_model_version_tag(register_as, version.version, "score", str(score))
    if _beats_champion(client, register_as, score):
        client.set_registered_model_alias(register_as, CHAMPION, version.version)
        log.info("registered %s version %s as @%s", register_as, version.version, CHAMPION)
    else:
        log.info("registered %s version %s (the champion scores higher)", register_as, version.version)
    return version


def _beats_champion(client: MlflowClient, name: str, score: float | None) -> bool:
    if score is None:
        return True
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return True
    best = current.tags.get("score")
    return best is None or score >= float(best)
