"""The train stage: a new head for the target classes, by one of five strategies (headstart.strategies).

auto: the advise stage's recommendation, kept only if it beats scratch on validation. A run may be
paired with a scratch baseline on the same data; losing to it is negative transfer.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch
from prefect import task

from headstart import tracking
from headstart.backbones import CLASSIFIER, StagedNet
from headstart.caching import cached, run_logger
from headstart.calibration import fit_temperature, rejection_threshold, softmax
from headstart.checkpoints import ModelSpec, save_model
from headstart.config import AUTO_CUT, STORED, HeadParams, OptimParams, RunParams, SourceParams, TrainParams
from headstart.datasets import TaskData, load_task
from headstart.extraction import source_network
from headstart.files import atomic_write
from headstart.fit import FitResult, inverse_frequency
from headstart.grid import GridOutcome, grid_cells, train_grid
from headstart.metrics import curves_figure
from headstart.records import AdviseRecord, ExtractRecord, Output, SourceWeights, TaskMeta, TrainRecord, relative
from headstart.strategies import (
    Features,
    Outcome,
    Recipe,
    Trained,
    body_dropout,
    distinct_units,
    keep,
    needs_baseline,
    train_strategy,
    val_logits,
)
from headstart.streaming import stored_rows, viewed_rows


def optim_of(strategy: str, params: TrainParams) -> OptimParams:
    return {"frozen": params.frozen, "partial": params.partial}.get(strategy, params.end_to_end)


def recipe_of(strategy: str, params: TrainParams, class_weights: tuple[float, ...] | None = None) -> Recipe:
    """The head, optimiser, seed, device and class weights a strategy trains with under this train section."""
    body_lr = params.finetune.body_lr if strategy == "finetune" else 1.0
    return Recipe(
        params.head, optim_of(strategy, params), params.seed, params.device, class_weights, params.feature_augment,
        body_lr,
    )  # fmt: skip


def head_first(
    strategy: str, params: TrainParams, class_weights: tuple[float, ...] | None, source_net: StagedNet,
    extract_record: ExtractRecord | None, target: TaskData,
) -> tuple[Recipe, Features | None] | None:  # fmt: skip
    """finetune's first phase (train.finetune.head_first): a frozen run's recipe, on the stored activations at the
    body's last cut when the store holds them (else None: through the frozen body)."""
    if strategy != "finetune" or not params.finetune.head_first:
        return None
    last, features = source_net.cut_names[-1], None
    if extract_record is not None and last in extract_record.taps:
        features = (
            stored_rows(extract_record, target.train.images, last, params.stream),
            stored_rows(extract_record, target.val.images, last, params.stream),
        )
    else:
        run_logger().warning(
            "finetune's head-first phase runs through the frozen body: the store does not hold its last cut %r "
            "(add it to the source's taps to train that phase on stored activations)", last,
        )  # fmt: skip
    return recipe_of("frozen", params, class_weights), features


def choice(run: RunParams, source: SourceParams, advice: AdviseRecord | None) -> tuple[str, str, str]:
    """(strategy, cut, upper_init) a run trains: its own, or for auto the advisor's recommendation."""
    if run.strategy != "auto":
        return run.strategy, run.cut or source.cut, run.upper_init
    if advice is None:
        raise ValueError(f"an auto run needs the advise stage's record of source {run.source!r}")
    rec = advice.recommendation
    return rec.strategy, rec.cut, rec.upper_init


def run_params(run: RunParams, source: SourceParams, params: TrainParams, optim: OptimParams) -> dict:
    """What the MLflow run records as params: this run's slice of the train section."""
    return {
        "strategy": run.strategy,
        "cut": run.cut or source.cut,
        "upper_init": run.upper_init,
        "baseline": run.baseline,
        "source": {"name": run.source, **source.model_dump(mode="json")},
        "head": params.head.model_dump(mode="json"),
        "optim": optim.model_dump(mode="json"),
        "seed": params.seed,
        "device": params.device,
        "class_weights": params.class_weights,
        "stream": params.stream.model_dump(mode="json"),
        "views": params.views,
        "feature_augment": params.feature_augment.model_dump(mode="json"),
        "finetune": params.finetune.model_dump(mode="json"),
        **({"grid": run.grid.model_dump(mode="json")} if run.grid is not None else {}),
    }


