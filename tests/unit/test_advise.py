"""The advisor: stratified probe subsets, the similarity score, the 2x2 table, and the advise task end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from flows.choose import advice_text, init_table
from flows.stages import plain_runner, run_stage
from headstart import tracking
from headstart.config import AdviseParams, ExtractParams, OptimParams
from headstart.records import AdviseRecord, ExtractRecord, Output
from tasks.advise import advise, pixels, probe, probe_subset, recommend, similarity
from tasks.extract import extract
from tests.unit.training_setup import Setup, prepare

CUTS = ["block1", "block2", "fc1"]
PARAMS = AdviseParams(
    probe_per_class=10,
    probe=OptimParams(epochs=5, batch_size=16, lr=5e-3, patience=5),
    small_per_class=50,
    device="cpu",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Setup, ExtractRecord]:
    root = tmp_path_factory.mktemp("advise")
    base = prepare(root)
    record = extract.fn(
        base.weights,
        base.task_meta,
        ExtractParams(batch_size=32, chunk_mb=0.5, device="cpu"),
        base.data_dir,
        root / "features-taps",
        taps=CUTS,
    )
    return base, record


def test_probe_subset_is_stratified_seeded_and_nested_in_the_training_split():
    labels = np.repeat(np.arange(4), [50, 30, 100, 20])
    idx = probe_subset(labels, 10, seed=0)
    assert np.all(np.diff(idx) > 0) and np.array_equal(idx, probe_subset(labels, 10, seed=0))
    counts = np.bincount(labels[idx], minlength=4)
    assert counts.sum() == pytest.approx(40, abs=4) and counts.min() >= 1  # proportional to the class sizes
    assert np.array_equal(probe_subset(labels, 1000, seed=0), np.arange(200))  # more than there is: everything
    assert pixels(np.full((2, 3, 3), 255, np.uint8)).tolist() == [[1.0] * 9, [1.0] * 9]


def test_similarity_is_the_share_of_the_untrained_networks_errors_removed():
    assert similarity(0.9, 0.8) == pytest.approx(0.5)  # 20% errors untrained -> 10% pretrained
    assert similarity(0.8, 0.8) == 0.0
    assert similarity(0.7, 0.8) == pytest.approx(-0.5)  # pretraining made the features worse
    assert similarity(1.0, 1.0) == 0.0


@pytest.mark.parametrize(
    ("per_class", "gain", "ranking", "expected"),
    [
        (10, 0.5, ["block2", "fc1", "block1"], ("small target, similar domain", "frozen", "block2")),
        (10, 0.05, ["block1", "block2", "fc1"], ("small target, different domain", "frozen", "block1")),
        (49, 0.05, ["fc1", "block2", "block1"], ("small target, different domain", "frozen", "fc1")),
        (500, 0.5, ["block2", "block1", "fc1"], ("large target, similar domain", "finetune", "fc1")),
        (500, 0.05, ["block2", "block1", "fc1"], ("large target, different domain", "scratch", "fc1")),
    ],
)
def test_the_two_by_two_table(per_class: int, gain: float, ranking: list[str], expected: tuple[str, str, str]):
    advice = recommend(per_class, gain, ranking, CUTS, PARAMS.model_copy(update={"similar_gain": 0.2}))
    rec = advice["recommendation"]
    assert (advice["quadrant"], rec["strategy"], rec["cut"]) == expected
    assert rec["why"]


def test_probe_learns_separable_rows_and_is_seeded():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = (np.eye(3)[y] * 3 + rng.normal(0, 1, (60, 3))).astype(np.float32)
    params = PARAMS.model_copy(update={"probe": OptimParams(epochs=30, batch_size=16, lr=5e-2)})
    first = probe((x[:40], y[:40]), (x[40:], y[40:]), 3, params)
    assert first["val_accuracy"] >= 0.8 and first["dims"] == 3
    assert probe((x[:40], y[:40]), (x[40:], y[40:]), 3, params) == first


def advise_runs(weights_sha256: str) -> set[str]:
    """Ids of the MLflow runs the advise task logged for this source's weights."""
    found = MlflowClient().search_runs(
        [tracking.experiment_id()], f"tags.stage = 'advise' and tags.weights_sha256 = '{weights_sha256}'"
    )
    return {r.info.run_id for r in found}


