"""Classification metrics and their figures, as pure functions (the tasks write and log them).

Figures are built on the Agg canvas without pyplot, so no global figure state leaks between
runs and nothing needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (sklearn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(len(num), dtype=np.float64), where=den > 0)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred {len(y_pred)}")
    return float((y_true == y_pred).mean()) if len(y_true) else 0.0


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred {len(y_pred)}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}: {sorted(set(y.tolist()))[:10]}")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    precision = _ratio(tp, cm.sum(axis=0))
    recall = _ratio(tp, cm.sum(axis=1))
    f1 = _ratio(2 * tp, cm.sum(axis=0) + cm.sum(axis=1))
    return precision, recall, f1


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over all `num_classes` classes."""
    return float(precision_recall_f1(confusion_matrix(y_true, y_pred, num_classes))[2].mean())


def per_class(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """{class name: {"precision", "recall", "f1", "support"}}."""
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    precision, recall, f1 = precision_recall_f1(cm)
    support = cm.sum(axis=1)
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Everything `metrics.json` holds: accuracy, balanced accuracy (mean recall of the classes tested), macro-F1,
    per-class scores, confusion matrix, n."""
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    _, recall, f1 = precision_recall_f1(cm)
    present = cm.sum(axis=1) > 0
    return {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": per_class(y_true, y_pred, class_names),
        "confusion_matrix": cm.tolist(),
        "n_test": int(len(y_true)),
    }


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def confusion_figure(cm: np.ndarray, class_names: Sequence[str], title: str = "confusion matrix") -> Figure:
    """Counts with row-normalised shading (recall per true class), class names on both axes."""
    cm = np.asarray(cm)
    shade = _ratio(cm.astype(np.float64).ravel(), np.repeat(cm.sum(axis=1), cm.shape[1]).astype(np.float64))
    shade = shade.reshape(cm.shape)
    size = 1.5 + 0.7 * len(class_names)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(shade, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of true class")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if shade[i, j] > 0.5 else "black")
    return fig


def curves_figure(history: Sequence[dict[str, float]], title: str = "training curves") -> Figure:
    """Train and validation loss (left) and accuracy (right) per epoch."""
    epochs = [row["epoch"] for row in history]
    fig = _figure(9.0, 3.6)
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split in ("train", "val"):
            ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def confident_mistakes(probs: np.ndarray, y_true: np.ndarray, k: int = 16) -> list[int]:
    """Indices of the `k` wrong predictions made with the highest confidence: where a user looks first."""
    wrong = np.flatnonzero(probs.argmax(axis=1) != y_true)
    return wrong[np.argsort(-probs[wrong].max(axis=1), kind="stable")][:k].tolist()


def mistakes_figure(
    images: np.ndarray, probs: np.ndarray, y_true: np.ndarray, class_names: Sequence[str], title: str
) -> Figure:
    """A grid of the most confidently misclassified images, each titled true -> predicted (confidence)."""
    chosen = confident_mistakes(probs, y_true)
    cols = 4
    rows = max(1, -(-len(chosen) // cols))
    fig = _figure(2.2 * cols, 2.4 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, chosen, strict=False):
        ax.imshow(images[i], cmap="gray" if images[i].ndim == 2 else None, vmin=0, vmax=255)
        predicted = int(probs[i].argmax())
        ax.set_title(
            f"{class_names[int(y_true[i])]} -> {class_names[predicted]}\n({probs[i, predicted]:.2f})", fontsize=8
        )
    fig.suptitle(title if chosen else f"{title}: no test image was misclassified")
    return fig
