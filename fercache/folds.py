"""Subject-independent cross-validation, for datasets without an official split (CK+, JAFFE).

Papers on CK+ and JAFFE report k-fold or leave-one-subject-out accuracy with no person in both
the training and the test part of a fold, as the mean over folds and its spread, and often the
accuracy of the pooled predictions (every face predicted once, by the fold that held it out).
`cross_validate` runs any fit that way (stage two's heads, stage three's tuning): the fit sees only
its fold's training rows, so whatever it chooses (logreg's C, an epoch) is chosen inside them,
never on the fold's test faces; `pooled_figures` scores the pooled predictions as `fit` scores test.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fercache.data import Entry
from fercache.datasets import subject_folds
from fercache.errors import UserError
from fercache.stats import calibration, classification_metrics, log_loss, mean_std, score_predictions, test_figures

FoldFit = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (train rows, test rows) -> test rows' class probabilities


def cross_validate(y: np.ndarray, subjects: list[str], folds: int | str, classes: list[str], fit_fold: FoldFit,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit and predict each fold: (pooled probabilities N x K, each row's fold, the fold summary).

    The summary holds each fold's counts and figures, their mean and sample standard deviation
    (`accuracy_mean`, `accuracy_std`, ...) and the folds' subject sets' sizes. A fold's macro-F1
    averages the classes its held-out faces show: one subject shows few of them (leave one subject
    out), and a class it lacks would count as F1 0 and drag every mean down.
    """
    y = np.asarray(y, dtype=np.int64)
    entries = [Entry(str(i), int(label), "all", "", subject=s) for i, (label, s) in enumerate(zip(y, subjects))]
    splits = subject_folds(entries, folds, seed)
    proba, fold_of = np.zeros((len(y), len(classes))), np.full(len(y), -1)
    rows = []
    for k, (train, test) in enumerate(splits, 1):
        proba[test] = fit_fold(train, test)
        fold_of[test] = k
        figures = classification_metrics(y[test], proba[test].argmax(1), classes)
        figures["macro_f1"] = float(np.mean([c["f1"] for c in figures["per_class"].values() if c["support"]]))
        rows.append({"fold": k, "train_count": len(train), "test_count": len(test),
                     "test_subjects": len({subjects[i] for i in test}),
                     **{key: figures[key] for key in ("accuracy", "macro_f1", "balanced_accuracy")}})
    spread = mean_std([{key: r[key] for key in ("accuracy", "macro_f1", "balanced_accuracy")} for r in rows])
    summary = {"folds": folds, "count": len(splits), "seed": seed, "subjects": len(set(subjects)),
               **{k: v for k, v in spread.items() if k != "repeats"}, "per_fold": rows}
    return proba, fold_of, summary


def pooled_figures(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """`metrics.json`'s test figures (and calibration) of the pooled predictions of split `all`."""
    report = score_predictions(y, proba.argmax(1), log_loss(y, proba), classes, "all")
    return {**test_figures(report), "calibration": calibration(y, proba)}


def check_folds(path: Path, dataset: str, folds: int | str | None) -> None:
    """A cache of a dataset without a split (only `all`) needs `folds`; one with a train split takes none."""
    from fercache.cache import split_state

    has_split = split_state(path, "train")[1] is not None
    if folds is None and not has_split and split_state(path, "all")[1] is not None:
        raise UserError(f"{path}: {dataset} has no train/test split; cross-validate with --folds K or "
                        "--folds subjects (subject-independent)")
    if folds is not None and has_split:
        raise UserError(f"--folds {folds}: {path} holds {dataset}'s train/test split; folds are for datasets "
                        "without one (CK+, JAFFE)")
