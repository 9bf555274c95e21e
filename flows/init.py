"""`headstart init`: a ready project from a folder of images (or the Fashion-MNIST example), git and DVC included.

The project holds its data (`images/`, tracked by `dvc add`, so every data version can be checked
out again), its params, its generated dvc.yaml and a README of what to type next; headstart's code
stays where it is installed (the stages' code deps are its files, by absolute path).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from flows import dvcyaml
from headstart.codeversion import PROJECT
from headstart.config import DataParams, parse_params
from headstart.datasets import SPLITS
from headstart.folder import scan_folder
from headstart.images import Decode
from tasks.data import read_image_folder

PINNED_SHA256 = {
    "torchvision:mobilenet_v2/IMAGENET1K_V1": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
}
"""Full sha256 of weights headstart has checked; others are trusted on first use against the hash in their name."""
EXAMPLES = ("fashion-mnist",)
GITIGNORE = """\
# tools' state, kept in the project (headstart/env.py); DVC adds its cached outputs to .gitignore files itself,
# and leaves the small records and metrics (cache: false) to git, so `dvc exp show` and `metrics diff` read them
.prefect/
.torch/
.cache/
mlflow.db
mlflow.db.lock
mlartifacts/
dvc_plots/
"""
DVCIGNORE = "**/*.partial\n"


def project_name(dest: Path) -> str:
    """The folder's name as an MLflow experiment and registered-model name (letters, digits, - and _)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", dest.resolve().name).strip("-")
    return name or "headstart-project"


def check_images(folder: Path, data: DataParams) -> dict[str, int]:
    """Refuse a folder the pipeline cannot train on, naming every unreadable file; the image count per class.

    It is the data stage's own reading (decoded small), so `init` refuses exactly what `run` would.
    """
    task = read_image_folder(folder, Decode(mode="RGB", size=8), data)
    counts = task.class_counts()
    return {c: sum(counts[s][c] for s in SPLITS) for c in task.class_names}


NONE_CLASSES = {"none", "other", "others", "unknown"}
"""A class folder of these names is the user's own "none of these": no rejection threshold is added."""


def backbone_source(backbone: str, image_size: int | None) -> tuple[dict[str, Any], int]:
    """A source entry for a torchvision model with its DEFAULT ImageNet weights, and the resize side before the crop.

    The crop and resize sides are the weights' own evaluation transforms' (224 and 256 for most);
    `image_size` replaces the crop side, the resize side scaled with it.
    """
    import torchvision

    from headstart.backbones import get_architecture

    try:
        enum = torchvision.models.get_model_weights(backbone)
    except ValueError:
        raise ValueError(
            f"unknown backbone {backbone!r}; expected a torchvision classification model such as mobilenet_v2, "
            "resnet50, efficientnet_b0 or convnext_tiny (torchvision.models.list_models()); for timm models edit "
            "sources in params.yaml"
        ) from None
    pinned = [uri.rsplit("/", 1)[1] for uri in PINNED_SHA256 if uri.startswith(f"torchvision:{backbone}/")]
    member = enum[pinned[0]] if pinned else enum.DEFAULT  # weights headstart checked (make install provides them)
    transforms = member.transforms()
    crop, resize = int(transforms.crop_size[0]), int(transforms.resize_size[0])
    if image_size is not None:
        crop, resize = image_size, round(image_size * resize / crop)
    uri = f"torchvision:{backbone}/{member.name}"
    source = {"weights": uri, "arch": backbone, "cut": get_architecture(backbone).default_cut, "image_size": crop}
    if uri in PINNED_SHA256:
        source["sha256"] = PINNED_SHA256[uri]
    return source, resize


