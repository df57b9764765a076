"""Exact checkpoints: a hub model is pinned to the commit it was loaded at, a local folder to its weights.

The hub case runs on an offline Hugging Face cache built here, as huggingface_hub lays it out
(`models--org--name/snapshots/<commit>/`, `refs/main`), with two commits of one repo; the CLI runs
in fresh processes, as users run it, with HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import cli, fake_faces, save_tiny_clip
from fercache.cache import load_embeddings
from fercache.checkpoint import fingerprint, resolve
from fercache.errors import UserError
from fercache.extract import extract
from fercache.fit import fit
from fercache.predict import predict

COMMITS = [hashlib.sha1(name).hexdigest() for name in (b"first", b"second")]


@pytest.fixture
def hub(tmp_path):
    """An offline HF cache holding two commits of `org/tiny-clip` (other random weights), main at the first."""
    root = tmp_path / "hub"
    repo = root / "models--org--tiny-clip"
    for seed, commit in enumerate(COMMITS):
        save_tiny_clip(repo / "snapshots" / commit, seed=seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMITS[0])
    return root


def faces_as_files(folder, n=4):
    folder.mkdir()
    paths = []
    for i, face in enumerate(fake_faces(n, seed=3)[0]):
        paths.append(folder / f"face{i}.png")
        Image.fromarray(face).save(paths[-1])
    return paths


def test_a_head_keeps_its_commit_after_main_moves(hub, fer_zip, tmp_path):
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    common = ["--model", "org/tiny-clip", "--device", "cpu", "--dtype", "float32"]
    cache, head = tmp_path / "c.h5", tmp_path / "head"
    out = cli("run", "--data", fer_zip, *common, "--epochs", "3", "--cache", cache, "--out", head, env=env)
    assert out.returncode == 0, out.stderr
    with h5py.File(cache) as f:
        assert f.attrs["model_revision"] == COMMITS[0]
    assert json.loads((head / "head.json").read_text())["model_revision"] == COMMITS[0]
    images = faces_as_files(tmp_path / "new")
    before = cli("predict", *images, "--head", head, "--device", "cpu", "--json", env=env)
    assert before.returncode == 0, before.stderr
    evaluated = cli("evaluate", "--head", head, "--cache", cache, "--json", env=env)
    assert evaluated.returncode == 0, evaluated.stderr

    (hub / "models--org--tiny-clip" / "refs" / "main").write_text(COMMITS[1])  # the repo moves on
    after = cli("predict", *images, "--head", head, "--device", "cpu", "--json", env=env)
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout) == json.loads(before.stdout)
    again = cli("evaluate", "--head", head, "--cache", cache, "--json", env=env)
    assert json.loads(again.stdout)["accuracy"] == json.loads(evaluated.stdout)["accuracy"]
    # a later extract into the same cache goes on at its commit (skipped: complete), not refused
    resumed = cli("extract", "--data", fer_zip, "--split", "test", *common, "--cache", cache, env=env)
    assert resumed.returncode == 0 and "already complete" in resumed.stdout, resumed.stderr
    # asking for today's main there is refused in one line; a new cache gets the second commit
    newer = cli("extract", "--data", fer_zip, "--split", "test", *common, "--cache", cache, "--revision", "main",
                env=env)
    assert newer.returncode == 2 and "model_revision" in newer.stderr and "Traceback" not in newer.stderr
    fresh = tmp_path / "c2.h5"
    made = cli("extract", "--data", fer_zip, "--split", "test", *common, "--cache", fresh, env=env)
    assert made.returncode == 0, made.stderr
    with h5py.File(fresh) as f:
        assert f.attrs["model_revision"] == COMMITS[1]
    assert not np.allclose(load_embeddings(fresh, "test").X, load_embeddings(cache, "test").X)


def test_zeroshot_loads_and_reports_the_commit_a_revision_names(full_clip, fer_zip, tmp_path):
    repo = tmp_path / "hub" / "models--org--full-clip"
    shutil.copytree(full_clip, repo / "snapshots" / COMMITS[1])
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(COMMITS[1])  # a tag, as the hub keeps one
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = cli("zeroshot", "--data", fer_zip, "--limit", 7, "--model", "org/full-clip", "--revision", "v1",
              "--device", "cpu", "--json", env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["revision"] == COMMITS[1]


def resolve_offline(hub, revision):
    """`resolve` against the test's HF cache (huggingface_hub reads its settings when imported:
    patch the constants it uses)."""
    import huggingface_hub.constants as constants

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(constants, "HF_HUB_CACHE", str(hub))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        return resolve("org/tiny-clip", revision)
    finally:
        mp.undo()


def test_an_unknown_revision_is_one_line(hub):
    with pytest.raises(UserError, match="cannot load model 'org/tiny-clip' at revision 'v9'"):
        resolve_offline(hub, "v9")


def test_a_local_folder_is_known_by_its_weights(fer_zip, tmp_path):
    first = save_tiny_clip(tmp_path / "vit-b32")
    moved = shutil.copytree(first, tmp_path / "elsewhere" / "copy")
    assert fingerprint(str(moved)) == fingerprint(str(first))
    args = dict(device="cpu", dtype="float32", progress=False)
    cache = tmp_path / "c.h5"
    extract(fer_zip, "train", str(moved), cache=cache, **args)
    # the same weights under another path (and name) fill the same cache
    extract(fer_zip, "test", str(first), cache=cache, **args)
    head = fit(cache, epochs=2, out=tmp_path / "head", plots=False).out
    images = faces_as_files(tmp_path / "new", 2)
    assert len(predict(head, images, "cpu")) == 2
    # changed weights under the same path: every later use says so in one line
    save_tiny_clip(first, seed=1)
    with pytest.raises(UserError, match="weight files changed since this was made"):
        predict(head, images, "cpu")
    with pytest.raises(UserError, match="model_weights 'sha256:"):
        extract(fer_zip, "test", str(first), cache=cache, force=False, **args)
    with pytest.raises(UserError, match="local folder, which has no revisions"):
        extract(fer_zip, "test", str(first), cache=tmp_path / "d.h5", revision="main", **args)


def test_a_hub_snapshot_folder_fingerprints_as_a_plain_copy_of_it(tmp_path):
    """huggingface_hub keeps each file once, in `blobs/<sha>`, and links to it from
    `snapshots/<commit>/<name>`: its content under the link's name counts, not the blob's name."""
    plain = save_tiny_clip(tmp_path / "plain")
    repo = tmp_path / "hub" / "models--org--tiny-clip"
    snapshot, blobs = repo / "snapshots" / COMMITS[0], repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in plain.iterdir():
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    assert all((snapshot / f.name).is_symlink() for f in plain.iterdir())
    assert fingerprint(str(snapshot)) == fingerprint(str(plain))
    # a copy of the snapshot (links followed), as users move model folders, agrees too
    assert fingerprint(str(shutil.copytree(snapshot, tmp_path / "copied"))) == fingerprint(str(plain))
    # other content behind the same link name does not
    shutil.copy(save_tiny_clip(tmp_path / "other", seed=1) / "model.safetensors", blobs / "other")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to("../../blobs/other")
    assert fingerprint(str(snapshot)) != fingerprint(str(plain))
