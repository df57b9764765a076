"""Stage one on ONNX Runtime (`fercache.onnxrt`): faithful for every family, built once, never reused
for other weights, picked by `--runtime auto` where it applies, and kept by a cache as part of its identity
(reproducible and resumable: `tests/test_cpu_speed.py`).

Speed is `bench/cpu.py`'s business; here only behaviour.
"""

from __future__ import annotations

import json
import shutil
import socket

import h5py
import numpy as np
import pytest
import torch

import test_families
import test_openclip_timm
from conftest import cli, save_tiny_clip
from fercache import onnxrt
from fercache.accelerate import INT8_MIN_COSINE
from fercache.cache import read_identity, read_meta
from fercache.encoder import load_encoder
from fercache.errors import FERCacheWarning, UserError
from fercache.extract import extract
from test_cpu_speed import CONV_ONLY

MODELS = [*test_families.FAMILIES, *test_openclip_timm.MODELS]
NO_TOKENS = ("convnext", "resnet", "efficientnet", "timm-convnext")  # conv nets: no token sequence


@pytest.fixture(scope="module")
def checkouts(tmp_path_factory) -> dict:
    """Every family's tiny checkout, saved the way each library publishes them (Hugging Face, OpenCLIP, timm)."""
    root = tmp_path_factory.mktemp("checkouts")
    out = {name: tiny.save(root / name) for name, tiny in test_families.FAMILIES.items()}
    out.update({f"openclip-{n}": test_openclip_timm.save_openclip(root / f"openclip-{n}", cfg)
                for n, cfg in test_openclip_timm.OPENCLIP.items()})
    out.update({f"timm-{n}": test_openclip_timm.save_timm(root / f"timm-{n}", n) for n in test_openclip_timm.TIMM})
    return out


def cosines(got: dict, ref: dict) -> dict[str, float]:
    assert got.keys() == ref.keys()
    return {k: torch.nn.functional.cosine_similarity(torch.from_numpy(got[k]).float().flatten(1),
                                                     torch.from_numpy(ref[k]).float().flatten(1)).min().item()
            for k in ref}


@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_features_are_faithful_for_every_family(name, checkouts):
    """Pooled, every block's and the stored tokens, plain and mirrored: float32 to 0.9999, int8 to its threshold."""
    pixels = test_families.faces(6, seed=2)
    options = dict(layers="all", tokens=None if name in NO_TOKENS else 1)
    views = ("plain", "flip")
    ref = load_encoder(str(checkouts[name]), "clip", "cpu", "float32", runtime="torch", **options).encode(pixels, views)
    enc = load_encoder(str(checkouts[name]), "clip", "cpu", "float32", runtime="onnxruntime", **options)
    assert enc.identity.runtime == "onnxruntime" and enc.graph is not None
    assert {p.device.type for p in enc.model.parameters()} == {"meta"}  # torch's copy of the weights let go
    got = enc.encode(pixels, views)
    assert all(got[k].dtype == ref[k].dtype for k in ref)  # tokens float16 as stored, the rest float32
    assert min(cosines(got, ref).values()) >= onnxrt.MIN_COSINE
    if name in CONV_ONLY:
        with pytest.raises(UserError, match="no Linear layers to quantise"):
            load_encoder(str(checkouts[name]), "clip", "cpu", "int8", runtime="onnxruntime")
        return
    int8 = load_encoder(str(checkouts[name]), "clip", "cpu", "int8", runtime="onnxruntime", **options)
    assert (int8.identity.dtype, int8.identity.runtime) == ("int8", "onnxruntime")
    got8 = int8.encode(pixels, views)
    assert min(cosines(got8, ref).values()) >= INT8_MIN_COSINE
    assert not np.array_equal(got8["embeddings"], got["embeddings"])  # int8 really ran


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_face_gets_the_same_features_in_any_batch(dtype, tiny_model):
    """Resume with another --batch-size, other ranks, `predict` of one face: the same features (int8 included)."""
    enc = load_encoder(str(tiny_model), "clip", "cpu", dtype, runtime="onnxruntime")
    pixels = test_families.faces(7, seed=4)
    whole = enc.encode(pixels)["embeddings"]
    apart = np.concatenate([enc.encode(pixels[:3])["embeddings"], enc.encode(pixels[3:])["embeddings"]])
    np.testing.assert_array_equal(apart, whole)
    np.testing.assert_array_equal(enc.encode(pixels[5:6])["embeddings"], whole[5:6])


def built(capfd) -> bool:
    return "building the ONNX Runtime graph" in capfd.readouterr().err


