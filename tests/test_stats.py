"""Uncertainty figures: bootstrap intervals, McNemar's test, calibration error, few-shot draws."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from fercache.stats import calibration, few_shot, intervals, mcnemar, mean_std


def noisy_predictions(n: int, right: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels over 7 unbalanced classes and predictions right about `right` of the time."""
    rng = np.random.default_rng(seed)
    y = rng.choice(7, size=n, p=[0.14, 0.015, 0.14, 0.25, 0.17, 0.115, 0.17])
    pred = np.where(rng.random(n) < right, y, rng.integers(0, 7, n))
    return y, pred


def test_point_figures_are_scikit_learns_and_inside_their_intervals():
    y, pred = noisy_predictions(7178, 0.6, seed=0)
    out = intervals(y, pred)
    assert out["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=range(7), zero_division=0))
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    for name in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert out[f"{name}_low"] < out[name] < out[f"{name}_high"], name
    # a binomial proportion's 95% interval is about +-1.96 sqrt(p (1 - p) / n)
    half = 1.96 * np.sqrt(out["accuracy"] * (1 - out["accuracy"]) / len(y))
    assert out["accuracy_high"] - out["accuracy_low"] == pytest.approx(2 * half, rel=0.15)
    assert intervals(y, pred) == out and intervals(y, pred, seed=1) != out  # seeded


def test_intervals_shrink_with_more_rows():
    widths = []
    for n in (300, 3000, 30000):
        y, pred = noisy_predictions(n, 0.5, seed=n)
        out = intervals(y, pred, resamples=500)
        widths.append(out["accuracy_high"] - out["accuracy_low"])
    assert widths[0] > 2.5 * widths[1] > 2.5 * 2.5 * widths[2]  # ~ 1 / sqrt(n): sqrt(10) ~ 3.2


def test_mcnemar_against_a_hand_computed_case():
    # 10 rows: a alone right on rows 0-5 (6), b alone right on row 6 (1), both right on 7-9.
    y = np.zeros(10, int)
    a = np.array([0] * 6 + [1] + [0] * 3)
    b = np.array([1] * 6 + [0] + [0] * 3)
    out = mcnemar(y, a, b)
    assert (out["a_only"], out["b_only"], out["count"]) == (6, 1, 10)
    # two-sided exact: 2 * P(Bin(7, 1/2) <= 1) = 2 * (1 + 7) / 128 = 0.125
    assert out["p_value"] == pytest.approx(0.125)
    assert out["difference"] == pytest.approx(0.5)
    assert mcnemar(y, a, a)["p_value"] == 1.0
    y, pred = noisy_predictions(2000, 0.6, seed=3)
    worse = np.where(np.arange(2000) < 300, (pred + 1) % 7, pred)  # 300 rows made wrong (some were already)
    assert mcnemar(y, pred, worse)["p_value"] < 1e-10


def test_expected_calibration_error_is_near_zero_when_calibrated_and_large_when_not():
    rng = np.random.default_rng(0)
    n = 50000
    proba = rng.dirichlet(np.ones(7) * 0.3, size=n)
    y = np.array([rng.choice(7, p=p) for p in proba[:2000]])  # labels drawn from the probabilities themselves
    calibrated = calibration(y, proba[:2000])
    y_fast = (rng.random(n)[:, None] > proba.cumsum(1)).sum(1).clip(0, 6)  # the same, vectorised
    assert calibration(y_fast, proba)["ece"] < 0.01
    assert calibrated["ece"] < 0.05
    over = calibration(y_fast, np.eye(7)[proba.argmax(1)])  # always certain, often wrong
    assert over["ece"] > 0.2
    bins = calibration(y_fast, proba)["bins"]
    assert sum(b["count"] for b in bins) == n and len(bins) == 15
    assert all(b["low"] < b["confidence"] <= b["high"] for b in bins if b["count"])


def test_few_shot_draws_k_per_class_differently_and_reproducibly():
    y = np.repeat(np.arange(7), [50, 3, 50, 50, 50, 50, 50])
    draws = few_shot(y, shots=5, repeats=4, seed=0)
    assert len(draws) == 4
    for rows in draws:
        assert np.bincount(y[rows], minlength=7).tolist() == [5, 3, 5, 5, 5, 5, 5]  # disgust has only 3
        assert len(set(rows.tolist())) == len(rows)
    assert not np.array_equal(draws[0], draws[1])
    assert all(np.array_equal(a, b) for a, b in zip(draws, few_shot(y, shots=5, repeats=2, seed=0)))
    assert not np.array_equal(draws[0], few_shot(y, shots=5, repeats=1, seed=1)[0])


def test_mean_std():
    out = mean_std([{"accuracy": 0.3, "name": "a"}, {"accuracy": 0.5, "name": "b"}])
    assert out == pytest.approx({"accuracy_mean": 0.4, "accuracy_std": np.sqrt(0.02), "repeats": 2})


def test_holm_adjusts_step_down_and_keeps_order():
    from fercache.stats import holm

    assert holm([]) == []
    assert holm([0.04]) == [0.04]
    # sorted 0.01, 0.02, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.02), max(0.04, 1 x 0.04)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == [1.0, 1.0]


def test_versus_best_holds_the_family_wise_error_over_equally_good_runs():
    """Runs that are all equally good, the best picked on the same faces: the chance that any run
    is called worse than it at 0.05 must stay at most 0.05. Adjusting only best-vs-rest (0.2.0)
    gave about 0.13 with 12 runs; all pairs Holm-adjusted hold it."""
    from scipy.stats import binom

    from fercache.stats import holm, versus_best

    sims, faces = 400, 300
    rng = np.random.default_rng(0)
    for runs, naive_at_least in ((12, 0.09), (6, 0.05)):
        ease = rng.beta(2.0, 1.3, size=(sims, 1, faces))  # faces differ in difficulty, runs do not
        right = rng.random((sims, runs, faces)) < ease
        best, raw, adjusted = versus_best(right)
        assert (best == right.sum(-1).argmax(-1)).all() and np.isnan(raw[np.arange(sims), best]).all()
        rest = ~np.isnan(raw)
        naive = holm(raw[rest].reshape(sims, runs - 1))  # best against the rest only
        assert np.mean(naive.min(-1) < 0.05) >= naive_at_least  # what the test guards against shows
        # At a true rate of 0.05, more than the 99.9th percentile of Binomial(400, 0.05) rejections
        # (34, 8.5%) happens once in a thousand seeds: any rate above is not sampling noise.
        limit = binom.ppf(0.999, sims, 0.05) / sims
        assert np.mean(np.nanmin(adjusted, -1) < 0.05) <= limit, runs
        assert np.mean(np.nanmin(adjusted, -1) < 0.05) <= 0.05  # and here in fact within the level itself


def test_versus_best_matches_mcnemar_and_holm_over_all_pairs_on_a_constructed_case():
    from fercache.stats import holm, versus_best

    y = np.zeros(60, dtype=np.int64)
    preds = [np.r_[np.zeros(50), np.ones(10)], np.r_[np.ones(20), np.zeros(40)], np.r_[np.zeros(30), np.ones(30)]]
    right = np.array([p == y for p in preds])
    best, raw, adjusted = versus_best(right)
    pairs = {(0, 1): mcnemar(y, preds[0], preds[1])["p_value"], (0, 2): mcnemar(y, preds[0], preds[2])["p_value"],
             (1, 2): mcnemar(y, preds[1], preds[2])["p_value"]}
    assert best == 0 and np.isnan(raw[0]) and np.isnan(adjusted[0])
    assert raw[1:] == pytest.approx([pairs[0, 1], pairs[0, 2]])
    assert adjusted[1:] == pytest.approx(np.array(holm(list(pairs.values())))[:2])
    assert adjusted[1] > raw[1] and pairs[0, 2] < 0.05  # three pairs in the family, not two
