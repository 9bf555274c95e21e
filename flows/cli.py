"""`headstart`: the command line. Parses arguments, loads params once, hands typed objects to the flows."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
        params = load_params(params_file, overrides)
    except ParamsError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    os.environ["MLFLOW_EXPERIMENT_NAME"] = params.name  # every stage logs to the project's experiment
    return params


@app.callback()
def _on_sigterm() -> None:
    """SIGTERM (a service manager's stop, `kill`) ends the process as Ctrl-C does: open runs are marked FAILED."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """A stage's refusal (bad input or files: ValueError, FileNotFoundError, a store's error) as one line, exit 1.

    Prefect has logged the traceback of a failed flow already; HEADSTART_DEBUG=1 shows it here too.
    """
    from headstart.store import StoreError

    try:
        yield
    except (ValueError, FileNotFoundError, StoreError) as err:
        if os.environ.get("HEADSTART_DEBUG"):
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def init(
    dest: Annotated[Path, typer.Argument(help="The new project's folder (absent or empty).")],
    images: Annotated[
        Path | None, typer.Option(help="Your images: one sub-folder per class (or train/, val/, test/ of them).")
    ] = None,
    example: Annotated[str | None, typer.Option(help="An example project instead: fashion-mnist.")] = None,
    backbone: Annotated[
        str, typer.Option(help="mobilenet_v2, mobilenet_v3_small or resnet18 (ImageNet).")
    ] = "mobilenet_v2",
    image_size: Annotated[int, typer.Option(min=32, max=512, help="Side the images are cropped to.")] = 224,
) -> None:
    """Make a ready project (git, DVC, params, dvc.yaml) from a folder of images; then `headstart run` in it."""
    from flows.init import init_project

    try:
        init_project(dest, images, example, backbone, image_size)
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"created {dest}: git and DVC initialised{', images/ tracked by DVC' if images else ''}")
    typer.echo(f"next:\n  cd {dest}\n  headstart run\n  headstart predict <image or folder>")


@app.command(epilog="Every key of params.yaml is documented in docs/params.md.")
def run(
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    flow: Annotated[
        bool, typer.Option("--flow", help="Start the Prefect flow even when every stage is up to date.")
    ] = False,
) -> None:
    """Run the whole pipeline as a Prefect flow; unchanged inputs are reused from the cache."""
    params = _load(params_file, set_)
    from flows.layout import Layout
    from flows.stages import pipeline_records
    from flows.status import pipeline_status
    from flows.summary import summary_markdown, summary_rows

    lay = Layout(ROOT)
    with _one_line_errors():
        if not flow and all(s.state == "up to date" for s in pipeline_status(params, lay)):
            # the flow would compute nothing: answer from the records, without starting a Prefect server
            typer.echo("every stage is up to date: nothing to run (--flow records a Prefect run anyway)")
            result = summary_rows(pipeline_records(params, lay), params)
        else:
            from flows.pipeline import transfer

            as_in_params_yaml = not set_ and params_file.resolve() == (ROOT / "params.yaml").resolve()
            result = transfer(params=params, root=ROOT, commit=as_in_params_yaml)
    typer.echo("")
    typer.echo(summary_markdown(result))


@app.command()
def status(params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """What is up to date and what would rerun, and why, for `headstart run` and `dvc repro` alike; runs nothing."""
    params = _load(params_file, set_)
    from flows.layout import Layout
    from flows.status import pipeline_status, status_text

    with _one_line_errors():
        typer.echo(status_text(pipeline_status(params, Layout(ROOT)), ROOT))


@app.command()
def sweep(
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    upstream: Annotated[
        bool, typer.Option(help="Run the upstream stages first, advise included (DVC runs them as their own stages).")
    ] = True,
) -> None:
    """Pretrained vs random initialisation on growing shares of the target data; a rerun resumes where it stopped."""
    params = _load(params_file, set_)
    from flows.sweep import fraction_sweep

    result = fraction_sweep(params=params, root=ROOT, with_upstream=upstream)
    typer.echo("")
    typer.echo(result["markdown"])
    typer.echo("")
    for line in result["crossover_lines"]:
        typer.echo(line)
    typer.echo(f"\nTable, figures and per-cell histories in {ROOT / 'reports' / 'sweep'}; MLflow: `make ui`")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="raw, data, pretrain, weights, extract, advise, train or evaluate.")],
    item: Annotated[str | None, typer.Argument(help="The source (extract) or run (train, evaluate).")] = None,
    params_file: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run one stage without Prefect: what `dvc repro` calls (see dvc.yaml)."""
    _logging()
    params = _load(params_file, None)
    from flows import stages
    from flows.layout import Layout

    lay = Layout(ROOT)
    plain = {"raw": stages.run_raw, "data": stages.run_data, "pretrain": stages.run_pretrain}
    plain["weights"] = stages.run_weights
    per_item = {"extract": stages.run_extract, "train": stages.run_train, "evaluate": stages.run_evaluate}
    per_item["advise"] = stages.run_advise
    if name in plain:
        with _one_line_errors():
            plain[name](params, lay, stages.plain_runner)
    elif name in per_item:
        known = sorted(params.sources) if name in ("extract", "advise") else sorted(params.train.runs)
        kind = "source" if name in ("extract", "advise") else "run"
        if item not in known:
            typer.echo(f"error: stage {name} needs a {kind} name: got {item!r}, expected one of {known}", err=True)
            raise typer.Exit(2)
        if name == "extract":
            from flows.verify import verify_before_dvc_reuse

            verify_before_dvc_reuse(lay, item)
        with _one_line_errors():
            per_item[name](params, lay, stages.plain_runner, item)
    else:
        raise typer.BadParameter(f"unknown stage {name!r}; expected one of {sorted({**plain, **per_item})}")


@app.command("dvc-yaml")
def dvc_yaml(
    check: Annotated[bool, typer.Option(help="Only report whether dvc.yaml and sweep/dvc.yaml are current.")] = False,
) -> None:
    """Write dvc.yaml and sweep/dvc.yaml from the stages' code (deps = each task's import closure)."""
    from flows import dvcyaml

    if check:
        stale = dvcyaml.stale(ROOT)
        for path in stale:
            typer.echo(f"{path}: differs from the code; run `headstart dvc-yaml`", err=True)
        raise typer.Exit(1 if stale else 0)
    for path in dvcyaml.write(ROOT):
        typer.echo(f"wrote {path}")


@app.command()
def advise(
    source: Annotated[list[str] | None, typer.Argument(help="Sources to advise on (default: every source).")] = None,
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Probe each stored cut on the target, measure its size and similarity, recommend a strategy (2x2 table)."""
    params = _load(params_file, set_)
    unknown = sorted(set(source or []) - set(params.sources))
    if unknown:
        raise typer.BadParameter(f"unknown source(s) {unknown}; expected some of {sorted(params.sources)}")
    from flows.choose import advice_text, advise_sources, rank_sources, ranking_text

    advice = advise_sources(params=params, root=ROOT, sources=source or sorted(params.sources))
    for record in advice.values():
        typer.echo("")
        typer.echo(advice_text(record))
    if len(advice) > 1:
        typer.echo("")
        typer.echo(ranking_text(rank_sources(advice)))
    typer.echo(f"\nProbe tables and plots in {ROOT / 'reports' / 'advise'}; MLflow: `make ui`")


@app.command("compare-init")
def compare_init(
    source: Annotated[str, typer.Option(help="The source transferred from.")] = "fmnist",
    strategy: Annotated[str, typer.Option(help="frozen or partial (the head is what differs).")] = "frozen",
    hidden: Annotated[int, typer.Option(help="Hidden units of the head (0: linear, where init is harmless).")] = 64,
    init: Annotated[list[str] | None, typer.Option(help="Inits to compare (repeatable; default: all four).")] = None,
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Train the same head with each initialisation on the same data: constant inits break it (symmetry)."""
    params = _load(params_file, set_)
    from flows.choose import INITS, init_table
    from flows.choose import compare_init as compare_flow

    inits = init or list(INITS)
    if strategy not in ("frozen", "partial") or source not in params.sources or set(inits) - set(INITS):
        raise typer.BadParameter(
            f"expected --strategy frozen|partial, --source one of {sorted(params.sources)}, --init among {INITS}"
        )
    widths = [hidden] if hidden > 0 else []
    rows = compare_flow(params=params, root=ROOT, source=source, strategy=strategy, hidden=widths, inits=inits)
    typer.echo("")
    typer.echo(init_table(rows, widths))


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="PNG/JPEG files, folders of them, or IDX image files.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="models:/<name>@<alias>, models:/<name>/<version>, or a model .safetensors file; "
            "default: the project's champion (models:/<evaluate.register_as>@champion)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array of image, class, probability.")] = False,
) -> None:
    """Class and probability per image, preprocessed exactly as the model was trained (its stored spec)."""
    import json

    from flows.layout import Layout
    from flows.predict import format_table, predict_files

    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        typer.echo(f"error: no such file or folder: {', '.join(missing)}", err=True)
        raise typer.Exit(2)
    if model is None:
        params_path = ROOT / "params.yaml"
        name = load_params(params_path).evaluate.register_as if params_path.is_file() else "fmnist-transfer"
        model = f"models:/{name}@champion"
    try:
        rows, sha256 = predict_files(model, inputs, Layout(ROOT).weights_cache)
    except (FileNotFoundError, LookupError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"model {model} (weights sha256 {sha256[:16]})", err=True)
    typer.echo(format_table(rows))


