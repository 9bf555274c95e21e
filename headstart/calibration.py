"""Calibrated probabilities: one temperature fitted on validation logits, and the error it is judged by.

A network trained to low loss on a few hundred photos is overconfident: its 0.99 is right less
often than 99% of the time. Dividing the logits by one temperature T > 1, chosen to minimise the
validation negative log-likelihood (Guo et al. 2017), keeps every prediction's class and makes
the probabilities mean what they say; the expected calibration error (ECE) measures how far they
are from that, before and after. T lives in the model's spec, so `headstart predict` and the served
model answer calibrated probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.nn import functional as F

BINS = 15


T_MIN, T_MAX = 1.0, 20.0
"""Temperatures are never below 1: on a validation split the model gets all right (common with a few hundred
photos) the likelihood keeps rising as T falls to 0, a fit to luck, not calibration; so the model is only ever
made less sure of itself."""


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL of softmax(logits / T) (deterministic: LBFGS from T = 1)."""
    logits, labels = logits.detach().double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return float(np.clip(t, T_MIN, T_MAX)) if np.isfinite(t) else T_MIN


def softmax(logits: torch.Tensor | np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float32) / temperature, dim=1).numpy()


def averaged_probabilities(logit_sets: list[torch.Tensor], temperature: float = 1.0) -> np.ndarray:
    """Test-time augmentation: each image's calibrated probabilities averaged over its views (the plain one first)."""
    return np.mean([softmax(logits, temperature) for logits in logit_sets], axis=0)


def rejection_threshold(probs: np.ndarray, share: float) -> float:
    """The calibrated confidence below which an image is answered "none": `share` of these images fall under it.

    Images of a class the model never saw tend to get lower confidence than its own classes', so a
    threshold that costs `share` of the known images rejects many of the unknown ones.
    """
    return float(np.quantile(probs.max(axis=1), share))


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Per confidence bin: how many predictions, their mean confidence and how often they were right."""
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            out.append(
                {"lo": float(lo), "hi": float(hi), "count": int(inside.sum()),
                 "confidence": float(confidence[inside].mean()), "accuracy": float(correct[inside].mean())}
            )  # fmt: skip
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over equal-width bins."""
    n = len(labels)
    return float(
        sum(b["count"] / n * abs(b["confidence"] - b["accuracy"]) for b in calibration_bins(probs, labels, bins))
    )


def reliability_figure(before: np.ndarray, after: np.ndarray, labels: np.ndarray, title: str) -> Figure:
    """Accuracy against confidence per bin, before and after temperature scaling (the diagonal is perfect)."""
    fig = Figure(figsize=(4.5, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for probs, name in ((before, "before"), (after, "after")):
        rows = calibration_bins(probs, labels)
        ece = expected_calibration_error(probs, labels)
        ax.plot(
            [r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=f"{name} (ECE {ece:.3f})"
        )
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="upper left")
    return fig
