"""The advise stage: probe every stored cut, measure the target's size and similarity, pick a strategy (2x2 table).

Size is training images per class. Similarity is measured, not guessed: a linear probe (the same
small head, budget and validation split for every input) on the source's stored activations at
each cut, against the same probe on the same network untrained (seeded random weights, computed
here for the probe's images); the share of the untrained network's validation errors that the
pretrained one removes (best cut against best cut) is what the source's training contributes to
this target. The probe also ranks the cuts; raw pixels are probed too, for reference.
docs/choosing-a-strategy.md has the table, the thresholds and the measurements behind them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from prefect import task

from headstart import tracking
from headstart.backbones import create_model
from headstart.caching import cached, run_logger
from headstart.config import AdviseParams, HeadParams, needs_features
from headstart.datasets import TaskData, load_task
from headstart.extraction import segment_features
from headstart.files import atomic_write
from headstart.fit import Inputs, fit
from headstart.heads import make_head
from headstart.images import Preprocess
from headstart.records import AdviseRecord, ExtractRecord, Output, SourceWeights, TaskMeta
from headstart.splits import nested_fraction
from headstart.streaming import stored_rows
from headstart.threads import head_threads, torch_threads

PIXELS = "pixels"
"""The probe's other reference input: the raw target images, no network at all."""
BATCH = 250


def probe_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, stratified subset of about `per_class` images per class."""
    classes = len(np.unique(labels))
    return nested_fraction(labels, min(1.0, per_class * classes / len(labels)), seed)


def pixels(images: np.ndarray) -> np.ndarray:
    """Raw uint8 images as float32 rows in [0, 1]: the probe's no-transfer reference."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def probe(
    train: tuple[np.ndarray | Inputs, np.ndarray],
    val: tuple[np.ndarray | Inputs, np.ndarray],
    num_classes: int,
    params: AdviseParams,
) -> dict[str, float]:
    """A seeded linear head trained on one input's rows; its best validation accuracy and loss (no timings:
    the advice file is the same bytes for the same inputs, so DVC does not see a change that is not there)."""
    torch.manual_seed(params.seed)
    head = make_head(train[0].shape[1:], num_classes, HeadParams())
    with torch_threads(head_threads()):  # a head on stored rows: bitwise the same at any thread count
        result = fit(head, train, val, params.probe, params.seed, params.device)
    return {
        "val_accuracy": result.best["val_accuracy"],
        "val_loss": result.best["val_loss"],
        "dims": int(math.prod(train[0].shape[1:])),
        "epochs": result.epochs,
    }


def similarity(pretrained_accuracy: float, untrained_accuracy: float) -> float:
    """Share of the untrained network's probe errors that the pretrained weights remove (<0: they add errors)."""
    untrained_error = 1.0 - untrained_accuracy
    return (untrained_error - (1.0 - pretrained_accuracy)) / untrained_error if untrained_error > 0 else 0.0


def untrained_features(
    arch: str, images: np.ndarray, pre: Preprocess, taps: Sequence[str], seed: int
) -> dict[str, np.ndarray]:
    """Activations at `taps` of the same architecture with seeded random weights: the no-transfer reference."""
    torch.manual_seed(seed)
    net = create_model(arch, 2)
    return segment_features(net, images, pre, taps, BATCH)


