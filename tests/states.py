"""Task-run states of a finished flow run, read back from the Prefect API once they have all settled."""

from __future__ import annotations

import time
from collections import Counter
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun

SETTLE_S = 60.0


def final_task_runs(client: SyncPrefectClient, flow_run_id: UUID, timeout_s: float = SETTLE_S) -> list[TaskRun]:
    """The flow run's task runs once every one is in a final state.

    Prefect 3 records task-run states through its event pipeline, so right after a flow returns
    the API may still show a task run as Pending (seen on a loaded CI machine); reading once would
    count a cached task as computed. Waits for the states to settle; fails naming the laggards.
    """
    deadline = time.monotonic() + timeout_s
    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    while True:
        runs = client.read_task_runs(flow_run_filter=flow_filter)
        pending = [tr.name for tr in runs if tr.state is None or not tr.state.is_final()]
        if not pending:
            return runs
        if time.monotonic() > deadline:
            raise TimeoutError(f"task runs {pending} of flow run {flow_run_id} not final after {timeout_s:.0f} s")
        time.sleep(0.2)


def task_states(client: SyncPrefectClient, flow_run_id: UUID) -> Counter:
    """How many task runs of a flow run ended in each state, by task name (`train-fmnist-frozen` -> `train`)."""
    return Counter((tr.name.split("-", 1)[0], tr.state_name) for tr in final_task_runs(client, flow_run_id))
