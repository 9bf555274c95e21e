"""The train stage: a new head for the target classes, by one of three strategies.

frozen: only the head trains, on activations stored once by the extract stage (the speed-up).
finetune: the source network up to its last cut plus the new head, every layer training on images.
scratch: the same architecture and head freshly initialised: the baseline transfer must beat.
Whatever the strategy, the saved model is a whole network that predicts from raw images.
"""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import torch
from prefect import task
from torch import nn

from headstart import tracking
from headstart.backbones import Preprocess, StagedNet, create_model, feature_shape, preprocess
from headstart.caching import cached, output, run_logger
from headstart.checkpoints import ModelSpec, atomic_write, save_model
from headstart.config import HeadParams, OptimParams, RunParams, SourceParams, TrainParams
from headstart.datasets import TaskData, load_task
from headstart.fingerprint import row_keys
from headstart.fit import EpochCallback, FitResult, fit
from headstart.heads import make_head
from headstart.metrics import curves_figure
from headstart.sources import load_source, local_path
from headstart.store import FeatureStore, provenance


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
    net: StagedNet, target: TaskData, pre: Preprocess, params: TrainParams, on_epoch: EpochCallback | None = None
) -> FitResult:
    return fit(
        net,
        (target.train.images, target.train.labels),
        (target.val.images, target.val.labels),
        params.end_to_end,
        params.seed,
        params.device,
        transform=partial(preprocess, spec=pre),
        on_epoch=on_epoch,
    )


def stored_features(store_path: str | Path, prov: dict, images: np.ndarray) -> np.ndarray:
    """The extract stage's features for these images (keyed by pixel content), provenance checked."""
    return FeatureStore.open(local_path(str(store_path)), prov).read(row_keys(images))


def run_params(run: RunParams, source: SourceParams, params: TrainParams, optim: OptimParams) -> dict:
    """What the MLflow run records as params: this run's slice of the train section."""
    return {
        "strategy": run.strategy,
        "source": {"name": run.source, **source.model_dump(mode="json")},
        "head": params.head.model_dump(mode="json"),
        "optim": optim.model_dump(mode="json"),
        "seed": params.seed,
        "device": params.device,
    }


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
) -> dict:
    """Train one run's network, save it with its history; one MLflow run (the evaluate stage adds test metrics)."""
    log = run_logger()
    target = load_task(Path(data_dir), "target")
    source_net = load_source(weights_record)
    pre = Preprocess.model_validate(weights_record["preprocess"])
    arch = weights_record["arch"]
    frozen = run.strategy == "frozen"
    optim = params.frozen if frozen else params.end_to_end
    tags = {
        "stage": "train",
        "strategy": run.strategy,
        "source": run.source,
        "data_fingerprint": target.fingerprint(),
        "weights_sha256": weights_record["sha256"],
    }
    if frozen:
        if extract_record is None:
            raise ValueError(f"run {run_name!r} is frozen: it needs the extract stage's record, got None")
        prov = provenance(weights_record["sha256"], arch, source.cut, pre)
        train_x, val_x = (
            stored_features(extract_record["store_path"], prov, s.images) for s in (target.train, target.val)
        )
        tags["feature_store_key"] = extract_record["store_key"]
    log.info("%s: %s from %s on %d images", run_name, run.strategy, run.source, len(target.train))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tracking.training_run(run_name, run_params(run, source, params, optim), tags) as mlrun:
        if frozen:
            in_shape = tuple(extract_record["feature_shape"])
            head, result = train_frozen_head(
                (train_x, target.train.labels),
                (val_x, target.val.labels),
                in_shape,
                target.num_classes,
                params,
                tracking.log_epoch,
            )
            net, cut = source_net.upto(source.cut).with_classifier(head), source.cut
        else:
            net = end_to_end_net(source_net, arch, run.strategy, target.num_classes, params.head, pre, params.seed)
            result = train_end_to_end(net, target, pre, params, tracking.log_epoch)
            cut = net.cut_names[-1]
        spec = ModelSpec(
            arch=arch,
            num_classes=target.num_classes,
            class_names=target.class_names,
            preprocess=pre,
            cut=cut,
            head=params.head,
            dropout=body_dropout(net.upto(cut)),
        )
        model_path, history_path = out_dir / "model.safetensors", out_dir / "history.json"
        sha256 = save_model(net, spec, model_path)
        summary = {"best_epoch": result.best_epoch, "epochs": result.epochs, "seconds": round(result.seconds, 2)}
        with atomic_write(history_path) as tmp:
            tmp.write_text(json.dumps({**summary, "history": result.history}, indent=2))
        mlflow.log_metrics(
            {"best_epoch": result.best_epoch, **{f"best_{k}": result.best[k] for k in ("val_loss", "val_accuracy")}}
        )
        mlflow.log_figure(curves_figure(result.history, f"{run_name}: {run.strategy} from {run.source}"), "curves.png")
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
        "outputs": [model_out, output(history_path)],
    }
