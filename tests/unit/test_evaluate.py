"""Metrics against hand-computed cases and sklearn; the evaluate task's report, figure, MLflow run and registry."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score

from headstart import metrics, tracking
from headstart.checkpoints import load_model
from headstart.config import EvaluateParams, ExtractParams, StreamParams
from headstart.datasets import load_task
from headstart.extraction import provenance
from headstart.records import EvaluateRecord, Output, TrainRecord, absolute
from tasks.evaluate import evaluate, logits_on_test, tta_logits
from tasks.extract import extract
from tasks.train import train
from tests.unit.training_setup import Setup, prepare

Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 1, 1, 1, 2, 0])
NAMES = ["a", "b", "c"]
PARAMS = EvaluateParams(register_as="test-transfer")


def test_metrics_by_hand():
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    per = metrics.per_class(Y_TRUE, Y_PRED, NAMES)
    assert [per[n]["precision"] for n in NAMES] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert [per[n]["recall"] for n in NAMES] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert [per[n]["support"] for n in NAMES] == [2, 2, 2]
    assert metrics.macro_f1(Y_TRUE, Y_PRED, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_balanced_accuracy_matches_sklearn_on_an_unbalanced_split():
    rng = np.random.default_rng(3)
    y_true = np.concatenate([np.zeros(90, int), np.ones(10, int), np.full(5, 2)])
    y_pred = np.where(rng.random(105) < 0.7, y_true, rng.integers(0, 3, 105))
    report = metrics.classification_report(y_true, y_pred, ["many", "few", "rare"])
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    always_many = metrics.classification_report(y_true, np.zeros(105, int), ["many", "few", "rare"])
    assert always_many["accuracy"] > 0.85 and always_many["balanced_accuracy"] == pytest.approx(1 / 3)


def test_the_most_confident_mistakes_come_first():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95], [0.7, 0.3]])
    y_true = np.array([1, 1, 0, 0, 0])  # rows 0, 2 and 3 are wrong, with confidence 0.9, 0.6 and 0.95
    assert metrics.confident_mistakes(probs, y_true) == [3, 0, 2]
    assert metrics.confident_mistakes(probs, y_true, k=1) == [3]
    fig = metrics.mistakes_figure(np.zeros((5, 8, 8), np.uint8), probs, y_true, ["a", "b"], "t")
    assert [ax.get_title() for ax in fig.axes if ax.get_title()][:1] == ["a -> b\n(0.95)"]


def test_macro_f1_and_per_class_match_sklearn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 4, 300))  # class 4 is never predicted
    labels = list(range(5))
    assert metrics.macro_f1(y_true, y_pred, 5) == pytest.approx(
        f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    )
    per = metrics.per_class(y_true, y_pred, list("vwxyz"))
    p = precision_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    r = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    assert [per[n]["precision"] for n in "vwxyz"] == pytest.approx(p.tolist())
    assert [per[n]["recall"] for n in "vwxyz"] == pytest.approx(r.tolist())


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match="outside 0..2"):
        metrics.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="2 labels but y_pred 1"):
        metrics.accuracy(np.array([0, 1]), np.array([0]))


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_figures_are_pure_and_render():
    fig = metrics.confusion_figure(metrics.confusion_matrix(Y_TRUE, Y_PRED, 3), NAMES)
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == NAMES
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(["1", "1", "0", "0", "2", "0", "1", "0", "1"])
    assert png_bytes(fig).startswith(b"\x89PNG")
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.5 / e, "train_accuracy": 0.5, "val_accuracy": 0.4}
        for e in (1, 2, 3)
    ]
    curves = metrics.curves_figure(history)
    assert [len(ax.lines) for ax in curves.axes] == [2, 2]
    assert list(curves.axes[0].lines[1].get_ydata()) == [1.5, 0.75, 0.5]
    assert png_bytes(curves).startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return prepare(tmp_path_factory.mktemp("evaluate"))


@pytest.fixture(scope="module")
def evaluated(
    setup: Setup, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[TrainRecord, EvaluateRecord, Path]]:
    out = {}
    for strategy in ("frozen", "finetune"):
        root = tmp_path_factory.mktemp(strategy)
        extract_record = setup.extract_record if strategy == "frozen" else None
        trained = train.fn(
            run_name=f"eval-{strategy}",
            run=setup.params.runs[strategy],
            source=setup.source,
            params=setup.params,
            weights=setup.weights,
            extract_record=extract_record,
            task_meta=setup.task_meta,
            data_dir=setup.data_dir,
            out_dir=root / "model",
        )
        record = evaluate.fn(
            run_name=f"eval-{strategy}",
            train_record=trained,
            extract_record=extract_record,
            task_meta=setup.task_meta,
            params=PARAMS,
            data_dir=setup.data_dir,
            reports_dir=root / "reports",
        )
        out[strategy] = (trained, record, root / "reports" / f"eval-{strategy}")
    return out


@pytest.mark.parametrize("strategy", ["frozen", "finetune"])
def test_evaluate_writes_metrics_and_confusion(evaluated, strategy: str):
    trained, record, reports = evaluated[strategy]
    # the registered version is found in the registry by the weights' sha256 (test_evaluate_logs_to_the_train_run...)
    assert isinstance(record, EvaluateRecord)
    assert set(EvaluateRecord.model_fields) == {
        "run_name", "test_accuracy", "balanced_accuracy", "macro_f1", "ece", "ece_calibrated", "tta_accuracy",
        "key", "inputs", "outputs",
    }  # fmt: skip
    assert record.run_name == f"eval-{strategy}"
    report = json.loads((reports / "metrics.json").read_text())
    assert set(report) == {
        "accuracy", "balanced_accuracy", "macro_f1", "n_test", "temperature", "ece", "ece_calibrated"
    }  # fmt: skip
    detail = json.loads((reports / "per_class.json").read_text())
    assert set(detail) == {"per_class", "confusion_matrix"} and np.sum(detail["confusion_matrix"]) == 15
    assert report["ece"] == record.ece and report["ece_calibrated"] == record.ece_calibrated
    assert report["balanced_accuracy"] == record.balanced_accuracy
    assert report["n_test"] == 15 and report["accuracy"] == record.test_accuracy
    assert report["macro_f1"] == record.macro_f1
    assert set(detail["per_class"]) == {"target-0", "target-1", "target-2"}
    assert all({"precision", "recall"} <= set(v) for v in detail["per_class"].values())
    assert (reports / "confusion.png").read_bytes().startswith(b"\x89PNG")
    assert {Path(o.path).name for o in record.outputs} == {
        "metrics.json", "per_class.json", "confusion.png", "reliability.png", "mistakes.png"
    }  # fmt: skip
    assert (reports / "reliability.png").read_bytes().startswith(b"\x89PNG")
    assert Output.of(reports / "metrics.json") in record.outputs


def test_frozen_scores_on_stored_features_equal_the_whole_network_on_images(setup: Setup, evaluated):
    trained, record, _ = evaluated["frozen"]
    net, spec = load_model(absolute(trained.path), trained.sha256)
    test = load_task(setup.data_dir, "target").test
    extract_record = setup.extract_record
    prov = provenance(trained.weights_sha256, spec.arch, spec.cut, spec.preprocess)
    assert extract_record.provenance_for(spec.cut) == prov  # the store read is the one these weights wrote
    loaded = logits_on_test(net, spec, "frozen", test.images, extract_record, StreamParams(mode="never"))
    streamed = StreamParams(mode="always", window_mb=0.05, read_ahead=1)  # a few rows at a time
    assert torch.equal(logits_on_test(net, spec, "frozen", test.images, extract_record, streamed), loaded)
    from_store = loaded.argmax(1).numpy()
    from_images = logits_on_test(net, spec, "finetune", test.images, None, EvaluateParams().stream).argmax(1).numpy()
    assert (from_store == from_images).all()
    assert metrics.accuracy(test.labels, from_images) == record.test_accuracy


@pytest.mark.parametrize("strategy", ["frozen", "finetune"])
def test_evaluate_logs_to_the_train_run_and_registers(evaluated, strategy: str):
    trained, record, _ = evaluated[strategy]
    client = MlflowClient()
    run_id = tracking.run_of_model(trained.sha256)
    assert run_id is not None
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == f"eval-{strategy}"
    assert run.data.metrics["test_accuracy"] == pytest.approx(record.test_accuracy)
    assert run.data.metrics["test_macro_f1"] == pytest.approx(record.macro_f1)
    assert "test_recall.target-0" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == trained.epochs  # train's metrics kept
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert evaluation == {
        f"evaluation/{f}"
        for f in ("metrics.json", "per_class.json", "confusion.png", "reliability.png", "mistakes.png")
    }
    registered = tracking.registered_version(PARAMS.register_as, trained.sha256)
    assert registered is not None
    version = client.get_model_version(PARAMS.register_as, registered.version)
    assert version.run_id == run.info.run_id and version.tags[tracking.WEIGHTS_SHA_TAG] == trained.sha256
    assert float(version.tags["score"]) == pytest.approx(trained.val_accuracy)


def test_frozen_without_features_is_a_clear_error(evaluated, setup: Setup, tmp_path: Path):
    trained, _, _ = evaluated["frozen"]
    with pytest.raises(ValueError, match="needs the extract record"):
        evaluate.fn("x", trained, None, setup.task_meta, PARAMS, setup.data_dir, tmp_path)


def test_tta_is_reported_beside_plain_accuracy(setup: Setup, evaluated, tmp_path: Path) -> None:
    """evaluate.tta: a frozen run averages the views its store holds, a finetune run its own forward passes."""
    stored = extract.fn(
        weights=setup.weights, task_meta=setup.task_meta, data_dir=setup.data_dir, store_root=tmp_path / "features",
        params=ExtractParams(batch_size=32, chunk_mb=0.5, device="cpu", tta=3),
    )  # fmt: skip
    tta = PARAMS.model_copy(update={"tta": 3})
    test = load_task(setup.data_dir, "target").test
    for strategy, record in (("frozen", stored), ("finetune", None)):
        trained, plain, _ = evaluated[strategy]
        again = evaluate.fn(
            run_name=f"eval-{strategy}", train_record=trained, extract_record=record, task_meta=setup.task_meta,
            params=tta, data_dir=setup.data_dir, reports_dir=tmp_path / strategy,
        )  # fmt: skip
        report = json.loads((tmp_path / strategy / f"eval-{strategy}" / "metrics.json").read_text())
        assert report["tta_views"] == 3 and report["tta_accuracy"] == again.tta_accuracy
        assert again.test_accuracy == plain.test_accuracy and plain.tta_accuracy is None  # plain figures unchanged
        net, spec = load_model(absolute(trained.path), trained.sha256)
        views = tta_logits(net, spec, trained.trained, test.images, record, 3, StreamParams())
        plain_logits = logits_on_test(net, spec, trained.trained, test.images, record, StreamParams())
        probs = np.mean([torch.softmax(v / spec.temperature, 1).numpy() for v in (plain_logits, *views)], axis=0)
        assert again.tta_accuracy == pytest.approx(float((probs.argmax(1) == test.labels).mean()))
        logged = MlflowClient().get_run(tracking.run_of_model(trained.sha256)).data.metrics
        assert logged["test_tta_accuracy"] == again.tta_accuracy
    trained, _, _ = evaluated["frozen"]
    with pytest.raises(ValueError, match="set extract.tta to 3 or more"):
        evaluate.fn(
            run_name="eval-frozen", train_record=trained, extract_record=setup.extract_record,
            task_meta=setup.task_meta, params=tta, data_dir=setup.data_dir, reports_dir=tmp_path / "refused",
        )  # fmt: skip
