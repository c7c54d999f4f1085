"""torch heads: scikit-learn estimators by the book, as accurate as scikit-learn's own, saved without torch."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

from heads import get_head, plan_protocol, fit_head
from heads.persist import load_head, save_head
from heads.torch_knn import TorchKNeighborsClassifier
from heads.torch_logreg import TorchLogisticRegression


@parametrize_with_checks([TorchLogisticRegression(), TorchKNeighborsClassifier()])
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("C", [0.01, 0.1, 1.0])
def test_matches_sklearn_logreg_accuracy_at_the_same_C(digits, C, precision):
    X_train, X_test, y_train, y_test = digits
    ours = TorchLogisticRegression(C=C, device="cpu", precision=precision).fit(X_train, y_train)
    ref = LogisticRegression(C=C, max_iter=5000).fit(X_train, y_train)
    assert abs(ours.score(X_test, y_test) - ref.score(X_test, y_test)) <= 0.003 + 1e-9
    np.testing.assert_allclose(ours.predict_proba(X_test), ref.predict_proba(X_test), atol=0.05)  # same optimum, float32


def _objective(model, X, y, C):
    """scikit-learn's scaled objective (mean cross-entropy + ||W||^2 / (2 C n)) in float64."""
    logits = X.astype(np.float64) @ model.coef_.T.astype(np.float64) + model.intercept_
    logits -= logits.max(1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    index = np.searchsorted(model.classes_, y)
    return -log_p[np.arange(len(y)), index].mean() + (model.coef_.astype(np.float64) ** 2).sum() / (2 * C * len(y))


def test_bf16_products_reach_the_fp32_optimum(digits):
    X_train, _, y_train, _ = digits
    fp32 = TorchLogisticRegression(C=0.1, precision="fp32", tol=1e-5).fit(X_train, y_train)
    bf16 = TorchLogisticRegression(C=0.1, precision="bf16", tol=1e-5).fit(X_train, y_train)
    best = _objective(fp32, X_train, y_train, 0.1)
    assert _objective(bf16, X_train, y_train, 0.1) <= best * 1.01


def test_warm_start_continues_from_the_previous_solution(digits):
    X_train, X_test, y_train, y_test = digits
    cold = TorchLogisticRegression(C=1.0, precision="fp32").fit(X_train, y_train)
    model = TorchLogisticRegression(C=0.1, precision="fp32", warm_start=True).fit(X_train, y_train)
    model.set_params(C=1.0).fit(X_train, y_train)
    np.testing.assert_allclose(model.predict_proba(X_test), cold.predict_proba(X_test), atol=0.05)
    assert model.n_iter_[0] < cold.n_iter_[0]  # started near the C=1 optimum from the C=0.1 one
    again = TorchLogisticRegression(C=1.0, precision="fp32", warm_start=False).fit(X_train, y_train)
    assert again.n_iter_[0] == cold.n_iter_[0]  # without warm_start every fit starts from zeros


def test_balanced_class_weight_changes_the_fit(digits):
    X_train, _, y_train, _ = digits
    keep = (y_train != 3) | (np.arange(len(y_train)) % 10 == 0)  # class 3 made rare
    plain = TorchLogisticRegression(C=0.1).fit(X_train[keep], y_train[keep])
    balanced = TorchLogisticRegression(C=0.1, class_weight="balanced").fit(X_train[keep], y_train[keep])
    assert abs(balanced.intercept_[3] - plain.intercept_[3]) > 0.1


def test_registered_and_saved_with_skops(tmp_path, digits):
    X_train, X_test, y_train, _ = digits
    spec = get_head("torch-logreg")
    plan = plan_protocol(y_train, np.array(["train"] * len(y_train)), folds=3)
    model = fit_head(spec, X_train, y_train, plan.final).best_estimator_
    path = save_head(tmp_path / "h.skops", model, {"head": "torch-logreg"})
    loaded, _ = load_head(path)
    np.testing.assert_array_equal(loaded.predict(X_test), model.predict(X_test))


@pytest.mark.parametrize("k, weights", [(1, "distance"), (5, "distance"), (10, "uniform")])
def test_knn_matches_sklearn_cosine_knn(digits, k, weights):
    from sklearn.neighbors import KNeighborsClassifier

    X_train, X_test, y_train, _ = digits
    ours = TorchKNeighborsClassifier(n_neighbors=k, weights=weights, batch_size=64).fit(X_train, y_train)
    ref = KNeighborsClassifier(n_neighbors=k, weights=weights, metric="cosine", algorithm="brute").fit(X_train, y_train)
    assert (ours.predict(X_test) == ref.predict(X_test)).mean() >= 0.995
    np.testing.assert_allclose(ours.predict_proba(X_test), ref.predict_proba(X_test), atol=1e-3)


def test_knn_saved_with_skops(tmp_path, digits):
    X_train, X_test, y_train, _ = digits
    model = TorchKNeighborsClassifier(n_neighbors=5).fit(X_train, y_train)
    loaded, _ = load_head(save_head(tmp_path / "k.skops", model, {}))
    np.testing.assert_array_equal(loaded.predict(X_test), model.predict(X_test))


def test_warm_started_path_search_chooses_like_grid_search():
    import dataclasses

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    plan = plan_protocol(y, np.where(np.arange(len(y)) % 4 == 0, "test", "train"), folds=3)
    spec = get_head("torch-logreg")
    assert spec.path_param == "C"
    path = fit_head(spec, X, y, plan.tasks[0], jobs=1)
    grid = fit_head(dataclasses.replace(spec, path_param=None), X, y, plan.tasks[0], jobs=1)
    assert path.best_params_["clf__C"] == grid.best_params_["clf__C"]
    scored = plan.tasks[0].score
    agree = (path.best_estimator_.predict(X[scored]) == grid.best_estimator_.predict(X[scored])).mean()
    assert agree >= 0.99
