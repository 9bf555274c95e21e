"""The train stage: a new head for the target classes, by one of five strategies.

frozen: only the head trains, on activations stored once by the extract stage (the speed-up).
partial: the source layers above the cut (pretrained or re-initialised) plus the head train on the
stored activations at the cut: the same as training end to end with the layers up to it frozen.
finetune: the source network up to its last cut plus the new head, every layer training on images.
scratch: the same architecture and head freshly initialised: the baseline transfer must beat.
auto: the advise stage's recommendation, kept only if it beats scratch on validation.
A run may be paired with a scratch baseline on the same data; losing to it is negative transfer.
Whatever the strategy, the saved model is a whole network that predicts from raw images.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import torch
from prefect import task
from torch import nn

from headstart import tracking
from headstart.backbones import CLASSIFIER, Preprocess, StagedNet, create_model, feature_shape, preprocess
from headstart.caching import cached, output, run_logger
from headstart.checkpoints import ModelSpec, atomic_write, save_model
from headstart.config import HeadParams, OptimParams, RunParams, SourceParams, TrainParams, UpperInit
from headstart.datasets import TaskData, load_task
from headstart.fingerprint import row_keys
from headstart.fit import EpochCallback, FitResult, fit
from headstart.heads import make_head
from headstart.metrics import curves_figure
from headstart.sources import load_source, local_path
from headstart.store import FeatureStore, provenance

STORED = ("frozen", "partial")
"""Strategies that train on the extract stage's stored activations."""
Features = tuple[np.ndarray, np.ndarray]
"""Stored activations at one cut for the training and validation images."""


def needs_features(strategy: str) -> bool:
    """Whether a run of this strategy reads the feature store (auto may choose a stored strategy)."""
    return strategy in (*STORED, "auto")


def body_dropout(body: nn.Module) -> float:
    """The dropout rate built into the kept source stages (0 when none), recorded so the spec rebuilds them."""
    return next((m.p for m in body.modules() if isinstance(m, nn.Dropout)), 0.0)


def train_frozen_head(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    in_shape: tuple[int, ...],
    num_classes: int,
    params: TrainParams,
    on_epoch: EpochCallback | None = None,
) -> tuple[nn.Module, FitResult]:
    """A seeded new head trained on stored features (rows of shape `in_shape`)."""
    torch.manual_seed(params.seed)
    head = make_head(in_shape, num_classes, params.head)
    return head, fit(head, train, val, params.frozen, params.seed, params.device, on_epoch=on_epoch)


def end_to_end_net(
    source_net: StagedNet, arch: str, strategy: str, num_classes: int, head: HeadParams, pre: Preprocess, seed: int
) -> StagedNet:
    """The source's stages up to its last cut plus a new head, all trainable.

    finetune keeps the pretrained weights; scratch re-initialises the very same stages the way
    the architecture initialises itself (seeded), so the two differ only in their starting point.
    """
    cut = source_net.cut_names[-1]
    torch.manual_seed(seed)
    body = copy.deepcopy(source_net.upto(cut))
    if strategy == "scratch":
        body.load_state_dict(create_model(arch, num_classes).upto(cut).state_dict())
    elif strategy != "finetune":
        raise ValueError(f"strategy {strategy!r} does not train end to end; expected finetune or scratch")
    net = body.with_classifier(make_head(feature_shape(body, cut, pre), num_classes, head))
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def train_end_to_end(
    net: StagedNet,
    target: TaskData,
    pre: Preprocess,
    params: TrainParams,
    on_epoch: EpochCallback | None = None,
    optim: OptimParams | None = None,
) -> FitResult:
    """Train every parameter of `net` that requires grad on images (`optim` defaults to params.end_to_end)."""
    return fit(
        net,
        (target.train.images, target.train.labels),
        (target.val.images, target.val.labels),
        optim or params.end_to_end,
        params.seed,
        params.device,
        transform=partial(preprocess, spec=pre),
        on_epoch=on_epoch,
    )


def partial_net(
    source_net: StagedNet,
    arch: str,
    cut: str,
    num_classes: int,
    head: HeadParams,
    pre: Preprocess,
    seed: int,
    upper_init: UpperInit = "pretrained",
) -> StagedNet:
    """The source up to its last cut plus a new head: stages up to `cut` frozen, the ones above it trainable.

    The layers above the cut keep the pretrained weights, or (`random`) are re-initialised the way
    the architecture initialises itself (seeded). The source network itself is left untouched.
    """
    last = source_net.cut_names[-1]
    torch.manual_seed(seed)
    body = copy.deepcopy(source_net.upto(last))
    if upper_init == "random":
        body.between(cut).load_state_dict(create_model(arch, num_classes).between(cut).state_dict())
    elif upper_init != "pretrained":
        raise ValueError(f"upper_init {upper_init!r}: expected pretrained or random")
    net = body.with_classifier(make_head(feature_shape(body, last, pre), num_classes, head))
    for p in net.parameters():
        p.requires_grad_(True)
    for p in net.upto(cut).parameters():
        p.requires_grad_(False)
    return net


