"""The sweep flow: every (seed, fraction, strategy) cell a cached task under one MLflow parent run, then the report.

Frozen and partial cells train at one stored cut, `sweep.cut`: by default the one the advise stage's
probe ranks first for the sweep's source (the advise task is an upstream, cached like the others).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from tqdm.auto import tqdm

from flows.layout import Layout
from flows.stages import Runner, prefect_runner, upstream
from headstart import tracking
from headstart.caching import run_logger, stage_key
from headstart.config import BEST_CUT, STORED, Params, SweepParams, base_strategy
from headstart.records import AdviseRecord, ExtractRecord, SourceWeights, TaskMeta
from tasks.sweep import sweep, sweep_cut
from tasks.sweep_report import sweep_report
from tasks.train import optim_of


def cells(params: SweepParams) -> list[tuple[int, float, str]]:
    """(seed, fraction, strategy) in the order they run: seed by seed, smallest fraction first."""
    return [(s, f, k) for s in params.seeds for f in sorted(params.fractions) for k in params.strategies]


def run_sweep(params: Params, lay: Layout, runner: Runner, with_upstream: bool = True) -> dict[str, Any]:
    """Bring the inputs up to date (unless DVC did, `with_upstream=False`), run every cell, write the report."""
    log = run_logger()
    sw, train = params.sweep, params.train
    on_features = any(base_strategy(s) in STORED for s in sw.strategies)
    best = on_features and sw.cut == BEST_CUT
    if with_upstream:
        upstream(params, lay, runner, [sw.source] if on_features else [], [sw.source] if best else [])
    if params.data.train_fraction < 1.0:
        log.warning(
            "data.train_fraction is %s: the sweep's fractions are of that subset, not of the whole training split",
            params.data.train_fraction,
        )
    weights = SourceWeights.read(lay.source_weights(sw.source))
    task_meta = TaskMeta.read(lay.task_meta("target"))
    extract_record = ExtractRecord.read(lay.extract_record(sw.source)) if on_features else None
    cut = None
    if on_features:
        cut = sweep_cut(sw.cut, AdviseRecord.read(lay.advice_record(sw.source)) if best else None)
        how = "the advise stage's best-probed cut" if best else "sweep.cut"
        log.info("frozen and partial cells train at %s of %s (%s)", cut, sw.source, how)
    identity = {
        "weights_sha256": weights.sha256,
        "cut": cut,
        "data_fingerprint": task_meta.fingerprint,
        "train": train.model_dump(mode="json", include={"head", "frozen", "partial", "end_to_end", "device", "stream"}),
    }
    grid = {"fractions": str(sorted(sw.fractions)), "strategies": str(sw.strategies), "seeds": str(sw.seeds)}
    records = []
    with tracking.keyed_run(
        f"sweep-{sw.source}",
        stage_key("sweep-parent", identity, module="tasks/sweep.py"),
        {"source": sw.source, **identity},
        {"stage": "sweep", "source": sw.source, **grid},
    ) as parent:
        for seed, fraction, strategy in tqdm(cells(sw), desc="sweep", unit="cell", disable=None):
            records.append(
                runner(
                    sweep,
                    strategy=strategy,
                    fraction=fraction,
                    seed=seed,
                    cut=cut if base_strategy(strategy) in STORED else None,
                    head=train.head,
                    optim=optim_of(base_strategy(strategy), train),
                    device=train.device,
                    stream=train.stream,
                    weights=weights,
                    extract_record=extract_record if base_strategy(strategy) in STORED else None,
                    task_meta=task_meta,
                    data_dir=lay.data,
                    out_dir=lay.sweep_cells,
                )
            )
    report = runner(sweep_report, cells=records, out_dir=lay.sweep, parent_run_id=parent.info.run_id)
    return {**report, "parent_run_id": parent.info.run_id, "cell_records": records}


@flow(name="sweep", validate_parameters=False)
def fraction_sweep(params: Params, root: Path, with_upstream: bool = True) -> dict[str, Any]:
    """The notes' Fashion-MNIST experiment; a rerun computes only the cells not yet finished (content-keyed cache)."""
    result = run_sweep(params, Layout(root), prefect_runner, with_upstream)
    create_markdown_artifact(
        "\n\n".join([result["markdown"], *result["crossover_lines"]]),
        key="sweep-table",
        description="headstart sweep: metrics per strategy and data fraction",
    )
    return result
