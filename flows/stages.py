"""Each pipeline stage as one call, and the pipeline's order written once.

The Prefect flow and the DVC stages run exactly these functions; only the runner differs (a
cached Prefect task call, or the plain function under DVC). Both runners first compute the
stage's content key (headstart.caching.stage_key) and reuse the stage's record on disk when it
carries that key and its files are intact, so a stage one orchestrator ran is not run again by
the other. Records are the stages' file contract, declared as outs/deps in dvc.yaml.

Each stage is a `Call`: its inputs read and every task argument bound, so its key is known
without importing the task. The task (and torch, MLflow) is imported only when the stage must run:
`headstart stage raw` (every `dvc repro`), an up-to-date stage and `headstart status` stay cheap.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from flows.layout import Layout
from headstart.caching import bound_arguments, run_logger, stage_inputs, stage_key
from headstart.config import Params
from headstart.records import (
    AdviseRecord,
    DataRecord,
    EvaluateRecord,
    ExtractRecord,
    Output,
    PretrainRecord,
    RawRecord,
    Record,
    SourceWeights,
    StageRecord,
    TaskMeta,
    TrainRecord,
    WeightsRecord,
)

Runner = Callable[..., Any]
R = TypeVar("R", bound=StageRecord)


def _intact(result: Any) -> bool:
    if isinstance(result, StageRecord):
        return result.intact()
    if isinstance(result, Record):  # a record of content that lists no files (the raw stage's)
        return True
    if isinstance(result, dict):  # sweep cells: plain dicts with the same `outputs` entries
        return all(Output.model_validate(o).intact() for o in result.get("outputs", []))
    return False


def prefect_runner(task: Any, **kwargs: Any) -> Any:
    """Run a cached task; a hit whose files are gone or changed is recomputed, never trusted."""
    result = task(**kwargs)
    if _intact(result):
        return result
    run_logger().warning("%s: the cached result's files are missing or changed; recomputing", task.name)
    return task.with_options(refresh_cache=True)(**kwargs)


def plain_runner(task: Any, **kwargs: Any) -> Any:
    """Run the task body without Prefect (DVC decides what reruns)."""
    return task.fn(**kwargs)


def dvc_stage(task_name: str, kwargs: dict[str, Any]) -> str:
    """The DVC stage (dvc.yaml) a task call is: `extract@fmnist`, `train@fmnist-frozen`, `data`."""
    if "run_name" in kwargs:
        return f"{task_name}@{kwargs['run_name']}"
    if "weights" in kwargs and task_name in ("extract", "advise"):
        return f"{task_name}@{kwargs['weights'].source}"
    return task_name


class Recorder:
    """A runner that remembers the DVC stages it computed: what `dvc commit` must record afterwards.

    A stage found up to date on disk was recorded by whoever made it (`dvc repro`, or an earlier
    `headstart run` and its commit), so committing only what this run computed keeps a warm run cheap.
    """

    def __init__(self, runner: Runner):
        self.runner = runner
        self.computed: list[str] = []

    def __call__(self, task: Any, **kwargs: Any) -> Any:
        if task.name != "raw":  # always recomputed, and always_changed in dvc.yaml: nothing to record
            self.computed.append(dvc_stage(task.name, kwargs))
        return self.runner(task, **kwargs)


def current(path: Path, kind: type[R], key: str) -> R | None:
    """The record at `path` when it was made from inputs with this key and its files are unchanged."""
    try:
        record = kind.read(path)
    except (FileNotFoundError, ValueError):
        return None
    return record if record.key == key and record.intact() else None


@dataclass(frozen=True)
class Call:
    """One stage call with its inputs read: what both runners run and `headstart status` inspects.

    `kwargs` binds every parameter of the task (no defaults left to fill), so the key is known
    without importing the task module and its torch: an up-to-date stage costs a record read.
    """

    stage: str
    """The DVC stage (dvc.yaml): data, extract@fmnist, train@fmnist-frozen."""
    task: str
    """The task of that name in tasks/<task>.py."""
    record: Path
    kind: type[StageRecord]
    kwargs: dict[str, Any]

    @cached_property
    def key(self) -> str:
        return stage_key(self.task, self.kwargs)

    @cached_property
    def inputs(self) -> dict[str, str]:
        """Computed once: the weights stage's part hashes the files its URIs name."""
        return stage_inputs(self.task, self.kwargs)

    def load(self) -> Any:
        return getattr(importlib.import_module(f"tasks.{self.task}"), self.task)