def folder_params(name: str, backbone: str, image_size: int | None, classes: list[str]) -> dict[str, Any]:
    """params.yaml of a project on its own images: one ImageNet source, runs named after their strategy.

    Without a none/other class folder, the models answer "none" below a confidence that rejects 5%
    of the validation images (train.reject).
    """
    source, resize = backbone_source(backbone, image_size)
    return {
        "name": name,
        "data": {
            "image_folder": "images",
            "val_fraction": 0.15,
            "test_fraction": 0.15,
            "folder_image_size": source["image_size"],
            "folder_resize": resize,
            "seed": 0,
        },
        "sources": {"imagenet": source},
        "train": {
            "runs": {
                "frozen": {"source": "imagenet", "strategy": "frozen"},
                "finetune": {"source": "imagenet", "strategy": "finetune"},
            },
            "frozen": {"epochs": 30, "batch_size": 64, "lr": 0.001, "weight_decay": 0.0001, "patience": 5},
            "end_to_end": {"epochs": 6, "batch_size": 32, "lr": 0.0003, "weight_decay": 0.0, "patience": 2},
            "seed": 0,
            "class_weights": "auto",  # photo folders are rarely balanced
            "reject": None if NONE_CLASSES & {c.lower() for c in classes} else 0.05,
        },
        "evaluate": {"register_as": name},
        "advise": {"probe_per_class": 200, "small_per_class": 1000},
    }


def readme(name: str, counts: dict[str, int] | None) -> str:
    data = (
        f"`images/` holds {sum(counts.values())} images in {len(counts)} classes ({', '.join(counts)}), tracked by DVC."
        if counts
        else "The data is Fashion-MNIST (Debian's dataset-fashion-mnist, or downloaded and verified)."
    )
    return f"""# {name}

A headstart project. {data}

    headstart run                        # train and evaluate every run in params.yaml (cached: a rerun is quick)
    headstart predict photo.jpg          # the champion model's class for new images
    headstart ui                         # compare the runs in MLflow (http://127.0.0.1:5000)

After adding, removing or editing photos under `images/`:

    dvc add images && dvc repro          # reruns what the change touches; only new images are extracted
    git add images.dvc dvc.lock && git commit -m "more photos"

`params.yaml` says what is trained (its keys are documented in headstart's docs/params.md);
`dvc exp run --set-param train.frozen.lr=0.003` tries a variant, `dvc exp show` compares them.
"""


def _sh(dest: Path, *cmd: str) -> None:
    exe = Path(sys.executable).with_name(cmd[0])
    proc = subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:]], cwd=dest, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {dest}:\n{(proc.stdout + proc.stderr).strip()[-2000:]}")


def init_project(
    dest: Path, images: Path | None, example: str | None, backbone: str = "mobilenet_v2", image_size: int | None = None
) -> Path:
    """Create the project at `dest` (which must be absent or empty); returns its params file."""
    if (images is None) == (example is None):
        raise ValueError("give exactly one of --images FOLDER or --example fashion-mnist")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest}: not empty; headstart init makes a new project in an empty or new folder")
    if example is not None and example not in EXAMPLES:
        raise ValueError(f"unknown example {example!r}; expected one of {list(EXAMPLES)}")
    name = project_name(dest)
    counts = None
    if images is not None:
        classes = scan_folder(images.resolve()).classes
        raw = folder_params(name, backbone, image_size, classes)
        counts = check_images(images.resolve(), parse_params(raw, "params.yaml").data)
    else:
        raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params = parse_params(raw, dest / "params.yaml")
    dest.mkdir(parents=True, exist_ok=True)
    if images is not None:
        shutil.copytree(images, dest / "images", ignore=shutil.ignore_patterns(".*"))
    if images is not None:  # every knob written out: dvc.yaml's stages name their sections, DVC needs them
        unused = {"pretrain": True, "sweep": True, "data": {"root", "source_labels", "target_labels"}}
        raw = params.model_dump(mode="json", exclude=unused)
    (dest / "params.yaml").write_text(
        f"# {name}: headstart parameters (documented in headstart's docs/params.md)\n"
        + yaml.safe_dump(raw, sort_keys=False)
    )
    (dest / ".gitignore").write_text(GITIGNORE)
    (dest / ".dvcignore").write_text(DVCIGNORE)
    (dest / "README.md").write_text(readme(name, counts))
    for path, text in dvcyaml.files(dest, params).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    _sh(dest, "git", "init", "-q", "-b", "main")
    _sh(dest, "dvc", "init", "-q")
    _sh(dest, "dvc", "config", "core.analytics", "false")
    if images is not None:
        _sh(dest, "dvc", "add", "-q", "images")
    _sh(dest, "git", "add", "-A")
    _sh(
        dest,
        "git",
        "-c",
        "user.email=headstart@localhost",
        "-c",
        "user.name=headstart",
        "commit",
        "-qm",
        "headstart init",
    )
    return dest / "params.yaml"
