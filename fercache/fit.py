"""Stage two: linear heads fitted on the cached features, and their reports.

Everything here works on the cache's arrays, so it takes seconds: `fit` trains a head on train and
reports on test (overall, and on its public and private halves) into a run folder; `evaluate`
scores a saved head on any split of a cache made by the same encoder. (`predict` applies a head to
new images; `pipeline.run` is the whole job, extraction included.)

A run folder holds `metrics.json`, `history.csv`, `confusion.png`, `curves.png` and the head
(`head.safetensors` + `head.json`).
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
from fercache.errors import UserError
from fercache.heads import Head, fit_linear, fit_logreg
from fercache.identity import ENCODER, Identity
from fercache.names import METHODS, VIEWS, choice, default_cache, default_run
from fercache.report import classification_metrics, plot_confusion, plot_curves


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
    """Loss, accuracy, macro-F1, per-class figures and confusion of a head on one split.

    With the rows' usage (`usage_of`) and more than one usage among them, also the accuracy of
    each part: `public_test_accuracy` and `private_test_accuracy` for the test split.
    """
    pred = head.predict(emb.X)
    out = {"split": emb.meta["split"], "count": len(emb.y), "loss": head.score(emb.X, emb.y)[0],
           **classification_metrics(emb.y, pred, head.classes)}
    if usage is not None and len(set(usage)) > 1:
        usage_arr = np.array(usage)
        for part in sorted(set(usage)):
            mask = usage_arr == part
            out[f"{part}_accuracy"] = float((pred[mask] == emb.y[mask]).mean())
    return out


def fit(cache: str | os.PathLike | None = None, method: str = "linear", epochs: int = 20, lr: float = 1e-3,
        batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0, standardize: bool = True,
        layer: int | None = None, views: str = "plain", out: str | os.PathLike | None = None,
        plots: bool = True) -> FitResult:
    """Fit a head on the cache's train split, report on its test split, write the run folder."""
    choice(method, METHODS, "method")
    choice(views, VIEWS, "views")
    path = resolve_cache(cache)
    settings = {"method": method, "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
                "seed": seed, "standardize": standardize, "layer": layer, "views": views}
    train = load_embeddings(path, "train", layer=layer, view=views)
    test = load_embeddings(path, "test", layer=layer, view=views)
    start = time.perf_counter()
    extra: dict = {}
    if method == "linear":
        head, history = fit_linear(train.X, train.y, test.X, test.y, epochs=epochs, lr=lr, batch_size=batch_size,
                                   weight_decay=weight_decay, seed=seed, standardize=standardize)
    else:
        head, extra["logreg"] = fit_logreg(train.X, train.y, seed=seed, standardize=standardize)
        # One row, the final model: lbfgs has no epochs.
        history = [{"epoch": 1, **dict(zip(("train_loss", "train_acc"), head.score(train.X, train.y))),
                    **dict(zip(("test_loss", "test_acc"), head.score(test.X, test.y)))}]
    seconds = time.perf_counter() - start
    head.classes, head.layer, head.views = train.classes, layer, views
    head.identity = Identity.from_meta(train.meta).encoder()

    report = score(head, test, usage_of(path, "test"))
    meta = {k: v for k, v in train.meta.items() if k != "split"}
    metrics = {
        "method": method, "model": meta.get("model"), "preprocess": meta.get("preprocess"), "layer": layer,
        "views": views, "fit_seconds": round(seconds, 3),
        "test_accuracy": report["accuracy"],
        "public_test_accuracy": report.get("public_test_accuracy"),
        "private_test_accuracy": report.get("private_test_accuracy"),
        "test_loss": report["loss"], "macro_f1": report["macro_f1"], "per_class": report["per_class"],
        "confusion": report["confusion"], "train_count": len(train.y), "test_count": len(test.y),
        "history": history, **extra, "settings": settings, "cache": {"path": str(path), "meta": meta},
    }
    folder = Path(out) if out is not None else default_run(path, method, layer, views)
    head.save(folder)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(folder / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    if plots:
        title = f"{meta.get('model')} · {method}"
        plot_confusion(report["confusion"], head.classes, folder / "confusion.png",
                       f"{title}: test accuracy {report['accuracy']:.4f}")
        if method == "linear":
            plot_curves(history, folder / "curves.png", title=title)
        else:
            plot_curves(extra["logreg"]["validation"], folder / "curves.png", x="C",
                        title=f"{title}: C on a {extra['logreg']['val_fraction']:.0%} validation part of train")
    return FitResult(folder, head, metrics)


def check_head(head: Head, identity: Identity, where: object) -> None:
    """Refuse features of another encoder (model, revision, weights, preprocessing) than the head's."""
    if head.identity is not None:
        identity.check(head.identity, where, ENCODER, hint="the head was fitted on features of another encoder")


def evaluate(cache: str | os.PathLike | None, head_dir: str | os.PathLike, split: str = "test",
             out: str | os.PathLike | None = None, plots: bool = True) -> dict:
    """Score a saved head on one split of a cache; writes `evaluate-<split>.json` (and its confusion plot)."""
    path = resolve_cache(cache)
    head = Head.load(head_dir)
    check_head(head, read_identity(path), path)
    emb = load_embeddings(path, split, layer=head.layer, view=head.views)
    if emb.X.shape[1] != head.dim:
        raise UserError(f"{path} holds {emb.X.shape[1]}-d features, but the head {head_dir} is {head.dim}-d")
    report = {**score(head, emb, usage_of(path, split)), "head": str(head_dir), "cache": str(path)}
    folder = Path(out) if out is not None else Path(head_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"evaluate-{split}.json").write_text(json.dumps(report, indent=2) + "\n")
    if plots:
        plot_confusion(report["confusion"], head.classes, folder / f"confusion-{split}.png",
                       f"{head.identity.model if head.identity else 'features'} · {head.method} on {split}: accuracy {report['accuracy']:.4f}")
    return report
