"""Temperature scaling: fitted on validation logits, it lowers the calibration error and keeps every class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headstart.calibration import calibration_bins, expected_calibration_error, fit_temperature, softmax


def overconfident(n: int, seed: int, scale: float = 4.0) -> tuple[torch.Tensor, np.ndarray]:
    """Logits whose softmax is calibrated (labels are drawn from it), then scaled up `scale` times: overconfident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (n, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    return torch.tensor(scale * logits, dtype=torch.float32), labels


def test_a_temperature_fitted_on_validation_calibrates_the_test_split():
    val_logits, val_labels = overconfident(2000, 0)
    test_logits, test_labels = overconfident(2000, 1)
    t = fit_temperature(val_logits, torch.as_tensor(val_labels))
    assert t == pytest.approx(4.0, rel=0.15)  # the logits were scaled up 4x: the fit undoes it
    before = expected_calibration_error(softmax(test_logits), test_labels)
    after = expected_calibration_error(softmax(test_logits, t), test_labels)
    assert before > 0.15 and after < 0.05 and after < before / 3
    assert np.array_equal(softmax(test_logits).argmax(1), softmax(test_logits, t).argmax(1))
    assert fit_temperature(val_logits, torch.as_tensor(val_labels)) == t  # deterministic


def test_ece_is_zero_when_confidence_matches_accuracy_and_bins_cover_every_prediction():
    probs = np.array([[0.8, 0.2]] * 10)
    labels = np.array([0] * 8 + [1] * 2)  # 80% right at confidence 0.8
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)
    always_wrong = expected_calibration_error(probs, np.ones(10, int))
    assert always_wrong == pytest.approx(0.8)
    rows = calibration_bins(softmax(overconfident(500, 2)[0]), overconfident(500, 2)[1])
    assert sum(r["count"] for r in rows) == 500


def test_predict_proba_answers_the_models_calibrated_probabilities():
    from headstart.backbones import Preprocess, create_model
    from headstart.checkpoints import ModelSpec
    from headstart.serving import image_logits, predict_proba

    torch.manual_seed(0)
    net = create_model("fmnist_cnn", 3)
    net.eval()
    pre = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    spec = ModelSpec(arch="fmnist_cnn", num_classes=3, class_names=["a", "b", "c"], preprocess=pre, temperature=2.5)
    expected = torch.softmax(image_logits(net, spec, images) / 2.5, dim=1).numpy()
    assert np.allclose(predict_proba(net, spec, images), expected)
    plain = predict_proba(net, spec.model_copy(update={"temperature": 1.0}), images)
    assert not np.allclose(plain, expected) and np.array_equal(plain.argmax(1), expected.argmax(1))


def test_the_none_threshold_rejects_the_asked_share_of_validation_and_predict_says_none():
    from headstart.backbones import Preprocess
    from headstart.calibration import rejection_threshold
    from headstart.checkpoints import ModelSpec
    from headstart.serving import NONE, answers

    val_logits, _ = overconfident(1000, 3, scale=1.0)
    probs = softmax(val_logits)
    threshold = rejection_threshold(probs, 0.05)
    assert (probs.max(axis=1) < threshold).mean() == pytest.approx(0.05, abs=0.002)
    pre = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))
    spec = ModelSpec(arch="fmnist_cnn", num_classes=3, class_names=["a", "b", "c"], preprocess=pre, reject_below=0.6)
    unsure_and_sure = np.array([[0.4, 0.35, 0.25], [0.1, 0.85, 0.05]])
    assert answers(spec, unsure_and_sure) == [NONE, "b"]
    assert answers(spec.model_copy(update={"reject_below": None}), unsure_and_sure) == ["a", "b"]


def test_a_validation_split_without_mistakes_never_sharpens_the_model():
    logits = torch.tensor([[3.0, 0.0], [0.0, 2.5], [4.0, 1.0]])
    assert fit_temperature(logits, torch.tensor([0, 1, 0])) == 1.0  # the unbounded fit would run to T -> 0
