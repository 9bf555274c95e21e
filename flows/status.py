"""`headstart status`: which stages are up to date and which would rerun, and why, without running anything.

The answer comes from the same place both orchestrators decide from: each stage's record on disk,
its content key and its files (flows/stages.py). Nothing is imported that a stage needs to run
(no torch, no Prefect server); the order and the links between stages are dvc.yaml's, so a
stage waiting on a stale one is named as DVC would rerun it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flows.dvcyaml import pipeline
from flows.layout import Layout
from flows.stages import Call, pipeline_calls
from headstart.config import Params
from headstart.raw import raw_record
from headstart.records import RawRecord, Record, StageRecord

State = Literal["up to date", "stale", "waits"]


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: State
    why: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.stage:<28} {self.state}" + (f": {'; '.join(self.why)}" if self.why else "")


def _paths(entries: list[Any]) -> set[str]:
    """dvc.yaml's deps/outs entries (a path, or {path: options}) as paths."""
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def stage_links(params: Params) -> dict[str, tuple[set[str], set[str]]]:
    """Each DVC stage's deps and outs (dvc.yaml's foreach resolved for these params)."""
    links: dict[str, tuple[set[str], set[str]]] = {}
    for name, spec in pipeline(params.needs_pretrain)["stages"].items():
        if "foreach" not in spec:
            links[name] = (_paths(spec["deps"]), _paths(spec["outs"]))
            continue
        per_source = spec["foreach"] == "${sources}"
        items = (
            {s: s for s in params.sources} if per_source else {r: run.source for r, run in params.train.runs.items()}
        )
        for key, source in items.items():

            def fill(entries: list[Any], key: str = key, source: str = source) -> set[str]:
                return {p.replace("${key}", key).replace("${item.source}", source) for p in _paths(entries)}

            links[f"{name}@{key}"] = (fill(spec["do"]["deps"]), fill(spec["do"]["outs"]))
    return links


def _upstream(deps: set[str], outs: set[str]) -> bool:
    return any(d == o or d.startswith(o.rstrip("/") + "/") for d in deps for o in outs)


def raw_changes(old: RawRecord, new: RawRecord) -> list[str]:
    """What differs between two raw records, file by file (the first few named)."""
    why = []
    if old.fmnist_origin != new.fmnist_origin:
        why.append(f"Fashion-MNIST now read from {new.fmnist_origin} (was {old.fmnist_origin})")
    why += [f"Fashion-MNIST {name} changed" for name in sorted(set(old.fmnist) | set(new.fmnist))
            if old.fmnist.get(name) != new.fmnist.get(name)]  # fmt: skip
    before, after = old.image_folder or {}, new.image_folder or {}
    for verb, names in (
        ("added", sorted(set(after) - set(before))),
        ("removed", sorted(set(before) - set(after))),
        ("changed", sorted(n for n in set(before) & set(after) if before[n] != after[n])),
    ):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            why.append(f"{len(names)} image(s) {verb}: {shown}")
    return why or ["its record differs"]


PARAM_ARGS = {"run": "train.runs", "source": "sources", "sources": "sources", "taps": "sources"}
"""Task arguments that are params.yaml sections other than the task's own (its `params` argument)."""


def input_changes(old: dict[str, str], new: dict[str, str], task: str = "") -> list[str]:
    """Which of a stage's inputs changed, in words, from the key's parts its record holds and the current ones."""
    if not old:
        return ["its inputs changed (its record predates per-input hashes)"]
    code = sorted(
        k.removeprefix("code:") for k in set(old) | set(new) if k.startswith("code:") and old.get(k) != new.get(k)
    )
    why = [f"code changed: {', '.join(code)}"] if code else []
    for name in sorted(k for k in set(old) | set(new) if not k.startswith("code:") and old.get(k) != new.get(k)):
        if name == "current_content":
            why.append("the weights a source's URI names changed")
        elif name == "params" and task:
            why.append(f"params changed (params.yaml: {task})")
        elif name in PARAM_ARGS:
            why.append(f"params changed (params.yaml: {PARAM_ARGS[name]})")
        else:
            why.append(f"input {name!r} changed")
    return why or ["its key changed"]


def _changed_outputs(record: StageRecord) -> list[str]:
    return [f"output {o.path} changed or missing" for o in record.outputs if not o.intact()]


def stage_status(call: Call) -> StageStatus:
    """One stage whose upstream is current: up to date when its record has this key and its files are intact."""
    try:
        record: StageRecord = call.kind.read(call.record)
    except FileNotFoundError:
        return StageStatus(call.stage, "stale", [f"never run ({call.record.name} missing)"])
    except ValueError as err:
        return StageStatus(call.stage, "stale", [str(err)])
    if record.key != call.key:
        return StageStatus(call.stage, "stale", input_changes(record.inputs, call.inputs, call.task))
    changed = _changed_outputs(record)
    return StageStatus(call.stage, "stale" if changed else "up to date", changed)


def pipeline_status(params: Params, lay: Layout) -> list[StageStatus]:
    """Every stage of `headstart run` and `dvc repro`: up to date, stale (and why), or waiting on a stale one."""
    try:
        old: Record | None = RawRecord.read(lay.raw_record)
    except (FileNotFoundError, ValueError):
        old = None
    new = raw_record(params.data, params.needs_pretrain)
    if old is None:
        statuses = [StageStatus("raw", "stale", ["never run (raw.json missing)"])]
    elif old != new:
        statuses = [StageStatus("raw", "stale", raw_changes(old, new))]
    else:
        statuses = [StageStatus("raw", "up to date")]
    links = stage_links(params)
    for stage, build in pipeline_calls(params, lay):
        waits = [s.stage for s in statuses if s.state != "up to date" and _upstream(links[stage][0], links[s.stage][1])]
        if waits:
            statuses.append(StageStatus(stage, "waits", [f"on {', '.join(waits)}"]))
            continue
        try:
            statuses.append(stage_status(build()))
        except (FileNotFoundError, ValueError) as err:
            statuses.append(StageStatus(stage, "stale", [f"cannot read its inputs: {err}"]))
    return statuses


def status_text(statuses: list[StageStatus], root: Path) -> str:
    stale = [s for s in statuses if s.state != "up to date"]
    lines = [s.line() for s in statuses]
    if stale:
        lines.append(f"\n{len(stale)} of {len(statuses)} stage(s) would run: `headstart run` or `dvc repro` in {root}")
    else:
        lines.append(f"\nevery stage is up to date in {root}")
    return "\n".join(lines)
