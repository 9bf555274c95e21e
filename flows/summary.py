"""The summary a run ends with (terminal and the Prefect "transfer-summary" artifact alike)."""

from __future__ import annotations

from typing import Any

from headstart import tracking
from headstart.config import Params


def _lineage(sha256: str, register_as: str) -> dict[str, Any]:
    """The MLflow run that trained a model file and its registry version, found by the file's sha256."""
    run_id = tracking.run_of_model(sha256)
    version = tracking.registered_version(register_as, sha256)
    return {
        "mlflow_run_id": run_id,
        "mlflow_url": tracking.run_url(run_id) if run_id else None,
        "registered_version": version.version if version is not None else None,
    }


def summary_rows(records: dict[str, Any], params: Params) -> dict[str, Any]:
    """The pipeline's records as the summary's rows, with their MLflow runs and registry versions looked up."""
    source = records["source"]
    if source is not None:
        source = {**source.model_dump(mode="json"), **_lineage(source.sha256, params.pretrain.register_as)}
    runs = {
        name: {
            **trained.model_dump(mode="json"),
            **evaluated.model_dump(mode="json"),
            **_lineage(trained.sha256, params.evaluate.register_as),
        }
        for name, (trained, evaluated) in records["runs"].items()
    }
    data = records["data"]
    best = tracking.champion(params.evaluate.register_as)
    shas = {run["sha256"]: name for name, run in runs.items()}
    champion = None
    if best is not None:
        sha = best.tags.get(tracking.WEIGHTS_SHA_TAG)
        champion = {"model": params.evaluate.register_as, "version": best.version, "run": shas.get(sha)}
    return {
        "champion": champion,
        "data": {
            "source": data.source.model_dump(mode="json") if data.source is not None else None,
            "target": data.target.model_dump(mode="json"),
            "origin": data.origin,
        },
        "sources": {name: s.model_dump(mode="json") for name, s in records["sources"].items()},
        "source": source,
        "runs": runs,
    }


def _link(text: str, url: str | None) -> str:
    return f"[{text}]({url})" if url else text


def _version(record: dict[str, Any]) -> str:
    return f"v{record['registered_version']}" if record.get("registered_version") else "-"


def summary_markdown(result: dict[str, Any]) -> str:
    """Data fingerprints, sources, source accuracy, per run its strategy, metrics and MLflow run, where to look next."""
    lines = []
    data = result.get("data")
    if data:
        for name in ("source", "target"):
            task = data[name]
            if task is None:
                continue
            counts = ", ".join(f"{n} {split}" for split, n in task["counts"].items())
            lines.append(
                f"Data {name}: fingerprint `{task['fingerprint'][:16]}` ({len(task['class_names'])} classes; {counts})"
            )
        lines += [f"Data from: {data['origin']}", ""]
    sources = result.get("sources")
    if sources:
        lines += ["| source | weights | arch | cut | weights sha256 |", "|---|---|---|---|---|"]
        for name, s in sources.items():
            lines.append(f"| {name} | `{s['uri']}` | {s['arch']} | {s['cut']} | `{s['sha256'][:16]}` |")
        lines.append("")
    source = result.get("source")
    if source:
        lines.append(
            f"Source model on the source test set: accuracy {source['test_accuracy']:.2%} "
            f"(registered {_version(source)}; "
            f"MLflow run {_link((source['mlflow_run_id'] or '-')[:12], source.get('mlflow_url'))})"
        )
        lines.append("")
    tta = any(run.get("tta_accuracy") is not None for run in result["runs"].values())  # evaluate.tta
    lines.append(
        "| run | source | strategy | target test accuracy | balanced accuracy | macro-F1 | "
        + ("with TTA | " if tta else "")
        + "registered | MLflow run |"
    )
    lines.append("|---|---|---|---|---|---|---|---|" + ("---|" if tta else ""))
    for name, run in result["runs"].items():
        mlflow_run = _link(run["mlflow_run_id"][:12], run.get("mlflow_url")) if run.get("mlflow_run_id") else "-"
        with_tta = f" {run['tta_accuracy']:.2%} |" if run.get("tta_accuracy") is not None else " - |" if tta else ""
        lines.append(
            f"| {name} | {run['source']} | {run['strategy']} | {run['test_accuracy']:.2%} "
            f"| {run['balanced_accuracy']:.2%} | {run['macro_f1']:.3f} |{with_tta} {_version(run)} | {mlflow_run} |"
        )
    lines.append("")
    lines += _strategy_notes(result["runs"])
    champ = result.get("champion")
    if champ:
        by = f", trained by run {champ['run']}" if champ.get("run") else ", trained by an earlier run"
        lines += [
            f"Champion: {champ['model']} v{champ['version']}{by}. Predict with it:",
            f"  headstart predict --model models:/{champ['model']}@champion <image files or folders>",
            "",
        ]
    lines.append("Compare the runs in the MLflow UI: `headstart ui`, then open http://127.0.0.1:5000")
    return "\n".join(lines)


def _strategy_notes(runs: dict[str, Any]) -> list[str]:
    """What auto chose, a grid's chosen head, and every run that lost to its scratch baseline on validation
    (negative transfer)."""
    notes = []
    for name, run in runs.items():
        if run["strategy"] == "auto" and run.get("trained"):
            at = f" at {run['cut']}" if run.get("cut") else ""
            notes.append(f"{name}: auto trained {run['trained']}{at}.")
        if run.get("grid_cell"):
            notes.append(f"{name}: its grid of heads chose {run['grid_cell']} (every head: a child of its MLflow run).")
        if run.get("negative_transfer"):
            notes.append(
                f"NEGATIVE TRANSFER: {name} ({run.get('chosen') or run['strategy']} from {run['source']}) scored "
                f"{run['transfer_val_accuracy']:.2%} on validation, scratch on the same data "
                f"{run['baseline_val_accuracy']:.2%}: transferring from this source hurt."
            )
    return [*notes, ""] if notes else []
