"""Training progress as a Prefect progress artifact inside a run, and nothing at all outside one (DVC's `.fn`)."""

from __future__ import annotations

import numpy as np
import torch
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from headstart.config import OptimParams
from headstart.fit import fit
from headstart.progress import TaskProgress

OPTIM = OptimParams(epochs=3, batch_size=8, patience=5)


def tiny_fit() -> int:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    return fit(torch.nn.Linear(4, 2), (x, y), (x, y), OPTIM, seed=0).epochs


@task(name="tiny-fit")
def tiny_fit_task() -> int:
    return tiny_fit()


@flow(name="progress-check")
def progress_flow() -> int:
    return tiny_fit_task()


def test_training_in_a_task_run_publishes_a_finished_progress_bar():
    state = progress_flow(return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    bars = [a for a in artifacts if a.type == "progress"]
    assert len(bars) == 1
    assert bars[0].data == 100.0
    assert bars[0].task_run_id is not None and bars[0].description.startswith("tiny-fit-")
    assert bars[0].description.endswith(": training epochs")


def test_outside_a_prefect_run_progress_does_nothing():
    bar = TaskProgress("training epochs", 10)
    assert bar.artifact_id is None
    bar.advance(5)
    bar.finish()
    assert tiny_fit() == OPTIM.epochs  # the plain `.fn` path trains as before
