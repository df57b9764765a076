"""A run folder, written and read in one place for `fit`, `finetune` and `evaluate` alike.

A run folder holds `metrics.json`, `history.csv`, `predictions.csv`, `report.html`,
`confusion.png`, `curves.png`, `reliability.png` and the model: a head (`head.safetensors` +
`head.json`, written by `heads.Head.save`) or tuned blocks (`tuned.json` + `tuned.safetensors`,
`finetune.save_tuned`); `evaluate` adds `evaluate-<split>.json` and `confusion-<split>.png`.
The figures themselves are computed in `stats`; the PNGs are drawn by `report`, the page by `html`.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from fercache.cache import read_meta
from fercache.errors import UserError, warn
from fercache.datasets import Origin
from fercache.html import write_report
from fercache.names import CLASSES, SPLITS, TUNED_CONFIG, default_cache
from fercache.report import plot_confusion, plot_curves, plot_reliability

PREDICTIONS = "predictions.csv"


def resolve_cache(cache: str | os.PathLike | None) -> Path:
    """The cache to read: as given, else the default model's default cache (what `extract` writes)."""
    return Path(cache) if cache is not None else default_cache()


def is_tuned(folder: str | os.PathLike) -> bool:
    """Whether a run folder holds tuned blocks (`finetune`) rather than a head (`fit`)."""
    return (Path(folder) / TUNED_CONFIG).is_file()


def origin_of(source: str | os.PathLike | None, cache: Path | None) -> Origin:
    """Where a run's faces are and how to reopen them: as the `cache` was made (its dataset, a
    folder's classes, images, the source's fingerprint), at `source`; without a cache, a source
    read as detected (`finetune --from-images`)."""
    return Origin.of(read_meta(cache), source) if cache is not None else Origin(str(source or ""))


def train_copies(source: str | os.PathLike | None, required: bool,
                 cache: Path | None = None) -> dict[str, list[str]] | None:
    """{test id: [ids of its train copies]} of the source's test faces with an exact or near copy in
    train, at the audit's threshold (`audit.test_duplicates`), kept beside the `cache` (else where
    the audit keeps it) under the source's fingerprint the cache records: found once from the source
    opened as the cache was made (`origin_of`), then read back in milliseconds without reading the
    source again. None where they cannot be found (the source not at hand, or not the one the cache
    was made from); an error when `required` (`--exclude-duplicates`)."""
    from fercache.audit import test_duplicates

    origin = origin_of(source, cache)
    try:
        return test_duplicates(origin, "near", cache.with_suffix(".duplicates.json") if cache is not None else None)
    except UserError as exc:
        if required:
            raise UserError(f"--exclude-duplicates: {exc} (its faces tell which train faces copy a test face)") \
                from None
        if origin.at_hand:
            warn(f"test faces with a copy in train not found ({exc}): no test_unseen_accuracy")
        return None


def with_copy(copies: dict[str, list[str]] | None, ids: list[str]) -> np.ndarray | None:
    """Row mask of the faces with a copy across train and test (a train face copying a test face, or
    a test face copied in train), from `train_copies`; None where the copies are unknown."""
    if copies is None:
        return None
    crossing = set(copies).union(*copies.values())
    return np.array([i in crossing for i in ids], dtype=bool)


def train_rows(source: str | os.PathLike | None, exclude: bool, cache: Path | None, train_ids: list[str],
               test_ids: list[str]) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """What `fit`, `probe` and `finetune` train on: which train and test rows have a copy across
    them (`with_copy`; None where unknown) and the train rows to use (with `exclude`, those without)."""
    copies = train_copies(source, exclude, cache)
    copied = with_copy(copies, train_ids)
    return copied, with_copy(copies, test_ids), np.flatnonzero(~copied) if exclude else np.arange(len(train_ids))


