"""Scoring that knows about duplicates: `test_unseen_accuracy` and `--exclude-duplicates`.

A small FER2013 look-alike with planted train copies of some test faces (exact, and near: one
pixel changed) is scored by fit, evaluate, probe and finetune; every figure is checked against an
independent computation from the planted ids and the run's own predictions.
"""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import _jpeg_free, make_fer_layout, save_tiny_clip
from fercache import load_embeddings
from fercache.data import CLASSES
from fercache.extract import extract
from fercache.fit import evaluate, fit

PLANTED = 4  # test faces copied into train: the even ones exactly, the odd ones with one pixel changed


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, set[str]]:
    """A Kaggle-layout zip (35 train, 14 test faces, plus PLANTED train copies of test faces) and the
    names of the test members copied."""
    path = tmp_path_factory.mktemp("planted") / "fer2013.zip"
    files = make_fer_layout({"train": 35, "test": 14})
    tests = [(name, p, y) for name, (_, p, y) in files.items() if name.startswith("test/")]
    copied = set()
    with zipfile.ZipFile(path, "w") as z:
        for name, (data, _, _) in files.items():
            z.writestr(name, data)
        for i, (name, pixels, label) in enumerate(tests[:PLANTED]):
            copy = pixels.copy()
            if i % 2:
                copy[0, 0] ^= 1  # near: the decoded pixels differ, the perceptual hash does not
            z.writestr(f"train/{CLASSES[label]}/Training_{5000 + i}.png", _jpeg_free(copy))
            copied.add(name)
    return path, copied