@app.command()
def export(
    run_name: Annotated[str, typer.Argument(help="A run of params.yaml's train.runs (trained already).")],
    format_: Annotated[str, typer.Option("--format", help="onnx (the only format so far).")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Where to write it; default models/runs/<run>/model.onnx.")] = None,
    params_file: ParamsOpt = Path("params.yaml"),
) -> None:
    """Export a trained run as one ONNX graph (pixels in, calibrated probabilities out), checked with onnxruntime."""
    params = _load(params_file, None)
    if run_name not in params.train.runs:
        typer.echo(f"error: unknown run {run_name!r}; expected one of {sorted(params.train.runs)}", err=True)
        raise typer.Exit(2)
    if format_ != "onnx":
        typer.echo(f"error: unknown format {format_!r}; expected onnx", err=True)
        raise typer.Exit(2)
    from flows.export import export_run
    from flows.layout import Layout

    try:
        path, diff, n = export_run(Layout(ROOT), run_name, out)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}: onnxruntime matches torch on {n} test images (max abs difference {diff:.2e})")


@app.command()
def verify(params_file: ParamsOpt = Path("params.yaml")) -> None:
    """Check every chunk of every feature store, the stores against the data, and the DVC cache's objects."""
    from flows.layout import Layout
    from flows.verify import dvc_cache_damage, report_text, verify_project

    params = _load(params_file, None)
    reports = verify_project(Layout(ROOT), sorted(params.sources))
    dvc_damage = dvc_cache_damage(ROOT)
    typer.echo(report_text(reports, ROOT, dvc_damage))
    if dvc_damage or not all(r.ok for r in reports):
        raise typer.Exit(1)


