"""`--dtype int8` on the CPU: faithful for every family it applies to, measured and kept with the cache;
int8 and ONNX Runtime's features reproducible and resumable (`tests/test_onnxrt.py`: the rest of ONNX Runtime).

Speed is `bench/cpu.py`'s business; here only behaviour: fidelity of every family's int8 tower
against its float32 one, the fidelity measured at extract time, stored, shown by `info` and
enforced for heads fitted on float features, and int8 features reproducible and resumable with
`--layers`, `--tokens` and `--tta flip`.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from conftest import cli
from fercache import extract as extract_module
from fercache.accelerate import INT8_FIDELITY, INT8_MIN_COSINE
from fercache.cache import load_embeddings, read_meta
from fercache.encoder import load_encoder
from fercache.errors import UserError
from fercache.extract import extract
from fercache.fit import evaluate, fit
from test_families import FAMILIES, faces, saved  # noqa: F401 (saved: each family's checkout, a fixture)

CONV_ONLY = ("resnet", "efficientnet")  # no Linear layer at all: int8 would change nothing, so it is refused


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_features_are_faithful_for_every_family(family, saved):
    pixels = faces(8, seed=3)
    if family in CONV_ONLY:
        with pytest.raises(UserError, match="no Linear layers to quantise"):
            load_encoder(str(saved[family]), "clip", "cpu", "int8")
        return
    full = load_encoder(str(saved[family]), "clip", "cpu", "float32", layers="all").encode(pixels)
    int8 = load_encoder(str(saved[family]), "clip", "cpu", "int8", layers="all")
    assert int8.identity.dtype == "int8"
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())  # every Linear is quantised
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8.model.modules())
    got = int8.encode(pixels)
    assert got.keys() == full.keys()
    for name, feats in got.items():
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(feats), torch.from_numpy(full[name]))
        assert feats.dtype == np.float32 and cos.min() >= INT8_MIN_COSINE, (name, cos.min().item())
    assert not np.array_equal(got["embeddings"], full["embeddings"])  # int8 really ran


def test_int8_is_refused_where_it_cannot_run(tiny_model):
    with pytest.raises(UserError, match="needs a neural encoder"):
        load_encoder("pixels", dtype="int8")
    with pytest.raises(UserError, match="unknown dtype 'int4'"):
        load_encoder(str(tiny_model), dtype="int4", weights=False)


def test_int8_extract_stores_its_fidelity_shown_by_info(fer_zip, tiny_model, tmp_path):
    cache = tmp_path / "int8.h5"
    extract(fer_zip, "all", str(tiny_model), "clip", "cpu", "int8", batch_size=8, cache=cache, progress=False)
    meta = read_meta(cache)
    assert meta["dtype"] == "int8"
    # the stored fidelity is the first batch's: recomputed here from the int8 and float32 towers
    first = load_embeddings(cache, "train").X[:8]
    ref = load_encoder(str(tiny_model), "clip", "cpu", "float32")
    pixels = _train_pixels(fer_zip, 8)
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(first), torch.from_numpy(ref.encode(pixels)["embeddings"]))
    assert meta[INT8_FIDELITY] == pytest.approx(cos.min().item(), abs=1e-6) and 0.9 < meta[INT8_FIDELITY] < 1
    out = cli("info", cache)
    assert out.returncode == 0 and f"int8 fidelity: cosine {meta[INT8_FIDELITY]:.4f}" in out.stdout
    # a float32 extract into the same file is another identity: refused, not mixed
    with pytest.raises(UserError, match="dtype 'int8' vs 'float32'"):
        extract(fer_zip, "train", str(tiny_model), "clip", "cpu", "float32", batch_size=8, cache=cache, progress=False)


def _train_pixels(fer_zip, n):
    from fercache.data import open_source

    return open_source(fer_zip).load("train", limit=n).pixels


def test_int8_cache_below_the_threshold_is_refused_for_a_float_head(fer_zip, tiny_model, tmp_path):
    floats, int8 = tmp_path / "f32.h5", tmp_path / "int8.h5"
    for cache, dtype in ((floats, "float32"), (int8, "int8")):
        extract(fer_zip, "all", str(tiny_model), "clip", "cpu", dtype, batch_size=8, cache=cache, progress=False)
    head = fit(floats, epochs=2, out=tmp_path / "run", plots=False).out
    assert read_meta(int8)[INT8_FIDELITY] >= INT8_MIN_COSINE
    evaluate(int8, head, plots=False)  # faithful enough: scored
    with h5py.File(int8, "a") as f:
        f.attrs[INT8_FIDELITY] = 0.95  # as a tower that quantises badly would measure
    with pytest.raises(UserError, match=r"int8 features with cosine 0.9500 to float32 \(below 0.99\)"):
        evaluate(int8, head, plots=False)
    int8_head = fit(int8, epochs=2, out=tmp_path / "run8", plots=False).out
    evaluate(int8, int8_head, plots=False)  # a head fitted on these very features is not refused


OPTIONS = dict(layers="1,2", tokens=0, tta="flip")


@pytest.mark.parametrize("dtype, runtime", [("int8", "torch"), ("int8", "onnxruntime"), ("float32", "onnxruntime")])
def test_int8_and_onnxruntime_features_are_reproducible_and_resume(dtype, runtime, fer_zip, tiny_model, tmp_path,
                                                                   monkeypatch):
    resumed_rows = []

    def run(cache):
        summary, = extract(fer_zip, "train", str(tiny_model), "clip", "cpu", dtype, batch_size=4, cache=cache,
                           progress=False, runtime=runtime, **OPTIONS)
        assert read_meta(cache)["runtime"] == runtime
        resumed_rows.append(summary.resumed)
        with h5py.File(cache) as f:
            return {name: f["train"][name][:] for name in ("embeddings", "layers/1", "layers/2", "tokens",
                                                           "flip/embeddings", "flip/layers/2")}

    first, again = run(tmp_path / "a.h5"), run(tmp_path / "b.h5")
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
    assert first["tokens"].dtype == np.float16 and first["embeddings"].shape == (21, 32)

    calls, check = {"n": 0}, extract_module.check_peers  # interrupted after 3 of the 6 batches, then resumed

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        check()

    monkeypatch.setattr(extract_module, "check_peers", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "c.h5")
    monkeypatch.setattr(extract_module, "check_peers", check)
    resumed = run(tmp_path / "c.h5")
    assert resumed_rows == [0, 0, 12]  # the third run took the interrupted one's 3 batches as they were
    for name in first:
        np.testing.assert_array_equal(resumed[name], first[name], err_msg=name)
