"""`python -m bench.operations`: what the operations cost, on a tiny project of its own (times, not ratios).

Starts a Prefect server, runs the pipeline once (cold), serves it on a schedule and times the
warm scheduled runs; times `headstart predict` (per process and per image) and the requests a
real `mlflow models serve` answers. Everything runs on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env(root: Path, **extra: str) -> dict[str, str]:
    """A user's environment in project `root` (none of this process's Prefect/MLflow settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HEADSTART_"))}
    env.pop("TORCH_HOME", None)
    return {**env, "HEADSTART_ROOT": str(root), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


def timed_run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def make_project(root: Path) -> tuple[Path, np.ndarray]:
    """Tiny Fashion-MNIST look-alike, the real params shrunk, one source (the CNN) and one frozen run."""
    from tests.tiny import IDX_FILES, tiny_params, write_tiny_fmnist

    data_root = write_tiny_fmnist(root / "tiny-fmnist")
    raw = tiny_params(data_root)
    raw["sources"] = {"fmnist": raw["sources"]["fmnist"]}
    raw["train"]["runs"] = {"fmnist-frozen": raw["train"]["runs"]["fmnist-frozen"]}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for package in ("headstart", "tasks", "flows"):  # a frozen copy of the code: stable cache keys
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    from headstart.fmnist import read_idx

    return data_root, read_idx(data_root / IDX_FILES[("test", "images")], ndim=3)


def flow_runs(api: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)
    return [r for r in runs if r.state_type == StateType.COMPLETED]


def bench_schedule(root: Path, scheduled_runs: int) -> dict[str, object]:
    from headstart import servers

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = user_env(root, PREFECT_HOME=str(root / ".prefect"), PYTHONPATH=str(root), PREFECT_API_URL=api)
    out: dict[str, object] = {}
    with (root / "prefect.log").open("w") as log:
        t0 = time.perf_counter()
        server = servers.start(servers.prefect_server(port), log=log, timeout_s=240, base_env=env)
        out["prefect server start to healthy (s)"] = time.perf_counter() - t0
        try:
            out["headstart run, cold (s)"] = timed_run([str(BIN / "headstart"), "run"], env, root)[0]
            warm, summary = timed_run([str(BIN / "headstart"), "run"], env, root)
            out["headstart run, warm, whole process (s)"] = warm
            before = len(flow_runs(api))
            schedule = subprocess.Popen(
                [str(BIN / "headstart"), "schedule", "--interval", "15"],
                cwd=root,
                env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                deadline = time.monotonic() + 600
                while len(flow_runs(api)) < before + scheduled_runs and time.monotonic() < deadline:
                    time.sleep(2)
                runs = flow_runs(api)[before:]
            finally:
                servers.Running(server.server, schedule).stop()
            seconds = [(r.end_time - r.start_time).total_seconds() for r in runs]
            out["scheduled warm run, flow start to end (s)"] = seconds
        finally:
            server.stop()
    return out | {"summary": summary}


def bench_predict(root: Path, images: np.ndarray, tracking: str) -> dict[str, object]:
    env = user_env(root, PYTHONPATH=str(root), MLFLOW_TRACKING_URI=tracking)
    folder = root / "predict"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images[:100]):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    cmd = [str(BIN / "headstart"), "predict", "--model", "models:/fmnist-transfer@champion"]
    first, _ = timed_run([*cmd, str(folder / "000.png")], env, root)  # downloads the model into the cache
    one = [timed_run([*cmd, str(folder / "000.png")], env, root)[0] for _ in range(3)]
    hundred = [timed_run([*cmd, str(folder)], env, root)[0] for _ in range(3)]
    _, table = timed_run([*cmd, str(folder / "000.png"), str(folder / "001.png"), str(folder / "002.png")], env, root)

    from flows.predict import load_for_prediction
    from headstart.serving import predict_images

    net, spec, _ = load_for_prediction("models:/fmnist-transfer@champion", root / ".cache" / "weights")
    single = []
    for image in images[:50]:
        t0 = time.perf_counter()
        predict_images(net, spec, [image])
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    predict_images(net, spec, list(images[:1000]))
    batch = (time.perf_counter() - t0) / min(1000, len(images))
    return {
        "predict CLI, first call incl. model download (s)": first,
        "predict CLI, 1 image, whole process (s)": one,
        "predict CLI, 100 PNGs, whole process (s)": hundred,
        "predict in-process, 1 image per call (ms)": [s * 1000 for s in single],
        "predict in-process, batch of 1000, per image (ms)": batch * 1000,
        "table": table,
    }


def bench_serve(root: Path, images: np.ndarray, tracking: str, requests: int) -> dict[str, object]:
    from headstart import servers

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/fmnist-transfer@champion"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    server = servers.Server("model", cmd, url, f"{url}/ping", {"MLFLOW_TRACKING_URI": tracking})
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    bodies = {
        "base64 PNG": {"inputs": [base64.b64encode(buf.getvalue()).decode()]},
        "raw pixels": {"inputs": images[:1].tolist()},
    }
    out: dict[str, object] = {}
    with (root / "serve.log").open("w") as log:
        t0 = time.perf_counter()
        running = servers.start(server, log=log, timeout_s=240, base_env=user_env(root, PYTHONPATH=str(root)))
        out["mlflow models serve start to healthy (s)"] = time.perf_counter() - t0
        try:
            for name, body in bodies.items():
                data = json.dumps(body).encode()
                times = []
                for _ in range(requests):
                    request = urllib.request.Request(
                        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}
                    )
                    t0 = time.perf_counter()
                    with urllib.request.urlopen(request, timeout=60) as response:
                        answer = response.read().decode()
                    times.append((time.perf_counter() - t0) * 1000)
                out[f"served request, 1 image as {name} (ms)"] = times
            out["answer"] = answer
        finally:
            running.stop()
    return out


def show(results: dict[str, object]) -> None:
    for name, value in results.items():
        if isinstance(value, list):
            spread = f"min {min(value):.3g}, max {max(value):.3g}, n={len(value)}"
            print(f"  {name}: median {statistics.median(value):.3g} [{spread}]")
        elif isinstance(value, float):
            print(f"  {name}: {value:.3g}")
        else:
            print(f"  {name}:\n" + "\n".join(f"    {line}" for line in str(value).splitlines()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operations", description=__doc__)
    parser.add_argument("--requests", type=int, default=20, help="served requests per input form")
    parser.add_argument("--scheduled-runs", type=int, default=3, help="warm scheduled runs to time")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="headstart-ops-bench-"))
    for key in ("HEADSTART_ROOT", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "TORCH_HOME", "DVC_SITE_CACHE_DIR"):
        os.environ.pop(key, None)
    from headstart.env import configure_environment

    configure_environment(root)  # before Prefect or MLflow is imported: this process's state lives there too
    try:
        _, images = make_project(root)
        print("scheduled runs (Prefect server on 127.0.0.1):")
        show(bench_schedule(root, args.scheduled_runs))
        tracking = f"sqlite:///{root / 'mlflow.db'}"
        print("predict (model fmnist-transfer@champion: fmnist_cnn cut at block2, linear head, 28 px):")
        show(bench_predict(root, images, tracking))
        print("serve (mlflow models serve --env-manager local):")
        show(bench_serve(root, images, tracking, args.requests))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
