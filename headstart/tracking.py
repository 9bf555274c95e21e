"""MLflow: one run per training whichever orchestrator started it, models logged and registered by name.

The tracking URI comes from MLFLOW_TRACKING_URI (set to the project's sqlite database by
`headstart.env` unless the user points it at a server).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion

from headstart.caching import run_logger
from headstart.env import project_root
from headstart.records import TaskMeta
from headstart.registry_db import sqlite_path
from headstart.uris import WEIGHTS_SHA_TAG

if TYPE_CHECKING:  # a type only: `headstart run`'s summary reads MLflow without loading torch
    from headstart.checkpoints import ModelSpec

log = logging.getLogger(__name__)

EXPERIMENT = "headstart"
MODEL_SHA_TAG = "model_sha256"
"""Tag of the run that trained a model file: its sha256, the content that finds the run again."""
CHAMPION = "champion"
CLASSES_TAG = "classes"
HOST_TAG, PID_TAG = "host", "pid"
"""Which process owns a run while it is RUNNING (fail_orphaned_runs)."""
UI_URL = "http://127.0.0.1:5000"
"""Where `make ui` (`headstart ui`) serves the project's own tracking store."""
SERVED_MODEL = Path(__file__).with_name("served_model.py")
"""The models-from-code file MLflow runs to load a headstart model."""
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


def experiment_name() -> str:
    """The project's experiment: MLflow's own MLFLOW_EXPERIMENT_NAME (the CLI sets it from params `name`)."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT


_READY: set[str] = set()


def ensure_store() -> None:
    """Create a local SQLite tracking store's tables once, under a file lock, before anything logs.

    Two stages starting at once on a fresh project would otherwise both create the tables, and one
    fails (`table runs already exists`) and loses its training.
    """
    uri = mlflow.get_tracking_uri()
    db = sqlite_path(uri)
    if uri in _READY or db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient().search_experiments(max_results=1)  # creates and migrates the tables
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY.add(uri)


def experiment_id(name: str | None = None) -> str:
    """Get or create the experiment; a local backend keeps artifacts in the project, not the cwd."""
    ensure_store()
    name = name or experiment_name()
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        location = (project_root() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # another stage created it a moment ago
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def run_url(run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server itself, or where `make ui` serves a local store.

    Empty when the run is not in the current store (a cached result logged to another one).
    """
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_URL
    try:
        experiment = MlflowClient().get_run(run_id).info.experiment_id
    except mlflow.exceptions.MlflowException:
        return ""
    return f"{base}/#/experiments/{experiment}/runs/{run_id}"


