"""`fercache serve`: a local web page that labels every face in webcam frames and uploaded photos.

The page is Gradio's (the `serve` extra). Faces are found, cropped and scored by `predict`'s own
pieces (`label_faces`), so an upload gets exactly `predict --detect-face`'s probabilities. The
server binds to localhost unless told otherwise and serves the page and its API only: no share
link, analytics, MCP server, PWA, monitoring or server-side rendering, and no web fonts fetched.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fercache.errors import UserError
from fercache.predict import Scorer, label_faces, read_image
from fercache.video import draw_faces

STREAM_EVERY = 0.1  # seconds between webcam frames sent to the server (10 frames/s at most)
SHOWN_SIDE = 480  # smaller pictures (a 48x48 FER2013 face) are shown enlarged to this, so the bars can be read


def _gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no calls home
    try:
        import gradio
    except ImportError:
        raise UserError("fercache serve needs Gradio: pip install 'fercache[serve]'") from None
    return gradio


def _shown(gr, handler: Callable) -> Callable:
    """`handler` with a `UserError` (an unreadable upload) raised as `gr.Error`, which the page shows as it
    is: with `show_error=False`, any other exception shows only "Error"."""
    @functools.wraps(handler)
    def said(*args):
        try:
            return handler(*args)
        except UserError as exc:
            raise gr.Error(str(exc)) from None
    return said


def build_page(scorer: Scorer, title: str):
    """The page: a webcam stream and an upload, each answered with labelled boxes and the faces' numbers."""
    from PIL import Image

    gr = _gradio()

    def upload(path: str | None) -> tuple[np.ndarray | None, dict]:
        if path is None:
            return None, {"faces": []}
        image = read_image(path)
        faces = label_faces(scorer, image, whole_if_none=True)
        return draw_faces(np.asarray(image.convert("RGB")), faces, min_side=SHOWN_SIDE), {"faces": faces}

    def frame(rgb: np.ndarray | None) -> tuple[np.ndarray | None, dict]:
        if rgb is None:  # the browser sent no frame (no camera, or permission refused)
            return None, {"faces": []}
        faces = label_faces(scorer, Image.fromarray(rgb))
        return draw_faces(rgb, faces, min_side=SHOWN_SIDE), {"faces": faces}

    with gr.Blocks(title=f"fercache: {title}", analytics_enabled=False) as page:
        gr.Markdown(f"### {title}\nEvery face found is boxed and labelled with the head's class probabilities.")
        with gr.Tab("Webcam"):
            with gr.Row():
                camera = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="camera")
                shown = gr.Image(label="faces", interactive=False)
            camera_faces = gr.JSON(label="probabilities")
            camera.stream(_shown(gr, frame), camera, [shown, camera_faces], api_name="frame",
                          stream_every=STREAM_EVERY, trigger_mode="always_last", concurrency_limit=1,
                          concurrency_id="model",
                          show_progress="hidden")  # a slow CPU skips frames rather than queueing them
        with gr.Tab("Upload"):
            with gr.Row():
                # filepath with image_mode None: Gradio hands over the uploaded file itself, not a re-encoded copy
                photo = gr.Image(sources=["upload", "clipboard"], type="filepath", image_mode=None, label="photo")
                labelled = gr.Image(label="faces", interactive=False)
            photo_faces = gr.JSON(label="probabilities")
            photo.change(_shown(gr, upload), photo, [labelled, photo_faces], api_name="label",
                         concurrency_limit=1, concurrency_id="model")
    return page


def serve(head_dir: str | os.PathLike, port: int = 7860, device: str = "auto", host: str = "127.0.0.1") -> None:
    """Load the head (or tuned run) once and serve its page until interrupted."""
    gr = _gradio()
    with socket.socket() as probe:  # a busy port fails now, not after loading the model
        try:
            probe.bind((host, port))
        except (OSError, OverflowError) as exc:  # busy, not ours, or not a port (OverflowError: > 65535)
            raise UserError(f"cannot serve on {host}:{port} ({getattr(exc, 'strerror', None) or exc})") from None
    scorer = Scorer(head_dir, device)
    page = build_page(scorer, f"{Path(head_dir).name}: {', '.join(scorer.classes)}")
    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no Google Fonts: the page works offline
    theme = gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])
    try:
        _, url, _ = page.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, share=False, inbrowser=False, quiet=True, show_error=False,
            mcp_server=False, pwa=False, ssr_mode=False, enable_monitoring=False, footer_links=["api"],
            max_file_size="50mb", theme=theme, prevent_thread_lock=True)
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port} ({str(exc).splitlines()[0]})") from None
    print(f"serving {Path(head_dir)} at {url} (Ctrl+C stops)", flush=True)
    page.block_thread()