def above_cut(net: StagedNet, cut: str) -> StagedNet:
    """The stages after `cut`, classifier included (the same modules): what a partial run trains."""
    names = net.stage_names
    return StagedNet({n: net.stages[n] for n in names[names.index(cut) + 1 :]})


def train_partial(
    net: StagedNet,
    cut: str,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    params: TrainParams,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train the layers of a `partial_net` above `cut` on the stored activations at `cut` (updates `net`).

    The frozen stages would compute exactly these activations every epoch, so this gives end-to-end
    training with them frozen (`train_end_to_end(net, ..., optim=params.partial)`) without running them.
    """
    return fit(above_cut(net, cut), train, val, params.partial, params.seed, params.device, on_epoch=on_epoch)


@dataclass(frozen=True)
class Trained:
    """One strategy's trained network (it predicts from images), the cut its spec records, its history."""

    strategy: str
    net: StagedNet
    spec_cut: str
    result: FitResult

    @property
    def val_accuracy(self) -> float:
        return self.result.best["val_accuracy"]


def train_strategy(
    strategy: str,
    source_net: StagedNet,
    arch: str,
    target: TaskData,
    pre: Preprocess,
    params: TrainParams,
    cut: str,
    features: Features | None = None,
    upper_init: UpperInit = "pretrained",
    on_epoch: EpochCallback | None = None,
) -> Trained:
    """Train one strategy; frozen and partial need `features`, the stored activations at `cut`."""
    if strategy in STORED:
        if features is None:
            raise ValueError(f"strategy {strategy!r} trains on stored activations at {cut!r}: pass `features`")
        train_xy, val_xy = (features[0], target.train.labels), (features[1], target.val.labels)
    if strategy == "frozen":
        in_shape = tuple(features[0].shape[1:])
        head, result = train_frozen_head(train_xy, val_xy, in_shape, target.num_classes, params, on_epoch)
        return Trained(strategy, source_net.upto(cut).with_classifier(head), cut, result)
    if strategy == "partial":
        net = partial_net(source_net, arch, cut, target.num_classes, params.head, pre, params.seed, upper_init)
        result = train_partial(net, cut, train_xy, val_xy, params, on_epoch)
        return Trained(strategy, net, net.cut_names[-1], result)
    net = end_to_end_net(source_net, arch, strategy, target.num_classes, params.head, pre, params.seed)
    return Trained(strategy, net, net.cut_names[-1], train_end_to_end(net, target, pre, params, on_epoch))


def distinct_units(head: nn.Module) -> int | None:
    """Distinct units of the head's first hidden layer (weights and bias, to 6 decimals); None without one.

    Fewer than the layer's width means units stayed copies of each other: the symmetry a constant init causes.
    """
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        return None
    first = torch.cat([linears[0].weight, linears[0].bias[:, None]], dim=1).detach()
    return len(torch.unique(torch.round(first, decimals=6), dim=0))


def negative_transfer(transfer_val_accuracy: float, scratch_val_accuracy: float) -> bool:
    """Transfer hurt: the scratch baseline trained on the same data scored higher on validation."""
    return scratch_val_accuracy > transfer_val_accuracy


def stored_features(store_path: str | Path, prov: dict, images: np.ndarray, tap: str | None = None) -> np.ndarray:
    """The extract stage's activations at `tap` (default: the one tap `prov` asks for) for these images.

    Rows are keyed by pixel content; the provenance is checked and the store must hold the tap.
    """
    return FeatureStore.open(local_path(str(store_path)), prov).read(row_keys(images), tap)


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
    }


def optim_of(strategy: str, params: TrainParams) -> OptimParams:
    return {"frozen": params.frozen, "partial": params.partial}.get(strategy, params.end_to_end)


def _log_baseline_epoch(epoch: int, metrics: dict[str, float]) -> None:
    mlflow.log_metrics({f"baseline_{k}": v for k, v in metrics.items()}, step=epoch)


