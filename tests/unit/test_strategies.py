"""Transfer strategies on tiny data: partial on stored activations, baselines and negative transfer, auto, head init."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from headstart import tracking
from headstart.backbones import CLASSIFIER, preprocess
from headstart.checkpoints import load_model, save_weights
from headstart.config import ExtractParams, HeadParams, RunParams, TrainParams
from headstart.datasets import load_task
from headstart.extraction import provenance, stored_features
from headstart.fit import predict_logits
from headstart.records import AdviseRecord, TrainRecord, absolute
from headstart.sources import load_source
from headstart.strategies import (
    above_cut,
    distinct_units,
    end_to_end_net,
    negative_transfer,
    partial_net,
    train_end_to_end,
    train_frozen_head,
    train_head_first,
    train_partial,
)
from tasks.extract import extract
from tasks.train import recipe_of, train
from tests.tiny import placeholder_advice
from tests.unit.training_setup import PRE, Setup, prepare, with_taps

TAPS = ["block1", "block2", "fc1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """The training setup, its feature store re-made with every tap of fmnist_cnn."""
    root = tmp_path_factory.mktemp("strategies")
    base = with_taps(prepare(root), root, TAPS)
    params = base.params.model_copy(update={"partial": base.params.frozen})  # 3 epochs, batches of 16
    return replace(base, params=params)


def features_at(setup: Setup, cut: str) -> tuple[np.ndarray, np.ndarray]:
    target = load_task(setup.data_dir, "target")
    record = setup.extract_record
    # the store is read with the provenance of this source's weights at `cut`
    assert record.provenance_for(cut) == provenance(setup.weights.sha256, "fmnist_cnn", cut, PRE)
    return stored_features(record, target.train.images, cut), stored_features(record, target.val.images, cut)


def advice_of(strategy: str, cut: str) -> AdviseRecord:
    """An advise record recommending `strategy` at `cut` (train reads only the recommendation)."""
    return placeholder_advice([cut, *(c for c in TAPS if c != cut)], strategy)


def run_train(
    setup: Setup, name: str, out: Path, params: TrainParams | None = None, advice: AdviseRecord | None = None, **run
) -> TrainRecord:
    return train.fn(
        run_name=name,
        run=RunParams(source="fmnist", **run),
        source=setup.source,
        params=params or setup.params,
        weights=setup.weights,
        extract_record=setup.extract_record,
        task_meta=setup.task_meta,
        data_dir=setup.data_dir,
        out_dir=out,
        advice_record=advice,
    )


def mlflow_run(record: TrainRecord):
    """The MLflow run that trained the record's model (found by the model's sha256)."""
    run_id = tracking.run_of_model(record.sha256)
    assert run_id is not None
    return MlflowClient().get_run(run_id)


def state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("cut", ["block1", "block2"])
def test_partial_on_stored_activations_equals_end_to_end_with_the_same_layers_frozen(setup: Setup, cut: str):
    """Same seed, same data: the stored path reproduces the end-to-end path's history and weights (float noise)."""
    source = load_source(setup.weights)
    target = load_task(setup.data_dir, "target")
    params = setup.params
    recipe = recipe_of("partial", params)
    assert recipe.optim == params.partial
    stored_net = partial_net(source, "fmnist_cnn", cut, 3, params.head, PRE, params.seed)
    images_net = partial_net(source, "fmnist_cnn", cut, 3, params.head, PRE, params.seed)
    before = state(stored_net)
    x_train, x_val = features_at(setup, cut)
    stored = train_partial(stored_net, cut, (x_train, target.train.labels), (x_val, target.val.labels), recipe)
    images = train_end_to_end(images_net, target, PRE, recipe)

    assert stored.epochs == images.epochs == params.partial.epochs
    for a, b in zip(stored.history, images.history, strict=True):
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1 / len(target.val))
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3, abs=1e-4)
    after_stored, after_images = state(stored_net), state(images_net)
    for key, value in after_stored.items():
        torch.testing.assert_close(value, after_images[key], rtol=1e-3, atol=1e-4)
        frozen = key.split(".")[1] in stored_net.upto(cut).stage_names
        assert torch.equal(value, before[key]) == frozen, key  # frozen stages unchanged, every other layer trained


def test_partial_net_freezes_up_to_the_cut_and_can_reinitialise_above_it(setup: Setup):
    source = load_source(setup.weights)
    source_state = state(source)
    pre_net = partial_net(source, "fmnist_cnn", "block1", 3, HeadParams(), PRE, seed=0)
    rnd_net = partial_net(source, "fmnist_cnn", "block1", 3, HeadParams(), PRE, seed=0, upper_init="random")
    assert [n for n, p in pre_net.named_parameters() if not p.requires_grad] == [
        "stages.block1.0.weight",
        "stages.block1.0.bias",
    ]
    assert above_cut(pre_net, "block1").stage_names == ["block2", "fc1", "classifier"]
    assert above_cut(pre_net, "fc1").stage_names == ["classifier"]
    pre_state, rnd_state = state(pre_net), state(rnd_net)
    for key in ("stages.block2.0.weight", "stages.fc1.1.weight"):
        assert torch.equal(pre_state[key], source_state[key])
        assert not torch.equal(rnd_state[key], source_state[key])
    assert torch.equal(rnd_state["stages.block1.0.weight"], source_state["stages.block1.0.weight"])
    again = partial_net(source, "fmnist_cnn", "block1", 3, HeadParams(), PRE, seed=0, upper_init="random")
    assert all(torch.equal(v, state(again)[k]) for k, v in rnd_state.items())  # seeded
    assert all(torch.equal(v, state(source)[k]) for k, v in source_state.items())  # the source is not touched


