"""Typed parameters: params.yaml is read and validated once, then passed down as these objects.

Each top-level section belongs to one DVC stage, one `tasks/<name>.py` module and one task
function of the same name. Unknown keys are errors, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Device = Literal["auto", "cpu", "cuda"]
Strategy = Literal["frozen", "partial", "finetune", "scratch", "auto"]
UpperInit = Literal["pretrained", "random"]
HeadInit = Literal["kaiming", "xavier", "zeros", "ones"]
StoreCodec = Literal["none", "lz4", "zstd-1", "zstd-3"]
"""How the feature store compresses its chunks (headstart.store.CODECS); every one is lossless and crc32c-checked."""
StoreDtype = Literal["float32", "float16"]
"""The stored activations' type: float16 halves the disk and the write, rounding each value (provenance: in the key)."""
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
AugmentName = Literal[
    "RandomResizedCrop", "RandomCrop", "RandomHorizontalFlip", "RandomVerticalFlip", "RandomRotation", "RandomAffine",
    "ColorJitter", "RandomErasing",
]  # fmt: skip
"""torchvision.transforms.v2 classes an augmented view may use (headstart.augment.AUGMENTS)."""
DEFAULT_AUGMENT: list[dict[str, dict[str, Any]]] = [
    {"RandomResizedCrop": {"scale": [0.8, 1.0], "ratio": [0.9, 1.1]}},
    {"RandomHorizontalFlip": {}},
    {"RandomRotation": {"degrees": 10}},
]
AUTO_CUT = "auto"
STORED = ("frozen", "partial")
"""Strategies that train on the extract stage's stored activations."""


def needs_features(strategy: str) -> bool:
    """Whether a run of this strategy reads the feature store (auto may choose a stored strategy)."""
    return strategy in (*STORED, "auto")


class ParamsError(ValueError):
    """A params file or value is invalid; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    """Where the images come from and how they are split into tasks."""

    root: Path | None = None
    """Folder holding the four Fashion-MNIST IDX files (.gz or not); None: Debian's package, then download."""
    image_folder: Path | None = None
    """A user's own target images, one sub-folder per class; replaces FMNIST-1 as the target task."""
    source_labels: list[Annotated[int, Field(ge=0, le=9)]] = [5, 6, 7, 8, 9]
    target_labels: list[Annotated[int, Field(ge=0, le=9)]] = [0, 1, 2, 3, 4]
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    train_fraction: Fraction = 1.0
    """Share of the target's training split used; the subsets are nested (5% lies inside 10%)."""
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    """Image folder: the share held out for testing, drawn per image from its content (Fashion-MNIST has its own)."""
    folder_image_size: Annotated[int, Field(ge=8, le=512)] = 64
    """Image-folder pictures are converted to RGB and made this square size."""
    folder_resize: Annotated[int | None, Field(ge=8, le=1024)] = None
    """Shorter side before the centre crop to folder_image_size (256 for 224, as ImageNet weights); None: stretch."""
    seed: int = 0

    @model_validator(mode="after")
    def _disjoint(self) -> DataParams:
        if self.folder_resize is not None and self.folder_resize < self.folder_image_size:
            raise ValueError(
                f"folder_resize {self.folder_resize} must be at least folder_image_size {self.folder_image_size}"
            )
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1, got {self.val_fraction} + {self.test_fraction}"
            )
        overlap = set(self.source_labels) & set(self.target_labels)
        if overlap:
            raise ValueError(f"source_labels and target_labels must be disjoint; both contain {sorted(overlap)}")
        for name in ("source_labels", "target_labels"):
            labels = getattr(self, name)
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise ValueError(f"{name} must hold at least two distinct labels, got {labels}")
        return self


class OptimParams(_Section):
    """One training loop's settings: Adam, early stopping on validation loss."""

    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 128
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    patience: Annotated[int, Field(ge=1)] = 3
    """Epochs without a better validation loss before training stops; the best epoch is kept."""


class PretrainParams(OptimParams):
    """The source model trained on the source task (FMNIST-2 by default)."""

    arch: str = "fmnist_cnn"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.3
    seed: int = 0
    device: Device = "auto"
    register_as: str = "fmnist-source"


