"""Subject-independent cross-validation, for datasets without an official split (CK+, JAFFE).

Papers on CK+ and JAFFE report k-fold or leave-one-subject-out accuracy with no person in both
the training and the test part of a fold, as the mean over folds and its spread, and often the
accuracy of the pooled predictions (every face predicted once, by the fold that held it out).
`cross_validate` runs any stage-two fit that way: the fit sees only its fold's training rows, so
whatever it chooses (logreg's C, an epoch) is chosen inside them, never on the fold's test faces.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fercache.data import Entry
from fercache.datasets import subject_folds
from fercache.stats import classification_metrics, mean_std

FoldFit = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (train rows, test rows) -> test rows' class probabilities


def cross_validate(y: np.ndarray, subjects: list[str], folds: int | str, classes: list[str], fit_fold: FoldFit,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit and predict each fold: (pooled probabilities N x K, each row's fold, the fold summary).

    The summary holds each fold's counts and figures, their mean and sample standard deviation
    (`accuracy_mean`, `accuracy_std`, ...) and the folds' subject sets' sizes.
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
        rows.append({"fold": k, "train_count": len(train), "test_count": len(test),
                     "test_subjects": len({subjects[i] for i in test}),
                     **{key: figures[key] for key in ("accuracy", "macro_f1", "balanced_accuracy")}})
    spread = mean_std([{key: r[key] for key in ("accuracy", "macro_f1", "balanced_accuracy")} for r in rows])
    summary = {"folds": folds, "count": len(splits), "seed": seed, "subjects": len(set(subjects)),
               **{k: v for k, v in spread.items() if k != "repeats"}, "per_fold": rows}
    return proba, fold_of, summary
