"""The Prefect and MLflow servers on 127.0.0.1, each started as its own process group and stopped as one.

`mlflow server` (and, to be safe, `prefect server start`) leave worker processes behind when
only the parent gets SIGTERM. Here a server runs in a new session; stopping it signals the
whole group, then kills what is left, so nothing outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Server:
    """How to start one server and how to tell that it is ready."""

    name: str
    command: list[str]
    url: str
    """What the user opens: the UI (and the API under it)."""
    health: str
    """A URL that answers 200 once the server takes requests."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to the caller's environment."""


def prefect_server(port: int = 4200, home: Path | None = None) -> Server:
    """`prefect server start`: API, scheduler and UI on http://127.0.0.1:<port> (its database in PREFECT_HOME)."""
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    url = f"http://{HOST}:{port}"
    command = [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    return Server("Prefect", command, url, f"{url}/api/health", env)


def mlflow_server(port: int, backend_uri: str, artifacts: Path | None = None) -> Server:
    """A lean `mlflow server` (one worker, no job runner) on `backend_uri`.

    With `artifacts`, it is a tracking server: clients log with
    MLFLOW_TRACKING_URI=http://127.0.0.1:<port> and their artifacts go through it into that
    folder, so no client needs the server's disk. Without, it is a UI over a local store.
    """
    url = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", backend_uri]
    if artifacts is not None:
        command += ["--artifacts-destination", str(artifacts.resolve())]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    return Server("MLflow", command, url, f"{url}/health", env)


def tracking_server(port: int = 5000, store: Path = Path(".mlflow-server")) -> Server:
    """The tracking server of `make mlflow-server`: `<store>/mlflow.db` and `<store>/artifacts`."""
    store = store.resolve()
    store.mkdir(parents=True, exist_ok=True)
    return mlflow_server(port, f"sqlite:///{store / 'mlflow.db'}", store / "artifacts")


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """True when `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Running:
    """A started server: its process group, stopped whole by `stop()` (also on exiting a `with` block)."""

    def __init__(self, server: Server, process: subprocess.Popen):
        self.server = server
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the whole group, SIGKILL to whatever is left after `timeout_s`."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _group_alive(self.process):
                time.sleep(0.1)
            if not _group_alive(self.process):
                break
        self.process.wait()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the leader when it has exited
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def start(
    server: Server, log: IO | None = None, timeout_s: float = 120.0, base_env: Mapping[str, str] | None = None
) -> Running:
    """Start the server in its own session (environment: `base_env`, default ours, plus the server's own) and wait
    until it is healthy; if it exits or stays unhealthy, stop its group and raise (its output says why)."""
    if healthy(server.health):
        raise RuntimeError(f"something already answers on {server.url}: stop it, or choose another --port")
    process = subprocess.Popen(
        server.command,
        env={**(os.environ if base_env is None else base_env), **server.env},
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
    )
    running = Running(server, process)
    deadline = time.monotonic() + timeout_s
    while not healthy(server.health):
        if process.poll() is not None or time.monotonic() > deadline:
            running.stop()
            why = f"exited with status {process.returncode}" if process.returncode else f"not healthy in {timeout_s} s"
            raise RuntimeError(f"{server.name} server ({' '.join(server.command)}) {why}")
        time.sleep(0.5)
    return running


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_until_stopped(running: Running) -> None:
    """Block until Ctrl-C or SIGTERM, then stop the server's whole process group."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        running.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()
        signal.signal(signal.SIGTERM, previous)
