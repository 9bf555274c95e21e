"""Benchmark inputs made through the project's own stages: target data, weights records, feature stores."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.timing import log, timed
from headstart.backbones import create_model
from headstart.checkpoints import save_weights
from headstart.config import DataParams, ExtractParams, Params, SourceParams, TrainParams, load_params
from headstart.datasets import SPLITS, Split, TaskData, load_task, save_task
from headstart.extraction import stored_features
from headstart.fmnist import SYSTEM_DIR, idx_files
from headstart.images import FMNIST_DECODE, Preprocess
from headstart.records import ExtractRecord, SourceWeights, TaskMeta
from headstart.sources import KNOWN_SHA256
from tasks.data import data
from tasks.extract import extract
from tasks.raw import raw
from tasks.weights import weights
from tests.tiny import MOBILENET as MOBILENET_FILE
from tests.tiny import install_mobilenet, tiny_images

REPO = Path(__file__).resolve().parent.parent
MOBILENET = SourceParams(
    weights="torchvision:mobilenet_v2/IMAGENET1K_V1",
    sha256=KNOWN_SHA256["mobilenet_v2/IMAGENET1K_V1"],
    arch="mobilenet_v2",
    cut="pool",
    image_size=64,
)
"""The default params' ImageNet source (real weights), at its default 64 px."""
SHARED = {"fmnist_cnn": (28, (27_000, 3_000, 5_000)), "mobilenet_v2": (64, (3_000, 500, 1_000))}
"""The feature stores benchmarks 2, 6 and 7 share: arch -> (image size, train/val/test images in full mode).
The source CNN on the whole of FMNIST-1; the ImageNet source on a part (its forward is 10x slower)."""
QUICK_SPLITS = (200, 50, 100)
SYNTHETIC_ROWS = 35_000
"""Rows of the stand-in target when Fashion-MNIST is absent: as many as FMNIST-1 has."""


