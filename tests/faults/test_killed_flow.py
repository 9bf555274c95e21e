"""A flow run whose process is killed (SIGKILL) is marked Crashed by the next run, and its temporary server stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client

from flows.orphans import claim_and_crash_orphans, orphaned_servers

DOOMED = textwrap.dedent(
    """
    import time
    from prefect import flow
    from prefect.runtime import flow_run
    from flows.orphans import claim_and_crash_orphans, orphaned_servers

    @flow(name="doomed")
    def doomed():
        claim_and_crash_orphans()  # what the transfer flow does first
        print(flow_run.get_id(), flush=True)
        time.sleep(300)

    doomed()
    """
)


@flow(name="next-run")
def next_run() -> list[UUID]:
    return claim_and_crash_orphans()


def test_a_killed_flow_run_is_crashed_by_the_next_run(project_root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", DOOMED], stdout=subprocess.PIPE, text=True, env=env)
    try:
        run_id = UUID(proc.stdout.readline().strip())
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(run_id).state.type.value == "RUNNING"
    finally:
        proc.send_signal(signal.SIGKILL)  # the process alone: its temporary Prefect server lives on
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not (left := orphaned_servers(os.environ["PREFECT_HOME"])) and time.monotonic() < deadline:
        time.sleep(0.2)  # reparented to init once its parent is reaped
    assert left, "the killed process's temporary server outlives it"
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.type.value == "RUNNING"  # nobody could end it
        assert run_id in next_run()
        state = client.read_flow_run(run_id).state
        assert state.name == "Crashed" and f"pid {proc.pid}" in state.message
        assert run_id not in next_run()  # once
    for pid in left:  # the next run stopped the orphaned server
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