class SourceParams(_Section):
    """A pretrained network to transfer from: its weights, its architecture and where to cut it."""

    weights: str
    """URI: a local path, https://... (sha256 required), torchvision:<model>/<ENUM>, or models:/<name>@<alias>."""
    sha256: str | None = None
    """Full sha256 the weights must have; required for https://, optional elsewhere."""
    arch: str
    cut: str
    """Name of the stage whose output is stored; everything up to it is frozen. `auto`: the architecture's own
    default (a torchvision or timm model's penultimate features)."""
    taps: list[str] = []
    """More stages whose outputs the same forward pass stores beside the cut's: runs and the probe may cut there."""
    image_size: Annotated[int | None, Field(ge=8, le=512)] = None
    """Side of the square the network sees; None: the weights' own (torchvision's crop size, timm's input size)."""

    @property
    def stored_cuts(self) -> list[str]:
        """The cut and the taps (the extract stage orders them as the network does)."""
        return [self.cut, *(t for t in self.taps if t != self.cut)]

    @field_validator("sha256")
    @classmethod
    def _hex64(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v.lower())):
            raise ValueError(f"must be a full sha256 (64 hex digits), got {v!r}")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _https_needs_hash(self) -> SourceParams:
        if self.weights.startswith(("https://", "http://")) and self.sha256 is None:
            raise ValueError(f"weights {self.weights!r} is a URL: pin its sha256")
        return self


class WeightsParams(_Section):
    """How weights are fetched (the sources say what)."""

    retries: Annotated[int, Field(ge=0)] = 3
    timeout_s: Annotated[float, Field(gt=0)] = 60.0


class ExtractParams(_Section):
    """Frozen-feature extraction into the Zarr store."""

    batch_size: Annotated[int, Field(ge=1)] = 250
    chunk_mb: Annotated[float, Field(gt=0)] = 4.0
    """Target size of one Zarr chunk file; rows per chunk are derived from it and the feature size."""
    device: Device = "auto"
    runner: Literal["local", "dask"] = "local"
    """local: one process, chunk after chunk. dask: shards of whole chunks, each a Prefect task on a Dask worker.

    Both give bitwise the same store (the same key: how rows are scheduled is not provenance)."""
    dask_address: str | None = None
    """Scheduler of a running Dask cluster (tcp://host:8786); None: a LocalCluster started and stopped per run."""
    dask_workers: Annotated[int, Field(ge=1)] = 2
    """LocalCluster worker processes (one thread each; each shard runs torch on one thread)."""
    shard_chunks: Annotated[int, Field(ge=1)] = 4
    """Zarr chunks per shard: the unit a worker computes, writes and marks done (a rerun redoes only unmarked ones)."""
    codec: StoreCodec = "zstd-1"
    """Compression of a new store's chunks (bench/extraction_codecs.py measures each). Lossless, so not provenance:
    it is not in the store key, an existing store keeps the codec it was made with, and readers open any."""
    dtype: StoreDtype = "float32"
    """float32: the forward pass's values, bitwise. float16: half the bytes, values rounded to float16 (readers
    get them back as float32); it is provenance, so a float16 store has a key of its own. A source whose
    activations exceed float16's range (65504) is refused: store it as float32."""
    views: Annotated[int, Field(ge=0, le=64)] = 0
    """Augmented views stored per training image besides its plain row (0: none); `train.views: use` trains on
    them. Each is drawn from `augment` with a seed of its own and keyed by image, index and spec (headstart.views),
    so raising it computes only the new views and a changed `augment` recomputes views, never plain rows."""
    augment: list[dict[AugmentName, dict[str, Any]]] = DEFAULT_AUGMENT
    """The pipeline drawing each view: torchvision.transforms.v2 names and their arguments, applied in order."""
    tta: Annotated[int, Field(ge=0, le=9)] = 0
    """Deterministic test-time views stored per test image (flip, corner crops: headstart.augment.TTA_VIEWS), so
    `evaluate.tta` averages a frozen run's predictions over them without running the backbone again."""

    @model_validator(mode="after")
    def _augment_builds(self) -> ExtractParams:
        for i, item in enumerate(self.augment):
            if len(item) != 1:
                raise ValueError(f"augment[{i}]: expected one {{name: arguments}} pair, got {sorted(item)}")
        return self  # the arguments are checked where the pipeline is built (the extract stage, headstart.augment)


