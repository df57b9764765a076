"""`report.html`: one self-contained page per run, to look at rather than parse.

Everything is inside the file (PNG figures and faces as base64 data URIs, inline CSS, no script,
no network), so it opens anywhere, is mailed as one attachment and renders the same in five
years. It shows the test figures with their 95% intervals, the per-class table, the run's PNGs
(confusion matrix, training or validation curves, reliability diagram with its calibration
error) and the most confident mistakes as the 48x48 faces themselves, read back from the
source by the ids the cache stores (skipped, with a note, where the source is not at hand).
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from fercache.names import CLASSES, SPLITS
from fercache.report import interval

REPORT = "report.html"
FIGURES = (("confusion.png", "Confusion matrix (test)"), ("curves.png", "Training curves"),
           ("reliability.png", "Reliability diagram (test)"))
GALLERY = 24  # the most confident mistakes shown

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:8px 0}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f6f6f6}.ci{color:#777;font-size:12px}figure{display:inline-block;margin:8px 12px 8px 0}
figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:12px}
.faces{display:flex;flex-wrap:wrap;gap:10px}.face{width:112px;font-size:11px;text-align:center}
.face img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc}.face .ci{word-break:break-all}
.true{color:#1a7f37}.pred{color:#b42318}.note{color:#8a6d3b;background:#fcf8e3;padding:6px 10px}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def face_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def faces_of(source: str | os.PathLike | None, ids: list[str]) -> dict[str, np.ndarray]:
    """The 48x48 faces of these ids, decoded from the source; {} if it is not there or not readable."""
    from fercache.data import open_source
    from fercache.errors import UserError

    if not source or not Path(source).exists():
        return {}
    try:
        src = open_source(source)
        wanted = set(ids)
        entries = [e for e in src.entries if e.id in wanted]
        found = {}
        for split in ("train", "test"):
            part = [e for e in entries if e.usage in ({"train"} if split == "train" else set(SPLITS[1:]) | {"test"})]
            if part:
                images = replace(src, entries=part).load(split)
                found.update(zip(images.ids, images.pixels))
        return found
    except (UserError, OSError, ValueError):
        return {}


def confident_mistakes(y: np.ndarray, proba: np.ndarray, top: int = GALLERY) -> np.ndarray:
    """Row numbers of the wrong predictions made with the highest confidence, most confident first."""
    pred, confidence = proba.argmax(1), proba.max(1)
    wrong = np.flatnonzero(pred != y)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:top]


def write_report(folder: str | os.PathLike, metrics: dict, predictions: dict | None = None,
                 source: str | os.PathLike | None = None) -> Path:
    """Write `folder/report.html` from a run's `metrics.json` content, its PNGs and its predictions.

    `predictions`: `{"id": [...], "label": array, "proba": (N, 7) array}` for the test rows (the
    gallery of confident mistakes needs them and `source`, the FER2013 file the ids point into).
    """
    folder = Path(folder)
    esc = html.escape
    m = metrics
    title = f"{m.get('model') or 'features'} · {m.get('method')}"
    setting = ", ".join(f"{k} {m[k]}" for k in ("preprocess", "views", "layer", "val", "class_weight")
                        if m.get(k) is not None)
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f'<p class=sub>{esc(setting)}; trained on {m.get("train_count", 0):,} faces, tested on '
             f'{m.get("test_count", 0):,} ({esc(str(m.get("test_split", "test")))}); 95% bootstrap intervals '
             "in brackets</p>"]

    rows = [("accuracy", "test_accuracy"), ("macro-F1", "macro_f1"), ("balanced accuracy", "balanced_accuracy"),
            ("PublicTest accuracy", "public_test_accuracy"), ("PrivateTest accuracy", "private_test_accuracy")]
    parts.append("<h2>Test figures</h2><table><tr><th>figure</th><th>value [95% interval]</th></tr>")
    for name, key in rows:
        if m.get(key) is not None:
            parts.append(f'<tr><td>{name}</td><td>{m[key]:.4f} <span class="ci">{interval(m, key)}</span></td></tr>')
    if m.get("test_unseen_accuracy") is not None:
        parts.append(f'<tr><td>accuracy on the {m["test_unseen_count"]:,} test faces with no copy in train</td>'
                     f'<td>{m["test_unseen_accuracy"]:.4f} <span class="ci">{interval(m, "test_unseen_accuracy")}'
                     "</span></td></tr>")
    if m.get("calibration"):
        parts.append(f"<tr><td>expected calibration error</td><td>{m['calibration']['ece']:.4f}</td></tr>")
    if m.get("test_loss") is not None:
        parts.append(f"<tr><td>cross-entropy</td><td>{m['test_loss']:.4f}</td></tr>")
    parts.append("</table>")
    if m.get("exclude_duplicates"):
        parts.append(f"<p>--exclude-duplicates: the {m['train_with_test_copy']:,} train faces with a copy (exact or "
                     "near) among the test faces were left out of training</p>")
    elif "test_unseen_count" in m and m["test_unseen_count"] is None:
        parts.append("<p class=note>which test faces have a copy in train is unknown: the source is not at hand</p>")
    if m.get("few_shot"):
        fs = m["few_shot"]
        parts.append(f"<p>{fs['shots']} faces per class, {fs['repeats']} draws: test accuracy "
                     f"{fs['accuracy_mean']:.4f} ± {fs['accuracy_std']:.4f}, macro-F1 {fs['macro_f1_mean']:.4f} ± "
                     f"{fs['macro_f1_std']:.4f} (mean ± sd; the figures above are the first draw's)</p>")

    if m.get("per_class"):
        parts.append("<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
                     "<th>support</th></tr>")
        for name, r in m["per_class"].items():
            parts.append(f"<tr><td>{esc(name)}</td><td>{r['precision']:.4f}</td><td>{r['recall']:.4f}</td>"
                         f"<td>{r['f1']:.4f}</td><td>{r['support']:,}</td></tr>")
        parts.append("</table>")

    captions = dict(FIGURES)
    if m.get("logreg"):
        captions["curves.png"] = "The choice of C on validation (error bars: one standard error)"
    figures = [(folder / name, caption) for name, caption in captions.items() if (folder / name).is_file()]
    if figures:
        parts.append("<h2>Figures</h2>")
        for path, caption in figures:
            parts.append(f'<figure><img alt="{esc(caption)}" src="{data_uri(path.read_bytes())}">'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")

    if predictions is not None:
        y, proba, ids = np.asarray(predictions["label"]), np.asarray(predictions["proba"]), list(predictions["id"])
        names = list(m.get("per_class") or CLASSES)  # the dataset's classes, in label order
        rows_ = confident_mistakes(y, proba)
        parts.append(f"<h2>The {len(rows_)} most confident mistakes</h2>")
        faces = faces_of(source, [ids[i] for i in rows_])
        if not faces:
            parts.append(f'<p class=note>the faces are not shown: the source {esc(str(source))} is not at hand</p>')
        parts.append('<div class=faces>')
        for i in rows_:
            img = f'<img alt="{esc(ids[i])}" src="{data_uri(face_png(faces[ids[i]]))}">' if ids[i] in faces else ""
            pred = int(proba[i].argmax())
            parts.append(f'<div class=face>{img}<br><span class=true>{esc(names[y[i]])}</span> → '
                         f'<span class=pred>{esc(names[pred])}</span> {proba[i, pred]:.2f}<br>'
                         f'<span class=ci>{esc(Path(ids[i]).name)}</span></div>')
        parts.append("</div>")
    parts.append("</body></html>\n")
    out = folder / REPORT
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