def model_spec(
    trained: Trained,
    weights: SourceWeights,
    target: TaskData,
    meta: TaskMeta,
    params: TrainParams,
    temperature: float = 1.0,
    reject_below: float | None = None,
    head: HeadParams | None = None,
) -> ModelSpec:
    """The saved network's spec: how to rebuild it (`head`: its head, default train.head) and how its images are
    decoded and preprocessed."""
    return ModelSpec(
        arch=weights.arch,
        num_classes=target.num_classes,
        class_names=target.class_names,
        preprocess=weights.preprocess,
        cut=trained.spec_cut,
        head=head or params.head,
        dropout=body_dropout(trained.net.upto(trained.spec_cut)),
        decode=meta.decode,
        temperature=temperature,
        reject_below=reject_below,
    )


def epochs(result: FitResult) -> list[dict[str, float]]:
    """Per-epoch metrics without their timings: the same training gives the same bytes."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]


def history(outcome: Outcome, grid: GridOutcome | None = None) -> dict:
    """history.json: the kept network's epochs, the baseline's when there was one, every grid cell's best figures
    with a grid (content only: no timings)."""
    result = outcome.kept.result
    out = {"best_epoch": result.best_epoch, "epochs": result.epochs, "history": epochs(result)}
    if result.start is not None:  # finetune after its head-first phase: epoch 0 is that phase's network
        out["start"] = result.start
    if outcome.baseline is not None:
        out["baseline"] = {"best_epoch": outcome.baseline.result.best_epoch, "history": epochs(outcome.baseline.result)}
    if grid is not None:
        out["grid"] = grid.summary()
    return out


def _best(result: FitResult) -> dict[str, float]:
    return {f"best_{k}": result.best[k] for k in ("val_loss", "val_accuracy")}


def _log_baseline_epoch(epoch: int, metrics: dict[str, float]) -> None:
    mlflow.log_metrics({f"baseline_{k}": v for k, v in metrics.items()}, step=epoch)


def _log_outcome(run_name: str, run: RunParams, strategy: str, outcome: Outcome) -> None:
    """The baseline's verdict into MLflow and the log: negative transfer is said loudly."""
    if outcome.baseline is None:
        return
    mlflow.set_tags({"negative_transfer": str(outcome.negative_transfer).lower()})
    mlflow.log_metric("baseline_val_accuracy", outcome.baseline.val_accuracy)
    if outcome.negative_transfer:
        run_logger().warning(
            "%s: NEGATIVE TRANSFER: %s from %s scores %.4f on validation, scratch on the same data %.4f%s",
            run_name, strategy, run.source, outcome.transfer_val_accuracy, outcome.baseline.val_accuracy,
            "; auto keeps scratch" if run.strategy == "auto" else "",
        )  # fmt: skip
        if run.strategy == "auto":
            mlflow.set_tag("auto_choice", "scratch")


def train_tags(run: RunParams, strategy: str, cut: str, target: TaskData, weights: SourceWeights,
               extract_record: ExtractRecord | None) -> dict[str, str]:  # fmt: skip
    """The MLflow run's tags: what trained, from which weights, data and store."""
    tags = {"stage": "train", "strategy": run.strategy, "source": run.source, "data_fingerprint": target.fingerprint()}
    tags["weights_sha256"] = weights.sha256
    if run.strategy == "auto":
        tags["auto_choice"] = f"{strategy}@{cut}"
    if strategy in STORED and extract_record is not None:
        tags["feature_store_key"] = extract_record.store_key
        tags["store_views"] = str(extract_record.views)
    return tags


def stored_inputs(
    run_name: str, strategy: str, extract_record: ExtractRecord | None, target: TaskData, cut: str, params: TrainParams
) -> Features | None:
    """The stored activations at `cut` of the training and validation images, for the strategies that train on them.

    Each split is loaded or streamed from the store as `train.stream` says (the same metrics either way); with
    `train.views: use`, training draws each image's plain row or one of its stored augmented views per epoch.
    """
    if strategy not in STORED:
        return None
    if extract_record is None:
        raise ValueError(f"run {run_name!r} is {strategy}: it needs the extract stage's record, got None")
    rows = viewed_rows if params.views == "use" else stored_rows
    return rows(extract_record, target.train.images, cut, params.stream), stored_rows(
        extract_record, target.val.images, cut, params.stream
    )


def class_weights_of(params: TrainParams, target: TaskData) -> tuple[float, ...] | None:
    return inverse_frequency(target.train.labels, target.num_classes) if params.class_weights == "auto" else None


