"""Stage two: linear heads fitted on the cached features, and their reports.

Everything here works on the cache's arrays, so it takes seconds: `fit` trains a head on train and
reports on test (overall, and on its public and private halves) into a run folder; `evaluate`
scores a saved head on any split of a cache made by the same encoder. (`predict` applies a head to
new images; `pipeline.run` is the whole job, extraction included.)

A run folder holds `metrics.json`, `history.csv`, `predictions.csv`, `report.html`,
`confusion.png`, `curves.png`, `reliability.png` and the head (`head.safetensors` + `head.json`).
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fercache.cache import Embeddings, load_embeddings, read_identity, usage_of
from fercache.errors import UserError, at_least_one
from fercache.heads import Head, fit_linear
from fercache.html import write_report
from fercache.identity import ENCODER, Identity
from fercache.logreg import fit_logreg
from fercache.names import (CLASS_WEIGHTS, CLASSES, METHODS, TUNED_CONFIG, VALS, VIEWS, choice, default_cache,
                            default_run)
from fercache.report import classification_metrics, plot_confusion, plot_curves, plot_reliability
from fercache.stats import calibration, few_shot, intervals, mean_std

PREDICTIONS = "predictions.csv"


@dataclass
class FitResult:
    """What `fit` made: the run folder, the head and everything in `metrics.json`."""

    out: Path
    head: Head
    metrics: dict


def resolve_cache(cache: str | os.PathLike | None) -> Path:
    """The cache to read: as given, else the default model's default cache (what `extract` writes)."""
    return Path(cache) if cache is not None else default_cache()


def score(head: Head, emb: Embeddings, usage: list[str] | None = None) -> dict:
    """Loss, accuracy, macro-F1, per-class figures and confusion of a head on one split."""
    return score_predictions(emb.y, head.predict(emb.X), head.score(emb.X, emb.y)[0], head.classes,
                             emb.meta["split"], usage)


def score_predictions(y: np.ndarray, pred: np.ndarray, loss: float, classes: list[str], split: str,
                      usage: list[str] | None = None) -> dict:
    """The report of any model's predictions on one split (a head's, or a tuned model's).

    Every figure comes with its 95% bootstrap interval (`<figure>_low`, `<figure>_high`, see
    `stats.intervals`), always drawn with the same bootstrap seed, whatever the fit's, so that
    `evaluate` reproduces `fit`'s intervals exactly. With the rows' usage (`usage_of`) and more than one usage among them, also
    the figures of each part: `public_test_accuracy` (and `_macro_f1`, intervals) for the test split.
    """
    out = {"split": split, "count": len(y), "loss": loss, **classification_metrics(y, pred, classes),
           **_bounds(intervals(y, pred))}
    if usage is not None and len(set(usage)) > 1:
        usage_arr = np.array(usage)
        for part in sorted(set(usage)):
            mask = usage_arr == part
            figures = intervals(y[mask], pred[mask])
            out.update({f"{part}_{k}": figures[k] for k in _INTERVAL_KEYS})
    return out


_INTERVAL_KEYS = tuple(f"{name}{end}" for name in ("accuracy", "macro_f1", "balanced_accuracy")
                       for end in ("", "_low", "_high"))


def _bounds(figures: dict) -> dict:
    """The interval ends of `stats.intervals` (the point figures are classification_metrics')."""
    return {k: figures[k] for k in _INTERVAL_KEYS if k.endswith(("_low", "_high"))}


