"""End-to-end helpers: a copy of the project in a temporary git repo, driven through its commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.tiny import REPO, install_mobilenet

PROJECT_FILES = (
    "headstart",
    "tasks",
    "flows",
    "sweep",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    "pyproject.toml",
)
BIN = Path(sys.executable).parent


def make_project(root: Path, raw_params: dict) -> Path:
    """Copy the project's code and pipeline into `root`, write params, and make it a git + DVC repo."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(src, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    install_mobilenet(root / ".torch")
    git = ["git", "-c", "user.email=ci@headstart.invalid", "-c", "user.name=ci"]
    subprocess.run(git[:1] + ["init", "-q", "-b", "main"], cwd=root, check=True)
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "config", "core.analytics", "false")
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "project"], cwd=root, check=True)
    return root


def project_env(root: Path) -> dict[str, str]:
    """The environment a user has in that project: its own Prefect, MLflow, torch and DVC state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HEADSTART_"))}
    for key in ("TORCH_HOME", "DVC_SITE_CACHE_DIR"):
        env.pop(key, None)
    env["HEADSTART_ROOT"] = str(root)
    env["DVC_SITE_CACHE_DIR"] = str(root / ".dvc" / "site_cache")
    env["DVC_NO_ANALYTICS"] = "1"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root)  # the copy's code, not the checkout's
    return env


def sh(
    root: Path, *cmd: str, timeout: float = 900, code: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a command in the project; on failure (unless `check` is false) show what it printed.

    The project's own copy of the code runs, or `code` (a project `headstart init` made holds none).
    """
    exe = BIN / cmd[0] if (BIN / cmd[0]).exists() else cmd[0]
    env = {**project_env(root), **({"PYTHONPATH": str(code)} if code is not None else {})}
    proc = subprocess.run([str(exe), *cmd[1:]], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