def run_call(runner: Runner, call: Call, task: Any = None) -> StageRecord:
    """One stage: reuse its record on disk if current, else run its task (through `runner`) and write the record."""
    key = call.key
    found = current(call.record, call.kind, key)
    if found is not None:
        run_logger().info("%s: up to date (%s)", call.stage, call.record.name)
        return found
    result = runner(task or call.load(), **call.kwargs)
    record = call.kind.model_validate(result.model_dump() if isinstance(result, Record) else result)
    record = record.model_copy(update={"key": key, "inputs": call.inputs})
    record.write(call.record)
    return record


def run_stage(runner: Runner, task: Any, path: Path, kind: type[R], **kwargs: Any) -> R:
    """A stage call for a task in hand (the advisor's flows): its defaults bound, then `run_call`."""
    call = Call(dvc_stage(task.name, kwargs), task.name, path, kind, bound_arguments(task.fn, kwargs))
    return run_call(runner, call, task)  # type: ignore[return-value]


def run_raw(params: Params, lay: Layout, runner: Runner) -> RawRecord:
    """Always computed (it is what the raw files are now); written only when it changed."""
    from tasks.raw import raw

    record = RawRecord.model_validate(runner(raw, params=params.data, with_source=params.needs_pretrain).model_dump())
    record.write(lay.raw_record)
    return record


def data_call(params: Params, lay: Layout) -> Call:
    kwargs = dict(
        params=params.data, raw=RawRecord.read(lay.raw_record), out_dir=lay.data, download_dir=lay.downloads,
        with_source=params.needs_pretrain,
    )  # fmt: skip
    return Call("data", "data", lay.data_record, DataRecord, kwargs)


def pretrain_call(params: Params, lay: Layout) -> Call:
    kwargs = dict(
        params=params.pretrain, task_meta=TaskMeta.read(lay.task_meta("source")), data_dir=lay.data,
        out_dir=lay.source_model,
    )  # fmt: skip
    return Call("pretrain", "pretrain", lay.source_model / "record.json", PretrainRecord, kwargs)


def weights_call(params: Params, lay: Layout) -> Call:
    kwargs = dict(sources=params.sources, params=params.weights, out_dir=lay.weights, cache_dir=lay.weights_cache)
    return Call("weights", "weights", lay.weights_record, WeightsRecord, kwargs)


def _weights(lay: Layout, source: str) -> SourceWeights:
    return SourceWeights.read(lay.source_weights(source))


def extract_call(params: Params, lay: Layout, source: str) -> Call:
    kwargs = dict(
        weights=_weights(lay, source), task_meta=TaskMeta.read(lay.task_meta("target")), params=params.extract,
        data_dir=lay.data, store_root=lay.store_root(source), taps=params.sources[source].taps, on_chunk=None,
    )  # fmt: skip
    return Call(f"extract@{source}", "extract", lay.extract_record(source), ExtractRecord, kwargs)


def advise_call(params: Params, lay: Layout, source: str) -> Call:
    """Probe the source's stored cuts on the target and recommend a strategy (reports/advise/<source>/)."""
    kwargs = dict(
        weights=_weights(lay, source), extract_record=ExtractRecord.read(lay.extract_record(source)),
        task_meta=TaskMeta.read(lay.task_meta("target")), params=params.advise, data_dir=lay.data,
        out_dir=lay.advice(source),
    )  # fmt: skip
    return Call(f"advise@{source}", "advise", lay.advice_record(source), AdviseRecord, kwargs)


def train_call(params: Params, lay: Layout, run_name: str) -> Call:
    run = params.train.runs[run_name]
    kwargs = dict(
        run_name=run_name, run=run, source=params.sources[run.source], params=params.train,
        weights=_weights(lay, run.source), extract_record=ExtractRecord.read(lay.extract_record(run.source)),
        task_meta=TaskMeta.read(lay.task_meta("target")), data_dir=lay.data, out_dir=lay.run_model(run_name),
        advice_record=AdviseRecord.read(lay.advice_record(run.source)),
    )  # fmt: skip
    return Call(f"train@{run_name}", "train", lay.train_record(run_name), TrainRecord, kwargs)


def evaluate_call(params: Params, lay: Layout, run_name: str) -> Call:
    run = params.train.runs[run_name]
    kwargs = dict(
        run_name=run_name, train_record=TrainRecord.read(lay.train_record(run_name)),
        extract_record=ExtractRecord.read(lay.extract_record(run.source)),
        task_meta=TaskMeta.read(lay.task_meta("target")), params=params.evaluate, data_dir=lay.data,
        reports_dir=lay.reports,
    )  # fmt: skip
    return Call(f"evaluate@{run_name}", "evaluate", lay.evaluate_record(run_name), EvaluateRecord, kwargs)


