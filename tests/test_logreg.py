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
    lowest = min(curve, key=lambda r: r["val_loss"])
    within = [r["C"] for r in curve if r["val_acc"] >= best["val_acc"] - best["val_se"]
              and r["val_loss"] <= lowest["val_loss"] + lowest["val_loss_se"]]
    assert search["C"] == min(within) and search["best_val_C"] == best["C"]
    assert search["lowest_val_loss_C"] == lowest["C"]
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
    stalled = [w for w in caught if "did not converge" in str(w.message)]
    assert len(stalled) == 1 and "\n" not in str(stalled[0].message) and not search["converged"]


def test_the_walk_goes_on_down_while_the_strongest_c_tried_is_the_best():
    rng = np.random.default_rng(6)
    y = np.arange(280) % 7
    X = np.concatenate([rng.normal(size=(280, 1)) * 0.3 + y[:, None], rng.normal(size=(280, 150))], 1)
    _, search = fit_logreg(X, y, grid=(10.0, 100.0))  # many noise features: weak regularisation overfits
    Cs = [r["C"] for r in search["validation"]]
    assert Cs == sorted(Cs) and Cs[0] < 10.0  # went below the grid
    first, *others = (r["val_acc"] for r in search["validation"])
    assert first <= max(others) or Cs[0] <= 1e-8 * np.sqrt(10)  # stopped once the edge was no longer strictly best


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
    lowest = min(curve, key=lambda r: r["val_loss"])
    assert search["C"] == min(r["C"] for r in curve if r["val_bacc"] >= best["val_bacc"] - best["val_bacc_se"]
                              and r["val_loss"] <= lowest["val_loss"] + lowest["val_loss_se"])
    y_small, pred = np.array([0, 0, 1, 1, 1, 1]), np.array([0, 1, 1, 1, 1, 0])
    assert balanced_accuracy(y_small, pred) == pytest.approx(
        (0.625, np.sqrt(0.5 * 0.5 / 2 + 0.75 * 0.25 / 4) / 2))
    assert fit_logreg(X, y)[1]["criterion"] == "val_acc"


def true_gradient(X, y, w, weight, bias, C):
    """The gradient of `objective` in the caller's own coordinates (uncentred rows), written out."""
    z = X @ weight.T + bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    g = p * (w / w.sum())[:, None]
    return np.concatenate([g.T @ X + weight / (C * w.sum()), g.sum(0)[:, None]], 1)


def test_convergence_is_measured_on_the_original_objective_with_offset_rows():
    """Rows far from the origin (--no-standardize on raw features): the bias gradient, times the
    offset, is part of the weights' gradient; measured after centring it was 50 times too small."""
    from fercache.logreg import TOL

    X, y = blobs(700, 6, 1.0, seed=8)
    X = X + 40.0  # every feature offset, as raw pixels or unstandardised embeddings are
    weights = sample_weights(y, "none")
    problem = Problem(X, y, weights)
    for max_iter in (3, 1000):  # stopped early (a gradient well above TOL) and run to the end
        theta, info = minimise(problem, 1.0, max_iter=max_iter)
        true = np.abs(true_gradient(X, y, weights, *problem.weights(theta, 1.0), C=1.0)).max()
        assert info["grad_max"] == pytest.approx(true, rel=1e-3)
        assert info["converged"] == (true <= TOL)
    assert info["converged"]
    head, search = fit_logreg(X, y, standardize=False)
    assert not head.mean.any() and (head.std == 1).all() and search["converged"]
    assert np.abs(true_gradient(X, y, weights, head.weight.astype(np.float64), head.bias.astype(np.float64),
                                search["C"])).max() <= 2 * TOL  # the head's float32 copy of the solution


