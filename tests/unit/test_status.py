"""`headstart status`'s pure parts: the reasons it gives and dvc.yaml's links between stages."""

from __future__ import annotations

from flows.status import input_changes, raw_changes, stage_links
from headstart.config import load_params
from headstart.records import RawRecord
from tests.tiny import REPO


def test_input_changes_name_the_code_file_the_argument_and_the_weights_content() -> None:
    old = {"code:tasks/train.py": "a", "code:headstart/fit.py": "b", "params": "c", "current_content": "d"}
    new = {**old, "code:headstart/fit.py": "B", "params": "C", "current_content": "D"}
    assert input_changes(old, new, "train") == [
        "code changed: headstart/fit.py",
        "the weights a source's URI names changed",
        "params changed (params.yaml: train)",
    ]
    assert input_changes({"run": "a", "task_meta": "b"}, {"run": "A", "task_meta": "B"}, "train") == [
        "params changed (params.yaml: train.runs)",
        "input 'task_meta' changed",
    ]
    assert input_changes(old, {**old, "code:headstart/new.py": "e"}) == ["code changed: headstart/new.py"]
    assert input_changes({}, new) == ["its inputs changed (its record predates per-input hashes)"]


def test_raw_changes_count_and_name_added_removed_and_changed_images() -> None:
    before = RawRecord(fmnist_origin="none", fmnist={}, image_folder={f"cat/{i}.png": "x" for i in range(3)})
    added = {f"dog/{i}.png": "y" for i in range(5)}
    after = RawRecord(fmnist_origin="none", fmnist={}, image_folder={"cat/0.png": "x", "cat/1.png": "edited", **added})
    assert raw_changes(before, after) == [
        "5 image(s) added: dog/0.png, dog/1.png, dog/2.png and 2 more",
        "1 image(s) removed: cat/2.png",
        "1 image(s) changed: cat/1.png",
    ]
    moved = before.model_copy(update={"fmnist_origin": "system", "fmnist": {"t10k-labels-idx1-ubyte.gz": "z"}})
    assert raw_changes(before, moved)[:2] == [
        "Fashion-MNIST now read from system (was none)",
        "Fashion-MNIST t10k-labels-idx1-ubyte.gz changed",
    ]


def test_stage_links_are_dvc_yaml_with_its_foreach_resolved() -> None:
    params = load_params(REPO / "params.yaml")
    links = stage_links(params)
    assert set(links) == (
        {"raw", "data", "pretrain", "weights"}
        | {f"{stage}@{s}" for stage in ("extract", "advise") for s in params.sources}
        | {f"{stage}@{r}" for stage in ("train", "evaluate") for r in params.train.runs}
    )
    deps, outs = links["train@imagenet-frozen"]
    assert {"features/imagenet.json", "weights/imagenet.json", "reports/advise/imagenet/advice.json"} <= deps
    assert "models/runs/imagenet-frozen/record.json" in outs
    assert "models/runs/imagenet-frozen/record.json" in links["evaluate@imagenet-frozen"][0]