def run_data(params: Params, lay: Layout, runner: Runner) -> DataRecord:
    return run_call(runner, data_call(params, lay))  # type: ignore[return-value]


def run_pretrain(params: Params, lay: Layout, runner: Runner) -> PretrainRecord:
    return run_call(runner, pretrain_call(params, lay))  # type: ignore[return-value]


def run_weights(params: Params, lay: Layout, runner: Runner) -> WeightsRecord:
    return run_call(runner, weights_call(params, lay))  # type: ignore[return-value]


def run_extract(params: Params, lay: Layout, runner: Runner, source: str) -> ExtractRecord:
    return run_call(runner, extract_call(params, lay, source))  # type: ignore[return-value]


def run_advise(params: Params, lay: Layout, runner: Runner, source: str) -> AdviseRecord:
    return run_call(runner, advise_call(params, lay, source))  # type: ignore[return-value]


def run_train(params: Params, lay: Layout, runner: Runner, run_name: str) -> TrainRecord:
    return run_call(runner, train_call(params, lay, run_name))  # type: ignore[return-value]


def run_evaluate(params: Params, lay: Layout, runner: Runner, run_name: str) -> EvaluateRecord:
    return run_call(runner, evaluate_call(params, lay, run_name))  # type: ignore[return-value]


def upstream(params: Params, lay: Layout, runner: Runner, sources: Sequence[str], advised: Sequence[str] = ()) -> None:
    """The pipeline up to the feature stores, in its one order: raw, data, pretrain, weights, extract, advise.

    Every flow (the pipeline, the advisor, compare-init, the sweep) brings its inputs up to date
    through this function.
    """
    run_raw(params, lay, runner)
    run_data(params, lay, runner)
    if params.needs_pretrain:
        run_pretrain(params, lay, runner)
    run_weights(params, lay, runner)
    for name in sources:
        run_extract(params, lay, runner, name)
    for name in advised:
        run_advise(params, lay, runner, name)


def pipeline_calls(params: Params, lay: Layout) -> list[tuple[str, Callable[[], Call]]]:
    """Every stage after raw in the pipeline's order (dvc.yaml's), each built when reached (it reads upstream)."""
    calls: list[tuple[str, Callable[[], Call]]] = [("data", lambda: data_call(params, lay))]
    if params.needs_pretrain:
        calls.append(("pretrain", lambda: pretrain_call(params, lay)))
    calls.append(("weights", lambda: weights_call(params, lay)))
    sources = sorted(params.sources)
    calls += [(f"extract@{s}", lambda s=s: extract_call(params, lay, s)) for s in sources]
    calls += [(f"advise@{s}", lambda s=s: advise_call(params, lay, s)) for s in sources]
    for run in params.train.runs:
        calls.append((f"train@{run}", lambda r=run: train_call(params, lay, r)))
        calls.append((f"evaluate@{run}", lambda r=run: evaluate_call(params, lay, r)))
    return calls


def run_all(params: Params, lay: Layout, runner: Runner) -> dict[str, Any]:
    """The whole pipeline, the same stages as dvc.yaml (every source extracted and advised); its records."""
    run_raw(params, lay, runner)
    for _, build in pipeline_calls(params, lay):
        run_call(runner, build())
    return pipeline_records(params, lay)


def pipeline_records(params: Params, lay: Layout) -> dict[str, Any]:
    """The records a finished pipeline leaves, as the run's summary reads them."""
    runs = {
        name: (TrainRecord.read(lay.train_record(name)), EvaluateRecord.read(lay.evaluate_record(name)))
        for name in params.train.runs
    }
    source = PretrainRecord.read(lay.source_model / "record.json") if params.needs_pretrain else None
    return {
        "data": DataRecord.read(lay.data_record),
        "sources": WeightsRecord.read(lay.weights_record).sources,
        "source": source,
        "runs": runs,
    }


def dvc_commit(lay: Layout, stages: Sequence[str]) -> bool:
    """Record what a Prefect run made in dvc.lock (`dvc commit`), so a following `dvc repro` has nothing to do.

    Only in a DVC project whose params.yaml the run used unchanged (the caller checks that): the
    outputs are then exactly what `dvc repro` would have made, byte for byte.
    """
    if not stages or not (lay.root / ".dvc").is_dir() or not (lay.root / "dvc.yaml").is_file():
        return False
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.exists() else "dvc", "commit", "--force", "--quiet", *stages]
    proc = subprocess.run(cmd, cwd=lay.root, capture_output=True, text=True)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()[-2000:]
        run_logger().warning("dvc commit failed (dvc repro will recompute): %s", output)
        return False
    return True