@app.command()
def backbones(
    image_size: Annotated[int, typer.Option(min=8, max=1024, help="Image side the activation shapes are for.")] = 224,
    model: Annotated[str | None, typer.Option(help="One architecture: resnet50, timm:convnext_tiny, ...")] = None,
) -> None:
    """The architectures a source can use, their cut points with activation shapes, the weights present locally."""
    from flows.catalog import catalog_text

    try:
        typer.echo(catalog_text(image_size, Path(os.environ["TORCH_HOME"]), model))
    except KeyError as err:
        typer.echo(f"error: {err.args[0]}", err=True)
        raise typer.Exit(2) from None


@app.command()
def schedule(
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    cron: Annotated[str | None, typer.Option(help='A cron expression: "0 2 * * *" is every night at 02:00.')] = None,
    interval: Annotated[float | None, typer.Option(min=1, help="Seconds between runs (instead of --cron).")] = None,
    name: Annotated[str, typer.Option(help="The deployment's name in the Prefect UI.")] = "scheduled",
) -> None:
    """Run the pipeline on a schedule through a Prefect server (PREFECT_API_URL); Ctrl-C or SIGTERM pauses and stops."""
    if (cron is None) == (interval is None):
        raise typer.BadParameter("give exactly one of --cron or --interval")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError:
            raise typer.BadParameter(f"--cron {cron!r}: not a cron expression (e.g. '0 2 * * *')") from None
    from prefect.settings import PREFECT_API_URL

    from headstart.servers import healthy

    api = PREFECT_API_URL.value()
    if not api or not healthy(f"{api.rstrip('/')}/health"):
        typer.echo(
            f"scheduling needs a running Prefect server{f' (none answers at {api})' if api else ''}: start one with "
            "`make prefect-server`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`",
            err=True,
        )
        raise typer.Exit(2)
    params = _load(params_file, set_)
    from flows.pipeline import serve_transfer

    serve_transfer(params, ROOT, name, cron=cron, interval=interval)


@app.command()
def server(
    kind: Annotated[str, typer.Argument(help="prefect (scheduling, UI) or mlflow (a tracking server).")],
    port: Annotated[int | None, typer.Option(help="Port on 127.0.0.1; default 4200 (prefect), 5000 (mlflow).")] = None,
) -> None:
    """Run the Prefect server or an MLflow tracking server in the foreground; Ctrl-C (or SIGTERM) stops all of it."""
    from headstart import servers

    if kind == "prefect":
        srv = servers.prefect_server(port or 4200)
        hint = f"export PREFECT_API_URL={srv.url}/api    # then: headstart schedule --cron '0 2 * * *'"
    elif kind == "mlflow":
        srv = servers.tracking_server(port or 5000, ROOT / ".mlflow-server")
        hint = f"export MLFLOW_TRACKING_URI={srv.url}    # then: headstart run"
    else:
        raise typer.BadParameter(f"unknown server {kind!r}; expected prefect or mlflow")
    _serve(srv, hint)


def _serve(srv: Any, hint: str) -> None:
    from headstart import servers

    typer.echo(f"starting the {srv.name} server on {srv.url} ...")
    try:
        running = servers.start(srv)
    except RuntimeError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{srv.name} server ready: UI on {srv.url}\n  {hint}\nCtrl-C stops it.")
    servers.run_until_stopped(running)


@app.command()
def ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000) -> None:
    """Open the MLflow UI on the project's tracking store (lean: one worker, bound to 127.0.0.1)."""
    from headstart import servers

    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith(("http://", "https://")):
        typer.echo(f"MLFLOW_TRACKING_URI is the tracking server {uri}: its UI is there.")
        return
    _serve(servers.mlflow_server(port, uri), f"tracking store {uri}")


if __name__ == "__main__":
    app()
