"""Choosing a strategy: the advise flow (cut-point probe + 2x2 table) and the head-initialisation comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.layout import Layout
from flows.stages import prefect_runner, run_stage, upstream
from headstart.caching import run_logger
from headstart.config import HeadParams, Params, RunParams, needs_features
from headstart.records import AdviseRecord, ExtractRecord, SourceWeights, TaskMeta, TrainRecord
from tasks.advise import probe_table
from tasks.train import train

INITS = ("kaiming", "xavier", "zeros", "ones")


@flow(name="advise", validate_parameters=False)
def advise_sources(params: Params, root: Path, sources: list[str]) -> dict[str, dict[str, Any]]:
    """The advise stage for each source, after bringing its inputs up to date (cached like `headstart run`)."""
    lay = Layout(Path(root))
    upstream(params, lay, prefect_runner, sources, sources)
    advice = {name: AdviseRecord.read(lay.advice_record(name)).model_dump(mode="json") for name in sources}
    for name, record in advice.items():
        create_markdown_artifact(
            f"```\n{advice_text(record)}\n```", key=f"advise-{name}", description="headstart advice"
        )
    if len(advice) > 1:
        text = ranking_text(rank_sources(advice))
        create_markdown_artifact(f"```\n{text}\n```", key="advise-sources", description="sources ranked")
    return advice


def advice_text(advice: dict[str, Any]) -> str:
    """What `headstart advise` prints: size, similarity, quadrant, the probe table, the recommendation."""
    rec, cuts = advice["recommendation"], advice["cuts"]
    best = advice["ranking"][0]
    best_untrained = max(advice["untrained"], key=lambda c: advice["untrained"][c]["val_accuracy"])
    th = advice["thresholds"]
    small = advice["size"] == "small"
    lines = [
        f"source {advice['source']}: {advice['quadrant']}",
        f"  size:       {advice['samples_per_class']} training images per class "
        f"({'small: <' if small else 'large: >='} {th['small_per_class']})",
        f"  similarity: {advice['similarity']:.2f} = share of the untrained network's probe errors that the "
        f"pretrained weights remove ({best} {cuts[best]['val_accuracy']:.2%} vs untrained {best_untrained} "
        f"{advice['untrained'][best_untrained]['val_accuracy']:.2%}); similar at >= {th['similar_gain']:.2f}",
        f"  cut-point probe: a linear head on {advice['probe_rows']} training images (stratified), "
        f"scored on {advice['val_rows']} validation images",
        "",
        "    input        dims  pretrained  untrained  rank",
    ]
    for row in probe_table(advice):
        untrained = "-" if row["untrained"] is None else f"{row['untrained']:.2%}"
        rank = "-" if row["rank"] is None else str(row["rank"])
        lines.append(f"    {row['input']:<11} {row['dims']:>5}  {row['pretrained']:>10.2%}  {untrained:>9}  {rank:>4}")
    at = f" at {rec['cut']}" if needs_features(rec["strategy"]) else ""
    guard = "." if rec["strategy"] == "scratch" else " and a scratch baseline; scratch wins if the transfer loses."
    lines += [
        "",
        f"  recommendation: {rec['strategy']}{at}",
        f"  why: {rec['why']}",
        f"  `strategy: auto` trains it{guard}",
    ]
    return "\n".join(lines)


def rank_sources(advice: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The sources, best first, by their best cut's probe accuracy on the same target (then similarity).

    Every source's probe is the same linear head on the same training and validation images, so
    the accuracies compare: the source to transfer from is the first, at its best cut.
    """
    rows = []
    for name, record in advice.items():
        best = record["ranking"][0]
        rows.append({
            "source": name, "cut": best, "val_accuracy": record["cuts"][best]["val_accuracy"],
            "similarity": record["similarity"], "recommendation": record["recommendation"]["strategy"],
        })  # fmt: skip
    return sorted(rows, key=lambda r: (-r["val_accuracy"], -r["similarity"], r["source"]))


def ranking_text(rows: list[dict[str, Any]]) -> str:
    """What `headstart advise` prints after the sources' own advice when there are several."""
    lines = ["sources ranked by their best cut's probe (the same head, images and split for each):", ""]
    lines.append("    rank  source        cut          probe  similarity  recommendation")
    for i, r in enumerate(rows, 1):
        lines.append(
            f"    {i:>4}  {r['source']:<12}  {r['cut']:<11} {r['val_accuracy']:>6.2%}  {r['similarity']:>10.2f}  "
            f"{r['recommendation']}"
        )
    lines += ["", f"  transfer from {rows[0]['source']} at {rows[0]['cut']}"]
    return "\n".join(lines)


@flow(name="compare-init", validate_parameters=False)
def compare_init(
    params: Params, root: Path, source: str, strategy: str, hidden: list[int], inits: list[str]
) -> list[dict[str, Any]]:
    """One train run (one MLflow run) per head initialisation, everything else equal; failures are reported."""
    lay = Layout(Path(root))
    log = run_logger()
    run = RunParams(source=source, strategy=strategy)
    upstream(params, lay, prefect_runner, [source] if needs_features(strategy) else [])
    extract_record = ExtractRecord.read(lay.extract_record(source)) if needs_features(strategy) else None
    rows = []
    for init in inits:
        head = HeadParams(hidden=hidden, dropout=params.train.head.dropout, init=init)
        run_name = f"init-{strategy}-{init}"
        try:
            record = run_stage(
                prefect_runner, train, lay.compare_init(run_name) / "record.json", TrainRecord, run_name=run_name,
                run=run, source=params.sources[source], params=params.train.model_copy(update={"head": head}),
                weights=SourceWeights.read(lay.source_weights(source)), extract_record=extract_record,
                task_meta=TaskMeta.read(lay.task_meta("target")), data_dir=lay.data, out_dir=lay.compare_init(run_name),
            )  # fmt: skip
        except (FloatingPointError, RuntimeError) as err:
            log.warning("%s: %s", run_name, err)
            rows.append({"init": init, "error": str(err)})
            continue
        rows.append({"init": init, **record.model_dump(mode="json")})
    return rows


def init_table(rows: list[dict[str, Any]], hidden: list[int]) -> str:
    """The comparison as a Markdown table, then the reading of it."""
    width = hidden[0] if hidden else None
    lines = [
        "| head init | val accuracy | val loss | epochs | distinct hidden units |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['init']} | failed: {row['error']} | - | - | - |")
            continue
        units = "-" if row.get("head_distinct_units") is None else f"{row['head_distinct_units']} of {width}"
        lines.append(
            f"| {row['init']} | {row['val_accuracy']:.2%} | {row['val_loss']:.4f} | {row['epochs']} | {units} |"
        )
    lines.append("")
    if width:
        lines.append(
            "A constant init gives every hidden unit the same weights, so every unit gets the same gradient and "
            "they stay copies of each other (symmetry): the layer acts like one unit (zeros: no gradient at all)."
        )
    else:
        lines.append("A linear head has no hidden units: a constant init is harmless there (the loss is convex).")
    return "\n".join(lines)
