"""Stage two: linear heads on the cached features, their reports, and their use on new images.

Everything but `predict` works on the cache's arrays, so it takes seconds: `fit` trains a head on
train and reports on test (overall, and on its public and private halves) into a run folder;
`evaluate` scores a saved head on any split of a cache made by the same encoder; `predict` encodes
new images with stage one's exact code and applies a head; `run` is the whole job, extraction
included.

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

from fercache.cache import Embeddings, load_embeddings, usage_of
from fercache.errors import UserError, warn
from fercache.heads import EXPECTS, Head, fit_linear, fit_logreg
from fercache.report import classification_metrics, plot_confusion, plot_curves

METHODS = ("linear", "logreg")
VIEWS = ("plain", "flip", "mean")


@dataclass
class FitResult:
    """What `fit` made: the run folder, the head and everything in `metrics.json`."""

    out: Path
    head: Head
    metrics: dict


def resolve_cache(cache: str | os.PathLike | None) -> Path:
    """The cache to read: as given, else the default model's default cache (what `extract` writes)."""
    if cache is not None:
        return Path(cache)
    from fercache.encoder import DEFAULT_MODEL
    from fercache.extract import default_cache

    return default_cache(DEFAULT_MODEL, "clip", [], "none")


def default_out(cache: Path, method: str, layer: int | None = None, views: str = "plain") -> Path:
    """`runs/<cache stem>-<method>[-layer<K>][-<views>]`."""
    name = f"{cache.stem}-{method}" + (f"-layer{layer}" if layer is not None else "")
    return Path("runs") / (name + (f"-{views}" if views != "plain" else ""))


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
    if method not in METHODS:
        raise UserError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    if views not in VIEWS:
        raise UserError(f"unknown views '{views}': choose one of {', '.join(VIEWS)}")
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
    head.classes = train.classes
    head.meta = {**{k: train.meta.get(k) for k in EXPECTS}, "layer": layer, "views": views}

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
    folder = Path(out) if out is not None else default_out(path, method, layer, views)
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


def check_head(head: Head, meta: dict, where: str) -> None:
    """Refuse features from another encoder or preprocessing than the head was fitted on."""
    for key in ("model", "model_revision", "preprocess", "feature"):
        want, have = head.meta.get(key), meta.get(key)
        if key == "model_revision" and not (want and have):
            continue  # a local folder has no hub revision to compare
        if want != have:
            raise UserError(f"{where} holds {key}={have!r}, but the head was fitted on {key}={want!r}")


def evaluate(cache: str | os.PathLike | None, head_dir: str | os.PathLike, split: str = "test",
             out: str | os.PathLike | None = None, plots: bool = True) -> dict:
    """Score a saved head on one split of a cache; writes `evaluate-<split>.json` (and its confusion plot)."""
    path = resolve_cache(cache)
    head = Head.load(head_dir)
    emb = load_embeddings(path, split, layer=head.meta.get("layer"), view=head.meta.get("views") or "plain")
    check_head(head, emb.meta, str(path))
    if emb.X.shape[1] != head.dim:
        raise UserError(f"{path} holds {emb.X.shape[1]}-d features, but the head {head_dir} is {head.dim}-d")
    report = {**score(head, emb, usage_of(path, split)), "head": str(head_dir), "cache": str(path)}
    folder = Path(out) if out is not None else Path(head_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"evaluate-{split}.json").write_text(json.dumps(report, indent=2) + "\n")
    if plots:
        plot_confusion(report["confusion"], head.classes, folder / f"confusion-{split}.png",
                       f"{head.meta.get('model')} · {head.method} on {split}: accuracy {report['accuracy']:.4f}")
    return report


def read_image(path: str | os.PathLike):
    """Open any image file with PIL, upright (EXIF orientation applied, as photos are shown)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None


def crop_face(image, name: str):
    """The largest face OpenCV's bundled Haar cascade finds; the whole image (with a warning) if none."""
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        raise UserError(f"--detect-face needs OpenCV 4 (OpenCV {cv2.__version__} has no Haar cascades): "
                        "pip install 'opencv-python-headless<5'")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    faces = cascade.detectMultiScale(np.asarray(image.convert("L")), scaleFactor=1.1, minNeighbors=5,
                                     minSize=(24, 24))
    if len(faces) == 0:
        warn(f"{name}: no face found; using the whole image")
        return image
    x, y, w, h = max(faces, key=lambda f: int(f[2]) * int(f[3]))
    return image.crop((int(x), int(y), int(x + w), int(y + h)))


def predict(head_dir: str | os.PathLike, images: list[str | os.PathLike], device: str = "auto",
            detect_face: bool = False, batch_size: int = 64) -> list[dict]:
    """Label new images: 48x48 gray as the readers make them, stage one's encoder, then the head.

    Returns `{"image", "label", "probs": {class: p}}` per image, in order.
    """
    from fercache.data import to_gray48
    from fercache.encoder import load_encoder

    head = Head.load(head_dir)
    faces = []
    for name in images:
        image = read_image(name)
        faces.append(to_gray48(crop_face(image, str(name)) if detect_face else image)[0])
    pixels = np.stack(faces)
    layer, views = head.meta.get("layer"), head.meta.get("views") or "plain"
    encoder = load_encoder(head.meta["model"], head.meta["preprocess"], device, head.meta.get("dtype") or "auto",
                           layers=str(layer) if layer is not None else None)
    check_head(head, encoder.meta, f"model '{head.meta['model']}'")
    feature = f"layers/{layer}" if layer is not None else "embeddings"

    def encode(batch: np.ndarray) -> np.ndarray:
        plain = lambda: encoder.encode(batch)[feature]  # noqa: E731
        flip = lambda: encoder.encode(np.ascontiguousarray(batch[:, :, ::-1]))[feature]  # noqa: E731
        return {"plain": plain, "flip": flip, "mean": lambda: (plain() + flip()) / 2}[views]()

    X = np.concatenate([encode(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
    if X.shape[1] != head.dim:
        raise UserError(f"model '{head.meta['model']}' gives {X.shape[1]}-d features, but the head is {head.dim}-d")
    probs = head.predict_proba(X)
    return [{"image": str(name), "label": head.classes[int(p.argmax())],
             "probs": {c: float(v) for c, v in zip(head.classes, p)}} for name, p in zip(images, probs)]


def run(data: str | os.PathLike | None = None, model: str | None = None, preprocess: str = "clip",
        device: str = "auto", dtype: str = "auto", batch_size: int = 64, method: str = "linear",
        epochs: int = 20, limit: int | None = None, cache: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None, progress: bool = True) -> tuple[list, FitResult]:
    """The whole job: extract train and test (a complete cache is reused), fit, evaluate on test."""
    from fercache.encoder import DEFAULT_MODEL
    from fercache.extract import extract

    summaries = extract(data, "all", model or DEFAULT_MODEL, preprocess, device, dtype, batch_size, limit,
                        cache, progress=progress)
    return summaries, fit(summaries[0].cache, method=method, epochs=epochs, out=out)