def recommend(
    samples_per_class: float, gain: float, ranking: Sequence[str], cut_names: Sequence[str], params: AdviseParams
) -> dict[str, Any]:
    """The 2x2 table: size (small/large) x domain (similar/different) -> strategy and cut, with the reason.

    small, similar:   frozen at the best-probed cut: too few images to move pretrained layers, and
                      the source's learned features are the best input there is.
    small, different: frozen at the best-probed cut too: the probe measures where the features still
                      help (for a different source, usually an earlier cut than the top).
    large, similar:   finetune: enough images to adapt every layer, from weights that help.
    large, different: scratch: enough images, and the pretrained weights barely beat random ones.
    docs/choosing-a-strategy.md has the measurements behind each cell (partial never won one there).
    """
    small = samples_per_class < params.small_per_class
    similar = gain >= params.similar_gain
    best, last = ranking[0], cut_names[-1]
    size, domain = ("small" if small else "large"), ("similar" if similar else "different")
    if small:
        strategy, cut = "frozen", best
        why = f"few images per class: train only a new head, on the best-probed cut ({best})"
        if not similar:
            why += "; the source's later layers are too specific to this target" if best != last else ""
    elif similar:
        strategy, cut = "finetune", last
        why = "many images per class and pretrained weights that help: fine-tune every layer from them"
    else:
        strategy, cut = "scratch", last
        why = "many images per class and pretrained features barely better than untrained ones: train from scratch"
    return {
        "size": size,
        "domain": domain,
        "quadrant": f"{size} target, {domain} domain",
        "recommendation": {"strategy": strategy, "cut": cut, "upper_init": "pretrained", "why": why},
    }


Pair = tuple[np.ndarray | Inputs, np.ndarray | Inputs]
"""Activations of the probe's training subset and of the whole validation split (stored ones may be streamed)."""


def advise_target(
    target: TaskData,
    features: Mapping[str, Pair],
    untrained: Mapping[str, Pair],
    cut_names: Sequence[str],
    params: AdviseParams,
) -> dict[str, Any]:
    """Probe each cut, pretrained and untrained, and raw pixels; size, similarity, ranking, recommendation.

    `features[cut]` and `untrained[cut]` hold the activations of the probe's training subset
    (`probe_subset` of the target's training labels) and of the whole validation split.
    """
    subset = probe_subset(target.train.labels, params.probe_per_class, params.seed)
    y_train, y_val = target.train.labels[subset], target.val.labels
    k = target.num_classes

    def probes(inputs: Mapping[str, Pair]) -> dict[str, dict[str, float]]:
        return {cut: probe((x_tr, y_train), (x_val, y_val), k, params) for cut, (x_tr, x_val) in inputs.items()}

    cuts, reference = probes(features), probes(untrained)
    raw = probe((pixels(target.train.images[subset]), y_train), (pixels(target.val.images), y_val), k, params)
    ranking = sorted(cuts, key=lambda c: (-cuts[c]["val_accuracy"], cuts[c]["val_loss"]))
    samples_per_class = int(np.bincount(target.train.labels, minlength=k).min())
    best_untrained = max(r["val_accuracy"] for r in reference.values())
    gain = similarity(cuts[ranking[0]]["val_accuracy"], best_untrained)
    return {
        "samples_per_class": samples_per_class,
        "num_classes": k,
        "probe_rows": len(subset),
        "val_rows": len(y_val),
        "cuts": cuts,
        "untrained": reference,
        PIXELS: raw,
        "ranking": ranking,
        "similarity": round(gain, 4),
        "thresholds": {"small_per_class": params.small_per_class, "similar_gain": params.similar_gain},
        **recommend(samples_per_class, gain, ranking, cut_names, params),
    }


