"""Each pipeline stage as one call: read upstream records, run the task, write this stage's record.

The Prefect flow and the DVC stages run exactly these functions; only the runner differs
(a cached Prefect task call, or the plain function under DVC, which does its own caching).
Records on disk are the stages' file contract, declared as outs/deps in dvc.yaml.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.layout import Layout
from headstart.caching import outputs_intact, run_logger
from headstart.checkpoints import atomic_path
from headstart.config import Params
from headstart.tracking import run_url
from tasks.advise import advise
from tasks.data import data
from tasks.evaluate import evaluate
from tasks.extract import extract
from tasks.pretrain import pretrain
from tasks.train import needs_features, train
from tasks.weights import weights

Runner = Callable[..., dict[str, Any]]


def prefect_runner(task: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a cached task; a hit whose files are gone or changed is recomputed, never trusted."""
    record = task(**kwargs)
    if outputs_intact(record):
        return record
    run_logger().warning("%s: the cached result's files are missing or changed; recomputing", task.name)
    return task.with_options(refresh_cache=True)(**kwargs)


def plain_runner(task: Any, **kwargs: Any) -> dict[str, Any]:
    """Run the task body without Prefect (DVC decides what reruns)."""
    return task.fn(**kwargs)


def read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run the stage that writes it first (dvc repro)") from None


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write atomically, and not at all when unchanged: a warm run leaves every file untouched."""
    text = json.dumps(record, indent=2, sort_keys=True)
    if path.is_file() and path.read_text() == text:
        return
    tmp = atomic_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def needs_pretrain(params: Params) -> bool:
    """The source model is trained only when a source uses it."""
    own = {"models/source/model.safetensors", f"models:/{params.pretrain.register_as}"}
    return any(any(s.weights.startswith(o) for o in own) for s in params.sources.values())


def run_data(params: Params, lay: Layout, runner: Runner) -> dict[str, Any]:
    return runner(data, params=params.data, out_dir=lay.data, download_dir=lay.downloads)


def run_pretrain(params: Params, lay: Layout, runner: Runner) -> dict[str, Any]:
    record = runner(
        pretrain,
        params=params.pretrain,
        data_record=read_record(lay.data / "source.json"),
        data_dir=lay.data,
        out_dir=lay.source_model,
    )
    write_record(lay.source_model / "record.json", record)
    return record


def run_weights(params: Params, lay: Layout, runner: Runner) -> dict[str, Any]:
    return runner(
        weights, sources=params.sources, params=params.weights, out_dir=lay.weights, cache_dir=lay.weights_cache
    )


def run_extract(params: Params, lay: Layout, runner: Runner, source: str) -> dict[str, Any]:
    record = runner(
        extract,
        source_name=source,
        weights_record=read_record(lay.weights / f"{source}.json"),
        data_record=read_record(lay.data / "target.json"),
        params=params.extract,
        data_dir=lay.data,
        store_root=lay.store_root(source),
        taps=params.sources[source].taps,
    )
    write_record(lay.extract_record(source), record)
    return record


def run_train(params: Params, lay: Layout, runner: Runner, run_name: str) -> dict[str, Any]:
    run = params.train.runs[run_name]
    extract_record = read_record(lay.extract_record(run.source)) if needs_features(run.strategy) else None
    advice_record = read_record(lay.advice(run.source) / "advice.json") if run.strategy == "auto" else None
    out_dir = lay.run_model(run_name)
    record = runner(
        train,
        run_name=run_name,
        run=run,
        source=params.sources[run.source],
        params=params.train,
        weights_record=read_record(lay.weights / f"{run.source}.json"),
        extract_record=extract_record,
        data_record=read_record(lay.data / "target.json"),
        data_dir=lay.data,
        out_dir=out_dir,
        advice_record=advice_record,
    )
    write_record(out_dir / "record.json", record)
    return record


def run_evaluate(params: Params, lay: Layout, runner: Runner, run_name: str) -> dict[str, Any]:
    run = params.train.runs[run_name]
    extract_record = read_record(lay.extract_record(run.source)) if run.strategy == "frozen" else None
    return runner(
        evaluate,
        run_name=run_name,
        train_record=read_record(lay.run_model(run_name) / "record.json"),
        extract_record=extract_record,
        data_record=read_record(lay.data / "target.json"),
        params=params.evaluate,
        data_dir=lay.data,
        reports_dir=lay.reports,
    )


def run_advise(params: Params, lay: Layout, runner: Runner, source: str) -> dict[str, Any]:
    """Probe the source's stored cuts on the target and recommend a strategy (reports/advise/<source>/)."""
    return runner(
        advise,
        source_name=source,
        weights_record=read_record(lay.weights / f"{source}.json"),
        extract_record=read_record(lay.extract_record(source)),
        data_record=read_record(lay.data / "target.json"),
        params=params.advise,
        data_dir=lay.data,
        out_dir=lay.advice(source),
    )


def frozen_sources(params: Params) -> list[str]:
    """Sources whose features must be stored: those used by a run that trains on them (frozen, partial, auto)."""
    return sorted({r.source for r in params.train.runs.values() if needs_features(r.strategy)})


def run_all(params: Params, lay: Layout, runner: Runner) -> dict[str, Any]:
    """The whole pipeline in dependency order; returns what the summary shows (data, sources, runs, MLflow links)."""
    data_record = run_data(params, lay, runner)
    source = run_pretrain(params, lay, runner) if needs_pretrain(params) else None
    weights_record = run_weights(params, lay, runner)
    for name in frozen_sources(params):
        run_extract(params, lay, runner, name)
    for name in sorted({r.source for r in params.train.runs.values() if r.strategy == "auto"}):
        run_advise(params, lay, runner, name)
    runs = {}
    for run_name in params.train.runs:
        trained = run_train(params, lay, runner, run_name)
        runs[run_name] = {**trained, **run_evaluate(params, lay, runner, run_name)}
        runs[run_name]["mlflow_url"] = run_url(trained["mlflow_run_id"])
    if source is not None:
        source = {**source, "mlflow_url": run_url(source["mlflow_run_id"])}
    data = {name: data_record[name] for name in ("source", "target", "origin")}
    return {"data": data, "sources": weights_record["sources"], "source": source, "runs": runs}
