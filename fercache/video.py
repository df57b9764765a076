"""Emotion over time in a video: faces of sampled frames scored as `predict` scores photos, tracked by box overlap.

`predict_video` writes one CSV row per face per sampled frame (one empty row for a frame without
a face, so every sampled frame appears), a timeline plot per face track and, on request, the video
with labelled boxes. `draw_faces` is that drawing, which `serve`'s page shows too.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from fercache.errors import UserError, warn
from fercache.predict import Scorer, label_faces

PALETTE = [(230, 57, 70), (106, 153, 78), (131, 56, 236), (244, 162, 97), (69, 123, 157), (255, 190, 11),
           (160, 160, 160)]  # RGB, one per class in the head's order
TIMELINE_TRACKS = 8  # the longest tracks get a panel each; the CSV has them all


def draw_faces(rgb: np.ndarray, faces: list[dict], min_side: int = 0) -> np.ndarray:
    """An RGB frame with each face boxed and its class probabilities drawn as bars under the box; a frame
    whose longer side is under `min_side` is enlarged first, so the bars stay readable."""
    out = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    zoom = max(1.0, min_side / max(out.shape[:2]))
    out = cv2.resize(out, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC) if zoom > 1 else out.copy()
    height, width = out.shape[:2]
    unit = max(height, width) / 640  # sizes follow the frame, so labels read the same at any resolution
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.45 * unit, max(1, round(unit))
    row, text_w, bar_w = round(16 * unit), round(72 * unit), round(80 * unit)
    for face in faces:
        x, y, w, h = (round(v * zoom) for v in face["box"]) if face["box"] else (0, 0, width, height)
        probs = face["probs"]
        best = list(probs).index(face["label"])
        colour = PALETTE[best % len(PALETTE)]
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, max(2, round(2 * unit)))
        title = f"{face['label']} {probs[face['label']]:.0%}"
        (tw, th), _ = cv2.getTextSize(title, font, scale * 1.2, thick + 1)
        ty = y - 4 if y - th - 8 >= 0 else y + th + 6  # above the box, or inside it at the top edge
        cv2.rectangle(out, (x, ty - th - 4), (x + tw + 4, ty + 4), colour, -1)
        cv2.putText(out, title, (x + 2, ty), font, scale * 1.2, (255, 255, 255), thick + 1, cv2.LINE_AA)
        panel_w, panel_h = text_w + bar_w + 6, row * len(probs) + 4
        px, py = min(max(0, x), max(0, width - panel_w)), y + h + 2  # under the box,
        if py + panel_h > height:  # else beside it (right, then left), else over it
            py = min(max(0, y), max(0, height - panel_h))
            if x + w + 2 + panel_w <= width:
                px = x + w + 2
            elif x >= panel_w + 2:
                px = x - panel_w - 2
        region = out[py:py + panel_h, px:px + panel_w]
        region[:] = (region * 0.35).astype(np.uint8)  # a dark panel under the bars
        for i, (name, p) in enumerate(probs.items()):
            top = py + 2 + i * row
            cv2.putText(out, name[:9], (px + 3, top + row - 4), font, scale, (255, 255, 255), thick, cv2.LINE_AA)
            cv2.rectangle(out, (px + text_w, top + 2), (px + text_w + max(1, round(p * bar_w)), top + row - 3),
                          PALETTE[i % len(PALETTE)], -1)
    return out


def iou(a: list[int], b: list[int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / float(aw * ah + bw * bh - w * h)


class IoUTracker:
    """Face tracks across frames: each box joins the track whose last box overlaps it most (IoU at least
    `threshold`, greedy, one box per track), else starts a new one; a track unseen for `patience` sampled
    frames ends."""

    def __init__(self, threshold: float = 0.3, patience: int = 5):
        self.threshold, self.patience = threshold, patience
        self.tracks: dict[int, tuple[list[int], int]] = {}  # id -> (last box, last sampled frame)
        self.frame = -1

    def assign(self, boxes: list[list[int]]) -> list[int]:
        self.frame += 1
        live = {t: box for t, (box, seen) in self.tracks.items() if self.frame - seen <= self.patience}
        pairs = sorted(((iou(box, last), i, t) for i, box in enumerate(boxes) for t, last in live.items()),
                       reverse=True)
        ids: dict[int, int] = {}
        for overlap, i, t in pairs:
            if overlap >= self.threshold and i not in ids and t not in ids.values():
                ids[i] = t
        for i, box in enumerate(boxes):
            if i not in ids:
                ids[i] = len(self.tracks)  # ids never reused: tracks are never dropped from the dict
            self.tracks[ids[i]] = (box, self.frame)
        return [ids[i] for i in range(len(boxes))]


def sampled(index: int, fps: float | None, source_fps: float) -> bool:
    """Whether frame `index` is kept when sampling `fps` frames a second from a `source_fps` video."""
    if fps is None or fps >= source_fps:
        return True
    return index == 0 or int(index * fps / source_fps) != int((index - 1) * fps / source_fps)


def predict_video(head_dir: str | os.PathLike, video: str | os.PathLike, out: str | os.PathLike,
                  fps: float | None = None, device: str = "auto", annotate: str | os.PathLike | None = None,
                  progress: bool = True) -> dict:
    """Score every face of every sampled frame; write `emotions.csv`, `timeline.png` and, on request, the
    annotated video. Returns the paths and counts."""
    if fps is not None and fps <= 0:
        raise UserError(f"--fps must be positive, not {fps}")
    capture = cv2.VideoCapture(str(video))
    ok, bgr = capture.read() if capture.isOpened() else (False, None)  # frame 0, sampled whatever --fps
    if not ok:
        raise UserError(f"{video}: not a readable video (OpenCV could not decode a frame)")
    source_fps = capture.get(cv2.CAP_PROP_FPS)
    if not source_fps or source_fps <= 0 or source_fps > 1000:
        warn(f"{video}: no frame rate recorded; assuming 25 frames/s")
        source_fps = 25.0
    total = max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))) or None  # streams say -1 or 0: unknown
    writer = None
    if annotate is not None:  # refused before the model loads, not after
        height, width = bgr.shape[:2]
        writer = cv2.VideoWriter(str(annotate), cv2.VideoWriter_fourcc(*"mp4v"), min(fps or source_fps, source_fps),
                                 (width, height))
        if not writer.isOpened():
            raise UserError(f"{annotate}: cannot write a video there (OpenCV's mp4v writer refused it)")
    scorer = Scorer(head_dir, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tracker, rows, index, frames = IoUTracker(), [], 0, 0
    expected = None if total is None else sum(sampled(i, fps, source_fps) for i in range(total))
    try:
        with tqdm(total=expected, unit="frame", desc=f"predict {Path(video).name}", disable=not progress,
                  dynamic_ncols=True) as bar:
            while ok:
                if sampled(index, fps, source_fps):
                    if bgr is None:  # only sampled frames are decoded; `grab` just steps over the others
                        ok, bgr = capture.retrieve()
                        if not ok:
                            break
                    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                    faces = label_faces(scorer, Image.fromarray(rgb))
                    tracks = tracker.assign([f["box"] for f in faces])
                    # the frame's own timestamp: index / frame rate is wrong for a variable frame rate
                    base = {"frame": index, "time_s": round(capture.get(cv2.CAP_PROP_POS_MSEC) / 1000, 3)}
                    rows += [{**base, "track": t, "face": f} for t, f in zip(tracks, faces)] or [{**base}]
                    if writer is not None:
                        writer.write(cv2.cvtColor(draw_faces(rgb, faces), cv2.COLOR_RGB2BGR))
                    frames += 1
                    bar.update()
                ok, bgr = capture.grab(), None
                index += 1
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if not any("face" in r for r in rows):
        raise UserError(f"{video}: no face found in {frames} sampled frame(s)")
    csv_path = _write_csv(rows, scorer.classes, out / "emotions.csv")
    timeline = plot_timeline(rows, scorer.classes, out / "timeline.png", Path(video).name)
    return {"csv": csv_path, "timeline": timeline, "annotated": None if annotate is None else Path(annotate),
            "frames": frames, "faces": sum("face" in r for r in rows), "tracks": len(tracker.tracks)}


def _write_csv(rows: list[dict], classes: list[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "time_s", "track", "x", "y", "w", "h", "label", *classes])
        for r in rows:
            face = r.get("face")
            w.writerow([r["frame"], r["time_s"], *([r["track"], *face["box"], face["label"],
                                                   *(f"{face['probs'][c]:.6f}" for c in classes)]
                                                  if face else [""] * (6 + len(classes)))])
    return path


def plot_timeline(rows: list[dict], classes: list[str], path: Path, title: str) -> Path:
    """One panel per face track (the longest `TIMELINE_TRACKS`): each class's probability against time."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    by_track: dict[int, list[dict]] = {}
    for r in rows:
        if "face" in r:
            by_track.setdefault(r["track"], []).append(r)
    shown = sorted(by_track, key=lambda t: -len(by_track[t]))[:TIMELINE_TRACKS]
    fig = Figure(figsize=(9, 2.4 * len(shown) + 0.6), layout="constrained")
    for ax, t in zip(np.atleast_1d(fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]), sorted(shown)):
        times = [r["time_s"] for r in by_track[t]]
        for i, c in enumerate(classes):
            ax.plot(times, [r["face"]["probs"][c] for r in by_track[t]], marker=".", markersize=3, label=c,
                    color=np.array(PALETTE[i % len(PALETTE)]) / 255)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"face {t}")
        ax.grid(alpha=0.3)
    ax.set_xlabel("time (s)")
    fig.legend(classes, loc="outside right upper")
    more = f" ({len(shown)} longest of {len(by_track)} tracks)" if len(by_track) > len(shown) else ""
    fig.suptitle(f"{title}: class probabilities per face track{more}")
    fig.savefig(path, dpi=110)
    return path
