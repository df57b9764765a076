"""The page's per-frame path on a CPU: detect faces, make each the head's 48x48 input, encode, score, draw.

    python bench/serve.py [--frames 30] [--faces 1] [--dtype auto] [--threads N]

A random-weight CLIP ViT-B/32 vision tower (the architecture of openai/clip-vit-base-patch32:
768 wide, 12 blocks, 32-pixel patches at 224) is saved to a temporary folder with a linear head
recorded against it, then `fercache.serve`'s path (`label_faces` + `draw_faces`) runs on a
640x480 webcam-like frame holding `--faces` faces. Weights do not change the speed, so no download.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fercache.encoder import load_encoder
from fercache.heads import Head
from fercache.names import CLASSES
from fercache.predict import Scorer, detect_faces, label_faces
from fercache.video import draw_faces


def vit_b32(folder: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, image_size=224, patch_size=32)).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


def head_for(model: Path, out: Path, dtype: str) -> Path:
    """A linear head recorded against this encoder, as `fercache fit` saves one."""
    identity = load_encoder(str(model), "clip", "cpu", dtype).identity.encoder()
    rng = np.random.default_rng(0)
    Head(rng.normal(size=(len(CLASSES), 768)).astype(np.float32) * 0.05, np.zeros(len(CLASSES), np.float32),
         np.zeros(768, np.float32), np.ones(768, np.float32), "linear", False, identity=identity).save(out)
    return out


def frame_with_faces(n: int) -> Image.Image:
    """A 640x480 frame with `n` face-like drawings the cascade finds (cv2 shapes: eyes, nose, mouth)."""
    import cv2

    rgb = np.full((480, 640, 3), 90, np.uint8)
    for i in range(n):
        cx, cy, r = 160 + 320 * (i % 2), 240 if n < 3 else 130 + 220 * (i // 2), 90 if n < 3 else 70
        cv2.ellipse(rgb, (cx, cy), (r, int(r * 1.25)), 0, 0, 360, (205, 170, 150), -1)
        for dx in (-r // 2.5, r // 2.5):
            cv2.ellipse(rgb, (int(cx + dx), cy - r // 4), (r // 5, r // 9), 0, 0, 360, (40, 30, 30), -1)
        cv2.line(rgb, (cx, cy - r // 8), (cx, cy + r // 5), (150, 110, 100), 3)
        cv2.ellipse(rgb, (cx, cy + r // 2), (r // 3, r // 8), 0, 0, 180, (120, 40, 50), 4)
    return Image.fromarray(rgb)


def timed(fn, frames: int) -> tuple[float, float]:
    """Seconds per call: wall clock, and this process's CPU time (what a busy shared machine leaves honest)."""
    fn()  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(frames):
        fn()
    return (time.perf_counter() - start) / frames, (time.process_time() - cpu) / frames


def matmul_rate() -> float:
    """float32 GFLOP/s of one ViT-B/32 MLP matmul (50 tokens) right now: how busy the machine is."""
    a, b = torch.rand(50, 768), torch.rand(768, 3072)
    seconds, _ = timed(lambda: a @ b, 200)
    return 2 * 50 * 768 * 3072 / seconds / 1e9


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--faces", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = vit_b32(Path(tmp) / "vit-b32")
        scorer = Scorer(head_for(model, Path(tmp) / "head", args.dtype), "cpu")
        frame = frame_with_faces(args.faces)
        rgb = np.asarray(frame)
        found = len(detect_faces(frame))
        detect = timed(lambda: detect_faces(frame), args.frames)
        whole = timed(lambda: draw_faces(rgb, label_faces(scorer, frame), min_side=480), args.frames)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}, "
          f"float32 matmul {matmul_rate():.0f} GFLOP/s; encoder dtype {scorer.encoder.identity.dtype}")
    print(f"640x480 frame, {found} face(s) found: detection {detect[0] * 1000:.1f} ms; whole per-frame path "
          f"(detect, crop, encode, score, draw) {whole[0] * 1000:.1f} ms wall = {1 / whole[0]:.1f} frames/s "
          f"({whole[1] * 1000:.1f} ms of CPU time)")


if __name__ == "__main__":
    main()