def test_partial_run_saves_a_whole_network_that_predicts_from_images(setup: Setup, tmp_path: Path):
    record = run_train(setup, "test-partial", tmp_path, strategy="partial", cut="block1")
    assert record.strategy == record.trained == "partial" and record.cut == "block1"
    assert record.baseline_val_accuracy is None and record.negative_transfer is None
    net, spec = load_model(absolute(record.path), record.sha256)
    assert spec.cut == "fc1"
    target = load_task(setup.data_dir, "target")
    _, x_val = features_at(setup, "block1")
    from_images = predict_logits(net, target.val.images, transform=lambda x: preprocess(x, PRE))
    from_store = predict_logits(above_cut(net, "block1"), x_val)
    torch.testing.assert_close(from_images, from_store, rtol=1e-4, atol=1e-4)
    run = mlflow_run(record)
    assert run.data.params["cut"] == "block1" and run.data.tags["feature_store_key"] == setup.extract_record.store_key


def test_a_run_may_cut_at_any_stored_tap(setup: Setup, tmp_path: Path):
    fc1 = run_train(setup, "test-frozen-fc1", tmp_path / "fc1", strategy="frozen", cut="fc1")
    _, spec = load_model(absolute(fc1.path), fc1.sha256)
    assert spec.cut == "fc1" and fc1.cut == "fc1"


def zero_source(setup: Setup, tmp_path: Path) -> Setup:
    """A source whose every weight is zero: its activations are all zeros, so transfer from it must lose."""
    net = load_source(setup.weights)
    path = tmp_path / "zero.safetensors"
    sha = save_weights({k: torch.zeros_like(v) for k, v in net.state_dict().items()}, path)
    weights = setup.weights.model_copy(update={"path": str(path), "uri": str(path), "sha256": sha})
    record = extract.fn(
        weights,
        setup.task_meta,
        ExtractParams(batch_size=32, device="cpu"),
        setup.data_dir,
        tmp_path / "features",
        taps=TAPS,
    )
    return replace(setup, weights=weights, extract_record=record)


def test_negative_transfer_is_detected_tagged_and_auto_falls_back_to_scratch(setup: Setup, tmp_path: Path):
    assert negative_transfer(0.5, 0.6) and not negative_transfer(0.6, 0.6) and not negative_transfer(0.7, 0.6)
    bad = zero_source(setup, tmp_path)
    params = setup.params.model_copy(update={"end_to_end": setup.params.end_to_end.model_copy(update={"epochs": 3})})
    frozen = run_train(bad, "test-neg-frozen", tmp_path / "frozen", params, strategy="frozen", baseline=True)
    assert frozen.negative_transfer is True and frozen.trained == "frozen"
    assert frozen.baseline_val_accuracy > frozen.transfer_val_accuracy == frozen.val_accuracy
    tags = mlflow_run(frozen).data
    assert tags.tags["negative_transfer"] == "true"
    assert tags.metrics["baseline_val_accuracy"] == pytest.approx(frozen.baseline_val_accuracy)

    advice = advice_of("partial", "fc1")
    auto = run_train(bad, "test-neg-auto", tmp_path / "auto", params, advice=advice, strategy="auto")
    assert auto.chosen == "partial" and auto.trained == "scratch" and auto.negative_transfer is True
    assert auto.val_accuracy == auto.baseline_val_accuracy > auto.transfer_val_accuracy
    _, spec = load_model(absolute(auto.path), auto.sha256)
    assert spec.cut == "fc1"  # the scratch network, whole
    run = mlflow_run(auto).data
    assert run.tags["auto_choice"] == "scratch" and run.tags["negative_transfer"] == "true"


def test_auto_keeps_the_recommendation_when_it_beats_scratch(setup: Setup, tmp_path: Path):
    advice = advice_of("frozen", "block2")
    auto = run_train(setup, "test-auto", tmp_path, advice=advice, strategy="auto")
    assert auto.chosen == "frozen" and auto.baseline_val_accuracy is not None
    assert auto.trained == ("scratch" if auto.negative_transfer else "frozen")
    assert auto.val_accuracy == max(auto.transfer_val_accuracy, auto.baseline_val_accuracy)
    with pytest.raises(ValueError, match="needs the advise stage's record"):
        run_train(setup, "test-auto-bad", tmp_path / "bad", strategy="auto")