@pytest.fixture(scope="module")
def pixels_cache(planted, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("pixels") / "pixels.h5"
    extract(planted[0], "all", "pixels", cache=cache, progress=False)
    return cache


@pytest.fixture(scope="module")
def tokens_cache(planted, tmp_path_factory) -> Path:
    """A tiny CLIP's per-layer features and the tokens entering its last block."""
    folder = tmp_path_factory.mktemp("tiny")
    model = save_tiny_clip(folder / "model", image_size=64, layers=2)
    cache = folder / "tiny.h5"
    extract(planted[0], "all", str(model), device="cpu", dtype="float32", cache=cache, layers="all", tokens=1,
            progress=False)
    return cache


def copied_ids(ids: list[str], members: set[str]) -> np.ndarray:
    """Which of these ids are the planted faces (the members copied, and their copies)."""
    return np.array([any(i.endswith(m) for m in members) or "Training_50" in i for i in ids])


def cli(*args: object):
    """The CLI in this process (a subprocess would import torch again): its exit code and output."""
    from typer.testing import CliRunner

    from fercache.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_reports_unseen_accuracy_and_excludes_exactly_the_copies(planted, pixels_cache, tmp_path):
    from fercache.heads import Head, fit_linear

    _, members = planted
    run = cli("fit", "--cache", pixels_cache, "--out", tmp_path / "all")
    assert run.exit_code == 0, run.output
    m = json.loads((tmp_path / "all" / "metrics.json").read_text())
    rows = read_csv(tmp_path / "all" / "predictions.csv")
    unseen = [r for r in rows if not copied_ids([r["id"]], members)[0]]
    assert (m["test_count"], m["test_unseen_count"], len(unseen)) == (14, 14 - PLANTED, 14 - PLANTED)
    assert m["test_unseen_accuracy"] == pytest.approx(np.mean([r["label"] == r["predicted"] for r in unseen]))
    assert m["test_unseen_accuracy_low"] <= m["test_unseen_accuracy"] <= m["test_unseen_accuracy_high"]
    assert (m["train_with_test_copy"], m["exclude_duplicates"], m["train_count"]) == (PLANTED, False, 35 + PLANTED)
    assert f"test faces with no copy in train: accuracy {m['test_unseen_accuracy']:.4f}" in run.output
    assert f"accuracy on the {14 - PLANTED} test faces with no copy in train" in \
        (tmp_path / "all" / "report.html").read_text()

    run = cli("fit", "--cache", pixels_cache, "--out", tmp_path / "kept", "--exclude-duplicates")
    assert run.exit_code == 0, run.output
    assert "--exclude-duplicates: 4 faces with a copy across train and test left out" in run.output
    m = json.loads((tmp_path / "kept" / "metrics.json").read_text())
    assert (m["train_count"], m["exclude_duplicates"], m["test_unseen_count"]) == (35, True, 14 - PLANTED)
    # the very head fitted on the train rows that are not copies, and on no other
    X, y, ids, *_ = load_embeddings(pixels_cache, "train")
    keep = ~copied_ids(ids, members)
    assert keep.sum() == 35
    X_test, y_test, *_ = load_embeddings(pixels_cache, "test")
    head, _ = fit_linear(X[keep], y[keep], X_test, y_test, seed=0)
    np.testing.assert_allclose(Head.load(tmp_path / "kept").predict_proba(X_test), head.predict_proba(X_test),
                               atol=1e-6)


def test_evaluate_reproduces_unseen_accuracy_and_scores_the_unseen_alone(planted, pixels_cache, tmp_path):
    m = fit(pixels_cache, out=tmp_path / "run").metrics
    report = evaluate(pixels_cache, tmp_path / "run")
    assert {k: report[k] for k in m if k.startswith("test_unseen")} == \
        {k: m[k] for k in m if k.startswith("test_unseen")}
    only = evaluate(pixels_cache, tmp_path / "run", out=tmp_path / "only", exclude_duplicates=True)
    assert (only["count"], only["excluded"], only["test_unseen_count"]) == (14 - PLANTED, PLANTED, 14 - PLANTED)
    assert only["accuracy"] == pytest.approx(m["test_unseen_accuracy"])
    assert only["accuracy"] == only["test_unseen_accuracy"]
    train = evaluate(pixels_cache, tmp_path / "run", "train", out=tmp_path / "train", exclude_duplicates=True)
    assert (train["count"], train["test_unseen_count"]) == (35, None)  # the copies left out; no test faces


def test_duplicates_are_found_once_and_kept_beside_the_cache(planted, pixels_cache, tmp_path, monkeypatch):
    import fercache.audit

    first = fit(pixels_cache, out=tmp_path / "a").metrics
    stored = pixels_cache.with_suffix(".duplicates.json")
    assert stored.is_file()

    def never(*args, **kwargs):
        raise AssertionError("the duplicates were searched for again")

    monkeypatch.setattr(fercache.audit, "read_faces", never)
    again = fit(pixels_cache, out=tmp_path / "b").metrics
    assert again["test_unseen_accuracy"] == first["test_unseen_accuracy"] and again["test_unseen_count"] == 10


def test_without_the_source_unseen_is_unknown_and_exclusion_an_error(planted, tmp_path):
    data = tmp_path / "moved.zip"
    shutil.copy(planted[0], data)
    cache = tmp_path / "c.h5"
    extract(data, "all", "pixels", cache=cache, progress=False)
    data.unlink()
    run = cli("fit", "--cache", cache, "--out", tmp_path / "run")
    assert run.exit_code == 0, run.output
    assert "test faces with no copy in train: unknown" in run.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test_unseen_count"] is m["test_unseen_accuracy"] is m["train_with_test_copy"] is None
    from conftest import cli as subprocess_cli
    from test_probe import one_line_error

    assert "is not at hand" in one_line_error(subprocess_cli("fit", "--cache", cache, "--exclude-duplicates"))


def test_probe_reports_unseen_accuracy_per_layer_and_excludes_the_copies(planted, tokens_cache, tmp_path):
    from fercache.heads import fit_linear
    from fercache.logreg import stratified_split
    from fercache.probe import probe

    _, members = planted
    result = probe(tokens_cache, tmp_path / "all")
    _, _, test_ids, *_ = load_embeddings(tokens_cache, "test")
    unseen = ~copied_ids(test_ids, members)
    X, y, ids, *_ = load_embeddings(tokens_cache, "train", layer=1)
    X_test, y_test, *_ = load_embeddings(tokens_cache, "test", layer=1)
    fit_rows, _ = stratified_split(y, 0.2, seed=0)
    head, _ = fit_linear(X[fit_rows], y[fit_rows], seed=0)
    right = head.predict(X_test) == y_test
    layer1 = result["layers"][0]
    assert layer1["test_unseen_count"] == 14 - PLANTED and result["train_with_test_copy"] == PLANTED
    assert layer1["test_unseen_accuracy"] == pytest.approx(right[unseen].mean())

    kept = probe(tokens_cache, tmp_path / "kept", exclude_duplicates=True)
    assert kept["train_count"] + kept["val_count"] == 35 and kept["exclude_duplicates"] is True
    pool = np.flatnonzero(~copied_ids(ids, members))
    fit_rows, _ = stratified_split(y[pool], 0.2, seed=0)
    head, _ = fit_linear(X[pool[fit_rows]], y[pool[fit_rows]], seed=0)
    assert kept["layers"][0]["test_accuracy"] == pytest.approx((head.predict(X_test) == y_test).mean())


def test_finetune_and_its_evaluation_report_unseen_accuracy(planted, tokens_cache, tmp_path):
    from fercache.finetune import finetune

    _, members = planted
    args = dict(blocks=1, epochs=1, batch_size=8, val="public_test", device="cpu", dtype="float32", progress=False,
                plots=False)  # (a 10% validation part of 35 faces would be empty)
    result = finetune(tokens_cache, out=tmp_path / "all", **args)
    m = result.metrics
    rows = read_csv(tmp_path / "all" / "predictions.csv")
    unseen = [r for r in rows if not copied_ids([r["id"]], members)[0]]
    assert m["test_unseen_count"] == len(unseen) and 0 < len(unseen) < len(rows) == 7  # PrivateTest
    assert m["test_unseen_accuracy"] == pytest.approx(np.mean([r["label"] == r["predicted"] for r in unseen]))
    assert (m["train_count"], m["train_with_test_copy"]) == (35 + PLANTED, PLANTED)
    report = evaluate(tokens_cache, tmp_path / "all", "private_test", out=tmp_path / "eval")
    assert report["test_unseen_accuracy"] == pytest.approx(m["test_unseen_accuracy"])

    kept = finetune(tokens_cache, out=tmp_path / "kept", exclude_duplicates=True, **args).metrics
    assert (kept["train_count"], kept["exclude_duplicates"]) == (35, True)


def _colour(rng, n: int, size: tuple[int, int] = (80, 112)) -> list[np.ndarray]:
    """Smooth colour images (W x H `size`, not 48x48 gray): pHash tells them apart, copies it does not."""
    from PIL import Image

    return [np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC))
            for _ in range(n)]