def probe_table(advice: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per cut (network order), then raw pixels: the table logged and shown."""
    rows = [
        {
            "input": cut,
            "dims": r["dims"],
            "pretrained": r["val_accuracy"],
            "untrained": advice["untrained"][cut]["val_accuracy"],
            "rank": advice["ranking"].index(cut) + 1,
        }
        for cut, r in advice["cuts"].items()
    ]
    pix = advice[PIXELS]
    return [
        *rows,
        {"input": PIXELS, "dims": pix["dims"], "pretrained": pix["val_accuracy"], "untrained": None, "rank": None},
    ]


def probe_figure(advice: Mapping[str, Any], title: str) -> Figure:
    """Probe validation accuracy per cut, pretrained beside untrained (network order); raw pixels as a line."""
    fig = Figure(figsize=(2.2 + 1.2 * len(advice["cuts"]), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = list(advice["cuts"])
    x = np.arange(len(names))
    series = (("pretrained", advice["cuts"], -0.2), ("untrained", advice["untrained"], 0.2))
    for label, results, shift in series:
        accs = [results[c]["val_accuracy"] for c in names]
        ax.bar(x + shift, accs, width=0.4, label=label)
        for xi, acc in zip(x + shift, accs, strict=True):
            ax.text(xi, acc, f"{acc:.1%}", ha="center", va="bottom", fontsize=8)
    ax.axhline(advice[PIXELS]["val_accuracy"], color="gray", linestyle="--", label="raw pixels")
    ax.set_xticks(x, [f"{c}\n(best)" if c == advice["ranking"][0] else c for c in names])
    low = min(r["val_accuracy"] for r in [*advice["cuts"].values(), *advice["untrained"].values(), advice[PIXELS]])
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_ylabel("probe validation accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    return fig


def probe_inputs(
    target: TaskData, extract_record: ExtractRecord, weights: SourceWeights, params: AdviseParams
) -> tuple[dict[str, Pair], dict[str, Pair]]:
    """Per stored cut, the probe's (training subset, validation) activations: pretrained (stored) and untrained."""
    images = target.train.images[probe_subset(target.train.labels, params.probe_per_class, params.seed)]
    taps = extract_record.taps
    splits = (images, target.val.images)
    stored = {t: tuple(stored_rows(extract_record, x, t, params.stream) for x in splits) for t in taps}
    both = np.concatenate([images, target.val.images])
    fresh = untrained_features(weights.arch, both, weights.preprocess, taps, params.seed)
    return stored, {tap: (a[: len(images)], a[len(images) :]) for tap, a in fresh.items()}


def log_advice(advice: dict, weights: SourceWeights, extract_record: ExtractRecord, task_meta: TaskMeta,
               params: AdviseParams, figure_path: Path) -> None:  # fmt: skip
    """One MLflow run per source: the probe's accuracies, similarity and size, the table and figure."""
    rec = advice["recommendation"]
    tags = {
        "stage": "advise", "source": weights.source, "quadrant": advice["quadrant"],
        "recommendation": f"{rec['strategy']}@{rec['cut']}", "data_fingerprint": task_meta.fingerprint,
        "weights_sha256": weights.sha256, "feature_store_key": extract_record.store_key,
    }  # fmt: skip
    table = probe_table(advice)
    with tracking.training_run(f"advise-{weights.source}", params.model_dump(mode="json"), tags):
        mlflow.log_metrics({f"probe_val_accuracy.{r['input']}": r["pretrained"] for r in table})
        mlflow.log_metrics(
            {f"probe_untrained_val_accuracy.{c}": r["val_accuracy"] for c, r in advice["untrained"].items()}
        )
        mlflow.log_metrics({"similarity": advice["similarity"], "samples_per_class": advice["samples_per_class"]})
        mlflow.log_dict({"rows": table}, "probe.json")
        mlflow.log_dict(advice, "advice.json")
        mlflow.log_artifact(str(figure_path))


@task(**cached("advise"))
def advise(
    weights: SourceWeights,
    extract_record: ExtractRecord,
    task_meta: TaskMeta,
    params: AdviseParams,
    data_dir: Path,
    out_dir: Path,
) -> AdviseRecord:
    """Probe the source's stored cuts on the target, write `advice.json` (this record) and `probe.png`, log one run."""
    target = load_task(Path(data_dir), "target")
    if target.fingerprint() != task_meta.fingerprint:
        raise ValueError(f"{data_dir}/target.npz does not match its data record; rerun the data stage")
    features, untrained = probe_inputs(target, extract_record, weights, params)
    advice = {"source": weights.source, **advise_target(target, features, untrained, extract_record.taps, params)}
    figure_path = Path(out_dir) / "probe.png"
    figure = probe_figure(advice, f"{weights.source}: linear probe per cut ({advice['probe_rows']} images)")
    with atomic_write(figure_path) as tmp:
        figure.savefig(tmp, format="png")
    log_advice(advice, weights, extract_record, task_meta, params, figure_path)
    rec = advice["recommendation"]
    at = f" at {rec['cut']}" if needs_features(rec["strategy"]) else ""
    run_logger().info("advise %s: %s; recommends %s%s", weights.source, advice["quadrant"], rec["strategy"], at)
    return AdviseRecord(**advice, outputs=[Output.of(figure_path)])
