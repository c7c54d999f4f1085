"""Calibrated probabilities: metrics against independent implementations, calibrators, and the test rows kept out."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.special import softmax

from heads import HeadsError, get_head, plan_protocol
from heads.calibration import Calibrator, calibration_metrics, expected_calibration_error
from heads.evaluate import run_head

from conftest import assert_one_line_error, invoke


def _torchmetrics_ece(y, proba):
    import torch
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(num_classes=proba.shape[1], n_bins=15, norm="l1")
    return float(metric(torch.from_numpy(proba), torch.from_numpy(y)))


def test_ece_equals_torchmetrics_on_random_and_extreme_probabilities():
    rng = np.random.default_rng(0)
    for scale in (0.5, 3.0, 30.0):  # diffuse to nearly one-hot (confidences at bin edges and at 1.0)
        proba = softmax(rng.normal(size=(3000, 7)) * scale, axis=1)
        y = rng.integers(0, 7, 3000)
        assert expected_calibration_error(y, proba) == pytest.approx(_torchmetrics_ece(y, proba), abs=1e-6)


def test_temperature_never_changes_the_argmax_and_lowers_the_nll_of_overconfident_scores():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 2000)
    logits = rng.normal(size=(2000, 5)) + 2.0 * np.eye(5)[y]
    over = logits * 6  # six times overconfident: six times the temperature
    calibrator = Calibrator("temperature").fit(over, y)
    assert calibrator.temperature_ == pytest.approx(6 * Calibrator("temperature").fit(logits, y).temperature_, rel=1e-3)
    calibrated = calibrator.transform(over)
    assert np.array_equal(calibrated.argmax(axis=1), over.argmax(axis=1))
    assert np.allclose(calibrated.sum(axis=1), 1)
    assert calibration_metrics(y, calibrated)["nll"] < calibration_metrics(y, softmax(over, axis=1))["nll"]


@pytest.mark.parametrize("method", ["sigmoid", "isotonic"])
def test_sigmoid_and_isotonic_give_probabilities(method):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 1500)
    logits = rng.normal(size=(1500, 3)) + 1.5 * np.eye(3)[y]
    proba = Calibrator(method).fit(logits, y).transform(logits)
    assert proba.shape == (1500, 3) and np.allclose(proba.sum(axis=1), 1) and (proba >= 0).all()
    with pytest.raises(HeadsError, match="at least 1000"):
        Calibrator("isotonic").fit(logits[:500], y[:500])


def test_test_labels_never_influence_the_temperature(digits_tiny):
    from featurize.store import read_store

    store = read_store(digits_tiny)
    X, y = np.asarray(store.features, np.float32), store.labels.copy()
    plan = plan_protocol(y, store.split)
    first = run_head(get_head("linear-svm"), X, y, plan, 10)
    scrambled = y.copy()
    scrambled[plan.final.score] = (scrambled[plan.final.score] + 3) % 10
    second = run_head(get_head("linear-svm"), X, scrambled, plan, 10)
    assert first.calibration["method"] == "temperature" and first.calibration["temperature"][0] > 0
    assert first.calibration == second.calibration and first.params == second.params
    assert np.array_equal(first.y_pred, second.y_pred)
    # The temperature keeps every prediction: the calibrated head predicts what the head alone predicts.
    head = first.model.head
    assert np.array_equal(first.model.predict(X[plan.final.score]), head.predict(X[plan.final.score]))


def test_metrics_in_results_equal_an_independent_computation_from_the_saved_predictions(runner, digits_tiny, tmp_path):
    from sklearn.metrics import brier_score_loss, log_loss

    out = tmp_path / "results"
    result = invoke(runner, ["compare-heads", digits_tiny, "--heads", "logreg,ridge,knn", "--out", out,
                             "--save-predictions", "--bootstrap", "200", "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["head"]: r["calibration"] for r in rows} == {"logreg": "none", "ridge": "temperature", "knn": "none"}
    for r in rows:
        with open(out / "predictions" / f"{r['representation']}__{r['head']}.csv") as f:
            table = list(csv.DictReader(f))
        classes = [c.removeprefix("p:") for c in table[0] if c.startswith("p:")]
        y = np.array([classes.index(t["label"]) for t in table])
        proba = np.array([[float(t[f"p:{c}"]) for c in classes] for t in table])
        assert np.mean([t["label"] == t["prediction"] for t in table]) == pytest.approx(r["accuracy"])
        assert r["nll"] == pytest.approx(log_loss(y, proba, labels=range(len(classes))), abs=1e-6)
        assert r["brier"] == pytest.approx(brier_score_loss(y, proba, labels=range(len(classes))), abs=1e-6)
        assert r["ece"] == pytest.approx(_torchmetrics_ece(y, proba), abs=1e-6)
        assert r["nll_ci"][0] <= r["nll"] <= r["nll_ci"][1]
    assert (out / "reliability_diagram.png").stat().st_size > 10_000
    assert "## Calibration" in (out / "report.md").read_text()


def test_isotonic_with_too_few_rows_is_refused_and_save_predictions_needs_out(runner, digits_tiny):
    from featurize.store import read_store

    store = read_store(digits_tiny)
    X, y = np.asarray(store.features, np.float32)[:800], store.labels[:800]
    plan = plan_protocol(y, store.split[:800])
    with pytest.raises(HeadsError, match="isotonic needs at least 1000 calibration rows"):
        run_head(get_head("ridge"), X, y, plan, 10, calibrate="isotonic")
    missing = invoke(runner, ["compare-heads", digits_tiny, "--heads", "ridge", "--save-predictions", "-q"])
    assert_one_line_error(missing, "--out")


def test_a_saved_head_keeps_its_calibrator_and_predict_writes_its_probabilities(runner, digits_tiny, tmp_path):
    from heads.calibration import CalibratedHead
    from heads.persist import load_head

    head, out = tmp_path / "ridge.skops", tmp_path / "results"
    result = invoke(runner, ["compare-heads", digits_tiny, "--heads", "ridge", "--save-best", head, "--out", out,
                             "--bootstrap", "200", "-q"])
    assert result.exit_code == 0, result.output
    model, provenance = load_head(head)
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert isinstance(model, CalibratedHead) and provenance["calibration"] == "temperature"
    assert model.calibrator.temperature_ == pytest.approx(row["temperature"])
    predicted = invoke(runner, ["predict", "--head", head, "builtin:digits", "--out", tmp_path / "p.csv", "--proba",
                                "--workers", "0", "-q"])
    assert predicted.exit_code == 0, predicted.output
    assert f"accuracy on split test: {row['accuracy'] * 100:.2f} %" in predicted.output
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(sum(float(r[f"p:{d}"]) for d in range(10)) == pytest.approx(1, abs=1e-9) for r in rows)