def test_standardisation_comes_from_the_fit_rows_only(monkeypatch):
    import fercache.logreg as logreg

    X, y = blobs(350, 8, 1.0, seed=9)
    X[:, 0] += 5.0 * (np.arange(350) % 2)  # rows differ enough that any other row set shows
    seen = []
    real = logreg.moments
    monkeypatch.setattr(logreg, "moments",
                        lambda rows, standardize: (seen.append(rows.copy()), real(rows, standardize))[1])
    head, search = fit_logreg(X, y, seed=3)
    fit_rows, val_rows = stratified_split(y, logreg.VAL_FRACTION, seed=3)
    # the validation fits were standardised on the fit rows alone, the refit on all its rows
    np.testing.assert_array_equal(seen[0], X[fit_rows].astype(np.float32))
    np.testing.assert_array_equal(seen[-1], X.astype(np.float32))
    np.testing.assert_allclose(head.mean, X.mean(0), rtol=1e-5, atol=1e-5)
    seen.clear()
    X_val, y_val = blobs(140, 8, 1.0, seed=10)
    head, _ = fit_logreg(X, y, val=(X_val, y_val))
    assert len(seen) == 1 and len(seen[0]) == 350  # a given validation set never enters the statistics
    np.testing.assert_allclose(head.mean, X.mean(0), rtol=1e-5, atol=1e-5)


def test_a_flat_curve_stays_on_the_grid_and_says_the_choice_is_at_its_edge():
    """Features that carry nothing: every C scores and loses alike. The walk used to go on down on
    the tie, to C = 1e-8; now it stops, and the choice at the grid's strong end is said once."""
    from fercache.logreg import C_GRID

    y = np.arange(140) % 7
    X = np.zeros((140, 5))
    with pytest.warns(FERCacheWarning, match=r"C=0.0001 is the strongest regularisation tried") as caught:
        head, search = fit_logreg(X, y)
    assert min(r["C"] for r in search["validation"]) == C_GRID[0]
    assert search["C"] == C_GRID[0] and search["C_at_edge"] == "strongest"
    assert len(caught) == 1 and "\n" not in str(caught[0].message)


def test_a_saturated_curve_keeps_probabilities_that_mean_something():
    """Every C classifies validation perfectly: the tie used to drive C to 1e-8, every probability to 1/7."""
    y = np.arange(700) % 7
    X = np.eye(7)[y] * 3 + np.random.default_rng(11).normal(size=(700, 7)) * 0.3
    head, search = fit_logreg(X, y)
    assert all(r["val_acc"] == 1.0 for r in search["validation"])  # the curve is saturated indeed
    assert search["C"] >= 1e-4 and min(r["C"] for r in search["validation"]) == 1e-4
    assert head.predict_proba(X).max(1).mean() > 0.9
    assert search["C_at_edge"] in (None, "weakest")  # at most the weak end: separable rows have no finite optimum


@pytest.mark.parametrize("sep", [1.0, 1.5])
def test_few_shot_logreg_gives_probabilities_not_uniform_ones(sep):
    """10 faces per class, so 2 per class validate: a flat accuracy curve is the normal case.
    scikit-learn at its default C=1 is the sanity anchor."""
    from sklearn.linear_model import LogisticRegression

    X, y = blobs(1400, 20, sep, seed=7)
    rng = np.random.default_rng(0)
    shots = np.concatenate([rng.choice(np.flatnonzero(y == c), 10, replace=False) for c in range(7)])
    rest = np.setdiff1d(np.arange(len(y)), shots)
    head, search = fit_logreg(X[shots], y[shots])
    ours = head.predict_proba(X[rest])
    mean, std = X[shots].mean(0), X[shots].std(0)
    ref = LogisticRegression(C=1.0, max_iter=10000).fit((X[shots] - mean) / std, y[shots])
    theirs = ref.predict_proba((X[rest] - mean) / std)
    assert ours.max(1).mean() > 0.5 > 3 / 7  # 1/7 is uniform
    assert ours.max(1).mean() > 0.8 * theirs.max(1).mean()
    assert (ours.argmax(1) == y[rest]).mean() > (theirs.argmax(1) == y[rest]).mean() - 0.05
    loss = lambda p: -np.log(p[np.arange(len(rest)), y[rest]]).mean()
    assert loss(ours) < min(np.log(7) / 2, loss(theirs) + 0.3)