def test_advise_task_probes_every_stored_cut_and_writes_a_deterministic_advice(setup, tmp_path: Path):
    base, record = setup
    kwargs = dict(
        weights=base.weights,
        extract_record=record,
        task_meta=base.task_meta,
        params=PARAMS,
        data_dir=base.data_dir,
        out_dir=tmp_path / "a",
    )
    advice_path = tmp_path / "a" / "advice.json"
    runs_before = advise_runs(base.weights.sha256)
    # as flows/stages.run_advise runs it: the task, then its record written as advice.json
    advice = run_stage(plain_runner, advise, advice_path, AdviseRecord, **kwargs)
    runs_first = advise_runs(base.weights.sha256)
    assert isinstance(advice, AdviseRecord) and advice.source == "fmnist"
    advice = advice.model_dump(mode="json")
    assert list(advice["cuts"]) == CUTS and sorted(advice["ranking"]) == sorted(CUTS)
    accs = [advice["cuts"][c]["val_accuracy"] for c in advice["ranking"]]
    assert accs == sorted(accs, reverse=True)
    assert advice["samples_per_class"] == 20 and advice["size"] == "small"  # 60 training images, 3 classes
    assert advice["probe_rows"] == 30 and advice["val_rows"] == 15
    assert list(advice["untrained"]) == CUTS and advice["pixels"]["dims"] == 28 * 28
    assert advice["untrained"] != advice["cuts"]  # the untrained network is another network
    gain = similarity(max(accs), max(r["val_accuracy"] for r in advice["untrained"].values()))
    assert advice["similarity"] == pytest.approx(gain, abs=1e-4)
    assert advice["domain"] == ("similar" if gain >= PARAMS.similar_gain else "different")
    assert advice["recommendation"]["strategy"] == "frozen" and advice["recommendation"]["cut"] == advice["ranking"][0]
    written = advice_path.read_text()
    assert json.loads(written)["recommendation"] == advice["recommendation"]
    assert AdviseRecord.read(advice_path).model_dump(mode="json") == advice
    assert (tmp_path / "a" / "probe.png").read_bytes().startswith(b"\x89PNG")
    assert [Output.model_validate(o) for o in advice["outputs"]] == [Output.of(tmp_path / "a" / "probe.png")]

    advice_path.unlink()  # the stage runs again from scratch
    again = run_stage(plain_runner, advise, advice_path, AdviseRecord, **kwargs)
    assert advice_path.read_text() == written  # same inputs, same bytes (DVC sees no change)
    assert again.model_dump(mode="json") == advice

    (run_id,) = runs_first - runs_before
    (again_run_id,) = advise_runs(base.weights.sha256) - runs_first
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "advise"
    assert run.data.tags["quadrant"] == advice["quadrant"]
    assert {f"probe_val_accuracy.{c}" for c in [*CUTS, "pixels"]} <= set(run.data.metrics)
    assert {f"probe_untrained_val_accuracy.{c}" for c in CUTS} <= set(run.data.metrics)
    assert {"probe.json", "probe.png", "advice.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert again_run_id != run_id
    (tmp_path / "logged").mkdir()
    logged = Path(client.download_artifacts(run_id, "advice.json", str(tmp_path / "logged")))
    assert json.loads(logged.read_text()) == {k: v for k, v in advice.items() if k not in ("key", "inputs", "outputs")}

    text = advice_text(advice)
    for needle in ("small target", "recommendation: frozen at", "why:", "pixels", "untrained", *CUTS):
        assert needle in text


def test_init_table_names_failures_and_symmetry():
    rows = [
        {"init": "kaiming", "val_accuracy": 0.9, "val_loss": 0.3, "epochs": 5, "head_distinct_units": 64},
        {"init": "zeros", "val_accuracy": 0.2, "val_loss": 1.6, "epochs": 5, "head_distinct_units": 1},
        {"init": "ones", "error": "validation loss is nan at epoch 1"},
    ]
    table = init_table(rows, [64])
    assert "| kaiming | 90.00% |" in table and "| 1 of 64 |" in table and "failed: validation loss is nan" in table
    assert "symmetry" in table
    assert "harmless" in init_table(rows[:1], [])
