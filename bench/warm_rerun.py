"""Benchmark 3: the whole Prefect flow rerun with nothing changed, against its cold run.

Each repetition is a fresh project (its own Prefect home, MLflow store, torch cache) and two
processes, as a user runs `headstart run` twice: the cold one computes everything, the warm one
should only find its cached results (the raw stage still fingerprints the raw data, as it does on
every run). Run as `python -m bench.warm_rerun ROOT` it is one such process: it prints how long
Prefect took to start and how long the flow itself took.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench.timing import Goal, Row, Stat, log, repeat, stat, timed
from tests.tiny import REPO, install_mobilenet, tiny_params, write_tiny_fmnist

if TYPE_CHECKING:  # the worker process must not import Prefect before its environment is set
    from bench.workspace import Workspace

NAME = "warm_rerun"
GOAL = Goal("<=", 0.05)
ISOLATED_PREFIXES = ("PREFECT_", "MLFLOW_", "HEADSTART_")
CODE = ("headstart", "tasks", "flows")
ALWAYS_RUNS = "raw"
"""The task every flow run computes: the raw stage's fingerprint of the raw data (not cached, by design)."""
"""Copied into each project: cache keys hash the code, which must not change between the two runs."""


def project_env(root: Path) -> dict[str, str]:
    """The environment of a user in that project: nothing of the benchmark's own Prefect or MLflow state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ISOLATED_PREFIXES)}
    for key in ("TORCH_HOME", "DVC_SITE_CACHE_DIR"):
        env.pop(key, None)
    env["HEADSTART_ROOT"] = str(root)
    env["PYTHONPATH"] = f"{root}{os.pathsep}{REPO}"  # the project's copy of the code; bench/ from the checkout
    env["TQDM_DISABLE"] = "1"
    return env


def make_project(ws: Workspace) -> Path:
    """A fresh project: a copy of the code, tiny Fashion-MNIST look-alikes, params.yaml shrunk as the flow tests do."""
    root = ws.fresh_dir("flow")
    for package in CODE:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    n_train = ws.size(800, 2000)
    raw = tiny_params(write_tiny_fmnist(root / "tiny-fmnist", n_train=n_train, n_test=n_train // 4))
    if not install_mobilenet(root / ".torch"):
        log("no ImageNet MobileNetV2 file: the flow runs without the imagenet source")
        raw["sources"].pop("imagenet")
        raw["train"]["runs"] = {k: r for k, r in raw["train"]["runs"].items() if r["source"] != "imagenet"}
    if ws.quick:  # every stage still runs, once
        raw["sources"].pop("imagenet", None)
        raw["train"]["runs"] = {"fmnist-frozen": raw["train"]["runs"]["fmnist-frozen"]}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def one_process(root: Path) -> dict[str, Any]:
    """One `headstart run`-like process in `root`: its wall seconds and what it reports."""
    cmd = [sys.executable, "-m", "bench.warm_rerun", str(root)]
    proc, seconds = timed(
        lambda: subprocess.run(cmd, cwd=root, env=project_env(root), capture_output=True, text=True, timeout=1800)
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process": seconds}


def run(ws: Workspace) -> list[Row]:

    def once(rep: int) -> dict[str, float]:
        root = make_project(ws)
        cold, warm = one_process(root), one_process(root)
        ws.drop(root)
        return {
            "cold": cold["flow"],
            "warm": warm["flow"],
            "startup": warm["startup"],
            "cold_process": cold["process"],
            "warm_process": warm["process"],
            "recomputed": warm["recomputed"],
            "ratio": warm["flow"] / cold["flow"],
            "process_ratio": warm["process"] / cold["process"],
        }

    samples = repeat(once, ws.process_repeats, NAME)
    tasks = stat(samples, "recomputed")
    return [
        Row(
            "3. warm rerun, flow (Prefect server up)",
            [
                ("cold", stat(samples, "cold", "s")),
                ("warm", stat(samples, "warm", "s")),
                ("tasks recomputed (besides raw)", tasks),
            ],
            Stat(tuple(s["ratio"] for s in samples)),
            GOAL,
        ),
        Row(
            "3. warm rerun, whole process",
            [
                ("cold", stat(samples, "cold_process", "s")),
                ("warm", stat(samples, "warm_process", "s")),
                ("of which Prefect start", stat(samples, "startup", "s")),
            ],
            Stat(tuple(s["process_ratio"] for s in samples)),
            GOAL,
        ),
    ]


def main(root: Path) -> None:
    """Start Prefect, run the transfer flow once, print {startup, flow, recomputed} as JSON."""
    from headstart.env import configure_environment

    configure_environment(root)  # before Prefect is imported
    from prefect.client.orchestration import get_client

    from flows.pipeline import transfer
    from headstart.config import load_params
    from tests.states import final_task_runs

    params = load_params(root / "params.yaml")
    started = time.perf_counter()
    with get_client(sync_client=True) as client:
        client.api_healthcheck()  # starts the project's temporary Prefect server
        up = time.perf_counter()
        state = transfer(params=params, root=root, return_state=True)
        done = time.perf_counter()
        if not state.is_completed():
            raise RuntimeError(f"the transfer flow ended {state}")
        task_runs = final_task_runs(client, state.state_details.flow_run_id)
    # raw is never cached (it is what the raw files are now): every other task run that was not a cache hit
    # recomputed something; a stage whose record on disk is current starts no task run at all
    recomputed = sum(tr.state_name != "Cached" for tr in task_runs if tr.name.rsplit("-", 1)[0] != ALWAYS_RUNS)
    print(json.dumps({"startup": up - started, "flow": done - up, "recomputed": recomputed}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
