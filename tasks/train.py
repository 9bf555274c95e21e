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
from headstart.backbones import CLASSIFIER
from headstart.caching import cached, run_logger
from headstart.calibration import fit_temperature, rejection_threshold, softmax
from headstart.checkpoints import ModelSpec, save_model
from headstart.config import AUTO_CUT, STORED, OptimParams, RunParams, SourceParams, TrainParams
from headstart.datasets import TaskData, load_task
from headstart.extraction import source_network, stored_features
from headstart.files import atomic_write
from headstart.fit import FitResult, inverse_frequency
from headstart.metrics import curves_figure
from headstart.records import AdviseRecord, ExtractRecord, Output, SourceWeights, TaskMeta, TrainRecord, relative
from headstart.strategies import (
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


def optim_of(strategy: str, params: TrainParams) -> OptimParams:
    return {"frozen": params.frozen, "partial": params.partial}.get(strategy, params.end_to_end)


def recipe_of(strategy: str, params: TrainParams, class_weights: tuple[float, ...] | None = None) -> Recipe:
    """The head, optimiser, seed, device and class weights a strategy trains with under this train section."""
    return Recipe(params.head, optim_of(strategy, params), params.seed, params.device, class_weights)


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
    }


def model_spec(
    trained: Trained,
    weights: SourceWeights,
    target: TaskData,
    meta: TaskMeta,
    params: TrainParams,
    temperature: float = 1.0,
    reject_below: float | None = None,
) -> ModelSpec:
    """The saved network's spec: how to rebuild it and how its images are decoded and preprocessed."""
    return ModelSpec(
        arch=weights.arch,
        num_classes=target.num_classes,
        class_names=target.class_names,
        preprocess=weights.preprocess,
        cut=trained.spec_cut,
        head=params.head,
        dropout=body_dropout(trained.net.upto(trained.spec_cut)),
        decode=meta.decode,
        temperature=temperature,
        reject_below=reject_below,
    )


def epochs(result: FitResult) -> list[dict[str, float]]:
    """Per-epoch metrics without their timings: the same training gives the same bytes."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]


def history(outcome: Outcome) -> dict:
    """history.json: the kept network's epochs, and the baseline's when there was one (content only: no timings)."""
    result = outcome.kept.result
    out = {"best_epoch": result.best_epoch, "epochs": result.epochs, "history": epochs(result)}
    if outcome.baseline is not None:
        out["baseline"] = {"best_epoch": outcome.baseline.result.best_epoch, "history": epochs(outcome.baseline.result)}
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
    """
    log = run_logger()
    target = load_task(Path(data_dir), "target")
    strategy, cut, upper_init = choice(run, source, advice_record)
    cut = weights.cut if cut == AUTO_CUT else cut  # the weights stage resolved `auto`
    tags = {"stage": "train", "strategy": run.strategy, "source": run.source, "data_fingerprint": target.fingerprint()}
    tags |= {
        "weights_sha256": weights.sha256,
        **({"auto_choice": f"{strategy}@{cut}"} if run.strategy == "auto" else {}),
    }
    features = None
    if strategy in STORED:
        if extract_record is None:
            raise ValueError(f"run {run_name!r} is {strategy}: it needs the extract stage's record, got None")
        features = tuple(stored_features(extract_record, s.images, cut) for s in (target.train, target.val))
        tags["feature_store_key"] = extract_record.store_key
    log.info("%s: %s from %s at %s on %d images", run_name, strategy, run.source, cut, len(target.train))
    source_net, out_dir = source_network(weights), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_of_classes = None
    if params.class_weights == "auto":
        weights_of_classes = inverse_frequency(target.train.labels, target.num_classes)
        log.info("%s: class weights %s", run_name, dict(zip(target.class_names, weights_of_classes, strict=True)))
    recipe = recipe_of(strategy, params, weights_of_classes)
    with tracking.training_run(run_name, run_params(run, source, params, recipe.optim), tags):
        tracking.log_data_lineage(task_meta)
        trained = train_strategy(
            strategy, source_net, weights.arch, target, weights.preprocess, recipe, cut, features, upper_init,
            tracking.log_epoch,
        )  # fmt: skip
        baseline = None
        if needs_baseline(run.strategy, run.baseline, strategy):
            baseline = train_strategy(
                "scratch", source_net, weights.arch, target, weights.preprocess,
                recipe_of("scratch", params, weights_of_classes), cut,
                on_epoch=_log_baseline_epoch,
            )  # fmt: skip
        outcome = keep(trained, baseline, auto=run.strategy == "auto")
        _log_outcome(run_name, run, strategy, outcome)
        kept, result = outcome.kept, outcome.kept.result
        model_path, history_path = out_dir / "model.safetensors", out_dir / "history.json"
        logits = val_logits(kept, target, weights.preprocess, cut, features, params.device)
        temperature = fit_temperature(logits, torch.as_tensor(target.val.labels))
        reject_below = None
        if params.reject is not None:
            reject_below = rejection_threshold(softmax(logits, temperature), params.reject)
            mlflow.log_metric("reject_below", reject_below)
        mlflow.log_metric("temperature", temperature)
        spec = model_spec(kept, weights, target, task_meta, params, temperature, reject_below)
        sha256 = save_model(kept.net, spec, model_path)
        mlflow.set_tag(tracking.MODEL_SHA_TAG, sha256)
        with atomic_write(history_path) as tmp:
            tmp.write_text(json.dumps(history(outcome), indent=2))
        units = distinct_units(kept.net.stages[CLASSIFIER])
        mlflow.log_metrics({"best_epoch": result.best_epoch, "seconds": result.seconds, **_best(result)})
        if units is not None:
            mlflow.log_metric("head_distinct_units", units)
        mlflow.log_figure(curves_figure(result.history, f"{run_name}: {kept.strategy} from {run.source}"), "curves.png")
    log.info(
        "%s: val accuracy %.4f (best of %d epochs, %.1f s)", run_name, kept.val_accuracy, result.epochs, result.seconds
    )
    return TrainRecord(
        run_name=run_name,
        strategy=run.strategy,
        chosen=strategy,
        trained=kept.strategy,
        cut=cut if kept.strategy in STORED else None,
        source=run.source,
        path=relative(model_path),
        sha256=sha256,
        weights_sha256=weights.sha256,
        val_accuracy=result.best["val_accuracy"],
        val_loss=result.best["val_loss"],
        epochs=result.epochs,
        best_epoch=result.best_epoch,
        transfer_val_accuracy=outcome.transfer_val_accuracy,
        baseline_val_accuracy=baseline.val_accuracy if baseline is not None else None,
        negative_transfer=outcome.negative_transfer,
        head_distinct_units=units,
        temperature=temperature,
        reject_below=reject_below,
        outputs=[Output.of(model_path), Output.of(history_path)],
    )