class HeadParams(_Section):
    """The new head put on top of the cut: linear when `hidden` is empty, else an MLP."""

    hidden: list[Annotated[int, Field(ge=1)]] = []
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    init: HeadInit = "kaiming"


class FeatureAugmentParams(_Section):
    """Feature-space augmentation of stored spatial activations while a head trains (headstart.feature_augment)."""

    flip: bool = False
    """Mirror each map left-right with probability 1/2."""
    crop: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    """Pad each side by this share of the map (edges replicated), then crop back to its size at a random offset."""
    brightness: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    """Shift each channel by a draw in +-brightness times that channel's spread over the map."""
    contrast: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Scale each channel about its mean by a draw in 1 +- contrast."""


class FinetuneParams(_Section):
    """How a finetune run starts from the pretrained network: the new head first, then every layer (fastai's
    `fine_tune`). A random head's first gradients otherwise flow into the pretrained layers and wreck them: on a
    200-photo folder, finetune all at once scored 40.5% on test where the frozen head scored 100%."""

    head_first: bool = True
    """Train the new head on the frozen body first, as a frozen run trains it (train.frozen; on the store's
    activations at the body's last cut when it holds them, else through the frozen body), then unfreeze."""
    body_lr: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    """Once unfrozen, the pretrained layers train at this share of end_to_end.lr; the head at the full rate."""


class StreamParams(_Section):
    """How a head reads stored activations: loaded whole, or streamed from the store a chunk at a time.

    Both follow one batch order (headstart.order: shuffled chunks, rows shuffled within a window),
    so the mode changes memory and speed, never a metric; the window is part of the order.
    """

    mode: Literal["auto", "always", "never"] = "auto"
    """auto: stream a split whose activations exceed window_mb, load a smaller one; always: stream; never: load."""
    window_mb: Annotated[float, Field(gt=0)] = 1024.0
    """Rows shuffled together (their activations' MiB). A split that fits is one window: one permutation of it.
    Streaming holds about two windows plus `read_ahead` chunks, whatever the store's size."""
    read_ahead: Annotated[int, Field(ge=1)] = 4
    """Chunks a background thread decodes ahead of training (speed only: the order does not depend on it)."""


class GridParams(_Section):
    """A frozen run's grid of heads: every learning rate x cut x head width (and a logistic regression per cut).

    The heads of one cut train together, one read of its stored activations stepping them all; the
    best on validation is the run's network. An axis left empty takes the run's own value, so `{}`
    is the run's single head.
    """

    lrs: list[Annotated[float, Field(gt=0.0)]] = []
    """Adam learning rates; empty: train.frozen.lr."""
    cuts: list[str] = []
    """Stored cuts of the run's source (its cut and taps); empty: the run's cut."""
    hidden: list[list[Annotated[int, Field(ge=1)]]] = []
    """Head widths, each a `train.head.hidden` ([] is linear); empty: train.head.hidden."""
    logreg: bool = False
    """Also a logistic regression per cut: a zero-initialised linear head on the flattened activations, L2 below."""
    logreg_c: Annotated[float, Field(gt=0.0)] = 1.0
    """Inverse L2 strength as scikit-learn's LogisticRegression(C): Adam weight decay 1 / (C x training rows)."""

    @field_validator("lrs", "cuts", "hidden")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len({str(v) for v in values}) != len(values):
            raise ValueError(f"must hold distinct values, got {values}")
        return values


class RunParams(_Section):
    """One transfer experiment: which source, which strategy (docs/choosing-a-strategy.md)."""

    source: str
    strategy: Strategy
    cut: str | None = None
    """frozen/partial: the stored cut to train on (one of the source's cut and taps); None: the source's cut."""
    upper_init: UpperInit = "pretrained"
    """partial: the source layers above the cut start from its weights, or are re-initialised at random."""
    baseline: bool = False
    """Also train scratch on the same data and flag negative transfer when it wins on validation (auto: always)."""
    grid: GridParams | None = None
    """frozen: train a grid of heads in one pass per cut and keep the best on validation; None: one head."""

    @model_validator(mode="after")
    def _cut_applies(self) -> RunParams:
        if self.cut is not None and self.strategy not in ("frozen", "partial"):
            raise ValueError(f"cut {self.cut!r} applies to frozen and partial runs, not {self.strategy}")
        if self.grid is not None and self.strategy != "frozen":
            raise ValueError(f"grid applies to frozen runs (heads on stored activations), not {self.strategy}")
        if self.grid is not None and self.grid.cuts and self.cut is not None:
            raise ValueError(f"set the cut once: cut {self.cut!r} or grid.cuts {self.grid.cuts}")
        return self

    @property
    def cuts(self) -> list[str | None]:
        """The stored cuts the run reads (None: the source's cut)."""
        return list(self.grid.cuts) if self.grid is not None and self.grid.cuts else [self.cut]


class TrainParams(_Section):
    runs: dict[str, RunParams]
    head: HeadParams = HeadParams()
    frozen: OptimParams = OptimParams(epochs=30, batch_size=256, lr=1e-3, weight_decay=1e-4, patience=4)
    """The head trained on stored features."""
    end_to_end: OptimParams = OptimParams(epochs=6, batch_size=128, lr=1e-3, patience=2)
    """Fine-tune and scratch: the whole network trains on images."""
    finetune: FinetuneParams = FinetuneParams()
    """How finetune starts from the pretrained weights: the head first, then the body at a lower rate."""
    partial: OptimParams = OptimParams(epochs=10, batch_size=128, lr=1e-3, patience=3)
    """The source layers above the cut plus the head, trained on the stored activations at the cut."""
    seed: int = 0
    device: Device = "auto"
    class_weights: Literal["auto", "none"] = "none"
    """auto: each class's loss term weighted by its inverse frequency in the training split (unbalanced folders)."""
    reject: Annotated[float, Field(gt=0.0, lt=0.5)] | None = None
    """Answer "none" below a calibrated confidence that rejects this share of the validation images; None: never."""
    stream: StreamParams = StreamParams()
    """How frozen and partial runs (and the sweep's cells) read the stored activations."""
    feature_augment: FeatureAugmentParams = FeatureAugmentParams()
    """Frozen and partial runs: cheap random changes to the stored activation maps of each training batch (FroFA)."""
    views: Literal["use", "ignore"] = "use"
    """use: frozen and partial runs draw, per image and epoch, its plain row or one of the store's augmented views
    (extract.views), seeded; ignore: the plain rows only. Without stored views both are the plain training."""

    @field_validator("runs")
    @classmethod
    def _names(cls, runs: dict[str, RunParams]) -> dict[str, RunParams]:
        for name in runs:
            if not name or any(not (c.isalnum() or c in "-_") for c in name):
                raise ValueError(f"run name {name!r} may hold only letters, digits, '-' and '_'")
        return runs


class EvaluateParams(_Section):
    register_as: str = "fmnist-transfer"
    tta: Annotated[int, Field(ge=0, le=9)] = 0
    """Test-time augmentation: also report accuracy with each test image's probabilities averaged over its plain
    form and its first N deterministic views (a frozen run reads them from the store: extract.tta >= N)."""
    stream: StreamParams = StreamParams()
    """How a frozen run's stored test activations are read (predictions do not depend on it)."""


class AdviseParams(_Section):
    """The strategy advisor: a probe per stored cut, the target's size and similarity, the 2x2 table."""

    probe_per_class: Annotated[int, Field(ge=2)] = 200
    """Training images per class for each probe (a stratified subset); every probe is scored on validation."""
    probe: OptimParams = OptimParams(epochs=40, batch_size=64, lr=1e-3, weight_decay=1e-4, patience=5)
    """The probe: a linear head on one cut's stored activations (or on raw pixels, the reference)."""
    small_per_class: Annotated[int, Field(ge=1)] = 1000
    """Fewer training images per class than this is a small target."""
    similar_gain: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    """The source is similar when its best probe removes at least this share of the untrained network's probe errors."""
    seed: int = 0
    device: Device = "auto"
    stream: StreamParams = StreamParams()
    """How the probes read the stored activations."""


SweepStrategy = Literal["frozen", "partial", "finetune", "scratch", "frozen+views", "partial+views"]
"""Strategies a sweep cell can train: the train stage's, less `auto` (the sweep compares them all); `+views`
trains the stored strategy on the store's augmented views (extract.views), beside the plain one."""
VIEWS_SUFFIX = "+views"


def base_strategy(strategy: str) -> str:
    """The training strategy of a sweep strategy: frozen+views trains as frozen, drawing stored views."""
    return strategy.removesuffix(VIEWS_SUFFIX)


BEST_CUT = "best"
"""`sweep.cut` value: the stored cut the advise stage's probe ranks first for the sweep's source."""


class SweepParams(_Section):
    """The Fashion-MNIST experiment: each strategy on nested fractions of the target's training split, per seed."""

    source: str = "fmnist"
    """The source transferred from (a key of `sources`); frozen and partial cells use its stored activations."""
    cut: str = BEST_CUT
    """Where frozen and partial cells cut: `best` (the advise stage's probe ranking, on the whole training
    split, chosen once for every fraction) or one of the source's stored cuts (its cut and taps)."""
    fractions: list[Fraction] = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0]
    """Shares of the training split; nested, so each fraction's images include the smaller ones'."""
    strategies: list[SweepStrategy] = ["frozen", "partial", "finetune", "scratch"]
    seeds: list[int] = [0]
    """One cell per seed: the seed draws the subset, initialises the new layers and shuffles the batches."""

    @field_validator("fractions", "strategies", "seeds")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if not values or len(set(values)) != len(values):
            raise ValueError(f"must be a non-empty list of distinct values, got {values}")
        return values


