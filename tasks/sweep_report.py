"""The sweep's report: the cells' records as a table, curves over the data fraction, and the crossover.

Pure functions average the cells over seeds, find the fraction from which random initialisation
(scratch) is at least as good as a transfer strategy, and draw the figures; the `sweep_report` task
writes them under reports/sweep/ and adds them to the sweep's parent MLflow run.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from matplotlib.figure import Figure
from prefect import task

from headstart import tracking
from headstart.caching import cached, run_logger
from headstart.files import atomic_write
from headstart.records import Output

METRICS = {
    "test_accuracy": ("test accuracy", False),
    "final_train_loss": ("final training loss", True),
    "best_val_loss": ("best validation loss", True),
}
"""Metric -> (label, lower is better): the table's columns and the figures' y axes."""
BASELINE = "scratch"
"""Random initialisation: what every transfer strategy is compared with."""
FIGURES = {"val_loss.png": "best_val_loss", "train_loss.png": "final_train_loss", "test_accuracy.png": "test_accuracy"}


def summarise(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (strategy, fraction): mean and (population) std of each metric over the seeds, fraction-sorted."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["strategy"], cell["fraction"]), []).append(cell)
    order = list(dict.fromkeys(c["strategy"] for c in cells))
    rows = []
    for (strategy, fraction), members in sorted(groups.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        row: dict[str, Any] = {
            "strategy": strategy,
            "cut": members[0].get("cut"),  # one sweep trains all its frozen and partial cells at one cut
            "fraction": fraction,
            "train_size": int(np.mean([m["train_size"] for m in members])),
            "seeds": len(members),
        }
        for metric in METRICS:
            values = np.array([m[metric] for m in members], dtype=np.float64)
            row[f"{metric}_mean"], row[f"{metric}_std"] = float(values.mean()), float(values.std())
        rows.append(row)
    return rows


def labels(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """strategy -> its name in the table's header and the figures' legend, with the cut it trained at
    (`frozen at block2`): a frozen or partial result means little without it."""
    return {r["strategy"]: f"{r['strategy']} at {r['cut']}" if r.get("cut") else r["strategy"] for r in rows}


def series(rows: Sequence[dict[str, Any]], strategy: str, metric: str) -> dict[float, float]:
    """fraction -> mean metric of one strategy."""
    return {r["fraction"]: r[f"{metric}_mean"] for r in rows if r["strategy"] == strategy}


def crossover(rows: Sequence[dict[str, Any]], reference: str, metric: str) -> float | None:
    """The smallest fraction from which scratch is at least as good as `reference` at it and every larger fraction.

    None when scratch is worse at the largest fraction (it never catches up), or either strategy is missing.
    """
    lower_is_better = METRICS[metric][1]
    ours, theirs = series(rows, BASELINE, metric), series(rows, reference, metric)
    shared = sorted(set(ours) & set(theirs))
    found = None
    for fraction in reversed(shared):
        as_good = ours[fraction] <= theirs[fraction] if lower_is_better else ours[fraction] >= theirs[fraction]
        if not as_good:
            break
        found = fraction
    return found


def crossovers(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """For each transfer strategy in the table, the crossover of scratch on every metric."""
    strategies = dict.fromkeys(r["strategy"] for r in rows)
    if BASELINE not in strategies:
        return {}
    return {s: {m: crossover(rows, s, m) for m in METRICS} for s in strategies if s != BASELINE}


def _fmt(row: dict[str, Any], metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    text = f"{mean:.2%}" if metric == "test_accuracy" else f"{mean:.3f}"
    if row["seeds"] > 1:
        text += f" ± {std:.2%}" if metric == "test_accuracy" else f" ± {std:.3f}"
    return text


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per fraction; for each metric a column per strategy (mean ± std over seeds when several)."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows})
    by_key = {(r["strategy"], r["fraction"]): r for r in rows}
    names = labels(rows)
    header = ["fraction", "images"] + [f"{label}: {names[s]}" for label, _ in METRICS.values() for s in strategies]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fraction in fractions:
        present = [by_key[(s, fraction)] for s in strategies if (s, fraction) in by_key]
        cells = [f"{fraction * 100:g}%"]
        cells.append(str(present[0]["train_size"]))
        for metric in METRICS:
            cells += [_fmt(by_key[(s, fraction)], metric) if (s, fraction) in by_key else "-" for s in strategies]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossover_lines(found: dict[str, dict[str, float | None]]) -> list[str]:
    """Plain sentences: from which fraction scratch catches up with each transfer strategy."""
    lines = []
    for reference, by_metric in found.items():
        for metric, fraction in by_metric.items():
            label = METRICS[metric][0]
            if fraction is None:
                lines.append(f"scratch never catches up with {reference} on {label} (behind at the largest share)")
            else:
                lines.append(f"scratch catches up with {reference} on {label} from {fraction * 100:g}% of the data on")
    return lines


def table_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV (one line per strategy and fraction), for spreadsheets and `dvc plots`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["strategy", "fraction"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def metric_figure(rows: Sequence[dict[str, Any]], metric: str, crossover_at: float | None = None) -> Figure:
    """One line per strategy against the fraction (percent), a band of ± one std over seeds, the crossover marked."""
    label, _ = METRICS[metric]
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    names = labels(rows)
    for strategy in names:
        mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["fraction"])
        x = np.array([100 * r["fraction"] for r in mine])
        mean = np.array([r[f"{metric}_mean"] for r in mine])
        std = np.array([r[f"{metric}_std"] for r in mine])
        ax.plot(x, mean, marker="o", label=names[strategy])
        if std.any():
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    if crossover_at is not None:
        label_at = f"scratch catches up ({crossover_at * 100:g}%)"
        ax.axvline(100 * crossover_at, color="grey", linestyle="--", label=label_at)
    ax.set_xlabel("share of the target's training data (%)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} against the training data used")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _reference(found: dict[str, dict[str, float | None]]) -> str | None:
    """The transfer strategy the figures mark the crossover against: finetune (the notes' pretrained init) first."""
    return "finetune" if "finetune" in found else next(iter(found), None)


@task(**cached("sweep_report"))
def sweep_report(cells: list[dict], out_dir: Path, parent_run_id: str) -> dict:
    """Write the table (CSV, Markdown), the three figures and summary.json; add them to the parent MLflow run."""
    log = run_logger()
    rows = summarise(cells)
    found = crossovers(rows)
    reference = _reference(found)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = table_markdown(rows)
    summary = {
        "cells": len(cells),
        "train_seconds": round(sum(c["seconds"] for c in cells), 1),
        "crossover": found,
    }
    texts = {
        "table.csv": table_csv(rows),
        "table.md": markdown + "\n",
        "summary.json": json.dumps(summary, indent=2) + "\n",
    }
    for name, text in texts.items():
        with atomic_write(out_dir / name) as tmp:
            tmp.write_text(text)
    for name, metric in FIGURES.items():
        at = found[reference][metric] if reference is not None else None
        with atomic_write(out_dir / name) as tmp:
            metric_figure(rows, metric, at).savefig(tmp, format="png")
    written = [out_dir / name for name in (*texts, *FIGURES)]
    with tracking.training_run("sweep", {}, {}, run_id=parent_run_id):
        for path in written:
            mlflow.log_artifact(str(path), artifact_path="sweep")
        for ref, by_metric in found.items():
            mlflow.log_metrics({f"crossover_vs_{ref}.{m}": f for m, f in by_metric.items() if f is not None})
    for line in crossover_lines(found):
        log.info(line)
    return {
        "rows": rows,
        "markdown": markdown,
        "crossover": found,
        "crossover_lines": crossover_lines(found),
        **summary,
        "outputs": [Output.of(p).model_dump() for p in written],
    }