def fit(cache: str | os.PathLike | None = None, method: str = "linear", epochs: int = 20, lr: float = 1e-3,
        batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0, standardize: bool = True,
        layer: int | None = None, views: str = "plain", out: str | os.PathLike | None = None,
        plots: bool = True, val: str = "train", class_weight: str = "none", shots: int | None = None,
        repeats: int = 1) -> FitResult:
    """Fit a head on the cache's train split, report on test, write the run folder.

    `val` is what chooses logreg's C: `train` (a stratified part of train; test is both halves)
    or `public_test` (the challenge's protocol: choose on PublicTest, report on PrivateTest).
    Nothing is ever chosen on the rows reported. `shots` fits on that many training faces per
    class, `repeats` times with different draws (`stats.few_shot`); the run folder keeps the first
    draw's head and figures, and `metrics["few_shot"]` the mean and standard deviation of all.
    """
    choice(method, METHODS, "method")
    choice(views, VIEWS, "views")
    choice(val, VALS, "--val")
    choice(class_weight, CLASS_WEIGHTS, "--class-weight")
    at_least_one(shots=shots, repeats=repeats)
    path = resolve_cache(cache)
    settings = {"method": method, "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
                "seed": seed, "standardize": standardize, "layer": layer, "views": views, "val": val,
                "class_weight": class_weight, "shots": shots, "repeats": repeats if shots else None}
    test_split = "test" if val == "train" else "private_test"
    train = load_embeddings(path, "train", layer=layer, view=views)
    test = load_embeddings(path, test_split, layer=layer, view=views)
    held = load_embeddings(path, "public_test", layer=layer, view=views) if val == "public_test" else None
    draws = few_shot(train.y, shots, repeats, seed) if shots else [np.arange(len(train.y))]
    start = time.perf_counter()
    fits = []
    for rows in draws:
        X, y = train.X[rows], train.y[rows]
        if method == "linear":
            head, history = fit_linear(X, y, test.X, test.y, epochs=epochs, lr=lr, batch_size=batch_size,
                                       weight_decay=weight_decay, seed=seed, standardize=standardize,
                                       class_weight=class_weight)
            search = None
        else:
            head, search = fit_logreg(X, y, seed=seed, standardize=standardize, class_weight=class_weight,
                                      val=None if held is None else (held.X, held.y))
            # One row, the final model: lbfgs has no epochs.
            history = [{"epoch": 1, **dict(zip(("train_loss", "train_acc"), head.score(X, y))),
                        **dict(zip(("test_loss", "test_acc"), head.score(test.X, test.y)))}]
        fits.append((head, history, search, len(rows)))
    seconds = time.perf_counter() - start
    head, history, search, train_count = fits[0]
    head.classes, head.layer, head.views = train.classes, layer, views
    head.identity = Identity.from_meta(train.meta).encoder()

    proba = head.predict_proba(test.X)
    usage = usage_of(path, test_split)
    report = score_predictions(test.y, proba.argmax(1), head.score(test.X, test.y)[0], head.classes, test_split,
                               usage)
    meta = {k: v for k, v in train.meta.items() if k != "split"}
    metrics = {
        "method": method, "model": meta.get("model"), "preprocess": meta.get("preprocess"), "layer": layer,
        "views": views, "val": val, "class_weight": class_weight, "test_split": test_split,
        "fit_seconds": round(seconds, 3), **test_figures(report), "calibration": calibration(test.y, proba),
        "train_count": train_count, "val_count": search["val_count"] if search else None, "test_count": len(test.y),
        "history": history, **({"logreg": search} if search else {}), "settings": settings,
        "cache": {"path": str(path), "meta": meta},
    }
    if shots:
        runs = [classification_metrics(test.y, h.predict(test.X), head.classes) for h, *_ in fits]
        metrics["few_shot"] = {"shots": shots, **mean_std([{k: r[k] for k in ("accuracy", "macro_f1",
                                                                              "balanced_accuracy")} for r in runs]),
                               "runs": [r["accuracy"] for r in runs]}
    folder = Path(out) if out is not None else default_run(path, method, layer, views)
    head.save(folder)
    title = f"{meta.get('model')} · {method}"
    if method == "linear":
        curves = (history, "epoch", title)
    else:
        where = "PublicTest" if held is not None else f"a {search['val_fraction']:.0%} validation part of train"
        criterion = "balanced accuracy" if search["criterion"] == "val_bacc" else "accuracy"
        curves = (search["validation"], "C",
                  f"{title}: C = {search['C']:g} on {where} (one-SE rule, {criterion} and loss)")
    write_run(folder, metrics, head.classes, title, curves if plots else None,
              {"id": test.ids, "usage": usage, "label": test.y, "proba": proba},
              meta.get("source", {}).get("path"))
    return FitResult(folder, head, metrics)