def run_grid(
    run_name: str, run: RunParams, cut: str, source_net: StagedNet, target: TaskData,
    extract_record: ExtractRecord | None, params: TrainParams, class_weights: tuple[float, ...] | None,
) -> tuple[Trained, GridOutcome]:  # fmt: skip
    """A frozen run's grid, one read of each cut's stored activations; the chosen cell as the run's network."""
    named = [cut if c == AUTO_CUT else c for c in run.grid.cuts]  # grid.cuts is set only when run.cut is not
    cells = grid_cells(run.grid.model_copy(update={"cuts": named}), cut, params.head, params.frozen, len(target.train))
    grid = train_grid(
        cells, lambda at: stored_inputs(run_name, "frozen", extract_record, target, at, params),
        (target.train.labels, target.val.labels), target.num_classes, recipe_of("frozen", params, class_weights),
    )  # fmt: skip
    log_grid(run_name, grid)
    kept = grid.kept
    net = source_net.upto(kept.cell.cut).with_classifier(kept.head)
    return Trained("frozen", net, kept.cell.cut, kept.result), grid


def train_outcome(
    run: RunParams, strategy: str, cut: str, upper_init: str, source_net: StagedNet, weights: SourceWeights,
    target: TaskData, features: Features | None, params: TrainParams, class_weights: tuple[float, ...] | None,
    extract_record: ExtractRecord | None, trained: Trained | None = None,
) -> Outcome:  # fmt: skip
    """Train the strategy (unless `trained`, a grid's choice, is given), and scratch beside it when a baseline is
    asked for; keep the one the rule says."""
    if trained is None:
        first = head_first(strategy, params, class_weights, source_net, extract_record, target)
        trained = train_strategy(
            strategy, source_net, weights.arch, target, weights.preprocess, recipe_of(strategy, params, class_weights),
            cut, features, upper_init, tracking.log_epoch, first,
        )  # fmt: skip
    baseline = None
    if needs_baseline(run.strategy, run.baseline, strategy):
        baseline = train_strategy(
            "scratch", source_net, weights.arch, target, weights.preprocess,
            recipe_of("scratch", params, class_weights), cut, on_epoch=_log_baseline_epoch,
        )  # fmt: skip
    return keep(trained, baseline, auto=run.strategy == "auto")


def calibrate(
    kept: Trained, target: TaskData, weights: SourceWeights, cut: str, features: Features | None, params: TrainParams
) -> tuple[float, float | None]:
    """The temperature fitted on validation and, with `train.reject`, the "none" threshold chosen there."""
    logits = val_logits(kept, target, weights.preprocess, cut, features, params.device)
    temperature = fit_temperature(logits, torch.as_tensor(target.val.labels))
    if params.reject is None:
        return temperature, None
    return temperature, rejection_threshold(softmax(logits, temperature), params.reject)