@pytest.fixture(scope="module")
def folder_zip(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], set[str]]:
    """A generic `<split>/<class>/` zip of colour images (8 train, 4 test per class), two test faces copied
    into train (one exactly, one with a pixel changed): the zip, every image by id, the copied test ids."""
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("folders") / "mine.zip"
    images, copied = {}, set()
    for split, n in (("train", 8), ("test", 4)):
        for cls in ("happy", "sad", "calm"):
            for k, pixels in enumerate(_colour(rng, n)):
                images[f"{split}/{cls}/{split}{k}.png"] = pixels
    for k, id_ in enumerate(["test/sad/test0.png", "test/calm/test1.png"]):
        copy = images[id_].copy()
        copy[56, 40] ^= 8 * k  # the second: one pixel changed (in the middle: a 48x48 face is its centre square)
        images[f"train/{id_.split('/')[1]}/copy{k}.png"] = copy
        copied.add(id_)
    with zipfile.ZipFile(path, "w") as z:
        for id_, pixels in images.items():
            z.writestr(f"mine/{id_}", _jpeg_free(pixels))
    return path, images, copied


def test_a_folder_run_shows_its_faces_as_stored_and_finds_its_copies_once(folder_zip, tmp_path, monkeypatch):
    """A generic folder dataset (--classes) extracted as native colour images: report.html shows the
    mistakes as the very images stored; the copies across train and test are found through the
    cache's dataset and classes (not "unknown"), kept under the fingerprint the cache records, and
    read back by the next run without reading the source."""
    import base64
    import io
    import re

    from PIL import Image

    import fercache.audit
    from fercache.cache import read_meta
    from fercache.data import Source

    path, images, copied = folder_zip
    model = save_tiny_clip(tmp_path / "model", image_size=64, layers=1)
    cache = tmp_path / "mine.h5"
    extract(path, "all", str(model), device="cpu", dtype="float32", cache=cache, classes="happy,sad,calm",
            images="native", progress=False)
    m = fit(cache, out=tmp_path / "run").metrics
    assert (m["test_count"], m["test_unseen_count"], m["train_with_test_copy"]) == (12, 12 - len(copied), len(copied))
    rows = read_csv(tmp_path / "run" / "predictions.csv")
    wrong = [r["id"] for r in rows if r["label"] != r["predicted"]]
    page = (tmp_path / "run" / "report.html").read_text()
    shown = re.findall(r'<img class=smooth alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert wrong and "faces are not shown" not in page and sorted(i for i, _ in shown) == sorted(wrong)
    for id_, png in shown:  # the image as stored: colour, its own size (80x112), its own pixels
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))), images[id_])

    stored = json.loads(cache.with_suffix(".duplicates.json").read_text())
    assert stored["fingerprint"] == read_meta(cache)["source"]["fingerprint"]
    assert set(stored["near"]) == copied and set(stored["exact"]) == {"test/sad/test0.png"}

    def never(*args, **kwargs):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(fercache.audit, "read_faces", never)
    monkeypatch.setattr(Source, "fingerprint", never)
    again = fit(cache, out=tmp_path / "again", exclude_duplicates=True).metrics
    assert (again["train_count"], again["train_with_test_copy"]) == (24, len(copied))
