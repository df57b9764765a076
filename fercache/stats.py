"""Every figure of a run, in one place: classification metrics, bootstrap intervals, a paired
test between runs, calibration, few-shot draws, and the report of one split built from them.

Everything is plain numpy and vectorised over resamples: a thousand bootstrap resamples of the
7,178 test faces take well under a second. Every function returns a flat dict (or a list of
index arrays), ready for `metrics.json`. Same seed, same numbers. (`report` draws them, `html`
lays them out, `runs` writes them into a run folder.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fercache.names import CLASSES

RESAMPLES = 1000
LEVEL = 0.95
BINS = 15  # reliability bins, as in Guo et al. (2017)


def _per_class(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Macro-F1 and balanced accuracy of a stack of confusion matrices (..., k, k), rows = true.

    The conventions of scikit-learn's `f1_score(average="macro", labels=all, zero_division=0)`
    and `balanced_accuracy_score` (mean recall over the classes present in the true labels).
    """
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(np.float64)
    support, predicted = confusion.sum(-1), confusion.sum(-2)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=support + predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    return f1.mean(-1), recall.sum(-1) / np.maximum((support > 0).sum(-1), 1)


def intervals(y_true: np.ndarray, y_pred: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0,
              level: float = LEVEL, k: int = len(CLASSES)) -> dict:
    """Accuracy, macro-F1 and balanced accuracy with percentile bootstrap intervals.

    Rows are resampled with replacement `resamples` times; the interval is the central `level`
    share of the resampled figures. Returns `{"accuracy", "accuracy_low", "accuracy_high",
    "macro_f1", ..., "balanced_accuracy", ..., "resamples", "level"}`.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = max(k, int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1)  # a dataset of more classes
    n = len(y_true)
    cell = y_true * k + y_pred
    rows = np.random.default_rng(seed).integers(0, n, size=(resamples, n), dtype=np.int32)
    # One bincount for all resamples: resample b's cells are offset by b * k * k.
    offsets = (np.arange(resamples, dtype=np.int64) * k * k)[:, None]
    confusion = np.bincount((cell[rows] + offsets).ravel(), minlength=resamples * k * k).reshape(resamples, k, k)
    point = np.bincount(cell, minlength=k * k).reshape(k, k)
    figures = {"accuracy": (np.trace(point) / max(n, 1), np.trace(confusion, axis1=1, axis2=2) / n)}
    (f1, bal), (f1s, bals) = _per_class(point), _per_class(confusion)
    figures.update(macro_f1=(f1, f1s), balanced_accuracy=(bal, bals))
    tail = (1 - level) / 2 * 100
    out: dict = {}
    for name, (value, samples) in figures.items():
        low, high = np.percentile(samples, [tail, 100 - tail])
        out.update({name: float(value), f"{name}_low": float(low), f"{name}_high": float(high)})
    return {**out, "resamples": resamples, "level": level}


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1/support, confusion (rows = true).

    Every class counts, present or not (zero where a class is never predicted or never true), so
    figures from a `--limit` run compare with full ones.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     zero_division=0)
    present = support > 0
    return {
        "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))),
        "balanced_accuracy": float(recall[present].mean()),  # mean recall over the classes that occur
        "macro_f1": float(f1.mean()),
        "per_class": {c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def score_predictions(y: np.ndarray, pred: np.ndarray, loss: float, classes: list[str], split: str,
                      usage: list[str] | None = None) -> dict:
    """The report of any model's predictions on one split (a head's, or a tuned model's).

    Every figure comes with its 95% bootstrap interval (`<figure>_low`, `<figure>_high`, see
    `intervals`), always drawn with the same bootstrap seed, whatever the fit's, so that
    `evaluate` reproduces `fit`'s intervals exactly. With the rows' usage (`cache.usage_of`) and more
    than one usage among them, also the figures of each part: `public_test_accuracy` (and
    `_macro_f1`, intervals) for the test split.
    """
    out = {"split": split, "count": len(y), "loss": loss, **classification_metrics(y, pred, classes),
           **_bounds(intervals(y, pred, k=len(classes)))}
    if usage is not None and len(set(usage)) > 1:
        usage_arr = np.array(usage)
        for part in sorted(set(usage)):
            mask = usage_arr == part
            figures = intervals(y[mask], pred[mask], k=len(classes))
            out.update({f"{part}_{k}": figures[k] for k in INTERVAL_KEYS})
    return out


INTERVAL_KEYS = tuple(f"{name}{end}" for name in ("accuracy", "macro_f1", "balanced_accuracy")
                      for end in ("", "_low", "_high"))


def _bounds(figures: dict) -> dict:
    """The interval ends of `intervals` (the point figures are classification_metrics')."""
    return {k: figures[k] for k in INTERVAL_KEYS if k.endswith(("_low", "_high"))}


def test_figures(report: dict) -> dict:
    """`metrics.json`'s test keys from a `score_predictions` report: `test_accuracy` (and its
    interval), `macro_f1`, `balanced_accuracy`, each half's figures, loss, per class, confusion."""
    renamed = {f"test_{k}" if k.startswith("accuracy") else k: report[k] for k in INTERVAL_KEYS}
    halves = {k: v for k, v in report.items() if k.startswith(("public_test_", "private_test_"))}
    if report["split"] in ("public_test", "private_test"):  # one half was the test set (--val public_test)
        halves.update({f"{report['split']}_{k}": report[k] for k in INTERVAL_KEYS})
    return {**renamed, "public_test_accuracy": None, "private_test_accuracy": None, **halves,
            "test_loss": report["loss"], "per_class": report["per_class"], "confusion": report["confusion"]}


UNSEEN_KEYS = ("test_unseen_accuracy", "test_unseen_accuracy_low", "test_unseen_accuracy_high", "test_unseen_count")


def unseen_figures(y: np.ndarray, pred: np.ndarray, seen: np.ndarray | None) -> dict:
    """Accuracy, with its 95% interval (`intervals`, same seed), and count of the test rows that have no
    copy in train (`seen` masks those that have one): what a model scores on faces it cannot have
    memorised. All None where the copies are unknown; the accuracy is None where every row has one."""
    if seen is None:
        return dict.fromkeys(UNSEEN_KEYS)
    unseen = ~np.asarray(seen, dtype=bool)
    n = int(unseen.sum())
    figures = intervals(np.asarray(y)[unseen], np.asarray(pred)[unseen]) if n else {}
    return {"test_unseen_accuracy": figures.get("accuracy"), "test_unseen_accuracy_low": figures.get("accuracy_low"),
            "test_unseen_accuracy_high": figures.get("accuracy_high"), "test_unseen_count": n}


def mcnemar(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict:
    """Exact McNemar test of two classifiers on the same rows: is one really more often right?

    Only the rows where exactly one of them is right count: `a_only` and `b_only`. Under the null
    hypothesis each such row is a fair coin, so the two-sided p-value is
    min(1, 2 P(Binomial(a_only + b_only, 1/2) <= min(a_only, b_only))).
    """
    y_true = np.asarray(y_true)
    right_a, right_b = np.asarray(pred_a) == y_true, np.asarray(pred_b) == y_true
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    return {"count": int(len(y_true)), "a_only": a_only, "b_only": b_only,
            "difference": float(right_a.mean() - right_b.mean()) if len(y_true) else 0.0,
            "p_value": float(mcnemar_p(a_only, b_only))}


def mcnemar_p(a_only: np.ndarray | int, b_only: np.ndarray | int) -> np.ndarray:
    """`mcnemar`'s exact two-sided p-value from the discordant counts, for arrays of counts at once."""
    from scipy.stats import binom

    a_only, b_only = np.asarray(a_only), np.asarray(b_only)
    n = a_only + b_only
    return np.where(n == 0, 1.0, np.minimum(1.0, 2 * binom.cdf(np.minimum(a_only, b_only), n, 0.5)))


def holm(p_values: list[float] | np.ndarray) -> list[float] | np.ndarray:
    """Holm's step-down adjustment of several p-values (family-wise error), in their given order.

    A list gives a list; an array is adjusted along its last axis (many families at once).
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    stepped = np.take_along_axis(p, order, -1) * (m - np.arange(m))
    adjusted = np.empty_like(p)
    np.put_along_axis(adjusted, order, np.minimum(1.0, np.maximum.accumulate(stepped, axis=-1)), -1)
    return adjusted.tolist() if isinstance(p_values, list) else adjusted


def versus_best(right: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each run against the most accurate one, with p-values that allow for that choice.

    `right`: booleans (..., runs, faces), whether each run is right on each of the same faces.
    The best is the run right most often (the first on ties), picked on these very faces, so
    adjusting only its runs - 1 comparisons is too optimistic: with 12 equally good runs some p
    falls below 0.05 about 13% of the time. Instead every pair is tested (exact McNemar) and
    Holm's adjustment runs over all runs (runs - 1) / 2 pairs: that holds the family-wise error
    whichever pairs are looked at afterwards, the best's included. Returns the best's index and
    each run's raw and adjusted p-value against it (NaN for the best itself).
    """
    right = np.asarray(right, dtype=np.float32)  # counts up to 2^24 faces are exact in float32
    runs = right.shape[-2]
    count = right.sum(-1)
    only = count[..., :, None] - right @ np.swapaxes(right, -1, -2)  # only[i, j]: i right where j is not
    i, j = np.triu_indices(runs, 1)
    pairs = mcnemar_p(np.rint(only[..., i, j]), np.rint(only[..., j, i]))
    raw, adjusted = (np.full(count.shape[:-1] + (runs, runs), np.nan) for _ in range(2))
    for matrix, p in ((raw, pairs), (adjusted, holm(pairs))):
        matrix[..., i, j] = matrix[..., j, i] = p
    best = count.argmax(-1)
    pick = best[..., None, None]
    return (best, np.take_along_axis(raw, pick, -2)[..., 0, :], np.take_along_axis(adjusted, pick, -2)[..., 0, :])


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean cross-entropy of the true classes' probabilities (floored at 1e-12: a zero is not infinite)."""
    return float(-np.log(np.maximum(proba[np.arange(len(y)), y], 1e-12)).mean())


def calibration(y_true: np.ndarray, proba: np.ndarray, bins: int = BINS) -> dict:
    """Expected calibration error and the reliability diagram's bins (equal-width in confidence).

    ECE = sum over bins of (rows in bin / n) * |accuracy - mean confidence|, the confidence being
    the top class's probability. Returns `{"ece", "bins": [{"low", "high", "count", "confidence",
    "accuracy"}]}`; empty bins have `None` figures.
    """
    proba = np.asarray(proba, dtype=np.float64)
    confidence, right = proba.max(axis=1), proba.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # (low, high]
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, confidence, minlength=bins)
    right_sum = np.bincount(which, right.astype(np.float64), minlength=bins)
    ece = float(np.abs(right_sum - conf_sum).sum() / max(len(confidence), 1))
    rows = [{"low": float(edges[i]), "high": float(edges[i + 1]), "count": int(count[i]),
             "confidence": float(conf_sum[i] / count[i]) if count[i] else None,
             "accuracy": float(right_sum[i] / count[i]) if count[i] else None} for i in range(bins)]
    return {"ece": ece, "bins": rows}


def few_shot(y: np.ndarray, shots: int, repeats: int, seed: int = 0) -> list[np.ndarray]:
    """`repeats` draws of `shots` rows per class (all of a class's rows where it has fewer).

    Draw r uses its own generator, seeded by (seed, r), so draw r is the same whatever `repeats`
    is; the rows of each draw come back sorted.
    """
    y = np.asarray(y)
    draws = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        picked = [rng.choice(np.flatnonzero(y == c), size=min(shots, int((y == c).sum())), replace=False)
                  for c in np.unique(y)]
        draws.append(np.sort(np.concatenate(picked)))
    return draws


def mean_std(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one run) of each number the runs share.

    `{"accuracy": a, ...}` per run -> `{"accuracy_mean", "accuracy_std", ..., "repeats"}`.
    """
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out: dict = {}
    for key in keys:
        values = np.array([r[key] for r in runs], dtype=np.float64)
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {**out, "repeats": len(runs)}
