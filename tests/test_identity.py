"""One identity for caches and heads: what differs is named in one line; files of fercache 0.1.0 still load."""

from __future__ import annotations

import json
from dataclasses import replace

import h5py
import numpy as np
import pytest
from safetensors.numpy import save_file

from fercache.cache import load_embeddings, read_identity
from fercache.errors import UserError
from fercache.fit import evaluate, fit
from fercache.heads import Head
from fercache.identity import CACHE, ENCODER, Identity
from fercache.names import CLASSES, feature_name

BASE = Identity("org/model", "clip", "pooler_output", "float32", image_size=224, revision="a" * 40,
                layers=(6,), views=("plain", "flip"), source="sha256:" + "0" * 64)


def test_identity_round_trips_through_its_stored_form():
    assert Identity.from_meta(json.loads(json.dumps(BASE.to_meta()))) == BASE
    old = {k: v for k, v in BASE.to_meta().items() if k != "runtime"}  # a file before 0.4.0: torch ran it
    assert Identity.from_meta(old).runtime == "torch" and Identity.from_meta({**old, "model": "pixels"}).runtime == ""
    assert BASE.encoder() == replace(BASE, layers=(), views=("plain",), source="")


def test_every_difference_is_named_in_one_line():
    other = replace(BASE, model="org/other", dtype="bfloat16", layers=(), source="sha256:" + "1" * 64)
    diff = BASE.differences(other)
    assert [d.split()[0] for d in diff] == ["model", "dtype", "layers", "dataset"]
    with pytest.raises(UserError) as err:
        BASE.check(other, "c.h5", hint="use another --cache")
    assert "\n" not in str(err.value) and str(err.value).startswith("c.h5 differs from what is asked (model ")
    assert not BASE.differences(other, ("preprocess", "feature"))  # only the keys asked for are compared
    assert set(ENCODER) < set(CACHE)


def test_unknown_optional_values_match_known_ones_but_two_known_must_agree():
    old = replace(BASE, revision="", image_size=None)  # as fercache 0.1.0 recorded a cache from a folder
    assert not old.differences(BASE)
    assert BASE.differences(replace(BASE, revision="b" * 40)) == [f"model_revision '{'a' * 19}…' vs '{'b' * 19}…'"]
    assert BASE.differences(replace(BASE, weights="sha256:x"), ENCODER) == []
    assert replace(BASE, weights="sha256:x").differences(replace(BASE, weights="sha256:y"), ENCODER)


def test_one_rule_names_every_stored_feature():
    assert feature_name() == "embeddings" and feature_name(3) == "layers/3" and feature_name(tokens=True) == "tokens"
    assert feature_name(3, "flip") == "flip/layers/3" and feature_name(tokens=True, view="flip") == "flip/tokens"


def write_v010_cache(path, dim=8, n=70):
    """A cache exactly as fercache 0.1.0 wrote it (no model_weights, no format_version)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        attrs = {"model": "openai/clip-vit-base-patch32", "model_revision": "", "preprocess": "clip",
                 "feature": "pooler_output", "dtype": "float32", "image_size": 224, "dim": dim,
                 "layers": "[]", "views": '["plain"]', "classes": json.dumps(list(CLASSES)),
                 "fercache_version": "0.1.0",
                 "source": json.dumps({"path": "data/fer2013.zip", "format": "zip", "fingerprint": "sha256:00"})}
        f.attrs.update(attrs)
        for split in ("train", "test"):
            y = np.arange(n) % 7
            g = f.create_group(split)
            g["embeddings"] = (np.eye(7, dim)[y] * 3 + rng.normal(size=(n, dim))).astype(np.float32)
            g["labels"] = y.astype(np.int64)
            g.create_dataset("ids", data=np.array([f"{split}/{i}" for i in range(n)], dtype=object),
                             dtype=h5py.string_dtype())
            usage = ["train"] * n if split == "train" else ["public_test", "private_test"] * (n // 2)
            g.create_dataset("usage", data=np.array(usage, dtype=object), dtype=h5py.string_dtype())
            g.attrs["selection"] = json.dumps({"split": split, "limit": None, "count": n})
            g.attrs["complete"] = True
    return path


def write_v010_head(folder, dim=8):
    """A head folder exactly as fercache 0.1.0 wrote it."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    save_file({"weight": rng.normal(size=(7, dim)).astype(np.float32), "bias": np.zeros(7, np.float32),
               "mean": np.zeros(dim, np.float32), "std": np.ones(dim, np.float32)}, folder / "head.safetensors")
    (folder / "head.json").write_text(json.dumps({
        "format": "fercache-head", "classes": list(CLASSES), "method": "linear", "dim": dim, "standardize": True,
        "model": "openai/clip-vit-base-patch32", "model_revision": "", "preprocess": "clip",
        "feature": "pooler_output", "layer": None, "views": "plain", "dtype": "float32"}))
    return folder


def test_caches_and_heads_of_fercache_0_1_0_still_load(tmp_path):
    cache = write_v010_cache(tmp_path / "old.h5")
    identity = read_identity(cache)
    assert (identity.model, identity.revision, identity.weights, identity.views) == \
        ("openai/clip-vit-base-patch32", "", "", ("plain",))
    assert load_embeddings(cache, "train").X.shape == (70, 8)
    head = Head.load(write_v010_head(tmp_path / "old-head"))
    assert head.identity.model == identity.model and head.views == "plain" and head.layer is None
    report = evaluate(cache, tmp_path / "old-head", out=tmp_path / "eval", plots=False)
    assert report["count"] == 70
    run = fit(cache, epochs=2, out=tmp_path / "new", plots=False)  # a new head from an old cache
    assert Head.load(run.out).identity == identity.encoder()


def test_a_head_refuses_a_cache_of_another_encoder_in_one_line(tmp_path):
    cache = write_v010_cache(tmp_path / "old.h5")
    write_v010_head(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "head.json").read_text())
    (tmp_path / "head" / "head.json").write_text(json.dumps({**config, "preprocess": "seed"}))
    with pytest.raises(UserError, match=r"preprocess 'clip' vs 'seed'.*another encoder"):
        evaluate(cache, tmp_path / "head", plots=False)


def test_a_file_without_fercache_metadata_is_a_one_line_error(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["a"] = np.zeros(3)
    with pytest.raises(UserError, match=r"x.h5: an HDF5 file, but not a fercache cache \(no fercache metadata"):
        read_identity(tmp_path / "x.h5")
