"""Runs of a killed process do not stay RUNNING: SIGTERM marks them FAILED on the way out, SIGKILL at the next stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mlflow import MlflowClient

from headstart import tracking

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from headstart.env import configure_environment
    configure_environment(sys.argv[1])
    from flows.cli import _on_sigterm
    from headstart import tracking
    _on_sigterm()
    with tracking.training_run("doomed", {}, {"stage": "train"}) as run:
        print(run.info.run_id, flush=True)
        time.sleep(120)
    """
)


def _start(root: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HEADSTART_", "PREFECT_"))}
    env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]  # the test session's store, read below
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(root)], stdout=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),  # whatever the parent ignores
    )  # fmt: skip
    run_id = proc.stdout.readline().strip()
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    return proc, run_id


def test_sigterm_marks_the_run_failed_and_sigkill_is_caught_by_the_next_stage(tmp_path: Path) -> None:
    proc, run_id = _start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert MlflowClient().get_run(run_id).info.status == "FAILED"

    proc, run_id = _start(tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    time.sleep(0.2)
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # nobody could end it
    assert tracking.fail_orphaned_runs() == [run_id]  # what every stage does before it logs
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED" and "was gone" in run.data.tags["ended_by"]
    assert tracking.fail_orphaned_runs() == []


RACE = textwrap.dedent(
    """
    import sys
    from headstart.env import configure_environment
    configure_environment(sys.argv[1])
    from headstart import tracking
    with tracking.training_run("racer", {"x": 1}, {"stage": "train"}):
        pass
    print("ok", flush=True)
    """
)


def test_two_stages_starting_at_once_on_a_fresh_project_both_log(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HEADSTART_", "PREFECT_"))}
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("headstart").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
