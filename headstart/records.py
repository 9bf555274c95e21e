"""The stages' records: what each stage hands the next, one frozen model per stage, written as JSON.

A record is the file contract between stages (a DVC out of its stage, a dep of the next) and the
value a Prefect task returns. It holds content only: paths relative to the project (a copied
project keeps working), fingerprints, the settings readers need, and `key`, the content key of
the inputs that produced it. Run ids, registry versions and timings are not here: they change on
every run and would make the other orchestrator see a change that is not there (they live in
MLflow, found again by the record's key).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict

from headstart.env import project_root
from headstart.files import atomic_path
from headstart.fingerprint import sha256_file
from headstart.images import Decode, Preprocess


def relative(path: Path | str) -> str:
    """A path as records hold it: relative to the project when inside it, else absolute (never moved with it)."""
    p = Path(path)
    p = p if p.is_absolute() else project_root() / p
    try:
        return p.resolve().relative_to(project_root()).as_posix()
    except ValueError:
        return str(p.resolve())


def absolute(path: str) -> Path:
    """A record's path on this machine: resolved against the current project root."""
    p = Path(path)
    return p if p.is_absolute() else project_root() / p


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def text(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def write(self, path: Path) -> None:
        """Atomically, and not at all when the bytes are the same: a warm run leaves every file untouched."""
        text = self.text()
        if path.is_file() and path.read_text() == text:
            return
        tmp = atomic_path(path)
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def read(cls, path: Path) -> Self:
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing; run the stage that writes it first (dvc repro)") from None
        except ValueError as err:
            raise ValueError(f"{path}: not a valid {cls.__name__}: {err}") from None


class Output(Record):
    """A file a stage wrote and the sha256 it must still have for its record to be trusted."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: Path) -> Output:
        return cls(path=relative(path), sha256=sha256_file(path))

    def intact(self) -> bool:
        p = absolute(self.path)
        return p.is_file() and sha256_file(p) == self.sha256


class StageRecord(Record):
    """A record a stage wrote: the key of its inputs and the files it wrote."""

    key: str = ""
    """Content key of the inputs (stage name, its code version, params, upstream records); set by the runner."""
    outputs: list[Output] = []
    inputs: dict[str, str] = {}
    """The key's parts, a short hash each (every argument, every code file): what `headstart status` compares."""

    def intact(self) -> bool:
        return all(o.intact() for o in self.outputs)


class RawRecord(Record):
    """What the raw data is right now: each file's sha256 (the raw stage; no key: it is the content)."""

    fmnist_origin: str
    """root, system or download: where the Fashion-MNIST IDX files are read from; none when not needed."""
    fmnist: dict[str, str]
    """IDX file name -> sha256 (download: the md5 the download is verified against, as `md5:<hex>`)."""
    image_folder: dict[str, str] | None = None
    """Image-folder file (relative to the folder) -> sha256; None without an image folder."""


class TaskMeta(Record):
    """One task's file form (`<name>.json` beside `<name>.npz`)."""

    name: str
    class_names: list[str]
    counts: dict[str, int]
    class_counts: dict[str, dict[str, int]] = {}
    """Split -> class name -> images."""
    fingerprint: str
    decode: Decode
    """How an image file becomes one of this task's images: the decoding a model trained on it keeps."""
    data_version: str | None = None
    """The image folder's DVC hash (as `dvc add` records it), or None for Fashion-MNIST: the lineage MLflow shows."""
    data_params: dict[str, Any] = {}
    """The data section the task was made with (logged as every training run's `data.*` params)."""


class DataRecord(StageRecord):
    origin: str
    """root, system or download: where Fashion-MNIST was read from; none when no task comes from it."""
    source: TaskMeta | None
    """The source task (FMNIST-2), made only when a source network is pretrained on it."""
    target: TaskMeta


class PretrainRecord(StageRecord):
    path: str
    sha256: str
    arch: str
    test_accuracy: float
    epochs: int
    best_epoch: int


class SourceWeights(Record):
    """One source's verified weights: everything `sources.load_source` needs to rebuild the network."""

    source: str
    uri: str
    path: str
    sha256: str
    arch: str
    cut: str
    preprocess: Preprocess

    def local(self) -> Path:
        return absolute(self.path)


class WeightsRecord(StageRecord):
    sources: dict[str, SourceWeights]


class ExtractRecord(StageRecord):
    """A source's feature store: where it is, which taps it holds, and the provenance it was written with.

    Readers open the store with `provenance_for(taps)`: nothing rebuilds a provenance by hand. The
    record is trusted as current because it is a dependency of every reader under both
    orchestrators (a changed extractor reruns the extract stage, which writes a new record).
    """

    source: str
    store: str
    store_key: str
    rows: int
    cut: str
    taps: list[str]
    tap_shapes: dict[str, list[int]]
    provenance: dict[str, Any]
    """The writer's provenance (weights sha256, arch, every tap, preprocessing, code version, torch)."""
    views: int = 0
    """Augmented views stored per training image (extract.views), keyed with `augment_digest` (headstart.views)."""
    augment_digest: str | None = None
    tta: int = 0
    """Deterministic test-time views stored per test image (extract.tta): the first `tta` of TTA_VIEWS."""

    def provenance_for(self, taps: str | list[str] | None = None) -> dict[str, Any]:
        """The provenance a reader of `taps` (default: the source's cut) opens the store with."""
        taps = taps or self.cut
        return {**self.provenance, "taps": [taps] if isinstance(taps, str) else list(taps)}

    @property
    def weights_sha256(self) -> str:
        return self.provenance["weights_sha256"]

    def store_dir(self) -> Path:
        return absolute(self.store)


class Recommendation(Record):
    strategy: str
    cut: str
    upper_init: str = "pretrained"
    why: str


class AdviseRecord(StageRecord):
    """The advisor's measurements and recommendation for one source (also `dvc metrics`)."""

    source: str
    samples_per_class: int
    num_classes: int
    probe_rows: int
    val_rows: int
    cuts: dict[str, dict[str, int | float]]
    untrained: dict[str, dict[str, int | float]]
    pixels: dict[str, int | float]
    ranking: list[str]
    similarity: float
    thresholds: dict[str, int | float]
    size: str
    domain: str
    quadrant: str
    recommendation: Recommendation


class TrainRecord(StageRecord):
    run_name: str
    strategy: str
    """As asked (auto included)."""
    chosen: str
    """What auto chose (else the strategy)."""
    trained: str
    """What the saved network is (scratch when auto's baseline won)."""
    cut: str | None
    source: str
    path: str
    sha256: str
    weights_sha256: str
    val_accuracy: float
    val_loss: float
    epochs: int
    best_epoch: int
    transfer_val_accuracy: float
    baseline_val_accuracy: float | None = None
    negative_transfer: bool | None = None
    head_distinct_units: int | None = None
    temperature: float = 1.0
    """The calibration temperature fitted on validation (the model's spec holds it too)."""
    reject_below: float | None = None
    """The calibrated confidence below which the model answers "none" (train.reject), or None."""
    grid_cell: str | None = None
    """A grid run's chosen cell (`block2-256-lr0.001`; every cell's figures are in history.json), or None."""


class EvaluateRecord(StageRecord):
    run_name: str
    test_accuracy: float
    balanced_accuracy: float
    """Mean recall over the classes: an unbalanced test split's fair figure."""
    macro_f1: float
    ece: float
    """Expected calibration error of the raw probabilities on the test split."""
    ece_calibrated: float
    """The same after temperature scaling: what `headstart predict` answers."""
    tta_accuracy: float | None = None
    """With evaluate.tta: accuracy of the probabilities averaged over each test image and its test-time views."""