class Workspace:
    """One benchmark session's folder, sizes (quick or full) and the inputs benchmarks share, each made once."""

    def __init__(self, root: Path, quick: bool, fmnist_dir: Path = SYSTEM_DIR, repeats: int = 3):
        self.root = Path(root)
        self.quick = quick
        self.fmnist_dir = Path(fmnist_dir)
        self.repeats = repeats
        self._weights: dict[str, SourceWeights] = {}
        self._saved: dict[str, tuple[Path, TaskMeta]] = {}
        self._stores: dict[str, Stored] = {}

    def size(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    @property
    def process_repeats(self) -> int:
        """Repetitions of benchmarks that start processes (seconds of imports each): one in quick mode."""
        return self.size(1, self.repeats)

    def fresh_dir(self, prefix: str) -> Path:
        """An empty folder of its own (delete it with `drop` when the repetition is done)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=self.root))

    @staticmethod
    def drop(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    @cached_property
    def params(self) -> Params:
        """The project's params.yaml: benchmarks use its extract and train settings, as the pipeline does."""
        return load_params(REPO / "params.yaml")

    @property
    def train_params(self) -> TrainParams:
        """params.yaml's train section; quick mode trains heads for at most 5 epochs."""
        train = self.params.train
        if not self.quick:
            return train
        return train.model_copy(update={"frozen": train.frozen.model_copy(update={"epochs": 5})})

    @property
    def has_fmnist(self) -> bool:
        return idx_files(self.fmnist_dir) is not None

    @property
    def has_mobilenet(self) -> bool:
        return MOBILENET_FILE.is_file()

    @cached_property
    def target(self) -> TaskData:
        """FMNIST-1 made by the real data stage (27000/3000/5000 rows), or a synthetic stand-in of that size."""
        if self.has_fmnist:
            out = self.root / "data" / "fmnist"
            params = DataParams(root=self.fmnist_dir)
            data.fn(params, raw.fn(params), out, self.root / ".cache" / "fashion-mnist")
            return load_task(out, "target")
        log(f"no Fashion-MNIST at {self.fmnist_dir}: synthetic images stand in for speed benchmarks")
        images, labels = tiny_images(SYNTHETIC_ROWS, seed=0)
        a, b = int(SYNTHETIC_ROWS * 27 / 35), int(SYNTHETIC_ROWS * 30 / 35)
        splits = [Split(images[i:j], labels[i:j].astype(np.int64) % 5) for i, j in ((0, a), (a, b), (b, None))]
        return TaskData("target", [f"class{i}" for i in range(5)], *splits)

    def subset(self, n_train: int, n_val: int = 0, n_test: int = 0) -> TaskData:
        """The first rows of each split of the target."""
        t = self.target
        cut = {"train": n_train, "val": n_val, "test": n_test}
        splits = {s: Split(t.split(s).images[: cut[s]], t.split(s).labels[: cut[s]]) for s in SPLITS}
        return TaskData("target", t.class_names, **splits)

    def rows(self, n: int) -> TaskData:
        """n distinct target images, all in the train split (for extraction, where splits do not matter)."""
        t = self.target
        images = np.concatenate([t.split(s).images for s in SPLITS])[:n]
        labels = np.concatenate([t.split(s).labels for s in SPLITS])[:n]
        if len(images) < n:
            raise ValueError(f"the target has {len(images)} images, {n} were asked for")
        empty = Split(images[:0], labels[:0])
        return TaskData("target", t.class_names, Split(images, labels), empty, empty)

    def save(self, task: TaskData, name: str) -> tuple[Path, TaskMeta]:
        """`task` written the way the data stage writes it (Fashion-MNIST's decoding): (data_dir, its TaskMeta)."""
        if name not in self._saved:
            folder = self.root / "data" / name
            self._saved[name] = (folder, TaskMeta(**save_task(task, folder, FMNIST_DECODE)))
        return self._saved[name]

    def weights(self, arch: str, image_size: int) -> SourceWeights:
        """A weights record from the real weights stage: mobilenet_v2 with ImageNet weights when installed,
        every other architecture randomly initialised (seed 0), cut where params.yaml cuts it (else `pool`)."""
        name = f"{arch}-{image_size}"
        if name not in self._weights:
            if arch == MOBILENET.arch:
                if not install_mobilenet(Path(os.environ["TORCH_HOME"])):
                    raise FileNotFoundError("the ImageNet MobileNetV2 file is not installed (make install)")
                source = MOBILENET.model_copy(update={"image_size": image_size})
            else:
                torch.manual_seed(0)
                path = self.root / "weights-files" / f"{arch}-random.safetensors"
                if not path.exists():
                    save_weights(create_model(arch, 5 if arch == "fmnist_cnn" else 1000).state_dict(), path)
                cuts = {s.arch: s.cut for s in self.params.sources.values()}
                source = SourceParams(weights=str(path), arch=arch, cut=cuts.get(arch, "pool"), image_size=image_size)
            record = weights.fn(
                sources={name: source},
                params=self.params.weights,
                out_dir=self.root / "weights",
                cache_dir=self.root / ".cache" / "weights",
            )
            self._weights[name] = record.sources[name]
        return self._weights[name]

    def extract(
        self,
        weights_record: SourceWeights,
        data_dir: Path,
        task_meta: TaskMeta,
        store_root: Path,
        taps: Sequence[str] = (),
        params: ExtractParams | None = None,
    ) -> tuple[ExtractRecord, float]:
        """The real extract task storing the cut and `taps`: (its record, seconds).

        `params` defaults to params.yaml's extract section, as the pipeline runs it.
        """
        params = params or self.params.extract
        return timed(lambda: extract.fn(weights_record, task_meta, params, data_dir, store_root, taps))

    @staticmethod
    def computed(record: ExtractRecord, before: ExtractRecord | None = None) -> int:
        """Rows the extract call that returned `record` computed: the store's rows after it, less those before.

        The store is append-only and an extraction computes exactly the rows it lacks, so the rows it
        gained are the rows computed; `before` is the record of the previous extraction into the same
        store (None for a fresh store root).
        """
        if before is not None and before.store != record.store:
            raise ValueError(f"{record.store} is not the store {before.store} the previous extraction wrote")
        return record.rows - (before.rows if before is not None else 0)

    def unavailable(self, arch: str) -> str:
        """Why the shared store of `arch` cannot be made with real images here, or "" when it can."""
        if not self.has_fmnist:
            return f"needs real Fashion-MNIST at {self.fmnist_dir}"
        if arch == MOBILENET.arch and not self.has_mobilenet:
            return f"the ImageNet MobileNetV2 file {MOBILENET_FILE} is not installed (make install)"
        return ""

    def shared(self, arch: str) -> Stored:
        """The shared store of `arch` (see SHARED)."""
        size, splits = SHARED[arch]
        return self.stored(arch, size, *(QUICK_SPLITS if self.quick else splits))

    def stored(self, arch: str, image_size: int, n_train: int, n_val: int, n_test: int) -> Stored:
        """A target subset and its feature store, made once per session and shared by the benchmarks."""
        name = f"{arch}-{image_size}-{n_train}-{n_val}-{n_test}"
        if name not in self._stores:
            task = self.subset(n_train, n_val, n_test)
            data_dir, task_meta = self.save(task, name)
            record = self.weights(arch, image_size)
            log(f"extracting {arch} @ {image_size} px features of {len(task.train)}/{len(task.val)}/{len(task.test)}")
            extracted, seconds = self.extract(record, data_dir, task_meta, self.root / "features" / name)
            self._stores[name] = Stored(task, record, extracted, seconds)
        return self._stores[name]


@dataclass(frozen=True)
class Stored:
    """A target subset with its weights record and the extract record of its feature store."""

    task: TaskData
    weights: SourceWeights
    extract: ExtractRecord
    extract_seconds: float

    @property
    def provenance(self) -> dict[str, Any]:
        """The provenance a reader of the cut opens the store with."""
        return self.extract.provenance_for()

    @property
    def preprocess(self) -> Preprocess:
        return self.weights.preprocess

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one row of stored activations at the cut."""
        return tuple(self.extract.tap_shapes[self.extract.cut])

    def features(self, split: str) -> np.ndarray:
        """That split's features read from the store (at the cut), as the train stage reads them."""
        return stored_features(self.extract, self.task.split(split).images)
