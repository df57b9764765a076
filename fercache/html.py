"""`report.html`: one self-contained page per run, to look at rather than parse.

Everything is inside the file (PNG figures and faces as base64 data URIs, inline CSS, no script,
no network), so it opens anywhere, is mailed as one attachment and renders the same in five
years. It shows the test figures with their 95% intervals, the per-class table, the run's PNGs
(confusion matrix, training or validation curves, reliability diagram with its calibration
error) and the most confident mistakes as the faces themselves, read back from the source by
the ids the cache stores, opened as the cache was made (`Origin`: its dataset, a folder's
classes, 48x48 gray or each image as stored, in colour and shrunk to a thumbnail); skipped, with
a note that says why, where the source is not at hand.
"""

from __future__ import annotations

import base64
import html
import io
import os
import warnings
from pathlib import Path

import numpy as np

from fercache.data import Source
from fercache.datasets import Origin
from fercache.errors import FERCacheWarning, UserError
from fercache.names import CLASSES
from fercache.report import interval

REPORT = "report.html"
FIGURES = (("confusion.png", "Confusion matrix (test)"), ("curves.png", "Training curves"),
           ("reliability.png", "Reliability diagram (test)"))
GALLERY = 24  # the most confident mistakes shown
THUMB = 128  # longest side of a face stored in a page: larger (native) images are shrunk to it, 48x48 ones kept
SHOWN = 96  # the side a face is shown at: smaller ones are enlarged pixel by pixel, larger ones smoothly

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:8px 0}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f6f6f6}.ci{color:#777;font-size:12px}figure{display:inline-block;margin:8px 12px 8px 0}
figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:12px}
.faces{display:flex;flex-wrap:wrap;gap:10px}.face{width:112px;font-size:11px;text-align:center}
.face img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc;object-fit:contain;background:#f6f6f6}
.face img.smooth{image-rendering:auto}.face .ci{word-break:break-all}
.true{color:#1a7f37}.pred{color:#b42318}.note{color:#8a6d3b;background:#fcf8e3;padding:6px 10px}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def face_png(pixels: np.ndarray) -> bytes:
    """A face as PNG bytes: 48x48 gray as it is, a larger (native, colour) image shrunk to `THUMB`."""
    from PIL import Image

    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    if max(image.size) > THUMB:
        image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def face_img(pixels: np.ndarray, alt: str) -> str:
    """An inline `<img>` of a face: shown at `SHOWN` px, keeping its shape; class `smooth` where that
    shrinks it (a large native image), else enlarged pixel by pixel (48x48: the pixels as they are)."""
    smooth = max(np.shape(pixels)[:2]) > SHOWN
    return (f'<img{" class=smooth" if smooth else ""} alt="{html.escape(alt)}" '
            f'src="{data_uri(face_png(pixels))}">')


def faces_of(source: Source, ids: list[str], native: bool = False) -> dict[str, np.ndarray]:
    """The faces of these ids, decoded from an open source (48x48 gray, or `native`: each as stored);
    ids it lacks or cannot read are left out."""
    wanted = set(ids)
    entries = [e for e in source.entries if e.id in wanted]
    found: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():  # what decoding warns of, `extract` said when it read these images
        warnings.simplefilter("ignore", FERCacheWarning)
        for positions, chunk in source.stream(entries, native=native):
            found.update((entries[i].id, pixels) for i, pixels in zip(positions, chunk))
    return found


def confident_mistakes(y: np.ndarray, proba: np.ndarray, top: int = GALLERY) -> np.ndarray:
    """Row numbers of the wrong predictions made with the highest confidence, most confident first."""
    pred, confidence = proba.argmax(1), proba.max(1)
    wrong = np.flatnonzero(pred != y)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:top]


def write_report(folder: str | os.PathLike, metrics: dict, predictions: dict | None = None,
                 origin: Origin | None = None) -> Path:
    """Write `folder/report.html` from a run's `metrics.json` content, its PNGs and its predictions.

    `predictions`: `{"id": [...], "label": array, "proba": (N, classes) array}` for the test rows
    (the gallery of confident mistakes needs them and `origin`, the source the ids point into).
    """
    folder = Path(folder)
    esc = html.escape
    m = metrics
    title = f"{m.get('model') or 'features'} · {m.get('method')}"
    setting = ", ".join(f"{k} {m[k]}" for k in ("preprocess", "views", "layer", "val", "class_weight")
                        if m.get(k) is not None)
    folds = m.get("folds")
    scored = (f'{folds["count"]} subject-independent folds of {m.get("test_count", 0):,} faces ({folds["subjects"]} '
              f'subjects, --folds {folds["folds"]}): every face predicted once, by the fold that held it out; '
              "the figures are of those pooled predictions" if folds else
              f'trained on {m.get("train_count", 0):,} faces, tested on {m.get("test_count", 0):,} '
              f'({esc(str(m.get("test_split", "test")))})')
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f"<p class=sub>{esc(setting)}; {esc(scored)}; 95% bootstrap intervals in brackets</p>"]

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
        parts.append("<p class=note>which test faces have a copy in train is unknown: the source is not at hand, "
                     "or could not be audited (fercache said which when this run was made)</p>")
    if folds:
        keys = [k for k in ("accuracy", "macro_f1", "balanced_accuracy") if f"{k}_mean" in folds]
        parts.append("<h2>Per fold</h2><table><tr><th>fold</th><th>train</th><th>test</th><th>test subjects</th>"
                     + "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys) + "</tr>")
        for r in folds["per_fold"]:
            parts.append(f"<tr><td>{r['fold']}</td><td>{r['train_count']:,}</td><td>{r['test_count']:,}</td>"
                         f"<td>{r['test_subjects']}</td>" + "".join(f"<td>{r[k]:.4f}</td>" for k in keys) + "</tr>")
        parts.append("<tr><td>mean ± sd</td><td></td><td></td><td></td>"
                     + "".join(f"<td>{folds[k + '_mean']:.4f} ± {folds[k + '_std']:.4f}</td>" for k in keys)
                     + "</tr></table>")
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
        try:
            if origin is None:
                raise UserError("the source is not known")
            faces = faces_of(origin.open(), [ids[i] for i in rows_], origin.native)
            why = "" if faces else f"none of them could be read from {origin.path}"
        except (UserError, OSError, ValueError) as exc:
            faces, why = {}, str(exc)
        if len(rows_) and why:
            parts.append(f"<p class=note>the faces are not shown: {esc(why)}</p>")
        parts.append('<div class=faces>')
        for i in rows_:
            img = face_img(faces[ids[i]], ids[i]) if ids[i] in faces else ""
            pred = int(proba[i].argmax())
            parts.append(f'<div class=face>{img}<br><span class=true>{esc(names[y[i]])}</span> → '
                         f'<span class=pred>{esc(names[pred])}</span> {proba[i, pred]:.2f}<br>'
                         f'<span class=ci>{esc(Path(ids[i]).name)}</span></div>')
        parts.append("</div>")
    parts.append("</body></html>\n")
    out = folder / REPORT
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
