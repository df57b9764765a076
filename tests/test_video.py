"""`fercache predict --video`: one CSV row per sampled frame with `predict`'s numbers, face tracks, a timeline,
an annotated video, and one-line errors for unreadable videos and videos without a face."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import cli, photo_with_face
from fercache.cli import app
from fercache.errors import UserError
from fercache.predict import predict
from fercache.video import IoUTracker, predict_video, sampled


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def drifting_face(real_zip) -> list[np.ndarray]:
    """20 RGB frames of a real face drifting right, 2 px a frame."""
    still = np.asarray(photo_with_face(real_zip, size=(320, 240), side=120, at=(100, 60))[0])
    return [np.roll(still, 2 * i, axis=1) for i in range(20)]


def test_video_gives_one_row_per_sampled_frame_with_predicts_numbers(tiny_head, drifting_face, tmp_path):
    video = write_video(tmp_path / "clip.mp4", drifting_face)
    summary = predict_video(tiny_head, video, tmp_path / "out", fps=5, device="cpu",
                            annotate=tmp_path / "labelled.mp4", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "emotions.csv")))
    assert [int(r["frame"]) for r in rows] == list(range(0, 20, 2)) and summary["frames"] == 10
    assert [float(r["time_s"]) for r in rows] == [i / 10 for i in range(0, 20, 2)]
    found = [r for r in rows if r["track"]]
    assert len(found) >= 8 and {r["track"] for r in found} == {"0"}  # one face, one track
    assert (tmp_path / "out" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The row of a frame is `predict --detect-face` on that decoded frame.
    capture = cv2.VideoCapture(str(video))
    for _ in range(int(found[0]["frame"]) + 1):
        ok, bgr = capture.read()
    cv2.imwrite(str(tmp_path / "frame.png"), bgr)
    [want] = predict(tiny_head, [tmp_path / "frame.png"], "cpu", detect_face=True)
    assert found[0]["label"] == want["label"]
    assert np.allclose([float(found[0][c]) for c in want["probs"]], list(want["probs"].values()), atol=1e-5)

    labelled = cv2.VideoCapture(str(tmp_path / "labelled.mp4"))
    assert int(labelled.get(cv2.CAP_PROP_FRAME_COUNT)) == 10
    assert labelled.get(cv2.CAP_PROP_FRAME_WIDTH) == 320


class VariableRateStream:
    """A `cv2.VideoCapture` stand-in: a stream (frame count -1) at a nominal 10 frames/s whose frames
    come at their own times (a variable frame rate), counting the frames it decodes."""

    def __init__(self, frames: list[np.ndarray], times_ms: list[float]):
        self.frames, self.times_ms, self.at, self.decoded = frames, times_ms, -1, []

    def isOpened(self):
        return True

    def grab(self):
        self.at += 1
        return self.at < len(self.frames)

    def retrieve(self):
        self.decoded.append(self.at)
        return True, cv2.cvtColor(self.frames[self.at], cv2.COLOR_RGB2BGR)

    def read(self):
        return self.retrieve() if self.grab() else (False, None)

    def get(self, prop):
        return {cv2.CAP_PROP_FPS: 10.0, cv2.CAP_PROP_FRAME_COUNT: -1.0,
                cv2.CAP_PROP_POS_MSEC: self.times_ms[self.at]}[prop]

    def release(self):
        pass


def test_a_variable_rate_stream_gets_its_frames_times_and_decodes_only_sampled_frames(tiny_head, drifting_face,
                                                                                     tmp_path, monkeypatch):
    import fercache.video

    times = [sum(range(i + 1)) * 10.0 for i in range(20)]  # gaps of 10, 20, 30... ms
    stream = VariableRateStream(drifting_face, times)
    monkeypatch.setattr(fercache.video.cv2, "VideoCapture", lambda path: stream)
    totals = []
    real_tqdm = fercache.video.tqdm
    monkeypatch.setattr(fercache.video, "tqdm", lambda *a, **k: (totals.append(k["total"]), real_tqdm(*a, **k))[1])
    predict_video(tiny_head, "stream", tmp_path / "out", fps=2, device="cpu", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "emotions.csv")))
    assert sorted({int(r["frame"]) for r in rows}) == [0, 5, 10, 15]
    assert stream.decoded == [0, 5, 10, 15]  # the other frames only grabbed
    assert sorted({float(r["time_s"]) for r in rows}) == [times[i] / 1000 for i in (0, 5, 10, 15)]
    assert totals == [None]  # a stream's unknown length: a bar without a total


def test_the_cli_labels_a_video_with_a_progress_bar(tiny_head, drifting_face, tmp_path):
    video = write_video(tmp_path / "clip.mp4", drifting_face[:3])
    done = cli("predict", "--head", tiny_head, "--video", video, "--device", "cpu", "--out", tmp_path / "out", "--json")
    assert done.returncode == 0, done.stderr
    assert "frame/s" in done.stderr and json.loads(done.stdout)["frames"] == 3


def test_unreadable_video_no_face_and_mixed_inputs_are_one_line_errors(tiny_head, tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    blank = write_video(tmp_path / "blank.mp4", [np.full((120, 160, 3), 128, np.uint8)] * 4)
    cases = {
        ("--video", tmp_path / "notes.mp4"): "notes.mp4: not a readable video",
        ("--video", tmp_path / "missing.mp4"): "missing.mp4: not a readable video",
        ("--video", blank): "blank.mp4: no face found in 4 sampled frame(s)",
        ("--video", blank, "--fps", "0"): "--fps must be positive",
        ("--video", blank, tmp_path / "notes.mp4"): "predict takes image files or --video FILE",
        (): "predict takes image files or --video FILE",
        (tmp_path / "face.png", "--fps", "2"): "--fps and --out: for --video",  # not silently ignored
        ("--video", blank, "--detect-face"): "--detect-face: for images",
        ("--video", blank, "--annotate", tmp_path / "no" / "such" / "x.mp4"): "cannot write a video there",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(app, ["predict", "--head", str(tiny_head), "--device", "cpu",
                                          "--out", str(tmp_path / "o"), *map(str, args)])
        assert isinstance(result.exception, UserError), (args, result.output)
        assert message in str(result.exception) and "\n" not in str(result.exception), args


def test_tracker_follows_overlapping_boxes_and_starts_new_tracks():
    tracker = IoUTracker()
    assert tracker.assign([[0, 0, 50, 50], [200, 0, 50, 50]]) == [0, 1]
    assert tracker.assign([[205, 2, 50, 50], [4, 3, 50, 50]]) == [1, 0]  # order swapped, tracks kept
    assert tracker.assign([[400, 300, 40, 40], [8, 5, 50, 50]]) == [2, 0]  # a new face; track 1 unseen
    for _ in range(6):  # longer than `patience`: track 1 ends
        tracker.assign([])
    assert tracker.assign([[205, 2, 50, 50]]) == [3]


def test_sampling_keeps_the_asked_rate():
    assert [i for i in range(12) if sampled(i, 5, 10)] == [0, 2, 4, 6, 8, 10]
    assert [i for i in range(5) if sampled(i, None, 10)] == [0, 1, 2, 3, 4]
    assert [i for i in range(5) if sampled(i, 30, 10)] == [0, 1, 2, 3, 4]
    assert sum(sampled(i, 1, 30) for i in range(90)) == 3