@contextmanager
def training_run(
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, with `run_id`) a run; an exception marks it FAILED before re-raising.

    Runs a killed process left RUNNING are marked FAILED first (`fail_orphaned_runs`); the run
    records the host and pid that own it, so a later stage can tell.
    """
    fail_orphaned_runs()
    if run_id is not None:
        ctx = mlflow.start_run(run_id=run_id)
    else:
        ctx = mlflow.start_run(experiment_id=experiment_id(), run_name=run_name)
    with ctx as run:
        if run_id is None:
            mlflow.log_params(flatten(params))
            mlflow.set_tags({"git_commit": git_commit(), **tags})
        mlflow.set_tags(_owner())
        yield run


def _owner() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


@contextmanager
def child_run(run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[mlflow.ActiveRun]:
    """A run nested under the active one (a grid cell under its training), in the parent's experiment.

    `start_run(nested=True)` alone would open it in MLflow's current experiment, not necessarily the
    parent's. It records the owning process as its parent does, so a killed process leaves no child RUNNING.
    """
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError(f"child run {run_name!r} needs an active parent run")
    with mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=run_name, nested=True) as run:
        mlflow.log_params(flatten(params))
        mlflow.set_tags({**tags, **_owner()})
        yield run


def alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_runs() -> list[str]:
    """Mark FAILED the experiment's RUNNING runs whose owning process (on this host) is gone; their ids.

    A process killed with SIGKILL (or a lost machine) cannot end its run; without this the MLflow UI
    would show it running forever. Runs of other hosts are left alone: their processes are not visible here.
    """
    ensure_store()
    client = MlflowClient()
    gone = []
    for run in client.search_runs([experiment_id()], "attributes.status = 'RUNNING'", max_results=1000):
        host, pid = run.data.tags.get(HOST_TAG), run.data.tags.get(PID_TAG)
        if host == socket.gethostname() and pid and pid.isdigit() and not alive(int(pid)):
            client.set_tag(run.info.run_id, "ended_by", f"its process {pid} was gone when a later stage started")
            client.set_terminated(run.info.run_id, status="FAILED")
            gone.append(run.info.run_id)
    if gone:
        log.warning("marked %d run(s) FAILED whose process was killed: %s", len(gone), gone)
    return gone


@contextmanager
def keyed_run(
    run_name: str, key: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> Iterator[mlflow.ActiveRun]:
    """Resume the run tagged `run_key=<key>`, or start it: a rerun of the same work (a resumed sweep) keeps one run.

    Params are logged when the run is created (MLflow refuses to change them); tags are set every time.
    """
    found = MlflowClient().search_runs([experiment_id()], f"tags.run_key = '{key}'", max_results=1)
    run_id = found[0].info.run_id if found else None
    with training_run(run_name, params, {**tags, "run_key": key}, run_id=run_id) as run:
        mlflow.set_tags(dict(tags))
        yield run


def log_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
    """One epoch's metrics into the active run (step = epoch) and the run's log (no progress bar outside a tty)."""
    mlflow.log_metrics(dict(metrics), step=epoch)
    run_logger().info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def log_history(history: Sequence[Mapping[str, float]]) -> None:
    """Per-epoch metrics of a finished training (its history, less the timings) into the active run, in one batch.

    What `log_epoch` logs epoch by epoch, for trainings logged after they end (a grid's cells): one
    call instead of one per epoch, so a grid of many heads costs the tracking store little.
    """
    run, now = mlflow.active_run(), int(time.time() * 1000)
    if run is None:
        raise RuntimeError("log_history needs an active run")
    metrics = [
        Metric(k, v, now, int(row["epoch"])) for row in history for k, v in row.items() if k not in ("epoch", "seconds")
    ]
    MlflowClient().log_batch(run.info.run_id, metrics=metrics)


def log_data_lineage(meta: TaskMeta) -> None:
    """The training data as an MLflow dataset (the UI's Datasets column) and the data params as `data.*` run params.

    The digest is the image folder's DVC hash (the one `dvc add` writes into `images.dvc`), so a run
    says exactly which version of the photos it saw; for Fashion-MNIST, the task's content fingerprint.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    folder = str(meta.data_params.get("image_folder") or "fashion-mnist")
    digest = meta.data_version or meta.fingerprint[:32]
    with warnings.catch_warnings():  # MLflow warns that a local path is resolved as a local artifact source
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(folder)
    dataset = MetaDataset(source, name=f"{folder}@{digest[:8]}", digest=digest)
    mlflow.log_input(dataset, context="training")
    mlflow.log_params({f"data.{k}": v for k, v in meta.data_params.items()})


def log_model(
    weights: Path,
    sha256: str,
    spec: ModelSpec,
    register_as: str | None,
    score: float | None = None,
) -> ModelVersion | None:
    """Log a trained network as a pyfunc (weights + spec + the code file naming the class) into the active run.

    The model is logged "from code" (headstart/served_model.py): loading it imports headstart
    and reads the weights file; nothing is unpickled. With `register_as`, a new registry
    version is created and tagged with the weights sha256; the `champion` alias moves to it
    when it has no score to beat or beats the current one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "model.json"
        manifest.write_text(json.dumps({"sha256": sha256, "spec": spec.model_dump(mode="json")}, indent=2))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVED_MODEL),
            artifacts={"weights": str(weights), "manifest": str(manifest)},
            pip_requirements=MODEL_REQUIREMENTS,
        )
    if register_as is None:
        return None
    client = MlflowClient()
    known = registered_version(register_as, sha256)
    if known is not None:
        log.info(
            "%s version %s already holds these weights (sha256 %s): not registered again",
            register_as,
            known.version,
            sha256[:16],
        )
        return known
    classes = classes_tag(spec.class_names)
    version = mlflow.register_model(info.model_uri, register_as, tags={WEIGHTS_SHA_TAG: sha256, CLASSES_TAG: classes})
    if score is not None:
        client.set_model_version_tag(register_as, version.version, "score", str(score))
    verdict = champion_verdict(champion(register_as), classes, score)
    if verdict is None:
        client.set_registered_model_alias(register_as, CHAMPION, version.version)
        log.info("registered %s version %s as @%s", register_as, version.version, CHAMPION)
    else:
        log.info("registered %s version %s, not @%s: %s", register_as, version.version, CHAMPION, verdict)
    return version


def classes_tag(class_names: list[str]) -> str:
    """The classes a model answers, as one registry tag: champions are compared only among equals."""
    return json.dumps(list(class_names), separators=(",", ":"))[:5000]


def champion(name: str) -> ModelVersion | None:
    """The version holding `@champion`, or None (no such model, or no alias yet)."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def champion_verdict(current: ModelVersion | None, classes: str, score: float | None) -> str | None:
    """None when a new version takes `@champion`; else why not.

    The rule: the first version takes it; after that, a version takes it only when it answers the
    same classes as the champion (in the same order) and scores at least as well on validation. A
    model of other classes never replaces the champion silently: `headstart predict` would answer
    classes the user did not ask for.
    """
    if current is None:
        return None
    if current.tags.get(CLASSES_TAG, classes) != classes:
        return f"it answers other classes than version {current.version} ({current.tags.get(CLASSES_TAG)})"
    best = current.tags.get("score")
    if score is None or best is None or score >= float(best):
        return None
    return f"version {current.version} scores higher on validation ({float(best):.4f} > {score:.4f})"


def registered_version(name: str, sha256: str) -> ModelVersion | None:
    """The registry version of `name` holding exactly these weights (the first registered), or None."""
    try:
        found = MlflowClient().search_model_versions(f"name = '{name}' and tags.{WEIGHTS_SHA_TAG} = '{sha256}'")
    except mlflow.exceptions.MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def run_of_model(sha256: str) -> str | None:
    """The newest run that trained a model file with this sha256 (tag `model_sha256`), or None.

    Records hold content only, so this is how a later stage, or the summary, finds the MLflow run
    whichever orchestrator (and process) logged it.
    """
    found = MlflowClient().search_runs(
        [experiment_id()], f"tags.{MODEL_SHA_TAG} = '{sha256}'", max_results=1, order_by=["attributes.start_time DESC"]
    )
    return found[0].info.run_id if found else None
