"""`fercache serve`: the page's API gives `predict`'s numbers for a real FER2013 face and a photo; it binds
to localhost, serves no extras, and fails in one line without Gradio or on a busy port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import photo_with_face, real_faces
from fercache.cli import app
from fercache.errors import UserError
from fercache.predict import detect_faces, predict


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_head):
    """`fercache serve` in its own process, as a user starts it; its URL once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "fercache", "serve", "--head", str(tiny_head),
                             "--port", str(free_port()), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        line = proc.stdout.readline()
        while line and not line.startswith("serving") and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert line.startswith("serving"), proc.stderr.read() if proc.poll() is not None else line
        yield line.split(" at ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(30)


def test_page_gives_predicts_probabilities_for_a_real_face_and_a_photo(server, tiny_head, real_zip, tmp_path):
    from gradio_client import Client, handle_file

    face = tmp_path / "face.png"
    real_faces(real_zip, 1)[0].save(face)
    photo, (x, y, w, h) = photo_with_face(real_zip)
    photo.save(tmp_path / "photo.jpg", quality=95)
    client = Client(server, verbose=False)
    expected = predict(tiny_head, [face, tmp_path / "photo.jpg"], "cpu", detect_face=True)
    for path, want in zip([face, tmp_path / "photo.jpg"], expected):
        shown, answer = client.predict(handle_file(str(path)), api_name="/label")
        first = answer["faces"][0]
        assert first["label"] == want["label"] and list(first["probs"]) == list(want["probs"])
        assert np.allclose(list(first["probs"].values()), list(want["probs"].values()), atol=1e-5)
        assert min(Image.open(shown).size) >= 480  # drawn enlarged, bars readable
    bx, by, bw, bh = first["box"]  # the photo's face is found where it was pasted
    overlap = max(0, min(bx + bw, x + w) - max(bx, x)) * max(0, min(by + bh, y + h) - max(by, y))
    assert overlap > 0.5 * w * h
    assert max(answer["faces"][0]["probs"].values()) < 1  # a random model: no class certain


def test_webcam_frames_get_predicts_numbers_and_no_frame_gets_nothing(tiny_head, real_zip, tmp_path):
    """The stream's handler, called as Gradio calls it (gradio_client cannot stream), on an RGB frame."""
    from fercache.predict import Scorer
    from fercache.serve import build_page

    page = build_page(Scorer(tiny_head, "cpu"), "test")
    frame = next(f.fn for f in page.fns.values() if f.api_name == "frame")
    photo, _ = photo_with_face(real_zip)
    photo.save(tmp_path / "frame.png")
    shown, answer = frame(np.asarray(photo))
    [want] = predict(tiny_head, [tmp_path / "frame.png"], "cpu", detect_face=True)
    assert shown.shape == (480, 640, 3) and not np.array_equal(shown, np.asarray(photo))  # boxes drawn
    assert np.allclose(list(answer["faces"][0]["probs"].values()), list(want["probs"].values()), atol=1e-5)
    assert frame(None) == (None, {"faces": []})
    _, blank = frame(np.full((480, 640, 3), 128, np.uint8))
    assert blank == {"faces": []}  # a frame without a face shows no box (an upload would be scored whole)


def test_server_binds_localhost_and_serves_the_page_and_its_api_only(server):
    import httpx

    assert server.startswith("http://127.0.0.1:")
    page = httpx.get(server)
    assert page.status_code == 200 and "<html" in page.text.lower()
    config = httpx.get(server + "config").json()
    assert config["analytics_enabled"] is False and config["mcp_server"] is False and config["pwa"] is False
    assert not config.get("share_url")
    assert sorted(d["api_name"] for d in config["dependencies"] if d.get("api_name")) == ["frame", "label"]
    assert httpx.get(server + "gradio_api/mcp/sse").status_code == 404
    assert httpx.get(server + "monitoring").status_code in (403, 404)
    assert "fonts.googleapis" not in httpx.get(server + "theme.css").text


def test_serve_without_gradio_names_the_extra(tiny_head, monkeypatch):
    from fercache.serve import serve

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(UserError, match=r"^fercache serve needs Gradio: pip install 'fercache\[serve\]'$"):
        serve(tiny_head)


def test_serve_on_a_busy_port_is_one_line(tiny_head):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--head", str(tiny_head), "--port", str(port)])
    assert isinstance(result.exception, UserError)
    assert f"cannot serve on 127.0.0.1:{port}" in str(result.exception) and "\n" not in str(result.exception)


@pytest.mark.parametrize("port", [70000, -1])
def test_serve_on_no_port_at_all_is_one_line(tiny_head, port):
    result = CliRunner().invoke(app, ["serve", "--head", str(tiny_head), "--port", str(port)])
    assert isinstance(result.exception, UserError)
    assert f"cannot serve on 127.0.0.1:{port}" in str(result.exception) and "\n" not in str(result.exception)


@pytest.mark.parametrize("side", [150, 400])
def test_a_face_in_a_large_photo_is_found_once_whatever_its_size(real_zip, side):
    """A 4000x3000 photo: a 150 px face, which only the search at the photo's resolution finds, and a 400 px
    one, which both searches find and which must come back as one box."""
    photo, (x, y, w, h) = photo_with_face(real_zip, size=(4000, 3000), side=side, at=(2400, 1700))
    [(bx, by, bw, bh)] = detect_faces(photo)
    overlap = max(0, min(bx + bw, x + w) - max(bx, x)) * max(0, min(by + bh, y + h) - max(by, y))
    assert overlap > 0.5 * w * h and bw < 2 * w


def test_a_user_error_on_the_page_says_what_is_wrong(tiny_head, tmp_path):
    """The server runs with show_error=False: only a `gr.Error` reaches the page with its message."""
    import gradio as gr

    from fercache.predict import Scorer
    from fercache.serve import build_page

    page = build_page(Scorer(tiny_head, "cpu"), "test")
    upload = next(f.fn for f in page.fns.values() if f.api_name == "label")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(gr.Error, match="notes.png: not a readable image") as err:
        upload(str(tmp_path / "notes.png"))
    assert "\n" not in str(err.value)
