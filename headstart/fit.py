"""One training loop for every strategy: a head on stored features or a whole network on images.

Adam + cross-entropy, seeded shuffling, early stopping on validation loss, best epoch restored.
Inputs are either float features or uint8 images with a `transform` (the preprocessing) applied
per batch, so the same loop, and the same numbers for the same seed, serve every strategy. They are
an array in memory or any `Inputs` (stored activations streamed from the feature store,
headstart.streaming): the loop asks them for its batches and never indexes rows itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

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


class Inputs(Protocol):
    """The rows a training loop reads, by batches: so rows need not be in memory to be trained on."""

    @property
    def shape(self) -> tuple[int, ...]:
        """(rows, *one row's shape), as an array's."""
        ...

    def __len__(self) -> int: ...

    def shuffled(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(row indices, their inputs) per batch: every row once, in the order `generator` draws for this epoch."""
        ...

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The inputs of rows 0, 1, ... `batch_size` at a time: what prediction reads."""
        ...


class ArrayInputs:
    """Rows of an array in memory, shuffled as one permutation per epoch."""

    def __init__(self, x: Array):
        self.x = _tensor(x)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)

    def __len__(self) -> int:
        return len(self.x)

    def shuffled(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield idx, self.x[idx]

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.x), batch_size):
            yield self.x[i : i + batch_size]


def as_inputs(x: Array | Inputs) -> Inputs:
    """An array as `ArrayInputs`; anything else is taken to be `Inputs` already."""
    return ArrayInputs(x) if isinstance(x, np.ndarray | torch.Tensor) else x


@dataclass
class FitResult:
    history: list[dict[str, float]]
    """One entry per epoch run: epoch (1-based), train/val loss and accuracy, seconds."""
    best_epoch: int
    """The epoch whose weights the model holds after `fit` (lowest validation loss); 0: the starting weights."""
    seconds: float
    stopped_early: bool = False
    start: dict[str, float] | None = None
    """Validation metrics of the starting weights, when they were a candidate (`keep_start`)."""

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def best(self) -> dict[str, float]:
        if self.best_epoch == 0 and self.start is not None:
            return self.start
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


def _prepared(xb: torch.Tensor, transform: Transform | None, device: torch.device) -> torch.Tensor:
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
    x: Array | Inputs,
    batch_size: int = 512,
    transform: Transform | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Logits for every row of `x` (eval mode, no gradients), on the CPU."""
    device = resolve_device(device) if isinstance(device, str) else device
    model.eval()
    out = []
    with torch.no_grad():
        for xb in as_inputs(x).in_order(batch_size):
            out.append(model(_prepared(xb, transform, device)).float().cpu())
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
    train: tuple[Array | Inputs, Array],
    val: tuple[Array | Inputs, Array],
    optim: OptimParams,
    seed: int,
    device: str | torch.device = "cpu",
    transform: Transform | None = None,
    on_epoch: EpochCallback | None = None,
    class_weights: Sequence[float] | None = None,
    train_augment: Transform | None = None,
    lr_shares: Sequence[tuple[Sequence[nn.Parameter], float]] | None = None,
    keep_start: bool = False,
) -> FitResult:
    """Train the parameters of `model` that require grad; return the per-epoch history.

    `train_augment` changes training batches only, after `transform` (feature-space augmentation of
    stored activations: headstart.feature_augment); validation and prediction never see it.

    `lr_shares` trains groups of parameters at shares of `optim.lr` (discriminative rates: a pretrained
    body slower than its new head); None trains every parameter that requires grad at `optim.lr`.

    `keep_start` makes the starting weights a candidate too (scored on validation first): a network that
    already fits (finetune after its head-first phase) is never handed back worse on validation.

    `class_weights` weigh each class's term of the training and validation loss (an unbalanced
    folder: `inverse_frequency`); None weighs every image the same.

    `model` must already be built and initialised (seed before building it); `seed` here drives
    the shuffling and dropout, so the same inputs and seed give the same history on CPU.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    x_train, y_train = as_inputs(train[0]), _labels(train[1])
    x_val, y_val = as_inputs(val[0]), _labels(val[1])
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
    groups = [{"params": trainable, "lr": optim.lr}] if lr_shares is None else [
        {"params": kept, "lr": optim.lr * share}
        for params, share in lr_shares
        if (kept := [p for p in params if p.requires_grad])
    ]  # fmt: skip
    optimizer = torch.optim.Adam(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state, begun = float("inf"), 0, {}, None
    if keep_start:
        loss, acc = _evaluate(model, x_val, y_val, optim.batch_size, transform, device, weight)
        begun = {"epoch": 0, "val_loss": loss, "val_accuracy": acc}
        best_loss, best_state = loss, {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    n = len(x_train)
    epochs = tqdm(range(1, optim.epochs + 1), desc="epochs", unit="epoch", disable=None)
    bar = TaskProgress("training epochs", optim.epochs)
    for epoch in epochs:
        t0 = time.perf_counter()
        _train_mode(model)
        loss_sum, correct = 0.0, 0
        batches = x_train.shuffled(optim.batch_size, generator)
        total = -(-n // optim.batch_size)
        for idx, x in tqdm(batches, total=total, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None):
            xb, yb = _prepared(x, transform, device), y_train[idx].to(device)
            if train_augment is not None:
                xb = train_augment(xb)
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
    return FitResult(
        history=history, best_epoch=best_epoch, seconds=time.perf_counter() - start, stopped_early=stopped, start=begun
    )
