"""Stage one: exact embeddings, an honest cache layout, refusal to mix (kills and resume: test_crash.py)."""

from __future__ import annotations

import json
import zipfile

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, make_fer_layout, pil_clip_processor, save_tiny_clip
from fercache.cache import load_embeddings
from fercache.data import load_images
from fercache.errors import UserError
from fercache.extract import extract
from fercache.preprocess import FILTERS, Preprocessor, Recipe


def faces_source(real_zip_or_none, tmp_path, n_train=40, n_test=20):
    """Real FER2013 when present, else a small fake zip: (path, limit)."""
    if real_zip_or_none is not None:
        return real_zip_or_none
    path = tmp_path / "fer2013.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, (data, _, _) in make_fer_layout({"train": n_train, "test": n_test}).items():
            z.writestr(name, data)
    return path


@pytest.fixture
def faces(tmp_path):
    from conftest import REAL_ZIP
    return faces_source(REAL_ZIP if REAL_ZIP.exists() else None, tmp_path)


def reference_embeddings(model_dir, pixels: np.ndarray, preprocess: str) -> np.ndarray:
    """The plain Hugging Face path: the model's image processor (or the seed recipe in PIL) per
    image, then CLIPVisionModel in float32."""
    from transformers import CLIPVisionModel

    processor = pil_clip_processor()
    model = CLIPVisionModel.from_pretrained(model_dir).eval()
    images = [Image.fromarray(p).convert("RGB") for p in pixels]
    if preprocess == "clip":
        x = processor.from_pretrained(model_dir)(images=images, return_tensors="pt")["pixel_values"]
    else:
        size = model.config.image_size
        arr = np.stack([np.asarray(im.resize((size, size), Image.Resampling.BILINEAR)) for im in images])
        x = torch.from_numpy((arr.astype(np.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2)
    with torch.inference_mode():
        return model(pixel_values=x).pooler_output.numpy()


@pytest.mark.parametrize("resample", sorted(FILTERS))
@pytest.mark.parametrize("resize, crop", [(224, 224), (256, 224)])
def test_batched_resize_is_bit_exact_with_pil(resample, resize, crop):
    pixels = np.random.default_rng(resample).integers(0, 256, (6, 48, 48), dtype=np.uint8)
    recipe = Recipe("test", resize, crop, resample, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0)
    ours = Preprocessor(recipe, torch.device("cpu"))(pixels)
    top = (resize - crop) // 2
    ref = np.stack([np.asarray(Image.fromarray(p).resize((resize, resize), resample))[top:top + crop, top:top + crop]
                    for p in pixels])
    assert ours.shape == (6, 3, crop, crop)
    assert np.array_equal(ours[:, 0].numpy(), ref) and np.array_equal(ours[:, 2].numpy(), ref)


@pytest.mark.parametrize("size", ["tiny", "vit-b/32"])
@pytest.mark.parametrize("preprocess", ["clip", "seed"])
def test_embeddings_equal_the_reference_pipeline(faces, tmp_path, preprocess, size):
    if size == "tiny":
        model_dir = save_tiny_clip(tmp_path / "model")
        n = 24
    else:  # the real ViT-B/32 architecture, random weights: a few images are enough
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
        model_dir = tmp_path / "vitb32"
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig()).save_pretrained(model_dir)
        CLIPImageProcessor().save_pretrained(model_dir)
        n = 4
    cache = tmp_path / "cache.h5"
    extract(faces, "test", str(model_dir), preprocess, "cpu", "float32", batch_size=16, limit=n,
            cache=cache, progress=False)
    X, y, ids, classes, meta = load_embeddings(cache, "test")
    images = load_images(faces, "test", limit=n)
    assert ids == images.ids and np.array_equal(y, images.labels)
    ref = reference_embeddings(model_dir, images.pixels, preprocess)
    assert X.dtype == np.float32 and X.shape == ref.shape
    np.testing.assert_allclose(X, ref, rtol=1e-4, atol=1e-4)
    assert meta["preprocess"] == preprocess and meta["dtype"] == "float32"


def test_cache_layout_and_info(fer_zip, tiny_model, tmp_path):
    cache = tmp_path / "c.h5"
    summaries = extract(fer_zip, "all", str(tiny_model), "clip", "cpu", "float32", batch_size=8, cache=cache,
                        progress=False)
    assert [(s.split, s.count, s.dim, s.skipped) for s in summaries] == [("train", 21, 32, False), ("test", 14, 32, False)]
    with h5py.File(cache) as f:
        attrs = dict(f.attrs)
        for key in ("model", "model_revision", "preprocess", "feature", "dtype", "image_size", "classes",
                    "fercache_version", "source"):
            assert key in attrs
        assert json.loads(attrs["classes"])[0] == "angry" and attrs["feature"] == "pooler_output"
        source = json.loads(attrs["source"])
        assert source["path"] == str(fer_zip) and source["fingerprint"].startswith("sha256:")
        for split, n in (("train", 21), ("test", 14)):
            g = f[split]
            assert g.attrs["complete"]
            assert g["embeddings"].dtype == np.float32 and g["embeddings"].shape == (n, 32)
            assert g["embeddings"].chunks is not None
            assert g["labels"].dtype == np.int64 and g["ids"].dtype.kind == "O"
            assert g["ids"][0].decode().startswith(f"{split}/")
    assert not (tmp_path / "c.h5.partial").exists()
    out = cli("info", cache, "--json")
    info = json.loads(out.stdout)
    assert info["splits"]["test"]["count"] == 14 and info["splits"]["test"]["complete"] is True
    assert info["model"] == str(tiny_model)
    public = load_embeddings(cache, "public_test")
    private = load_embeddings(cache, "private_test")
    assert len(public.ids) + len(private.ids) == 14 and all("PublicTest_" in i for i in public.ids)


def test_complete_split_is_skipped_and_limit_then_full_redoes(fer_zip, tiny_model, tmp_path):
    cache = tmp_path / "c.h5"
    args = dict(model=str(tiny_model), device="cpu", dtype="float32", cache=cache, progress=False)
    extract(fer_zip, "train", limit=5, **args)
    assert len(load_embeddings(cache, "train").ids) == 5
    before = cache.stat().st_mtime_ns
    assert extract(fer_zip, "train", limit=5, **args)[0].skipped
    assert cache.stat().st_mtime_ns == before
    assert not extract(fer_zip, "train", **args)[0].skipped
    assert len(load_embeddings(cache, "train").ids) == 21
    assert not extract(fer_zip, "train", force=True, **args)[0].skipped


def test_mismatched_cache_is_refused_and_force_replaces(fer_zip, tiny_model, tmp_path):
    cache = tmp_path / "c.h5"
    base = dict(device="cpu", dtype="float32", cache=cache, progress=False)
    extract(fer_zip, "train", model=str(tiny_model), **base)
    other_model = save_tiny_clip(tmp_path / "other", layers=1)
    with pytest.raises(UserError, match=r"c.h5 differs from what is asked \(model_weights 'sha256:"):  # folders: by weights
        extract(fer_zip, "test", model=str(other_model), **base)
    with pytest.raises(UserError, match=r"preprocess 'clip' vs 'seed'"):
        extract(fer_zip, "test", model=str(tiny_model), preprocess="seed", **base)
    other_data = tmp_path / "other.zip"
    with zipfile.ZipFile(other_data, "w") as z:
        for name, (data, _, _) in make_fer_layout({"train": 3}, seed=5).items():
            z.writestr(name, data)
    with pytest.raises(UserError, match="dataset 'sha256:"):
        extract(other_data, "train", model=str(tiny_model), **base)
    extract(fer_zip, "test", model=str(tiny_model), preprocess="seed", force=True, **base)
    with h5py.File(cache) as f:
        assert f.attrs["preprocess"] == "seed" and list(f) == ["test"]


def test_cli_user_errors_exit_2_with_one_line(fer_zip, tiny_model, tmp_path):
    cases = [
        ["extract", "--data", str(fer_zip), "--split", "valid", "--model", str(tiny_model)],
        ["extract", "--data", str(fer_zip), "--model", str(tmp_path / "no-model")],
        ["extract", "--data", str(fer_zip), "--model", str(tiny_model), "--device", "tpu"],
        ["info", str(tmp_path / "missing.h5")],
    ]
    for args in cases:
        out = cli(*args, env={"HF_HUB_OFFLINE": "1"})
        assert out.returncode == 2, (args, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.startswith("fercache: error:")]
        assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
