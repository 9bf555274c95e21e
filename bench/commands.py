"""Benchmark 9: what the everyday commands cost as whole processes, in a project whose pipeline has run.

`headstart --help`, `headstart status`, a `headstart run` with nothing to do (decided from the
records, no Prefect server) beside the same run through the Prefect flow (`--flow`), and
`headstart predict` of one image: the wall seconds a user waits, imports and all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bench.timing import Goal, Row, Stat, log, stat, timed
from bench.warm_rerun import make_project, project_env

if TYPE_CHECKING:
    from bench.workspace import Workspace

NAME = "commands"
COMMANDS = {
    "help": (["--help"], Goal("<=", 1.0)),
    "status": (["status"], Goal("<=", 3.0)),
    "no-op run": (["run"], Goal("<=", 5.0)),
    "no-op run through Prefect": (["run", "--flow"], None),
    "predict one image": (["predict", "image.png"], Goal("<=", 3.0)),
}


def headstart(root: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=root, env=project_env(root), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"headstart {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _image(root: Path) -> None:
    """One test image of the project's data as a PNG file: what a user hands `predict`."""
    import numpy as np
    from PIL import Image

    from headstart.fmnist import read_idx

    images = read_idx(root / "tiny-fmnist" / "t10k-images-idx3-ubyte.gz", ndim=3)
    Image.fromarray(np.asarray(images[0])).save(root / "image.png")


def run(ws: Workspace) -> list[Row]:
    root = make_project(ws)
    _, cold = timed(lambda: headstart(root, "run"))
    log(f"{NAME}: cold `headstart run` {cold:.0f} s")
    _image(root)
    headstart(root, "predict", "image.png")  # the first one fetches the champion's file into the cache
    samples = []
    for rep in range(ws.process_repeats):
        log(f"{NAME}: repetition {rep + 1}/{ws.process_repeats}")
        sample = {}
        for name, (args, _) in COMMANDS.items():
            out, sample[name] = timed(lambda args=args: headstart(root, *args))
            if name == "no-op run" and not out.startswith("every stage is up to date"):
                raise RuntimeError(f"the no-op run was not decided from the records:\n{out[-2000:]}")
        samples.append(sample)
    ws.drop(root)
    flow = stat(samples, "no-op run through Prefect", "s")
    rows = []
    for name, (_, goal) in COMMANDS.items():
        if goal is None:
            continue
        measured = [("whole process", stat(samples, name, "s"))]
        if name == "no-op run":
            measured.append(("through the Prefect flow (--flow)", flow))
        rows.append(Row(f"9. headstart {name}, seconds", measured, Stat(stat(samples, name).values, "s"), goal))
    return rows