def scored_rows(copies: dict[str, list[str]] | None, ids: list[str], split: str,
                exclude: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """What `evaluate` scores of a split: its rows (with `exclude`, those without a copy across train
    and test) and which of them have a copy in train (for `stats.unseen_figures`; None off the test
    splits or where the copies are unknown)."""
    crossing = with_copy(copies, ids)
    rows = np.flatnonzero(~crossing) if exclude else np.arange(len(ids))
    return rows, crossing[rows] if crossing is not None and split in SPLITS[1:] else None


def duplicate_counts(copied: np.ndarray | None, excluded: bool) -> dict:
    """`metrics.json`'s account of the copies: whether the train faces copying a test face were
    excluded, and how many there are (`train_with_test_copy`; None where unknown)."""
    return {"exclude_duplicates": excluded, "train_with_test_copy": None if copied is None else int(copied.sum())}


def write_run(folder: Path, metrics: dict, classes: list[str], title: str,
              curves: tuple[list[dict], str, str] | None, predictions: dict | None = None,
              source: str | None = None) -> None:
    """A run folder's reports (a head's or a tuned model's): `metrics.json`, `history.csv`,
    `report.html` and, unless `curves` is None, `confusion.png` and `curves.png` (the rows, their
    x key, a title). With the test `predictions` (`{"id", "usage", "label", "proba"}`), also
    `predictions.csv` (what `compare` pairs runs by) and `reliability.png`; `source` is the
    file or folder whose faces the report shows, read as the run's cache (`metrics["cache"]`) was."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(folder / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(metrics["history"][0]))
        writer.writeheader()
        writer.writerows(metrics["history"])
    if predictions is not None:
        write_predictions(folder / PREDICTIONS, predictions, classes)
    if curves is not None:
        plot_confusion(metrics["confusion"], classes, folder / "confusion.png",
                       f"{title}: test accuracy {metrics['test_accuracy']:.4f}")
        rows, x, curve_title = curves
        plot_curves(rows, folder / "curves.png", x=x, title=curve_title)
        if metrics.get("calibration"):
            plot_reliability(metrics["calibration"], folder / "reliability.png", title)
    cache = metrics["cache"].get("path") if isinstance(metrics.get("cache"), dict) else None
    write_report(folder, metrics, predictions, origin_of(source, Path(cache) if cache else None))


def write_predictions(path: Path, predictions: dict, classes: list[str]) -> None:
    """One row per test face: id, usage, true label, predicted label, then each class's probability
    (cross-validated runs, `predictions["fold"]`: the fold that predicted it, after the usage)."""
    proba = np.asarray(predictions["proba"])
    folds = predictions.get("fold")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "usage", *(["fold"] if folds is not None else []), "label", "predicted",
                         *(f"p_{c}" for c in classes)])
        for i, (id_, usage, label) in enumerate(zip(predictions["id"], predictions["usage"], predictions["label"])):
            writer.writerow([id_, usage, *([int(folds[i])] if folds is not None else []), classes[label],
                             classes[int(proba[i].argmax())], *(f"{p:.6f}" for p in proba[i])])


def read_predictions(path: Path) -> dict:
    """`write_predictions`' file back: `{"id", "usage", "label", "predicted"}` (labels as class numbers)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        # the classes are the file's own (its p_<class> columns, in label order); older files: FER2013's
        index = {c: i for i, c in enumerate([n[2:] for n in reader.fieldnames or [] if n.startswith("p_")]
                                            or CLASSES)}
        return {"id": [r["id"] for r in rows], "usage": [r["usage"] for r in rows],
                "label": np.array([index[r["label"]] for r in rows], dtype=np.int64),
                "predicted": np.array([index[r["predicted"]] for r in rows], dtype=np.int64)}
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise UserError(f"{path}: unreadable predictions ({type(exc).__name__}: {exc})") from None


def write_evaluation(report: dict, folder: Path, classes: list[str], title: str, plots: bool = True) -> dict:
    """`evaluate-<split>.json` and, with `plots`, `confusion-<split>.png` of a head's or a tuned run's
    report on one split, into `folder`; returns the report."""
    folder.mkdir(parents=True, exist_ok=True)
    split = report["split"]
    (folder / f"evaluate-{split}.json").write_text(json.dumps(report, indent=2) + "\n")
    if plots:
        plot_confusion(report["confusion"], classes, folder / f"confusion-{split}.png",
                       f"{title}: accuracy {report['accuracy']:.4f}")
    return report