@pytest.mark.parametrize(("init", "distinct"), [("kaiming", 8), ("zeros", 1), ("ones", 1)])
def test_constant_head_init_leaves_every_hidden_unit_a_copy(setup: Setup, tmp_path: Path, init: str, distinct: int):
    params = setup.params.model_copy(update={"head": HeadParams(hidden=[8], init=init)})
    record = run_train(setup, f"test-init-{init}", tmp_path, params, strategy="frozen")
    assert record.head_distinct_units == distinct
    net, _ = load_model(absolute(record.path), record.sha256)
    assert distinct_units(net.stages["classifier"]) == distinct
    if init == "zeros":  # no gradient reaches any weight: the head predicts one class
        assert record.val_accuracy == pytest.approx(1 / 3, abs=0.07)
    assert distinct_units(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))) is None


def test_inverse_frequency_class_weights_raise_the_minority_recall():
    """A 10:1 imbalance of overlapping classes: unweighted, the head favours the majority; auto weights fix it."""
    from headstart.config import HeadParams, OptimParams
    from headstart.fit import inverse_frequency
    from headstart.metrics import classification_report
    from headstart.strategies import Recipe, train_frozen_head

    rng = np.random.default_rng(0)

    def draw(n_major: int, n_minor: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([rng.normal(0.0, 1.0, (n_major, 2)), rng.normal((1.5, 0.0), 1.0, (n_minor, 2))])
        return x.astype(np.float32), np.concatenate([np.zeros(n_major, int), np.ones(n_minor, int)])

    train, val, test = draw(500, 50), draw(200, 20), draw(300, 300)
    weights = inverse_frequency(train[1], 2)
    assert weights == pytest.approx((550 / 1000, 550 / 100))
    optim = OptimParams(epochs=30, batch_size=64, lr=0.05, patience=30)
    recall = {}
    for name, cw in (("none", None), ("auto", weights)):
        head, _ = train_frozen_head(train, val, 2, Recipe(HeadParams(), optim, seed=0, device="cpu", class_weights=cw))
        with torch.no_grad():
            y_pred = head(torch.from_numpy(test[0])).argmax(1).numpy()
        recall[name] = classification_report(test[1], y_pred, ["major", "minor"])["per_class"]["minor"]["recall"]
    assert recall["auto"] > recall["none"] + 0.2, recall
    with pytest.raises(ValueError, match="every class in the training split"):
        inverse_frequency(np.zeros(5, int), 2)


def test_finetune_trains_the_head_first_as_a_frozen_run_would_then_the_body_slower(setup: Setup) -> None:
    """train.finetune: phase one is the frozen strategy's head at the body's last cut (stored activations or
    through the frozen body: the same head), phase two unfreezes every layer with the body at body_lr."""
    source = load_source(setup.weights)
    target = load_task(setup.data_dir, "target")
    params = setup.params
    head_recipe = recipe_of("frozen", params)
    x_train, x_val = features_at(setup, "fc1")  # fmnist_cnn's last cut: where finetune's new head sits
    frozen_head, frozen = train_frozen_head((x_train, target.train.labels), (x_val, target.val.labels), 3, head_recipe)

    stored_net = end_to_end_net(source, "fmnist_cnn", "finetune", 3, params.head, PRE, params.seed)
    images_net = end_to_end_net(source, "fmnist_cnn", "finetune", 3, params.head, PRE, params.seed)
    body_before = state(stored_net.upto("fc1"))
    from_store = train_head_first(stored_net, target, PRE, head_recipe, (x_train, x_val))
    train_head_first(images_net, target, PRE, head_recipe)
    seconds = [{"seconds": r["seconds"]} for r in from_store.history]
    assert from_store.history == [r | s for r, s in zip(frozen.history, seconds, strict=True)]
    for key, value in frozen_head.state_dict().items():  # the very head a frozen run trains
        assert torch.equal(value, stored_net.stages[CLASSIFIER].state_dict()[key]), key
        torch.testing.assert_close(value, images_net.stages[CLASSIFIER].state_dict()[key], rtol=1e-4, atol=1e-5)
    for net in (stored_net, images_net):  # the body did not move and trains again in phase two
        assert all(torch.equal(v, body_before[k]) for k, v in state(net.upto("fc1")).items())
        assert all(p.requires_grad for p in net.parameters())

    slow = replace(recipe_of("finetune", params), body_lr=1e-6)
    assert recipe_of("finetune", params).body_lr == params.finetune.body_lr == 0.1
    head_before = state(stored_net.stages[CLASSIFIER])
    train_end_to_end(stored_net, target, PRE, slow)
    moved = {k: (v - body_before[k]).abs().max().item() for k, v in state(stored_net.upto("fc1")).items()}
    assert 0 < max(moved.values()) < 1e-3  # Adam's steps scale with the rate: the body crawls
    head_moved = max((v - head_before[k]).abs().max().item() for k, v in state(stored_net.stages[CLASSIFIER]).items())
    assert head_moved > 100 * max(moved.values())
