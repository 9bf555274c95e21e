"""One training loop for every strategy: a head on stored features or a whole network on images.

Adam + cross-entropy, seeded shuffling, early stopping on validation loss, best epoch restored.
Inputs are either float features or uint8 images with a `transform` (the preprocessing) applied
per batch, so the same loop, and the same numbers for the same seed, serve every strategy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from headstart.config import OptimParams
from headstart.progress import TaskProgress

Array = np.ndarray | torch.Tensor
Transform = Callable[[torch.Tensor], torch.Tensor]
EpochCallback = Callable[[int, dict[str, float]], None]
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@dataclass
class FitResult:
    history: list[dict[str, float]]
    """One entry per epoch run: epoch (1-based), train/val loss and accuracy, seconds."""
    best_epoch: int
    """The epoch whose weights the model holds after `fit` (lowest validation loss)."""
    seconds: float
    stopped_early: bool = False

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def best(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1]


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when present, else CPU; an explicit 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(device)


def _tensor(x: Array) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _labels(y: Array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y, dtype=torch.long)


def _batch(x: torch.Tensor, idx: torch.Tensor | slice, transform: Transform | None, device: torch.device):
    xb = x[idx]
    if transform is not None:
        xb = transform(xb)
    return xb.to(device, dtype=torch.float32)


def _train_mode(model: nn.Module) -> None:
    """Train mode, except modules whose own parameters are all frozen: their BatchNorm statistics stay put."""
    model.train()
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            m.eval()


def predict_logits(
    model: nn.Module,
    x: Array,
    batch_size: int = 512,
    transform: Transform | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Logits for every row of `x` (eval mode, no gradients), on the CPU."""
    device = resolve_device(device) if isinstance(device, str) else device
    x = _tensor(x)
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(_batch(x, slice(i, i + batch_size), transform, device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def inverse_frequency(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """Class weights n / (k * n_c) ("balanced"): every class weighs the same in the loss, whatever its count."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"class weights need every class in the training split; counts {counts.astype(int).tolist()}")
    return tuple((counts.sum() / (num_classes * counts)).tolist())


def _evaluate(model, x, y, batch_size, transform, device, weight=None) -> tuple[float, float]:
    logits = predict_logits(model, x, batch_size, transform, device)
    weight = weight.cpu() if weight is not None else None
    return F.cross_entropy(logits, y, weight=weight).item(), (logits.argmax(1) == y).float().mean().item()


def fit(
    model: nn.Module,
    train: tuple[Array, Array],
    val: tuple[Array, Array],
    optim: OptimParams,
    seed: int,
    device: str | torch.device = "cpu",
    transform: Transform | None = None,
    on_epoch: EpochCallback | None = None,
    class_weights: Sequence[float] | None = None,
) -> FitResult:
    """Train the parameters of `model` that require grad; return the per-epoch history.

    `class_weights` weigh each class's term of the training and validation loss (an unbalanced
    folder: `inverse_frequency`); None weighs every image the same.

    `model` must already be built and initialised (seed before building it); `seed` here drives
    the shuffling and dropout, so the same inputs and seed give the same history on CPU.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    x_train, y_train = _tensor(train[0]), _labels(train[1])
    x_val, y_val = _tensor(val[0]), _labels(val[1])
    if len(x_train) != len(y_train) or len(x_val) != len(y_val):
        raise ValueError(
            f"inputs and labels differ in length: train {len(x_train)} vs {len(y_train)}, "
            f"val {len(x_val)} vs {len(y_val)}"
        )
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"need at least one training and one validation row, got {len(x_train)} and {len(x_val)}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    optimizer = torch.optim.Adam(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state = float("inf"), 0, {}
    start = time.perf_counter()
    n = len(x_train)
    epochs = tqdm(range(1, optim.epochs + 1), desc="epochs", unit="epoch", disable=None)
    bar = TaskProgress("training epochs", optim.epochs)
    for epoch in epochs:
        t0 = time.perf_counter()
        _train_mode(model)
        order = torch.randperm(n, generator=generator)
        loss_sum, correct = 0.0, 0
        for i in tqdm(range(0, n, optim.batch_size), desc=f"epoch {epoch}", unit="batch", leave=False, disable=None):
            idx = order[i : i + optim.batch_size]
            xb, yb = _batch(x_train, idx, transform, device), y_train[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        val_loss, val_acc = _evaluate(model, x_val, y_val, optim.batch_size, transform, device, weight)
        if not np.isfinite(val_loss):
            raise FloatingPointError(f"validation loss is {val_loss} at epoch {epoch}: training diverged (lower lr)")
        row = {"epoch": epoch, "train_loss": loss_sum / n, "train_accuracy": correct / n}
        row |= {"val_loss": val_loss, "val_accuracy": val_acc, "seconds": time.perf_counter() - t0}
        history.append(row)
        epochs.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.4f}")
        if on_epoch is not None:
            on_epoch(epoch, {k: row[k] for k in METRICS})
        bar.advance(epoch)
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= optim.patience:
            break
    epochs.close()
    bar.finish()
    model.load_state_dict(best_state)
    model.eval()
    stopped = len(history) < optim.epochs
    return FitResult(history=history, best_epoch=best_epoch, seconds=time.perf_counter() - start, stopped_early=stopped)
