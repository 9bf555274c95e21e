"""`headstart`: the command line. Parses arguments, loads params once, hands typed objects to the flows."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from headstart.env import configure_environment

ROOT = configure_environment()  # before Prefect or MLflow is imported

from headstart.config import Params, ParamsError, load_params  # noqa: E402

app = typer.Typer(
    help="headstart: transfer learning from a pretrained network, as a cached, versioned, tracked pipeline.",
    no_args_is_help=True,
    add_completion=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file (one section per stage).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a param: --set train.head.init=zeros (repeatable)."),
]


def _load(params_file: Path, sets: list[str] | None) -> Params:
    overrides: dict[str, Any] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set {item!r}: expected KEY=VALUE, e.g. train.head.init=zeros")
        overrides[key] = yaml.safe_load(value)
    try:
        return load_params(params_file, overrides)
    except ParamsError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def run(params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Run the whole pipeline as a Prefect flow; unchanged inputs are reused from the cache."""
    params = _load(params_file, set_)
    from flows.pipeline import transfer
    from flows.summary import summary_markdown

    result = transfer(params=params, root=ROOT)
    typer.echo("")
    typer.echo(summary_markdown(result))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="data, pretrain, weights, extract, train or evaluate.")],
    item: Annotated[str | None, typer.Argument(help="The source (extract) or run (train, evaluate).")] = None,
    params_file: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run one stage without Prefect: what `dvc repro` calls (see dvc.yaml)."""
    _logging()
    params = _load(params_file, None)
    from flows import stages
    from flows.layout import Layout

    lay = Layout(ROOT)
    plain = {"data": stages.run_data, "pretrain": stages.run_pretrain, "weights": stages.run_weights}
    per_item = {"extract": stages.run_extract, "train": stages.run_train, "evaluate": stages.run_evaluate}
    if name in plain:
        plain[name](params, lay, stages.plain_runner)
    elif name in per_item:
        if item is None:
            raise typer.BadParameter(f"stage {name!r} needs a source or run name")
        per_item[name](params, lay, stages.plain_runner, item)
    else:
        raise typer.BadParameter(f"unknown stage {name!r}; expected one of {sorted({**plain, **per_item})}")


@app.command()
def ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000) -> None:
    """Open the MLflow UI on the project's tracking store (lean: one worker, bound to 127.0.0.1)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    uri = os.environ["MLFLOW_TRACKING_URI"]
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} (tracking store {uri}); Ctrl-C stops it.")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    subprocess.run(cmd, env=env, check=False)


if __name__ == "__main__":
    app()
