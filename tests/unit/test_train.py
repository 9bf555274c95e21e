"""The train task: frozen head on stored features, fine-tune and scratch end to end, each one MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from headstart import tracking
from headstart.backbones import preprocess
from headstart.checkpoints import load_model
from headstart.config import ExtractParams, OptimParams, StreamParams, TrainParams
from headstart.datasets import load_task
from headstart.fingerprint import sha256_file
from headstart.fit import predict_logits
from headstart.records import ExtractRecord, TrainRecord, absolute
from headstart.sources import load_source
from headstart.strategies import end_to_end_net, train_frozen_head
from tasks.extract import extract
from tasks.train import recipe_of, train
from tests.unit.training_setup import PRE, Setup, prepare

RECORD_KEYS = {"run_name", "strategy", "source", "path", "sha256", "val_accuracy", "val_loss", "epochs", "outputs"}
"""The record's fields (the MLflow run is found by the model's sha256, `tracking.run_of_model`; no timings)."""


def check_record(record: TrainRecord, strategy: str) -> None:
    """A typed train record with the expected fields, and the MLflow run that trained its model."""
    assert isinstance(record, TrainRecord) and set(TrainRecord.model_fields) >= RECORD_KEYS
    assert record.strategy == strategy
    assert tracking.run_of_model(record.sha256) is not None


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return prepare(tmp_path_factory.mktemp("train"))


def run_train(setup: Setup, strategy: str, out_dir: Path) -> TrainRecord:
    return train.fn(
        run_name=f"test-{strategy}",
        run=setup.params.runs[strategy],
        source=setup.source,
        params=setup.params,
        weights=setup.weights,
        extract_record=setup.extract_record if strategy == "frozen" else None,
        task_meta=setup.task_meta,
        data_dir=setup.data_dir,
        out_dir=out_dir,
    )


@pytest.fixture(scope="module")
def records(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainRecord]:
    root = tmp_path_factory.mktemp("runs")
    return {s: run_train(setup, s, root / s) for s in ("frozen", "finetune", "scratch")}


def state(net: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if k.startswith(prefix)}


def test_frozen_head_pure_path_on_arrays():
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = (np.eye(3)[y] * 4 + rng.normal(0, 1, (90, 3))).astype(np.float32)
    params = TrainParams(runs={}, frozen=OptimParams(epochs=20, batch_size=16, lr=5e-2), device="cpu")
    recipe = recipe_of("frozen", params)
    assert recipe.optim == params.frozen and recipe.head == params.head and recipe.device == "cpu"
    head, result = train_frozen_head((x[:60], y[:60]), (x[60:], y[60:]), 3, recipe)
    assert result.best["val_accuracy"] >= 0.9
    again, _ = train_frozen_head((x[:60], y[:60]), (x[60:], y[60:]), 3, recipe)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True))


def test_finetune_starts_pretrained_and_scratch_from_a_seeded_fresh_init(setup: Setup):
    source = load_source(setup.weights)
    finetune = end_to_end_net(source, "fmnist_cnn", "finetune", 3, setup.params.head, PRE, seed=0)
    scratch = end_to_end_net(source, "fmnist_cnn", "scratch", 3, setup.params.head, PRE, seed=0)
    scratch_again = end_to_end_net(source, "fmnist_cnn", "scratch", 3, setup.params.head, PRE, seed=0)
    body = state(source.upto("fc1"))
    assert all(torch.equal(body[k], v) for k, v in state(finetune, "stages.fc").items())
    assert all(torch.equal(body[k], v) for k, v in state(finetune, "stages.block").items())
    assert not any(torch.equal(body[k], v) for k, v in state(scratch, "stages.block").items() if v.ndim > 1)
    assert all(torch.equal(a, b) for a, b in zip(state(scratch).values(), state(scratch_again).values(), strict=True))
    assert state(source.upto("fc1")).keys() <= state(scratch).keys()  # the very same architecture
    assert all(p.requires_grad for p in scratch.parameters()) and all(p.requires_grad for p in finetune.parameters())
    assert torch.equal(body["stages.block1.0.weight"], state(source)["stages.block1.0.weight"]), "source untouched"
    with pytest.raises(ValueError, match="finetune or scratch"):
        end_to_end_net(source, "fmnist_cnn", "frozen", 3, setup.params.head, PRE, seed=0)


def test_frozen_run_trains_only_the_head_and_predicts_from_images(setup: Setup, records: dict[str, TrainRecord]):
    record = records["frozen"]
    check_record(record, "frozen")
    net, spec = load_model(absolute(record.path), record.sha256)
    assert (
        spec.cut == "block2"
        and spec.head == setup.params.head
        and spec.class_names == ["target-0", "target-1", "target-2"]
    )
    source = load_source(setup.weights)
    body = state(source.upto("block2"))
    assert all(torch.equal(body[k], v) for k, v in state(net, "stages.block").items()), "frozen layers changed"

    test = load_task(setup.data_dir, "target").test
    from_images = predict_logits(net, test.images, transform=lambda x: preprocess(x, spec.preprocess))
    features = predict_logits(source.upto("block2"), test.images, transform=lambda x: preprocess(x, PRE))
    from_features = predict_logits(net.stages["classifier"], features)
    torch.testing.assert_close(from_images, from_features)


def test_frozen_run_is_deterministic(setup: Setup, records: dict[str, TrainRecord], tmp_path: Path):
    assert run_train(setup, "frozen", tmp_path).sha256 == records["frozen"].sha256


@pytest.mark.parametrize("strategy", ["finetune", "scratch"])
def test_end_to_end_runs_train_every_layer(setup: Setup, records: dict[str, TrainRecord], strategy: str):
    record = records[strategy]
    check_record(record, strategy)
    assert record.epochs == 2
    model_path = absolute(record.path)
    net, spec = load_model(model_path, record.sha256)
    assert spec.cut == "fc1" and spec.dropout == 0.3  # the source model's own dropout, kept
    source = state(load_source(setup.weights))
    assert not any(torch.equal(source[k], v) for k, v in state(net, "stages.block").items())

    history = json.loads((model_path.parent / "history.json").read_text())
    assert len(history["history"]) == record.epochs and history["best_epoch"] >= 1
    best = history["history"][history["best_epoch"] - 1]
    assert (best["val_accuracy"], best["val_loss"]) == (record.val_accuracy, record.val_loss)
    assert all("seconds" not in row for row in history["history"]), "content only: the same training, the same bytes"
    assert {o.sha256 for o in record.outputs} == {
        sha256_file(model_path),
        sha256_file(model_path.parent / "history.json"),
    }
    assert record.intact()


def test_each_run_is_one_finished_mlflow_run(setup: Setup, records: dict[str, TrainRecord]):
    client = MlflowClient()
    run_ids = {strategy: tracking.run_of_model(record.sha256) for strategy, record in records.items()}
    for strategy, record in records.items():
        run = client.get_run(run_ids[strategy])
        assert run.info.status == "FINISHED" and run.info.run_name == f"test-{strategy}"
        tags, params = run.data.tags, run.data.params
        assert tags["stage"] == "train" and tags["strategy"] == strategy and tags["source"] == "fmnist"
        assert tags[tracking.MODEL_SHA_TAG] == record.sha256
        assert tags["weights_sha256"] == setup.weights.sha256 == record.weights_sha256
        assert tags["data_fingerprint"] == setup.task_meta.fingerprint
        assert ("feature_store_key" in tags) == (strategy == "frozen")
        assert params["strategy"] == strategy and params["source.cut"] == "block2" and params["head.hidden"] == "[8]"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == list(
            range(1, record.epochs + 1)
        )
        assert "curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run_ids["frozen"] != run_ids["finetune"]
    tags = client.get_run(run_ids["frozen"]).data.tags
    assert tags["feature_store_key"] == setup.extract_record.store_key


def test_frozen_without_features_is_a_clear_error(setup: Setup, tmp_path: Path):
    with pytest.raises(ValueError, match="needs the extract stage's record"):
        train.fn(
            run_name="bad",
            run=setup.params.runs["frozen"],
            source=setup.source,
            params=setup.params,
            weights=setup.weights,
            extract_record=None,
            task_meta=setup.task_meta,
            data_dir=setup.data_dir,
            out_dir=tmp_path,
        )


def test_a_frozen_run_streamed_from_the_store_trains_the_same_model_as_loaded(setup: Setup, tmp_path: Path) -> None:
    """The same run, its splits streamed a chunk at a time or loaded whole: bitwise the same model and history."""
    window = StreamParams(window_mb=0.01)  # about one row per window: every chunk is a window of its own

    def run(mode: str) -> TrainRecord:
        params = setup.params.model_copy(update={"stream": window.model_copy(update={"mode": mode})})
        return train.fn(
            run_name=f"test-stream-{mode}", run=setup.params.runs["frozen"], source=setup.source, params=params,
            weights=setup.weights, extract_record=setup.extract_record, task_meta=setup.task_meta,
            data_dir=setup.data_dir, out_dir=tmp_path / mode,
        )  # fmt: skip

    loaded, streamed = run("never"), run("always")
    assert streamed.sha256 == loaded.sha256  # the saved weights (and spec) are the same bytes
    assert (tmp_path / "always" / "history.json").read_bytes() == (tmp_path / "never" / "history.json").read_bytes()
    assert (streamed.val_loss, streamed.temperature) == (loaded.val_loss, loaded.temperature)


def test_a_frozen_run_trains_on_the_stored_views_when_asked(setup: Setup, tmp_path: Path) -> None:
    """train.views: use draws stored augmented views (seeded: the same model twice); ignore is the plain run."""
    viewed = extract.fn(
        weights=setup.weights, task_meta=setup.task_meta, data_dir=setup.data_dir, store_root=tmp_path / "features",
        params=ExtractParams(batch_size=32, chunk_mb=0.5, device="cpu", views=2),
    )  # fmt: skip
    assert viewed.views == 2 and viewed.rows == 90 + 2 * 60

    def run(name: str, views: str, record: ExtractRecord) -> TrainRecord:
        return train.fn(
            run_name=f"test-views-{name}", run=setup.params.runs["frozen"], source=setup.source,
            params=setup.params.model_copy(update={"views": views}), weights=setup.weights, extract_record=record,
            task_meta=setup.task_meta, data_dir=setup.data_dir, out_dir=tmp_path / name,
        )  # fmt: skip

    use, again, ignore = run("use", "use", viewed), run("again", "use", viewed), run("ignore", "ignore", viewed)
    plain = run("plain", "use", setup.extract_record)
    assert use.sha256 == again.sha256  # seeded: the same views drawn, the same head
    assert ignore.sha256 == plain.sha256  # ignore reads the plain rows only: the run on a store without views
    assert use.sha256 != plain.sha256
    logged = MlflowClient().get_run(tracking.run_of_model(use.sha256)).data
    assert logged.params["views"] == "use" and logged.tags["store_views"] == "2"
