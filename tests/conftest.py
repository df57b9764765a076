"""Shared fixtures: tiny random CLIP models saved to disk, small FER2013 look-alikes, the real zip."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fercache.data import CLASSES

REAL_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013.zip"

# ENVIRONMENT WORKAROUND (tests only): where torchvision's compiled ops do not load beside this
# torch (a CUDA torchvision wheel beside CPU torch), define their schemas before torchvision is
# imported, here and in the CLI's subprocesses. See envfix/sitecustomize.py; fercache has none of it.
ENVFIX = Path(__file__).resolve().parent / "envfix"
_spec = importlib.util.spec_from_file_location("fercache_tests_envfix", ENVFIX / "sitecustomize.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """Every test runs in its own folder: default caches (./data) and runs (./runs) land there,
    never in the checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FERCACHE_DATA", raising=False)


@pytest.fixture(scope="session")
def real_zip() -> Path:
    """The real FER2013 zip beside the repo (CI has it; a user's fresh clone may not)."""
    if not REAL_ZIP.exists():
        pytest.skip(f"real FER2013 not found at {REAL_ZIP}")
    return REAL_ZIP


def cli(*args: object, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m fercache ARGS...` in a fresh process, as a user runs it (exit code, stdout, stderr)."""
    path = os.pathsep.join(filter(None, [str(ENVFIX), os.environ.get("PYTHONPATH")]))  # the workaround above
    return subprocess.run([sys.executable, "-m", "fercache", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {}), "PYTHONPATH": path})


def save_tiny_clip(folder: Path, image_size: int = 224, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight CLIP vision model plus its image processor, saved like a hub checkout."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=image_size, patch_size=32)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def pil_clip_processor():
    """CLIP's PIL image processor, the reference for `--preprocess clip`: transformers 5 calls it
    CLIPImageProcessorPil (its CLIPImageProcessor is torchvision-backed where torchvision is
    installed), transformers 4 CLIPImageProcessor."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def fake_faces(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` random 48x48 uint8 'faces' with labels cycling through the 7 classes."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 48, 48), dtype=np.uint8), np.arange(n) % len(CLASSES)


def _jpeg_free(pixels: np.ndarray) -> bytes:
    """PNG, so the pixels survive encoding exactly and tests can compare them."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_fer_layout(per_split: dict[str, int], seed: int = 0) -> dict[str, tuple[bytes, np.ndarray, int]]:
    """Kaggle-layout member paths -> (encoded image, pixels, label) for a small fake dataset."""
    files = {}
    for split, n in per_split.items():
        pixels, labels = fake_faces(n, seed + len(files))
        for i, (p, y) in enumerate(zip(pixels, labels)):
            prefix = "Training" if split == "train" else ("PublicTest" if i % 2 else "PrivateTest")
            files[f"{split}/{CLASSES[y]}/{prefix}_{1000 + i}.png"] = (_jpeg_free(p), p, int(y))
    return files


@pytest.fixture
def fer_zip(tmp_path) -> Path:
    """A small FER2013 zip in Kaggle's layout: 21 train and 14 test images."""
    path = tmp_path / "fer2013.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, (data, _, _) in make_fer_layout({"train": 21, "test": 14}).items():
            z.writestr(name, data)
    return path


def write_fer_csv(path: Path, pixels: np.ndarray, labels: np.ndarray, usages: list[str],
                  icml: bool = False) -> Path:
    """Write the challenge CSV (`fer2013.csv`, or `icml_face_data.csv` with its spaced header)."""
    text = [str(v) for v in range(256)]
    with open(path, "w") as f:
        f.write("emotion, Usage, pixels\n" if icml else "emotion,pixels,Usage\n")
        for p, y, u in zip(pixels, labels, usages):
            px = " ".join([text[v] for v in p.ravel().tolist()])
            f.write(f"{y},{u},{px}\n" if icml else f"{y},{px},{u}\n")
    return path


def random_clip(folder, hidden: int = 64, layers: int = 2, position_scale: float = 30.0):
    """A random CLIP for 48x48 faces (8x8 patches, no resize), position embeddings scaled up."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                             num_hidden_layers=layers, num_attention_heads=4, image_size=48,
                                             patch_size=8))
    with torch.no_grad():
        model.embeddings.position_embedding.weight.mul_(position_scale)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(folder)
    return folder


def bytes_to_unicode() -> list[str]:
    """GPT-2's (and CLIP's) byte-level BPE alphabet: one printable symbol per byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="session")
def full_clip(tmp_path_factory) -> Path:
    """A random full CLIPModel (both towers) with a toy byte-level tokenizer, saved offline."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("full-clip")
    symbols = bytes_to_unicode()
    assert len(set(symbols)) == 256
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    bos, eos = len(tokens) - 2, len(tokens) - 1
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(tokens), max_position_embeddings=77, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder
