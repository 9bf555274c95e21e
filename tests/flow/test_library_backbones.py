"""Backbones the libraries own, through the real flow: a torchvision model headstart never staged, and a timm model.

Their weights are local files in the libraries' own key layout (seeded, untrained: extraction and
training need weights, not ImageNet), so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision

from flows.layout import Layout
from flows.pipeline import transfer
from headstart.config import parse_params
from headstart.library_backbones import PENULTIMATE
from headstart.records import ExtractRecord, SourceWeights
from tests.tiny import tiny_params, write_tiny_fmnist

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(project_root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    tv = project_root / "shufflenet.pth"
    torch.save(torchvision.models.get_model("shufflenet_v2_x0_5", weights=None).state_dict(), tv)
    tm = project_root / "timm-resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tm)
    raw = tiny_params(write_tiny_fmnist(project_root / "tiny-fmnist", n_train=300, n_test=100))
    raw["sources"] = {
        "shufflenet": {"weights": str(tv), "arch": "shufflenet_v2_x0_5", "cut": "auto", "image_size": 32},
        "timmres": {"weights": str(tm), "arch": "timm:resnet18", "cut": "auto", "image_size": 32},
    }
    raw["train"]["runs"] = {
        "shufflenet-frozen": {"source": "shufflenet", "strategy": "frozen"},
        "timmres-frozen": {"source": "timmres", "strategy": "frozen"},
        "timmres-finetune": {"source": "timmres", "strategy": "finetune"},
    }
    raw["advise"].update(probe_per_class=10, probe={"epochs": 2, "batch_size": 32})
    del raw["sweep"]  # the sweep is the Fashion-MNIST experiment's
    return {"root": project_root, "raw": raw, "result": transfer(params=parse_params(raw), root=project_root)}


def test_any_torchvision_or_timm_model_extracts_trains_and_evaluates(project: dict[str, Any]) -> None:
    lay = Layout(project["root"])
    runs = project["result"]["runs"]
    assert set(runs) == {"shufflenet-frozen", "timmres-frozen", "timmres-finetune"}
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in runs.values())
    for source, width in (("shufflenet", 1024), ("timmres", 512)):
        weights = SourceWeights.read(lay.source_weights(source))
        assert weights.cut == PENULTIMATE  # `cut: auto` is the library model's penultimate features
        assert ExtractRecord.read(lay.extract_record(source)).tap_shapes == {PENULTIMATE: [width]}
    # timm's own preprocessing is the default: its pretrained_cfg mean and std
    cfg = timm.create_model("resnet18", pretrained=False).pretrained_cfg
    pre = SourceWeights.read(lay.source_weights("timmres")).preprocess
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])


def test_partial_on_a_one_stage_library_model_is_refused_naming_it(project: dict[str, Any]) -> None:
    from headstart.backbones import create_model
    from headstart.strategies import check_partial

    with pytest.raises(ValueError, match=r"partial on timm:resnet18 at 'penultimate'.*one stage.*split into stages"):
        check_partial(create_model("timm:resnet18", 2), "timm:resnet18", PENULTIMATE)
    check_partial(create_model("resnet18", 2), "resnet18", "layer3")  # staged: layers above layer3 train