class Params(_Section):
    """The whole params.yaml."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")] = "headstart"
    """The project's name: the MLflow experiment every stage logs to (no stage's output depends on it)."""
    data: DataParams = DataParams()
    pretrain: PretrainParams = PretrainParams()
    sources: dict[str, SourceParams]
    weights: WeightsParams = WeightsParams()
    extract: ExtractParams = ExtractParams()
    train: TrainParams
    evaluate: EvaluateParams = EvaluateParams()
    sweep: SweepParams = SweepParams()
    advise: AdviseParams = AdviseParams()

    @property
    def needs_pretrain(self) -> bool:
        """The source model (and its Fashion-MNIST source task) is made only when a source uses it."""
        own = ("models/source/model.safetensors", f"models:/{self.pretrain.register_as}")
        return any(s.weights.startswith(own) for s in self.sources.values())

    @model_validator(mode="after")
    def _sweep_source(self) -> Params:
        if "sweep" not in self.model_fields_set:
            return self
        if self.sweep.source not in self.sources:
            raise ValueError(f"sweep.source is {self.sweep.source!r}; expected one of {sorted(self.sources)}")
        stored = self.sources[self.sweep.source].stored_cuts
        if self.sweep.cut != BEST_CUT and self.sweep.cut not in stored:
            raise ValueError(
                f"sweep.cut is {self.sweep.cut!r}; expected {BEST_CUT!r} or one of {stored}, the cuts source "
                f"{self.sweep.source!r} stores (add it to sources.{self.sweep.source}.taps)"
            )
        return self

    @model_validator(mode="after")
    def _runs_name_sources(self) -> Params:
        for name, run in self.train.runs.items():
            if run.source not in self.sources:
                raise ValueError(f"train.runs.{name}.source is {run.source!r}; expected one of {sorted(self.sources)}")
            stored = self.sources[run.source].stored_cuts
            key = "grid.cuts" if run.grid is not None and run.grid.cuts else "cut"
            for cut in run.cuts:
                if cut is not None and cut not in stored:
                    raise ValueError(
                        f"train.runs.{name}.{key} holds {cut!r}; source {run.source!r} stores {stored} "
                        f"(add it to sources.{run.source}.taps)"
                    )
        return self

    @model_validator(mode="after")
    def _tta_is_stored(self) -> Params:
        """A frozen run's test-time views come from the store: refused at load, not after training."""
        frozen = [n for n, r in self.train.runs.items() if r.strategy in ("frozen", "auto")]
        if frozen and self.evaluate.tta > self.extract.tta:
            raise ValueError(
                f"evaluate.tta is {self.evaluate.tta} and extract.tta {self.extract.tta}: frozen run(s) {frozen} "
                f"average test-time views from the store; set extract.tta to {self.evaluate.tta} or more"
            )
        return self


def _format_error(path: Path | str, err: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        got = e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {e['msg']}{got_text}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], origin: Path | str = "<params>") -> Params:
    """Validate a params mapping; errors name the origin and every bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(origin, err)) from None


def load_params(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read params.yaml once; `overrides` maps dotted keys ("train.head.init") to values."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return parse_params(raw, path)


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set raw["a"]["b"] = value for "a.b", creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {dotted}: {key!r} is not a section")
    node[leaf] = value
