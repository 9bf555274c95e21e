"""Architectures as named stages, one registry, one factory (`create_model`).

Every network is a `StagedNet`: an ordered list of named stages whose last one is
`classifier`. A cut point is a stage name; `upto(cut)` is the frozen body, `between(cut)`
the source layers above it, and a new head replaces `classifier`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from headstart.images import Preprocess

CLASSIFIER = "classifier"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(images: np.ndarray | torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """uint8 images (N,H,W) grey or (N,H,W,3) RGB -> float32 (N, channels, size, size).

    The documented conversions: grey is repeated into three channels for an RGB network, RGB is
    averaged to grey for a grey one, and any side is resized (bilinear) to the network's square.
    Anything else (alpha or other channel counts, other ranks) is refused, naming the shape.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise ValueError(
            f"images of shape {tuple(x.shape)}: expected (n, H, W) grey or (n, H, W, 3) RGB uint8 "
            f"(the network takes {spec.channels} channel(s) at {spec.image_size} px; headstart.images decodes files)"
        )
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    if x.shape[1] == 1 and spec.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and spec.channels == 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != spec.image_size or x.shape[-2] != spec.image_size:
        x = F.interpolate(x, size=(spec.image_size, spec.image_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


class StagedNet(nn.Module):
    """A network as named stages run in order."""

    def __init__(self, stages: Mapping[str, nn.Module]):
        super().__init__()
        self.stages = nn.ModuleDict(OrderedDict(stages))

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    @property
    def cut_names(self) -> list[str]:
        """Stages one may cut after: all but the classifier."""
        return [n for n in self.stage_names if n != CLASSIFIER]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages.values():
            x = stage(x)
        return x

    def _index(self, cut: str) -> int:
        if cut not in self.cut_names:
            raise KeyError(f"unknown cut point {cut!r}; expected one of {self.cut_names}")
        return self.stage_names.index(cut)

    def upto(self, cut: str) -> StagedNet:
        """The stages up to and including `cut` (shared modules, not copies)."""
        i = self._index(cut)
        return StagedNet({n: self.stages[n] for n in self.stage_names[: i + 1]})

    def between(self, cut: str) -> StagedNet:
        """The source's stages after `cut`, without its classifier (empty at the last cut)."""
        i = self._index(cut)
        return StagedNet({n: self.stages[n] for n in self.cut_names[i + 1 :]})

    def with_classifier(self, head: nn.Module) -> StagedNet:
        """The same stages with `classifier` replaced (or added) by `head`."""
        stages = {n: m for n, m in self.stages.items() if n != CLASSIFIER}
        return StagedNet({**stages, CLASSIFIER: head})


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: how to build it and how its images are prepared by default."""

    name: str
    build: Callable[[int, float], StagedNet]
    """(num_classes, dropout) -> StagedNet with freshly initialised weights."""
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_cut: str
    native_state: Callable[[StagedNet, dict[str, torch.Tensor]], None] | None = None
    """Loads a state dict saved in the architecture's native key layout (torchvision's), if any."""
    image_size: int = 224
    """The input side its weights are usually evaluated at (a source's image_size: None takes it)."""


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    """A registered architecture, else any torchvision classifier or `timm:<name>` (registered on first use)."""
    if name not in ARCHITECTURES:
        from headstart.library_backbones import library_architecture  # it builds on this module

        found = library_architecture(name)
        if found is None:
            raise KeyError(
                f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}, a torchvision "
                "classification model (torchvision.models.list_models()) or timm:<model_name>"
            )
        register(found)
    return ARCHITECTURES[name]


def create_model(
    arch: str,
    num_classes: int,
    *,
    dropout: float = 0.0,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> StagedNet:
    """Build `arch`; with `state_dict`, load it first (our staged keys or torchvision's native keys).

    `num_classes` sizes the classifier; when a state dict is given its classifier is loaded
    only if the sizes agree (a transfer replaces it anyway).
    """
    spec = get_architecture(arch)
    net = spec.build(num_classes, dropout)
    if state_dict is not None:
        load_state(net, spec, state_dict)
    return net


def load_state(net: StagedNet, spec: Architecture, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights strictly except for a classifier of another size; errors name the missing keys."""
    if any(k.startswith("stages.") for k in state_dict):
        own = net.state_dict()
        body = {k: v for k, v in state_dict.items() if not k.startswith(f"stages.{CLASSIFIER}.")}
        head = {k: v for k, v in state_dict.items() if k.startswith(f"stages.{CLASSIFIER}.")}
        if all(k in own and own[k].shape == v.shape for k, v in head.items()):
            body.update(head)
        missing = sorted(k for k in own if k not in body and not k.startswith(f"stages.{CLASSIFIER}."))
        unexpected = sorted(k for k in body if k not in own)
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit architecture {spec.name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        net.load_state_dict(body, strict=False)
    elif spec.native_state is not None:
        spec.native_state(net, state_dict)
    else:
        raise ValueError(f"weights for {spec.name!r} must use staged keys ('stages.<name>....')")


def feature_shape(net: StagedNet, cut: str, pre: Preprocess) -> tuple[int, ...]:
    """Shape of one sample's activation at `cut` (computed with a dummy forward)."""
    body = net.upto(cut)
    was_training = body.training
    body.eval()
    with torch.no_grad():
        out = body(torch.zeros(1, pre.channels, pre.image_size, pre.image_size))
    body.train(was_training)
    return tuple(out.shape[1:])


# --- the source CNN -------------------------------------------------------------------------


def _fmnist_cnn(num_classes: int, dropout: float) -> StagedNet:
    return StagedNet(
        {
            "block1": nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            "block2": nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            "fc1": nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(dropout)),
            CLASSIFIER: nn.Linear(128, num_classes),
        }
    )


register(
    Architecture(
        name="fmnist_cnn",
        build=_fmnist_cnn,
        channels=1,
        mean=(0.5,),
        std=(0.5,),
        default_cut="block2",
        image_size=28,
    )
)


# --- torchvision backbones --------------------------------------------------------------------


def _pool() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _mobilenet_v2_stages(m: nn.Module, num_classes: int, dropout: float) -> StagedNet:
    stages: dict[str, nn.Module] = {f"features_{i}": layer for i, layer in enumerate(m.features)}
    stages["pool"] = _pool()
    stages[CLASSIFIER] = nn.Sequential(nn.Dropout(dropout), nn.Linear(m.last_channel, num_classes))
    return StagedNet(stages)


def _mobilenet_v3_small_stages(m: nn.Module, num_classes: int, dropout: float) -> StagedNet:
    stages: dict[str, nn.Module] = {f"features_{i}": layer for i, layer in enumerate(m.features)}
    stages["pool"] = _pool()
    stages["pre_logits"] = nn.Sequential(m.classifier[0], m.classifier[1], nn.Dropout(dropout))
    stages[CLASSIFIER] = nn.Linear(m.classifier[3].in_features, num_classes)
    return StagedNet(stages)


def _resnet18_stages(m: nn.Module, num_classes: int, dropout: float) -> StagedNet:
    stages: dict[str, nn.Module] = {"stem": nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stages[name] = getattr(m, name)
    stages["pool"] = _pool()
    stages[CLASSIFIER] = nn.Sequential(nn.Dropout(dropout), nn.Linear(m.fc.in_features, num_classes))
    return StagedNet(stages)


def _torchvision(name: str, to_stages: Callable[[nn.Module, int, float], StagedNet], default_cut: str) -> None:
    """Register a torchvision model; native (torchvision-keyed) weights load into its own modules."""

    def build(num_classes: int, dropout: float) -> StagedNet:
        import torchvision  # on first use: it costs 1.5 s to import (its ops load torch._dynamo)

        return to_stages(torchvision.models.get_model(name, weights=None), num_classes, dropout)

    def native_state(net: StagedNet, state_dict: dict[str, torch.Tensor]) -> None:
        import torchvision  # on first use: it costs 1.5 s to import (its ops load torch._dynamo)

        m = torchvision.models.get_model(name, weights=None)
        m.load_state_dict(state_dict, strict=True)
        staged = to_stages(m, 1, 0.0)
        own = net.state_dict()
        body = {k: v for k, v in staged.state_dict().items() if not k.startswith(f"stages.{CLASSIFIER}.")}
        net.load_state_dict({**own, **body}, strict=True)

    register(
        Architecture(
            name=name,
            build=build,
            channels=3,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            default_cut=default_cut,
            native_state=native_state,
        )
    )


_torchvision("mobilenet_v2", _mobilenet_v2_stages, "pool")
_torchvision("mobilenet_v3_small", _mobilenet_v3_small_stages, "pool")
_torchvision("resnet18", _resnet18_stages, "pool")