def save_run(
    outcome: Outcome, spec: ModelSpec, out_dir: Path, grid: GridOutcome | None = None
) -> tuple[Path, Path, str]:
    """model.safetensors (with its spec) and history.json; their paths and the model's sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path, history_path = out_dir / "model.safetensors", out_dir / "history.json"
    sha256 = save_model(outcome.kept.net, spec, model_path)
    with atomic_write(history_path) as tmp:
        tmp.write_text(json.dumps(history(outcome, grid), indent=2))
    return model_path, history_path, sha256


def log_grid(run_name: str, grid: GridOutcome) -> None:
    """Each cell as a child run of the active run (its params, per-epoch metrics, best figures); the choice on the
    parent, with the chosen cell's epochs as the parent's own (a single head logs them as it trains)."""
    for cell in grid.cells:
        with tracking.child_run(f"{run_name}/{cell.cell.name}", cell.cell.params(), {"stage": "train-grid"}):
            tracking.log_history(cell.result.history)
            mlflow.log_metrics({"best_epoch": cell.result.best_epoch, **(_best(cell.result) if cell.score else {})})
            mlflow.set_tag("chosen", str(cell is grid.kept).lower())
    kept = grid.kept
    mlflow.set_tags({"grid_choice": kept.cell.name, "grid_cells": str(len(grid.cells))})
    mlflow.log_params(tracking.flatten({"chosen": kept.cell.params()}))
    tracking.log_history(kept.result.history)
    run_logger().info(
        "%s: grid of %d heads, chosen %s (val accuracy %.4f, val loss %.4f)",
        run_name, len(grid.cells), kept.cell.name, *kept.score,
    )  # fmt: skip


def log_result(run_name: str, run: RunParams, outcome: Outcome, spec: ModelSpec, sha256: str) -> int | None:
    """The kept network's figures into the active MLflow run; returns its head's distinct units."""
    kept, result = outcome.kept, outcome.kept.result
    mlflow.set_tag(tracking.MODEL_SHA_TAG, sha256)
    metrics = {
        "best_epoch": result.best_epoch,
        "seconds": result.seconds,
        "temperature": spec.temperature,
        **_best(result),
    }
    if spec.reject_below is not None:
        metrics["reject_below"] = spec.reject_below
    units = distinct_units(kept.net.stages[CLASSIFIER])
    if units is not None:
        metrics["head_distinct_units"] = units
    mlflow.log_metrics(metrics)
    mlflow.log_figure(curves_figure(result.history, f"{run_name}: {kept.strategy} from {run.source}"), "curves.png")
    return units


@task(**cached("train"))
def train(
    run_name: str,
    run: RunParams,
    source: SourceParams,
    params: TrainParams,
    weights: SourceWeights,
    extract_record: ExtractRecord | None,
    task_meta: TaskMeta,
    data_dir: Path,
    out_dir: Path,
    advice_record: AdviseRecord | None = None,
) -> TrainRecord:
    """Train one run's network, save it with its history; one MLflow run (evaluate adds the test metrics).

    With a baseline (run.baseline, or auto), scratch is trained on the same data too: if it wins on
    validation the run is tagged `negative_transfer=true`, and auto keeps the scratch network instead.
    A frozen run with a grid trains every cell (each a child run), and its best on validation is the run's network.
    """
    log = run_logger()
    target = load_task(Path(data_dir), "target")
    strategy, cut, upper_init = choice(run, source, advice_record)
    cut = weights.cut if cut == AUTO_CUT else cut  # the weights stage resolved `auto`
    features = stored_inputs(run_name, strategy, extract_record, target, cut, params) if run.grid is None else None
    class_weights = class_weights_of(params, target)
    log.info("%s: %s from %s at %s on %d images; class weights %s", run_name, strategy, run.source, cut,
             len(target.train), class_weights)  # fmt: skip
    tags = train_tags(run, strategy, cut, target, weights, extract_record)
    with tracking.training_run(run_name, run_params(run, source, params, optim_of(strategy, params)), tags):
        tracking.log_data_lineage(task_meta)
        source_net, trained, grid = source_network(weights), None, None
        if run.grid is not None:  # the grid's chosen cell is the run's frozen head
            trained, grid = run_grid(run_name, run, cut, source_net, target, extract_record, params, class_weights)
            features, cut = grid.features, trained.spec_cut
        outcome = train_outcome(
            run, strategy, cut, upper_init, source_net, weights, target, features, params, class_weights,
            extract_record, trained,
        )  # fmt: skip
        _log_outcome(run_name, run, strategy, outcome)
        temperature, reject_below = calibrate(outcome.kept, target, weights, cut, features, params)
        head = grid.kept.cell.head if grid is not None else None
        spec = model_spec(outcome.kept, weights, target, task_meta, params, temperature, reject_below, head)
        model_path, history_path, sha256 = save_run(outcome, spec, Path(out_dir), grid)
        units = log_result(run_name, run, outcome, spec, sha256)
    kept, result = outcome.kept, outcome.kept.result
    log.info("%s: val accuracy %.4f (best of %d epochs, %.1f s), temperature %.2f",
             run_name, kept.val_accuracy, result.epochs, result.seconds, temperature)  # fmt: skip
    return TrainRecord(
        run_name=run_name, strategy=run.strategy, chosen=strategy, trained=kept.strategy,
        cut=cut if kept.strategy in STORED else None, source=run.source, path=relative(model_path), sha256=sha256,
        weights_sha256=weights.sha256, val_accuracy=result.best["val_accuracy"], val_loss=result.best["val_loss"],
        epochs=result.epochs, best_epoch=result.best_epoch, transfer_val_accuracy=outcome.transfer_val_accuracy,
        baseline_val_accuracy=outcome.baseline.val_accuracy if outcome.baseline is not None else None,
        negative_transfer=outcome.negative_transfer, head_distinct_units=units, temperature=temperature,
        reject_below=reject_below, grid_cell=grid.kept.cell.name if grid is not None else None,
        outputs=[Output.of(model_path), Output.of(history_path)],
    )  # fmt: skip
