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
    diverged: bool = False
    """Its validation loss stopped being finite (`fit_many(stop_diverged=True)`); the best finite epoch is kept."""

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
    return _logits_of([model], as_inputs(x), batch_size, transform, device)[0]


def _logits_of(
    models: Sequence[nn.Module], x: Inputs, batch_size: int, transform: Transform | None, device: torch.device
) -> list[torch.Tensor]:
    """Each model's logits for every row of `x`, reading `x` once: every model sees the same batches."""
    for model in models:
        model.eval()
    out: list[list[torch.Tensor]] = [[] for _ in models]
    with torch.no_grad():
        for xb in x.in_order(batch_size):
            xb = _prepared(xb, transform, device)
            for logits, model in zip(out, models, strict=True):
                logits.append(model(xb).float().cpu())
    return [torch.cat(o) if o else torch.zeros(0) for o in out]


def inverse_frequency(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """Class weights n / (k * n_c) ("balanced"): every class weighs the same in the loss, whatever its count."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"class weights need every class in the training split; counts {counts.astype(int).tolist()}")
    return tuple((counts.sum() / (num_classes * counts)).tolist())


def _scores(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> tuple[float, float]:
    """(loss, accuracy) of logits against labels."""
    weight = weight.cpu() if weight is not None else None
    return F.cross_entropy(logits, y, weight=weight).item(), (logits.argmax(1) == y).float().mean().item()


RngState = tuple[torch.Tensor, torch.Tensor | None]
"""torch's global random state on the CPU and, training on CUDA, on the device: what dropout draws from."""


def _rng_state(device: torch.device) -> RngState:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: RngState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


LrShares = Sequence[tuple[Sequence[nn.Parameter], float]]
"""Groups of parameters and the share of the learning rate each trains at."""


class _Learner:
    """One model's training in a shared loop: its Adam, its random stream, its early stopping and best epoch.

    Each learner owns a copy of the global random state (seeded once for all), swapped in around its
    own steps: its dropout draws are those it would make trained alone, whatever the other models draw.
    """

    def __init__(
        self, model: nn.Module, optim: OptimParams, on_epoch: EpochCallback | None, device: torch.device,
        lr_shares: LrShares | None = None,
    ):  # fmt: skip
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
        self.model, self.optim, self.on_epoch, self.device = model.to(device), optim, on_epoch, device
        groups = [{"params": trainable, "lr": optim.lr}] if lr_shares is None else [
            {"params": kept, "lr": optim.lr * share}
            for params, share in lr_shares
            if (kept := [p for p in params if p.requires_grad])
        ]  # fmt: skip
        self.optimizer = torch.optim.Adam(groups, lr=optim.lr, weight_decay=optim.weight_decay)
        self.rng = _rng_state(device)
        self.history: list[dict[str, float]] = []
        self.best_loss, self.best_epoch, self.best_state = float("inf"), 0, {}
        self.start: dict[str, float] | None = None
        self.loss_sum, self.correct = 0.0, 0
        self.active, self.diverged, self.seconds = True, False, 0.0

    def keep_start(self, val: tuple[float, float]) -> None:
        """The starting weights as the best so far, scored on validation (`val`: loss, accuracy)."""
        self.start = {"epoch": 0, "val_loss": val[0], "val_accuracy": val[1]}
        self.best_loss, self.best_state = val[0], {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def start_epoch(self) -> None:
        _train_mode(self.model)
        self.loss_sum, self.correct = 0.0, 0

    def step(self, xb: torch.Tensor, yb: torch.Tensor, weight: torch.Tensor | None) -> None:
        _set_rng_state(self.rng, self.device)
        logits = self.model(xb)
        loss = F.cross_entropy(logits, yb, weight=weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.rng = _rng_state(self.device)
        self.loss_sum += loss.item() * len(yb)
        self.correct += (logits.argmax(1) == yb).sum().item()

    def end_epoch(self, epoch: int, n: int, val: tuple[float, float], times: tuple[float, float], stop_diverged: bool
                  ) -> None:  # fmt: skip
        """Record the epoch (`times`: its seconds, and the loop's so far), keep the best weights, and stop on
        patience, after the last epoch or, if asked, on divergence."""
        val_loss, val_acc = val
        self.seconds = times[1]
        if not np.isfinite(val_loss):
            if not stop_diverged:
                raise FloatingPointError(
                    f"validation loss is {val_loss} at epoch {epoch}: training diverged (lower lr)"
                )
            self.active, self.diverged = False, True
            return
        row = {"epoch": epoch, "train_loss": self.loss_sum / n, "train_accuracy": self.correct / n}
        row |= {"val_loss": val_loss, "val_accuracy": val_acc, "seconds": times[0]}
        self.history.append(row)
        if self.on_epoch is not None:
            self.on_epoch(epoch, {k: row[k] for k in METRICS})
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        elif epoch - self.best_epoch >= self.optim.patience:
            self.active = False
        if epoch >= self.optim.epochs:
            self.active = False

    def result(self) -> FitResult:
        """The best epoch's weights restored (none to restore when no epoch had a finite validation loss)."""
        if self.best_state:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        stopped = len(self.history) < self.optim.epochs
        return FitResult(
            self.history, self.best_epoch, self.seconds, stopped_early=stopped, start=self.start, diverged=self.diverged
        )


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
    lr_shares: LrShares | None = None,
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
    return fit_many(
        [model], train, val, [optim], seed, device, transform, [on_epoch], class_weights, train_augment,
        [lr_shares], keep_start,
    )[0]  # fmt: skip


def fit_many(
    models: Sequence[nn.Module],
    train: tuple[Array | Inputs, Array],
    val: tuple[Array | Inputs, Array],
    optims: Sequence[OptimParams],
    seed: int,
    device: str | torch.device = "cpu",
    transform: Transform | None = None,
    on_epoch: Sequence[EpochCallback | None] | None = None,
    class_weights: Sequence[float] | None = None,
    train_augment: Transform | None = None,
    lr_shares: Sequence[LrShares | None] | None = None,
    keep_start: bool = False,
    stop_diverged: bool = False,
) -> list[FitResult]:
    """Train several models on the same rows in one pass: each batch (and validation batch) is read once.

    Every model trains exactly as `fit` would train it alone, bitwise on CPU: the same batches (one
    shuffle, seeded with `seed`), its own Adam with its own `optims` entry, its own dropout stream
    seeded with `seed`, its own early stopping on validation loss and its best epoch restored. The
    loop runs while any model trains; a stopped model is no longer stepped. The optimisers must share
    one batch size (the batch is shared), and so does `train_augment`'s draw (it draws from a
    generator of its own, once a batch, as it would for each model alone). With `stop_diverged`, a
    model whose validation loss is not finite stops (`FitResult.diverged`, its best finite epoch
    kept) instead of failing every model. See `fit` for the other arguments.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    if not models or len(models) != len(optims):
        raise ValueError(f"need one optimiser setting per model, got {len(models)} models and {len(optims)}")
    batch_sizes = {o.batch_size for o in optims}
    if len(batch_sizes) != 1:
        raise ValueError(f"models trained in one pass share their batches: one batch size, got {sorted(batch_sizes)}")
    x_train, y_train = as_inputs(train[0]), _labels(train[1])
    x_val, y_val = as_inputs(val[0]), _labels(val[1])
    if len(x_train) != len(y_train) or len(x_val) != len(y_val):
        raise ValueError(
            f"inputs and labels differ in length: train {len(x_train)} vs {len(y_train)}, "
            f"val {len(x_val)} vs {len(y_val)}"
        )
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"need at least one training and one validation row, got {len(x_train)} and {len(x_val)}")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    callbacks, shares = on_epoch or [None] * len(models), lr_shares or [None] * len(models)
    learners = [_Learner(m, o, cb, device, sh) for m, o, cb, sh in zip(models, optims, callbacks, shares, strict=True)]
    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None
    batch_size, n = batch_sizes.pop(), len(x_train)
    if keep_start:
        starts = _logits_of([learner.model for learner in learners], x_val, batch_size, transform, device)
        for learner, val_logits in zip(learners, starts, strict=True):
            learner.keep_start(_scores(val_logits, y_val, weight))
    start = time.perf_counter()
    most = max(o.epochs for o in optims)
    epochs = tqdm(range(1, most + 1), desc="epochs", unit="epoch", disable=None)
    bar = TaskProgress("training epochs", most)
    for epoch in epochs:
        t0 = time.perf_counter()
        active = [learner for learner in learners if learner.active]
        for learner in active:
            learner.start_epoch()
        batches = x_train.shuffled(batch_size, generator)
        total = -(-n // batch_size)
        for idx, x in tqdm(batches, total=total, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None):
            xb, yb = _prepared(x, transform, device), y_train[idx].to(device)
            if train_augment is not None:
                xb = train_augment(xb)
            for learner in active:
                learner.step(xb, yb, weight)
        logits = _logits_of([learner.model for learner in active], x_val, batch_size, transform, device)
        for learner, val_logits in zip(active, logits, strict=True):
            now = time.perf_counter()
            learner.end_epoch(epoch, n, _scores(val_logits, y_val, weight), (now - t0, now - start), stop_diverged)
        epochs.set_postfix(best_val_loss=f"{min(s.best_loss for s in active):.4f}", training=len(active))
        bar.advance(epoch)
        if not any(learner.active for learner in learners):
            break
    epochs.close()
    bar.finish()
    return [learner.result() for learner in learners]
