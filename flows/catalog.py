"""`headstart backbones`: the architectures a source can name, their cut points with activation shapes, local weights.

Staged architectures (headstart.backbones) list every cut; any torchvision classifier and any
`timm:<name>` is a library model with one cut, `penultimate`. Weights in the torch hub cache are
checked against the hash prefix torchvision puts in their file names.
"""

from __future__ import annotations

from pathlib import Path

import torchvision

from headstart.backbones import ARCHITECTURES, create_model, feature_shape, get_architecture
from headstart.download import matches
from headstart.fingerprint import sha256_file
from headstart.images import Preprocess
from headstart.uris import HASH_IN_NAME


def cut_shapes(arch: str, image_size: int) -> tuple[int, dict[str, tuple[int, ...]]]:
    """The size used and each cut point of `arch` with one image's activation shape there.

    An architecture that takes one input size only (fmnist_cnn: 28 px) is shown at that size.
    """
    spec = get_architecture(arch)
    net = create_model(arch, 2)
    for size in (image_size, spec.image_size):
        pre = Preprocess(image_size=size, channels=spec.channels, mean=spec.mean, std=spec.std)
        try:
            return size, {cut: feature_shape(net, cut, pre) for cut in net.cut_names}
        except RuntimeError:
            continue
    raise ValueError(f"{arch}: no activation shapes at {image_size} or {spec.image_size} px")


def local_weights(torch_home: Path) -> dict[str, bool]:
    """Weights files in the torch hub cache -> whether their sha256 starts with the prefix in their name."""
    found = {}
    for path in sorted((torch_home / "hub" / "checkpoints").glob("*")):
        m = HASH_IN_NAME.search(path.name)
        if path.is_file() and m:
            found[path.name] = matches(sha256_file(path), m.group(1))
    return found


def catalog_text(image_size: int, torch_home: Path, model: str | None = None) -> str:
    """The listing `headstart backbones` prints."""
    lines = []
    names = [model] if model else sorted(n for n in ARCHITECTURES if ":" not in n)
    for name in names:
        size, shapes = cut_shapes(name, image_size)
        lines.append(f"{name} ({len(shapes)} cut points at {size} px):")
        lines += [f"  {cut:<14} {'x'.join(map(str, shape))}" for cut, shape in shapes.items()]
    if model is None:
        count = len(torchvision.models.list_models(module=torchvision.models))
        lines.append(
            f"and any of torchvision's {count} classification models (torchvision.models.list_models()) or "
            "timm:<model_name>, cut at `penultimate` (`cut: auto`); `headstart backbones --model resnet50` shows one"
        )
    weights = local_weights(torch_home)
    lines.append(f"weights in {torch_home / 'hub' / 'checkpoints'}:" if weights else f"no weights in {torch_home}")
    lines += [f"  {name}  {'verified' if ok else 'HASH MISMATCH: delete it'}" for name, ok in weights.items()]
    return "\n".join(lines)