def test_a_graph_is_built_once_per_weights_and_refused_when_damaged(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("FERCACHE_GRAPHS", str(tmp_path / "graphs"))
    first, other = save_tiny_clip(tmp_path / "a"), save_tiny_clip(tmp_path / "b", seed=1)
    pixels = test_families.faces(4)
    a = load_encoder(str(first), "clip", "cpu", "float32", runtime="onnxruntime")
    assert built(capfd)
    again = load_encoder(str(first), "clip", "cpu", "float32", runtime="onnxruntime")
    assert not built(capfd) and again.graph.folder == a.graph.folder  # read back, not rebuilt
    np.testing.assert_array_equal(again.encode(pixels)["embeddings"], a.encode(pixels)["embeddings"])
    b = load_encoder(str(other), "clip", "cpu", "float32", runtime="onnxruntime")  # same architecture, other weights
    assert built(capfd) and b.graph.folder != a.graph.folder
    assert not np.allclose(b.encode(pixels)["embeddings"], a.encode(pixels)["embeddings"])
    layers = load_encoder(str(first), "clip", "cpu", "float32", runtime="onnxruntime", layers="1")  # other outputs
    assert built(capfd) and layers.graph.folder != a.graph.folder
    left = a.graph.folder.parent / f".{a.graph.folder.name}.{socket.gethostname()}.999999999.x"  # a killed build's
    left.mkdir()
    shutil.rmtree(a.graph.folder)
    a = load_encoder(str(first), "clip", "cpu", "float32", runtime="onnxruntime")  # built anew, said so
    assert built(capfd) and not left.exists()
    meta = json.loads((a.graph.folder / "graph.json").read_text())
    assert meta["cosine_to_torch"] >= onnxrt.MIN_COSINE and meta["fingerprint"].startswith(a.graph.folder.name[-20:])
    with open(a.graph.folder / "model.onnx", "ab") as f:
        f.write(b"\0")  # a damaged file: said, not used, not silently rebuilt
    with pytest.raises(UserError, match="damaged or foreign ONNX graph"):
        load_encoder(str(first), "clip", "cpu", "float32", runtime="onnxruntime")
    assert not list((tmp_path / "graphs").glob(".*"))  # no half-built folder left behind


def test_auto_picks_onnxruntime_for_float32_and_int8_on_the_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("FERCACHE_RUNTIME")
    assert onnxrt.pick_runtime(None, cpu, "float32", "m") == "onnxruntime"
    assert onnxrt.pick_runtime("auto", cpu, "int8", "m") == "onnxruntime"
    assert onnxrt.pick_runtime("auto", cpu, "bfloat16", "m") == "torch"  # native bf16: torch's own path
    assert onnxrt.pick_runtime("auto", cuda, "float32", "m") == "torch"
    assert onnxrt.pick_runtime("auto", cpu, "float32", "pixels") == "torch"
    monkeypatch.setenv("FERCACHE_RUNTIME", "torch")
    assert onnxrt.pick_runtime(None, cpu, "float32", "m") == "torch"
    with pytest.raises(UserError, match="runs float32 or int8 encoders on the CPU, not bfloat16 on cpu"):
        onnxrt.pick_runtime("onnxruntime", cpu, "bfloat16", "m")
    with pytest.raises(UserError, match="unknown --runtime 'tvm'"):
        onnxrt.pick_runtime("tvm", cpu, "float32", "m")
    monkeypatch.setattr(onnxrt, "available", lambda: False)  # the `cpu` extra not installed
    with pytest.warns(FERCacheWarning, match=r"pip install 'fercache\[cpu\]'"):
        assert onnxrt.pick_runtime("auto", cpu, "float32", "m") == "torch"
    with pytest.raises(UserError, match=r"but not installed: pip install 'fercache\[cpu\]'"):
        onnxrt.pick_runtime("onnxruntime", cpu, "float32", "m")


@pytest.mark.parametrize("made_by", ["0.4.0", "0.3.0"])
def test_a_cache_goes_on_with_its_runtime_and_says_it(made_by, fer_zip, tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "c.h5"
    extract(fer_zip, "train", str(tiny_model), "clip", "cpu", "float32", batch_size=8, cache=cache, progress=False)
    assert read_meta(cache)["runtime"] == "torch"  # FERCACHE_RUNTIME=torch in the suite
    if made_by == "0.3.0":  # no runtime recorded: it ran on torch, and reads so
        with h5py.File(cache, "a") as f:
            del f.attrs["runtime"]
    monkeypatch.delenv("FERCACHE_RUNTIME")  # auto would pick ONNX Runtime: the cache's torch goes on
    extract(fer_zip, "test", str(tiny_model), "clip", "cpu", "float32", batch_size=8, cache=cache, progress=False)
    with pytest.raises(UserError, match="runtime 'torch' vs 'onnxruntime'"):  # asked: refused, not mixed
        extract(fer_zip, "test", str(tiny_model), "clip", "cpu", "float32", batch_size=8, cache=cache,
                progress=False, runtime="onnxruntime", force=False, limit=3)
    assert read_identity(cache).runtime == "torch"
    out = cli("info", cache)
    assert out.returncode == 0 and "float32 on torch" in out.stdout
    out = cli("extract", "--data", fer_zip, "--model", "pixels", "--runtime", "onnxruntime", "--cache", tmp_path / "p.h5")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "not the pixels baseline" in out.stderr


def test_int8_gets_a_default_cache_of_its_own(tiny_model):
    from fercache.names import default_cache

    assert default_cache(str(tiny_model), dtype="int8").name.endswith("__int8.h5")
    assert default_cache(str(tiny_model), dtype="float32") == default_cache(str(tiny_model))


def test_predict_encodes_as_extract_does(tiny_head, monkeypatch):
    from fercache.predict import Scorer

    monkeypatch.delenv("FERCACHE_RUNTIME")
    scorer = Scorer(tiny_head, "cpu")
    assert scorer.encoder.identity.runtime == "onnxruntime"
    pixels = test_families.faces(3)
    monkeypatch.setenv("FERCACHE_RUNTIME", "torch")
    np.testing.assert_allclose(scorer.probs(pixels), Scorer(tiny_head, "cpu").probs(pixels), atol=1e-5)