def test_figures(report: dict) -> dict:
    """`metrics.json`'s test keys from a `score_predictions` report: `test_accuracy` (and its
    interval), `macro_f1`, `balanced_accuracy`, each half's figures, loss, per class, confusion."""
    renamed = {f"test_{k}" if k.startswith("accuracy") else k: report[k] for k in _INTERVAL_KEYS}
    halves = {k: v for k, v in report.items() if k.startswith(("public_test_", "private_test_"))}
    if report["split"] in ("public_test", "private_test"):  # one half was the test set (--val public_test)
        halves.update({f"{report['split']}_{k}": report[k] for k in _INTERVAL_KEYS})
    return {**renamed, "public_test_accuracy": None, "private_test_accuracy": None, **halves,
            "test_loss": report["loss"], "per_class": report["per_class"], "confusion": report["confusion"]}


def write_run(folder: Path, metrics: dict, classes: list[str], title: str,
              curves: tuple[list[dict], str, str] | None, predictions: dict | None = None,
              source: str | None = None) -> None:
    """A run folder's reports (a head's or a tuned model's): `metrics.json`, `history.csv`,
    `report.html` and, unless `curves` is None, `confusion.png` and `curves.png` (the rows, their
    x key, a title). With the test `predictions` (`{"id", "usage", "label", "proba"}`), also
    `predictions.csv` (what `compare` pairs runs by) and `reliability.png`; `source` is the
    FER2013 file whose faces the report shows."""
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
    write_report(folder, metrics, predictions, source)


def write_predictions(path: Path, predictions: dict, classes: list[str]) -> None:
    """One row per test face: id, usage, true label, predicted label, then each class's probability."""
    proba = np.asarray(predictions["proba"])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "usage", "label", "predicted", *(f"p_{c}" for c in classes)])
        for i, (id_, usage, label) in enumerate(zip(predictions["id"], predictions["usage"], predictions["label"])):
            writer.writerow([id_, usage, classes[label], classes[int(proba[i].argmax())],
                             *(f"{p:.6f}" for p in proba[i])])


def read_predictions(path: Path) -> dict:
    """`write_predictions`' file back: `{"id", "usage", "label", "predicted"}` (labels as class numbers)."""
    index = {c: i for i, c in enumerate(CLASSES)}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {"id": [r["id"] for r in rows], "usage": [r["usage"] for r in rows],
                "label": np.array([index[r["label"]] for r in rows], dtype=np.int64),
                "predicted": np.array([index[r["predicted"]] for r in rows], dtype=np.int64)}
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise UserError(f"{path}: unreadable predictions ({type(exc).__name__}: {exc})") from None


def check_head(head: Head, identity: Identity, where: object) -> None:
    """Refuse features of another encoder (model, revision, weights, preprocessing) than the head's."""
    if head.identity is not None:
        identity.check(head.identity, where, ENCODER, hint="the head was fitted on features of another encoder")


def evaluate(cache: str | os.PathLike | None, head_dir: str | os.PathLike, split: str = "test",
             out: str | os.PathLike | None = None, plots: bool = True) -> dict:
    """Score a saved head on one split of a cache; writes `evaluate-<split>.json` (and its confusion plot).

    A `finetune` run folder is scored too, from the tokens its cache stores (`finetune.evaluate_tuned`).
    """
    if (Path(head_dir) / TUNED_CONFIG).is_file():
        from fercache.finetune import evaluate_tuned

        return evaluate_tuned(cache, head_dir, split, out, plots=plots)
    path = resolve_cache(cache)
    head = Head.load(head_dir)
    check_head(head, read_identity(path), path)
    emb = load_embeddings(path, split, layer=head.layer, view=head.views)
    if emb.X.shape[1] != head.dim:
        raise UserError(f"{path} holds {emb.X.shape[1]}-d features, but the head {head_dir} is {head.dim}-d")
    report = {**score(head, emb, usage_of(path, split)), "calibration": calibration(emb.y, head.predict_proba(emb.X)),
              "head": str(head_dir), "cache": str(path)}
    title = f"{head.identity.model if head.identity else 'features'} · {head.method} on {split}"
    return write_evaluation(report, Path(out) if out is not None else Path(head_dir), head.classes, title, plots)


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
