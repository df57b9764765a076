"""Stage two: linear heads fitted on the cached features, and their reports.

Everything here works on the cache's arrays, so it takes seconds: `fit` trains a head on train and
reports on test (overall, and on its public and private halves) into a run folder; `evaluate`
scores a saved head on any split of a cache made by the same encoder. (`predict` applies a head to
new images; `pipeline.run` is the whole job, extraction included.)

The run folder is written by `runs`, every figure in it computed by `stats`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fercache.accelerate import check_int8
from fercache.cache import (Embeddings, load_embeddings, load_subjects, load_votes, read_identity, read_meta,
                            split_state, usage_of)
from fercache.crossdata import class_map, restricted_scores
from fercache.errors import UserError, at_least_one
from fercache.folds import check_folds, cross_validate, pooled_figures
from fercache.heads import Head, fit_linear
from fercache.identity import ENCODER, Identity, dataset_of
from fercache.logreg import fit_logreg
from fercache.datasets import check_labels, ferplus_targets
from fercache.names import CLASS_WEIGHTS, METHODS, VALS, VIEWS, choice, default_run
# runs' and stats' names that lived here before 0.3.0 stay importable from fercache.fit:
from fercache.runs import (PREDICTIONS, duplicate_counts, is_tuned, read_predictions, resolve_cache,  # noqa: F401
                           scored_rows, train_copies, train_rows, with_copy, write_evaluation, write_predictions,
                           write_run)
from fercache.stats import (calibration, classification_metrics, few_shot, log_loss, mean_std, score_predictions,
                            test_figures, unseen_figures)


@dataclass
class FitResult:
    """What `fit` made: the run folder, the head and everything in `metrics.json`."""

    out: Path
    head: Head
    metrics: dict


def score(head: Head, emb: Embeddings, usage: list[str] | None = None) -> dict:
    """Loss, accuracy, macro-F1, per-class figures and confusion of a head on one split."""
    return score_predictions(emb.y, head.predict(emb.X), head.score(emb.X, emb.y)[0], head.classes,
                             emb.meta["split"], usage)


def fit(cache: str | os.PathLike | None = None, method: str = "linear", epochs: int = 20, lr: float = 1e-3,
        batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0, standardize: bool = True,
        layer: int | None = None, views: str = "plain", out: str | os.PathLike | None = None,
        plots: bool = True, val: str = "train", class_weight: str = "none", shots: int | None = None,
        repeats: int = 1, exclude_duplicates: bool = False, folds: int | str | None = None,
        labels: str | None = None) -> FitResult:
    """Fit a head on the cache's train split, report on test, write the run folder.

    `val` is what chooses logreg's C: `train` (a stratified part of train; test is both halves)
    or `public_test` (the challenge's protocol: choose on PublicTest, report on PrivateTest).
    Nothing is ever chosen on the rows reported. `shots` fits on that many training faces per
    class, `repeats` times with different draws (`stats.few_shot`); the run folder keeps the first
    draw's head and figures, and `metrics["few_shot"]` the mean and standard deviation of all.
    `exclude_duplicates` drops the train faces that copy a test face (exact or near, `audit`);
    either way `test_unseen_accuracy` is the accuracy on the test faces with no copy in train.
    The head has a row per class of the cache's dataset. `folds` (K or `subjects`) cross-validates
    a dataset without a split instead (`fit_folds`). `labels` (FER+ caches): `ferplus-majority`
    (the default) or `ferplus-votes`, the vote shares as the linear head's soft targets; accuracy
    is against the majority either way.
    """
    choice(method, METHODS, "method")
    choice(views, VIEWS, "views")
    choice(val, VALS, "--val")
    choice(class_weight, CLASS_WEIGHTS, "--class-weight")
    at_least_one(shots=shots, repeats=repeats)
    path = resolve_cache(cache)
    dataset, classes, canonical = dataset_of(read_meta(path))
    labels = check_labels(labels, dataset, soft=method == "linear")
    settings = {"method": method, "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
                "seed": seed, "standardize": standardize, "layer": layer, "views": views, "val": val,
                "class_weight": class_weight, "shots": shots, "repeats": repeats if shots else None,
                "exclude_duplicates": exclude_duplicates, "labels": labels}
    if folds is not None:
        if val != "train" or shots or exclude_duplicates:
            raise UserError("--folds chooses inside each fold's training part: it takes no --val public_test, "
                            "--shots or --exclude-duplicates")
        return fit_folds(path, folds, settings, out, plots)
    check_folds(path, dataset, None)  # no split: needs --folds
    test_split = "test" if val == "train" else "private_test"
    train = load_embeddings(path, "train", layer=layer, view=views)
    test = load_embeddings(path, test_split, layer=layer, view=views)
    held = load_embeddings(path, "public_test", layer=layer, view=views) if val == "public_test" else None
    copied, seen, pool = train_rows(train.meta.get("source", {}).get("path"), exclude_duplicates, path, train.ids,
                                    test.ids)
    draws = [pool[d] for d in few_shot(train.y[pool], shots, repeats, seed)] if shots else [pool]
    targets = soft_targets(path, "train", labels)
    start = time.perf_counter()
    fits = []
    for rows in draws:
        X, y = train.X[rows], train.y[rows]
        head, history, search = fit_head(X, y, (test.X, test.y), None if held is None else (held.X, held.y),
                                         settings, len(classes), None if targets is None else targets[rows])
        fits.append((head, history, search, len(rows)))
    seconds = time.perf_counter() - start
    head, history, search, train_count = fits[0]
    head.classes, head.layer, head.views = train.classes, layer, views
    head.canonical, head.dataset = canonical, dataset
    head.identity = Identity.from_meta(train.meta).encoder()

    proba = head.predict_proba(test.X)
    usage = usage_of(path, test_split)
    report = score_predictions(test.y, proba.argmax(1), head.score(test.X, test.y)[0], head.classes, test_split,
                               usage)
    meta = {k: v for k, v in train.meta.items() if k != "split"}
    metrics = {
        "method": method, "model": meta.get("model"), "preprocess": meta.get("preprocess"), "layer": layer,
        "views": views, "val": val, "class_weight": class_weight, "test_split": test_split, "dataset": dataset,
        "labels": labels,
        "fit_seconds": round(seconds, 3), **test_figures(report), "calibration": calibration(test.y, proba),
        "train_count": train_count, "val_count": search["val_count"] if search else None, "test_count": len(test.y),
        **unseen_figures(test.y, proba.argmax(1), seen), **duplicate_counts(copied, exclude_duplicates),
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


def fit_head(X: np.ndarray, y: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None,
             held: tuple[np.ndarray, np.ndarray] | None, settings: dict, classes: int,
             targets: np.ndarray | None = None) -> tuple[Head, list[dict], dict | None]:
    """One head by `settings["method"]` on rows `X, y` (`targets`: soft ones, linear only): the head, its
    history (per epoch; logreg: one row) and logreg's C search (chosen on `held`, else a part of `X`)."""
    s = settings
    if s["method"] == "linear":
        head, history = fit_linear(X, y, *(test or (None, None)), epochs=s["epochs"], lr=s["lr"],
                                   batch_size=s["batch_size"], weight_decay=s["weight_decay"], seed=s["seed"],
                                   standardize=s["standardize"], class_weight=s["class_weight"], classes=classes,
                                   targets=targets)
        return head, history, None
    head, search = fit_logreg(X, y, seed=s["seed"], standardize=s["standardize"], class_weight=s["class_weight"],
                              val=held, classes=classes)
    # One row, the final model: lbfgs has no epochs.
    history = [{"epoch": 1, **dict(zip(("train_loss", "train_acc"), head.score(X, y))),
                **(dict(zip(("test_loss", "test_acc"), head.score(*test))) if test is not None else {})}]
    return head, history, search


def fit_folds(path: Path, folds: int | str, settings: dict, out: str | os.PathLike | None = None,
              plots: bool = True) -> FitResult:
    """Subject-independent cross-validation of a dataset without a split (`folds.cross_validate`).

    Each fold's head is fitted on the fold's training part alone (logreg's C chosen on a part of
    it); `metrics.json` has the pooled test figures (every face predicted once, by the fold that
    held it out), `folds` the per-fold figures and their mean and sd; `predictions.csv` a `fold`
    column. The head saved is fitted on every face, with the same settings, for use elsewhere.
    """
    s = settings
    emb = load_embeddings(path, "all", layer=s["layer"], view=s["views"])
    dataset, classes, canonical = dataset_of(emb.meta)
    targets = soft_targets(path, "all", s["labels"])
    start = time.perf_counter()

    def one_fold(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        head, _, _ = fit_head(emb.X[train], emb.y[train], (emb.X[test], emb.y[test]), None, s, len(classes),
                              None if targets is None else targets[train])
        return head.predict_proba(emb.X[test])

    proba, fold_of, summary = cross_validate(emb.y, load_subjects(path, "all"), folds, classes, one_fold, s["seed"])
    seconds = time.perf_counter() - start
    head, history, search = fit_head(emb.X, emb.y, None, None, s, len(classes), targets)
    head.classes, head.canonical, head.dataset = classes, canonical, dataset
    head.layer, head.views = s["layer"], s["views"]
    head.identity = Identity.from_meta(emb.meta).encoder()
    meta = {k: v for k, v in emb.meta.items() if k != "split"}
    metrics = {
        "method": s["method"], "model": meta.get("model"), "preprocess": meta.get("preprocess"), "layer": s["layer"],
        "views": s["views"], "val": "train", "class_weight": s["class_weight"], "test_split": "all",
        "dataset": dataset, "labels": s["labels"], "fit_seconds": round(seconds, 3),
        **pooled_figures(emb.y, proba, classes), "train_count": len(emb.y), "val_count": None,
        "test_count": len(emb.y), "folds": summary, "history": history, **({"logreg": search} if search else {}),
        "settings": {**s, "folds": folds}, "cache": {"path": str(path), "meta": meta},
    }
    folder = Path(out) if out is not None else default_run(path, s["method"], s["layer"], s["views"])
    head.save(folder)
    title = f"{meta.get('model')} · {s['method']} · {summary['count']} folds"
    curves = (history, "epoch", title) if search is None else (search["validation"], "C", f"{title}: the final head's C")
    curves = curves if plots else None
    write_run(folder, metrics, classes, title, curves,
              {"id": emb.ids, "usage": usage_of(path, "all"), "label": emb.y, "proba": proba, "fold": fold_of},
              meta.get("source", {}).get("path"))
    return FitResult(folder, head, metrics)


def soft_targets(path: Path, split: str, labels: str | None) -> np.ndarray | None:
    """FER+'s vote shares over its 8 emotions per row of a cache's `split` (`--labels ferplus-votes`), else None."""
    if labels != "ferplus-votes":
        return None
    return ferplus_targets(load_votes(path, split))


def check_head(head: Head, identity: Identity, where: object) -> None:
    """Refuse features of another encoder (model, revision, weights, preprocessing) than the head's."""
    if head.identity is not None:
        identity.check(head.identity, where, ENCODER, hint="the head was fitted on features of another encoder")


def evaluate(cache: str | os.PathLike | None, head_dir: str | os.PathLike, split: str | None = None,
             out: str | os.PathLike | None = None, plots: bool = True, exclude_duplicates: bool = False) -> dict:
    """Score a saved head on one split of a cache; writes `evaluate-<split>.json` (and its confusion plot).

    `split` defaults to test, or `all` for a dataset without a split (CK+, JAFFE: stored whole).
    A `finetune` run folder is scored too, from the tokens its cache stores (`finetune.evaluate_tuned`).
    On a test split, `test_unseen_accuracy` is the accuracy on its faces with no copy in train;
    `exclude_duplicates` scores only the faces without a copy across train and test.
    """
    if split is None:
        stored = resolve_cache(cache)
        split = "all" if stored.is_file() and split_state(stored, "all")[1] is not None else "test"
    if is_tuned(head_dir):
        from fercache.finetune import evaluate_tuned

        return evaluate_tuned(cache, head_dir, split, out, plots=plots, exclude_duplicates=exclude_duplicates)
    path = resolve_cache(cache)
    head = Head.load(head_dir)
    check_head(head, read_identity(path), path)
    check_int8(read_meta(path), head.identity.dtype if head.identity else None, path)
    emb = load_embeddings(path, split, layer=head.layer, view=head.views)
    if emb.X.shape[1] != head.dim:
        raise UserError(f"{path} holds {emb.X.shape[1]}-d features, but the head {head_dir} is {head.dim}-d")
    dataset, classes, canonical = dataset_of(emb.meta)
    if (classes, canonical) != (head.classes, head.canonical):  # another dataset's classes
        return evaluate_across(head, Path(head_dir), emb, path, split, out, plots)
    copies = train_copies(emb.meta.get("source", {}).get("path"), exclude_duplicates, path)
    rows, seen = scored_rows(copies, emb.ids, split, exclude_duplicates)
    usage = usage_of(path, split)
    emb = emb._replace(X=emb.X[rows], y=emb.y[rows], ids=[emb.ids[i] for i in rows])
    report = {**score(head, emb, [usage[i] for i in rows]),
              "calibration": calibration(emb.y, head.predict_proba(emb.X)),
              **unseen_figures(emb.y, head.predict(emb.X), seen), "exclude_duplicates": exclude_duplicates,
              "excluded": len(usage) - len(rows), "head": str(head_dir), "cache": str(path)}
    title = f"{head.identity.model if head.identity else 'features'} · {head.method} on {split}"
    return write_evaluation(report, Path(out) if out is not None else Path(head_dir), head.classes, title, plots)



def evaluate_across(head: Head, head_dir: Path, emb: Embeddings, path: Path, split: str,
                    out: str | os.PathLike | None = None, plots: bool = True) -> dict:
    """A head scored on another dataset's faces (`crossdata`): classes matched by canonical name,
    its output restricted to the shared classes, the faces of classes it does not know left out and
    counted by name; the report's classes are the shared ones, by the data's names."""
    dataset, classes, canonical = dataset_of(emb.meta)
    cmap = class_map(head.classes, dataset_of({"classes": head.classes, "canonical": head.canonical})[2], classes,
                     canonical)
    keep, y, logits = cmap.restrict(emb.y, head.logits(emb.X))
    if not keep.any():
        raise UserError(f"{path}: none of split '{split}''s faces is of a class the head knows "
                        f"({', '.join(head.classes)})")
    proba, pred = restricted_scores(logits)
    loss = log_loss(y, proba)
    usage = usage_of(path, split)
    report = {**score_predictions(y, pred, loss, cmap.classes, split, [u for u, k in zip(usage, keep) if k]),
              "calibration": calibration(y, proba), "dataset": dataset, "head_dataset": head.dataset,
              "shared_classes": dict(zip(cmap.classes, cmap.canonical)),
              "left_out": cmap.left_out_counts(emb.y, classes), "head_classes_unused": cmap.unused,
              "head": str(head_dir), "cache": str(path)}
    title = (f"{head.identity.model if head.identity else 'features'} · {head.method} ({head.dataset}) on "
             f"{dataset} {split}")
    return write_evaluation(report, Path(out) if out is not None else head_dir, cmap.classes, title, plots)
