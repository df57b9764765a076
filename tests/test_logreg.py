"""Logistic regression: scikit-learn's optimum, the one-SE choice of C, seven rows whatever the data."""

from __future__ import annotations

import numpy as np
import pytest

from fercache.errors import FERCacheWarning
from fercache.logreg import Problem, fit_logreg, minimise, sample_weights, stratified_split


def blobs(n: int, dim: int, sep: float, seed: int, classes: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Correlated features (a random mixing matrix) around one centre per class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    mix = rng.normal(size=(dim, dim)) * np.linspace(0.05, 3, dim)  # badly conditioned on purpose
    X = (rng.normal(size=(classes, dim))[y] * sep + rng.normal(size=(n, dim))) @ mix
    return X, y


def objective(X, y, w, weight, bias, C):
    """scikit-learn's objective, written out: weighted mean cross-entropy + ||W||^2 / (2 C sum(w))."""
    z = X @ weight.T + bias
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -(w * logp[np.arange(len(y)), y]).sum() / w.sum() + (weight ** 2).sum() / (2 * C * w.sum())


@pytest.mark.parametrize("class_weight", ["none", "balanced"])
def test_reaches_scikit_learns_optimum(class_weight):
    from sklearn.linear_model import LogisticRegression

    X, y = blobs(600, 12, 0.7, seed=0)
    keep = (y != 1) | (np.arange(600) < 200)  # an unbalanced class, so the weights matter
    X, y = X[keep], y[keep]
    for C in (0.01, 10.0):
        weights = sample_weights(y, class_weight)
        problem = Problem(X, y, weights)
        theta, info = minimise(problem, C, tol=1e-6)
        assert info["converged"] and info["grad_max"] <= 1e-6
        weight, bias = problem.weights(theta, C)
        ref = LogisticRegression(C=C, tol=1e-8, max_iter=100000,
                                 class_weight=None if class_weight == "none" else "balanced").fit(X, y)
        np.testing.assert_allclose(weight, ref.coef_, atol=2e-4 * max(1, np.abs(ref.coef_).max()))
        np.testing.assert_allclose(bias - bias.mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-3)
    # Large data takes float32 products: on standardised rows they still reach scikit-learn's tolerance.
    Xs = (X - X.mean(0)) / X.std(0)
    problem = Problem(Xs, y, weights, dtype="float32")
    theta, info = minimise(problem, 1.0)
    assert info["converged"] and problem.X.dtype.itemsize == 4
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=100000,
                             class_weight=None if class_weight == "none" else "balanced").fit(Xs, y)
    ours = objective(Xs, y, weights, *problem.weights(theta, 1.0), C=1.0)
    assert ours == pytest.approx(objective(Xs, y, weights, ref.coef_, ref.intercept_, C=1.0), rel=1e-5)  # tol 1e-4 leaves ~1e-6
    np.testing.assert_allclose(problem.weights(theta, 1.0)[0], ref.coef_, atol=1e-2)  # a flat optimum: ~tol / curvature


def test_one_standard_error_rule_takes_the_strongest_regularisation_within_one_se():
    X, y = blobs(1400, 20, 0.3, seed=1)
    head, search = fit_logreg(X, y, seed=0)
    curve = search["validation"]
    best = max(curve, key=lambda r: r["val_acc"])
    within = [r["C"] for r in curve if r["val_acc"] >= best["val_acc"] - best["val_se"]]
    assert search["C"] == min(within) and search["best_val_C"] == best["C"]
    assert all(r["converged"] for r in curve) and search["converged"]
    assert [r["C"] for r in curve] == sorted(r["C"] for r in curve)
    assert search["val_count"] == 280 and head.weight.shape == (7, 20)
    assert best["val_se"] == pytest.approx(np.sqrt(best["val_acc"] * (1 - best["val_acc"]) / 280))