@task(**cached("train"))
def train(
    run_name: str,
    run: RunParams,
    source: SourceParams,
    params: TrainParams,
    weights_record: dict,
    extract_record: dict | None,
    data_record: dict,
    data_dir: Path,
    out_dir: Path,
    advice_record: dict | None = None,
) -> dict:
    """Train one run's network, save it with its history; one MLflow run (the evaluate stage adds test metrics).

    With a baseline (run.baseline, or auto), scratch is trained on the same data too: if it wins on
    validation the run is tagged `negative_transfer=true`, and auto keeps the scratch network instead.
    """
    log = run_logger()
    target = load_task(Path(data_dir), "target")
    source_net = load_source(weights_record)
    pre = Preprocess.model_validate(weights_record["preprocess"])
    arch = weights_record["arch"]
    strategy, cut, upper_init = run.strategy, run.cut or source.cut, run.upper_init
    tags = {
        "stage": "train",
        "strategy": run.strategy,
        "source": run.source,
        "data_fingerprint": target.fingerprint(),
        "weights_sha256": weights_record["sha256"],
    }
    if strategy == "auto":
        if advice_record is None:
            raise ValueError(f"run {run_name!r} is auto: it needs the advise stage's record of {run.source!r}")
        chosen = advice_record["recommendation"]
        strategy, cut, upper_init = chosen["strategy"], chosen["cut"], chosen.get("upper_init", "pretrained")
        tags |= {"auto_choice": f"{strategy}@{cut}", "quadrant": advice_record["quadrant"]}
    features = None
    if strategy in STORED:
        if extract_record is None:
            raise ValueError(f"run {run_name!r} is {strategy}: it needs the extract stage's record, got None")
        prov = provenance(weights_record["sha256"], arch, cut, pre)
        store = extract_record["store_path"]
        features = (stored_features(store, prov, target.train.images), stored_features(store, prov, target.val.images))
        tags["feature_store_key"] = extract_record["store_key"]
    with_baseline = (run.baseline or run.strategy == "auto") and strategy != "scratch"
    log.info("%s: %s from %s at %s on %d images", run_name, strategy, run.source, cut, len(target.train))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optim = optim_of(strategy, params)
    baseline, lost = None, None
    with tracking.training_run(run_name, run_params(run, source, params, optim), tags) as mlrun:
        trained = train_strategy(
            strategy, source_net, arch, target, pre, params, cut, features, upper_init, tracking.log_epoch
        )
        transfer_accuracy = trained.val_accuracy
        if with_baseline:
            baseline = train_strategy(
                "scratch", source_net, arch, target, pre, params, cut, None, upper_init, _log_baseline_epoch
            )
            lost = negative_transfer(trained.val_accuracy, baseline.val_accuracy)
            mlflow.set_tags({"negative_transfer": str(lost).lower()})
            mlflow.log_metric("baseline_val_accuracy", baseline.val_accuracy)
            if lost:
                log.warning(
                    "%s: NEGATIVE TRANSFER: %s from %s scores %.4f on validation, scratch on the same data %.4f%s",
                    run_name,
                    strategy,
                    run.source,
                    trained.val_accuracy,
                    baseline.val_accuracy,
                    "; auto keeps scratch" if run.strategy == "auto" else "",
                )
                if run.strategy == "auto":
                    trained = baseline
                    mlflow.set_tag("auto_choice", "scratch")
        result = trained.result
        spec = ModelSpec(
            arch=arch,
            num_classes=target.num_classes,
            class_names=target.class_names,
            preprocess=pre,
            cut=trained.spec_cut,
            head=params.head,
            dropout=body_dropout(trained.net.upto(trained.spec_cut)),
        )
        model_path, history_path = out_dir / "model.safetensors", out_dir / "history.json"
        sha256 = save_model(trained.net, spec, model_path)
        summary = {"best_epoch": result.best_epoch, "epochs": result.epochs, "seconds": round(result.seconds, 2)}
        history = {**summary, "history": result.history}
        if baseline is not None:
            history["baseline"] = {"best_epoch": baseline.result.best_epoch, "history": baseline.result.history}
        with atomic_write(history_path) as tmp:
            tmp.write_text(json.dumps(history, indent=2))
        mlflow.log_metrics(
            {"best_epoch": result.best_epoch, **{f"best_{k}": result.best[k] for k in ("val_loss", "val_accuracy")}}
        )
        units = distinct_units(trained.net.stages[CLASSIFIER])
        if units is not None:
            mlflow.log_metric("head_distinct_units", units)
        title = f"{run_name}: {trained.strategy} from {run.source}"
        mlflow.log_figure(curves_figure(result.history, title), "curves.png")
    log.info(
        "%s: val accuracy %.4f (best of %d epochs, %.1f s)",
        run_name,
        result.best["val_accuracy"],
        result.epochs,
        result.seconds,
    )
    model_out = output(model_path)
    return {
        "run_name": run_name,
        "strategy": run.strategy,
        "chosen": strategy,
        "trained": trained.strategy,
        "cut": cut if trained.strategy in STORED else None,
        "source": run.source,
        "path": model_out["path"],
        "sha256": sha256,
        "weights_sha256": weights_record["sha256"],
        "mlflow_run_id": mlrun.info.run_id,
        "val_accuracy": result.best["val_accuracy"],
        "val_loss": result.best["val_loss"],
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 2),
        "transfer_val_accuracy": transfer_accuracy,
        "baseline_val_accuracy": baseline.val_accuracy if baseline is not None else None,
        "negative_transfer": lost,
        "head_distinct_units": units,
        "outputs": [model_out, output(history_path)],
    }
