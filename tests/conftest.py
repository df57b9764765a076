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
# kept in sys.modules: the op schemas it defines live only as long as the module does
sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sys.modules[_spec.name])
# and in every Python this session starts (CLI calls, torchrun ranks, servers): Python imports the
# folder's `sitecustomize` at start-up
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENVFIX), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session", autouse=True)
def runtime(tmp_path_factory):
    """Exported ONNX Runtime graphs (`fercache.onnxrt`) go to the session's folder, never ~/.cache,
    and the encoder runs on torch unless a test asks for ONNX Runtime (tests/test_onnxrt.py): every
    other test's tiny model would otherwise be exported first. Session-wide, before any fixture
    of a module or the session extracts a cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FERCACHE_GRAPHS", str(tmp_path_factory.mktemp("graphs")))
        patch.setenv("FERCACHE_RUNTIME", "torch")
        yield


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


def cli(*args: object, cwd: Path | None = None, env: dict | None = None,
        fresh: bool = False) -> subprocess.CompletedProcess:
    """`fercache ARGS...` as a user runs it: its exit code, stdout and stderr.

    By default in this process, through the console entry point itself (`fercache.cli.main`, which
    turns user errors into one line and exit 2): a fresh interpreter would import torch and
    transformers again for each of the suite's CLI calls. With `env` (libraries such as
    huggingface_hub read their variables at import) or `fresh`, in a new process.
    """
    if env is not None or fresh:
        return subprocess.run([sys.executable, "-m", "fercache", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env={**os.environ, **(env or {})})
    import warnings
    from contextlib import redirect_stderr, redirect_stdout

    from fercache import cache
    from fercache.cli import main

    out, err, here, argv, locking = io.StringIO(), io.StringIO(), os.getcwd(), sys.argv, cache.LOCKING
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["fercache", *map(str, args)]
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # each call warns anew, as a fresh process would
            warnings.showwarning = (lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line)))  # not pytest's recorder
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # what a fresh process would print and exit 1 with
                import traceback

                traceback.print_exc()
                code = 1
    finally:
        sys.argv, cache.LOCKING = argv, locking
        os.chdir(here)
    return subprocess.CompletedProcess(["fercache", *map(str, args)], code, out.getvalue(), err.getvalue())


def run_tiny(folder: Path, model: Path, per_split: dict[str, int], epochs: int):
    """`fercache run` (Typer's runner) on a small FER2013 zip made in `folder`: cache `c.h5`, head in `run/`."""
    from typer.testing import CliRunner

    from fercache.cli import app

    with zipfile.ZipFile(folder / "fer.zip", "w") as z:
        for name, (data, _, _) in make_fer_layout(per_split).items():
            z.writestr(name, data)
    return CliRunner().invoke(app, ["run", "--data", str(folder / "fer.zip"), "--model", str(model), "--device", "cpu",
                                    "--dtype", "float32", "--epochs", str(epochs), "--cache", str(folder / "c.h5"),
                                    "--out", str(folder / "run")], catch_exceptions=False)


def assert_half_precision_agrees(folder: Path, dtype: str, pixels) -> None:
    """`dtype` features of every stored layer within a cosine of 0.999 of float32's (the README's promise)."""
    import torch

    from fercache.encoder import load_encoder

    full = load_encoder(str(folder), "clip", "cpu", "float32", layers="all").encode(pixels)
    half = load_encoder(str(folder), "clip", "cpu", dtype, layers="all")
    assert half.identity.dtype == dtype and next(half.model.parameters()).dtype == getattr(torch, dtype)
    for name, got in half.encode(pixels).items():
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(got), torch.from_numpy(full[name]))
        assert got.dtype == np.float32 and cos.min() >= 0.999, (name, cos.min().item())


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


def real_faces(real_zip: Path, n: int = 40) -> list[Image.Image]:
    """The first `n` real FER2013 test faces labelled happy."""
    with zipfile.ZipFile(real_zip) as z:
        names = sorted(m for m in z.namelist() if m.startswith("test/happy/"))[:n]
        return [Image.open(io.BytesIO(z.read(m))).convert("L") for m in names]


def photo_with_face(real_zip: Path, size: tuple[int, int] = (640, 480), side: int = 220,
                    at: tuple[int, int] = (210, 130)) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A photo-like colour picture: a gradient background with a real face pasted (the first of the real
    faces the detector finds there), and where it was pasted."""
    from fercache.predict import detect_faces

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    background = np.stack([60 + 80 * xx / w, 90 + 60 * yy / h, 140 - 40 * xx / w], -1).astype(np.uint8)
    for face in real_faces(real_zip):
        photo = Image.fromarray(background.copy())
        photo.paste(face.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), at)
        boxes = detect_faces(photo)
        if boxes and abs(boxes[0][0] - at[0]) < side // 4 and abs(boxes[0][1] - at[1]) < side // 4:
            return photo, (*at, side, side)
    raise AssertionError(f"the detector found none of the real faces pasted {side} px large into a {w}x{h} photo")


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory, tiny_model) -> Path:
    """A head fitted through `fercache run` on the tiny random CLIP over a small fake FER2013 zip (once a session:
    `serve` and `predict --video` score with it)."""
    folder = tmp_path_factory.mktemp("tiny-head")
    result = run_tiny(folder, tiny_model, {"train": 14, "test": 7}, epochs=2)
    assert result.exit_code == 0, result.output
    return folder / "run"


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
