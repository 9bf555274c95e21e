"""Any torchvision or timm classifier as a headstart architecture: its penultimate features, then a new classifier.

The libraries own their models: torchvision's registry (`list_models`, `get_model`) and timm's
(`create_model`, `pretrained_cfg`). headstart does not re-describe their layers; it cuts every
such model where the libraries themselves do for transfer, at the penultimate features (the
input of the final linear layer; timm's `num_classes=0`), the one cut point `penultimate` (also
what `cut: auto` names). Frozen and finetune runs work on all of them; `partial` needs the layers
above a cut as stages, which the hand-staged architectures (headstart.backbones) have.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from headstart.backbones import CLASSIFIER, IMAGENET_MEAN, IMAGENET_STD, Architecture, StagedNet

PENULTIMATE = "penultimate"
TIMM = "timm:"


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no linear classifier to cut below")
    return found[-1]


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    *parents, leaf = dotted.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, leaf, new)


def penultimate_body(model: nn.Module) -> tuple[nn.Module, int]:
    """The model with its final linear layer replaced by the identity, and that layer's input width."""
    name, linear = _last_linear(model)
    _replace(model, name, nn.Identity())
    return model, linear.in_features


def _staged(body: nn.Module, width: int, num_classes: int, dropout: float) -> StagedNet:
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
    return StagedNet({PENULTIMATE: body, CLASSIFIER: head})


def _architecture(name: str, make: Callable[[], nn.Module], body_of: Callable[[nn.Module], tuple[nn.Module, int]],
                  mean: tuple[float, ...], std: tuple[float, ...], image_size: int = 224) -> Architecture:  # fmt: skip
    def build(num_classes: int, dropout: float) -> StagedNet:
        body, width = body_of(make())
        return _staged(body, width, num_classes, dropout)

    def native_state(net: StagedNet, state_dict: dict[str, torch.Tensor]) -> None:
        model = make()
        model.load_state_dict(state_dict, strict=True)
        body, _ = body_of(model)
        net.stages[PENULTIMATE].load_state_dict(body.state_dict(), strict=True)

    return Architecture(
        name=name, build=build, channels=3, mean=mean, std=std, default_cut=PENULTIMATE, native_state=native_state,
        image_size=image_size,
    )  # fmt: skip


def torchvision_architecture(model_name: str) -> Architecture:
    """A torchvision classification model (`torchvision.models.list_models(module=torchvision.models)`)."""
    import torchvision  # on first use: it costs 1.5 s to import (its ops load torch._dynamo)

    return _architecture(
        model_name,
        lambda: torchvision.models.get_model(model_name, weights=None),
        penultimate_body,
        IMAGENET_MEAN,
        IMAGENET_STD,
    )


def timm_architecture(arch: str) -> Architecture:
    """`timm:<model_name>`: built by timm (no download: the weights come from the weights stage)."""
    import timm
    from timm.models import get_pretrained_cfg

    model_name = arch.removeprefix(TIMM)
    if not timm.list_models(model_name):
        raise KeyError(f"unknown timm model {model_name!r} (timm {timm.__version__}: see timm.list_models())")
    found = get_pretrained_cfg(model_name)  # timm's registry entry: no model is built to read it
    cfg = found.to_dict() if found is not None else {}

    def body_of(model: nn.Module) -> tuple[nn.Module, int]:
        model.reset_classifier(0)
        return model, model.num_features

    return _architecture(
        arch,
        lambda: timm.create_model(model_name, pretrained=False),
        body_of,
        tuple(cfg.get("mean", IMAGENET_MEAN)),
        tuple(cfg.get("std", IMAGENET_STD)),
        int(cfg.get("input_size", (3, 224, 224))[-1]),
    )


def library_architecture(name: str) -> Architecture | None:
    """The architecture a library name means (`resnet50`, `timm:convnext_tiny`), or None when no library has it."""
    import torchvision  # on first use: it costs 1.5 s to import (its ops load torch._dynamo)

    if name.startswith(TIMM):
        return timm_architecture(name)
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision_architecture(name)
    return None
