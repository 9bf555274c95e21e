"""What a killed `headstart run` leaves behind, cleaned up by the next flow run on this host.

A process killed with SIGKILL cannot report its end, and the project's Prefect server (temporary,
started per run) has no heartbeat to notice: the UI would show the run Running forever. Each flow
run tags itself with its host and pid; at its start it crashes the Running runs whose process is
gone. Runs of other hosts are left alone (their processes are not visible here). The killed
process's temporary server outlives it too (about 250 MB, reparented to init): it is stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed

from headstart.tracking import alive

log = logging.getLogger(__name__)


def owner_tags() -> list[str]:
    return [f"host:{socket.gethostname()}", f"pid:{os.getpid()}"]


def orphaned_servers(home: str) -> list[int]:
    """Pids of temporary Prefect servers of this PREFECT_HOME whose parent died (Linux /proc; else none)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != 1:
                continue
            pairs = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue
        env = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        if env.get("PREFECT__SERVER_EPHEMERAL") == "1" and env.get("PREFECT_HOME") == home:
            found.append(int(entry.name))
    return found


def stop_orphaned_servers() -> list[int]:
    """SIGTERM the temporary servers killed runs of this project left behind; their pids."""
    pids = orphaned_servers(os.environ.get("PREFECT_HOME", ""))
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    if pids:
        log.warning("stopped %d temporary Prefect server(s) left by killed runs: pids %s", len(pids), pids)
    return pids


def claim_and_crash_orphans() -> list[UUID]:
    """Tag the current flow run with its owner; mark Crashed this host's Running runs whose process is gone.

    Also stops the temporary servers those processes left running.
    """
    stop_orphaned_servers()
    own, host = flow_run.get_id(), owner_tags()[0]
    crashed = []
    with get_client(sync_client=True) as client:
        if own is not None:
            client.update_flow_run(UUID(own), tags=[*flow_run.get_tags(), *owner_tags()])
        running = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
                tags=FlowRunFilterTags(all_=[host]),
            )
        )
        for run in running:
            pids = [t.removeprefix("pid:") for t in run.tags if t.startswith("pid:")]
            if str(run.id) == own or not pids or not pids[0].isdigit() or alive(int(pids[0])):
                continue
            message = f"its process (pid {pids[0]}, {host}) was gone when a later run started"
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            crashed.append(run.id)
    if crashed:
        log.warning("marked %d flow run(s) Crashed whose process was killed: %s", len(crashed), crashed)
    return crashed