def test_missing_and_single_row_classes_still_give_seven_rows_and_any_float_dtype():
    X, y = blobs(210, 8, 2.0, seed=2)
    keep = (y != 1) & ((y != 5) | (np.arange(210) == 5))  # no disgust at all, one surprise row
    X, y = X[keep], y[keep]
    fit_rows, val_rows = stratified_split(y, 0.2, seed=0)
    assert 5 not in y[val_rows] and (y[fit_rows] == 5).sum() == 1
    for dtype in (np.float16, np.float32, np.float64):
        head, search = fit_logreg(X.astype(dtype), y, seed=0)
        assert head.weight.shape == (7, 8) and head.bias.shape == (7,) and search["converged"]
        proba = head.predict_proba(X.astype(np.float32))
        assert proba[:, 1].max() == 0 and not head.weight[1].any()  # a class never seen is never predicted
        assert (head.predict(X * 100) != 1).all()  # not even for faces far from every training row
        assert (head.predict(X) == y).mean() > 0.9


def test_a_given_validation_set_is_used_as_is():
    X, y = blobs(700, 10, 0.5, seed=3)
    X_val, y_val = blobs(350, 10, 0.5, seed=4)
    head, search = fit_logreg(X, y, val=(X_val, y_val))
    assert search["val_count"] == 350 and search["val"] == "given" and search["val_fraction"] is None
    chosen = next(r for r in search["validation"] if r["C"] == search["C"])
    assert head.score(X_val, y_val)[1] == pytest.approx(chosen["val_acc"])  # no refit: the head scored


def test_a_fit_that_stops_early_says_so_in_one_line(monkeypatch):
    import fercache.logreg as logreg

    monkeypatch.setattr(logreg, "MAX_ITER", 2)
    monkeypatch.setattr(logreg.minimise, "__defaults__", (logreg.TOL, 2))
    X, y = blobs(400, 10, 0.5, seed=5)
    with pytest.warns(FERCacheWarning, match=r"did not converge .*after at most 2 iterations") as caught:
        _, search = fit_logreg(X, y, grid=(1.0, 10.0))
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and not search["converged"]


def test_the_walk_goes_on_down_while_the_strongest_c_tried_is_the_best():
    rng = np.random.default_rng(6)
    y = np.arange(280) % 7
    X = np.concatenate([rng.normal(size=(280, 1)) * 0.3 + y[:, None], rng.normal(size=(280, 150))], 1)
    _, search = fit_logreg(X, y, grid=(10.0, 100.0))  # many noise features: weak regularisation overfits
    Cs = [r["C"] for r in search["validation"]]
    assert Cs == sorted(Cs) and Cs[0] < 10.0  # went below the grid
    best = max(search["validation"], key=lambda r: r["val_acc"])
    assert best["C"] > Cs[0] or Cs[0] <= 1e-8 * np.sqrt(10)  # stopped once the best was no longer the edge


def test_balanced_weights_choose_c_on_balanced_accuracy():
    from fercache.logreg import balanced_accuracy

    X, y = blobs(700, 10, 0.5, seed=3)
    keep = (y != 1) | (np.arange(len(y)) % 10 == 0)  # a rare class, as disgust is
    X, y = X[keep], y[keep]
    head, search = fit_logreg(X, y, class_weight="balanced")
    assert search["criterion"] == "val_bacc"
    curve = search["validation"]
    best = max(curve, key=lambda r: r["val_bacc"])
    assert search["best_val_C"] == best["C"]
    assert search["C"] == min(r["C"] for r in curve if r["val_bacc"] >= best["val_bacc"] - best["val_bacc_se"])
    y_small, pred = np.array([0, 0, 1, 1, 1, 1]), np.array([0, 1, 1, 1, 1, 0])
    assert balanced_accuracy(y_small, pred) == pytest.approx(
        (0.625, np.sqrt(0.5 * 0.5 / 2 + 0.75 * 0.25 / 4) / 2))
    assert fit_logreg(X, y)[1]["criterion"] == "val_acc"
