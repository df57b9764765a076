"""Probing experiments: per-layer and flip features, `probe`, `zeroshot`, `compare`, the pixels floor."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import REAL_ZIP, cli, make_fer_layout, pil_clip_processor, save_tiny_clip
from fercache import load_embeddings, load_images
from fercache.data import CLASSES
from fercache.errors import FERCacheWarning, UserError
from fercache.extract import extract



def one_line_error(run: subprocess.CompletedProcess) -> str:
    """The CLI's contract for user errors: exit 2 and a single `fercache: error:` line."""
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fercache: error: "), run.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory) -> Path:
    """A small FER2013 zip whose labels cycle through all 7 classes (35 train, 14 test)."""
    path = tmp_path_factory.mktemp("data") / "fer2013.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, (data, _, _) in make_fer_layout({"train": 35, "test": 14}).items():
            z.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def faces_zip(tiny_zip) -> Path:
    """Real faces where the real zip is present (the check this is for), else the small one."""
    return REAL_ZIP if REAL_ZIP.exists() else tiny_zip


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory) -> Path:
    """A random 3-block CLIP vision tower: three layers make a curve."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny3"), layers=3, seed=1)


def as_rgb(pixels: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(p).convert("RGB") for p in pixels]


# --- per-layer and flip features ------------------------------------------------------------


def test_layer_and_flip_features_match_the_reference_forward_pass(faces_zip, tiny3, tmp_path):
    import torch
    from transformers import CLIPVisionModel

    cache = tmp_path / "layers.h5"
    run = cli("extract", "--data", faces_zip, "--split", "test", "--limit", 10, "--model", tiny3,
              "--layers", "all", "--tta", "flip", "--device", "cpu", "--dtype", "float32", "--cache", cache)
    assert run.returncode == 0, run.stderr
    X, y, ids, classes, meta = load_embeddings(cache, "test")
    assert meta["layers"] == [1, 2, 3] and meta["views"] == ["plain", "flip"] and X.shape == (10, 32)

    faces = load_images(faces_zip, "test", limit=10)
    assert ids == faces.ids
    model = CLIPVisionModel.from_pretrained(tiny3).eval()
    processor = pil_clip_processor().from_pretrained(tiny3)
    for view, images in (("plain", as_rgb(faces.pixels)), ("flip", [ImageOps.mirror(i) for i in as_rgb(faces.pixels)])):
        with torch.no_grad():
            out = model(**processor(images=images, return_tensors="pt"), output_hidden_states=True)
        np.testing.assert_allclose(load_embeddings(cache, "test", view=view).X, out.pooler_output.numpy(),
                                   atol=1e-5)
        for k in (1, 2, 3):
            want = model.post_layernorm(out.hidden_states[k][:, 0]).detach().numpy()
            got = load_embeddings(cache, "test", layer=k, view=view).X
            assert got.shape == (10, 32)
            np.testing.assert_allclose(got, want, atol=1e-5)
    # CLIP's pooled feature is the last block's layer-normed CLS; earlier blocks are other features
    np.testing.assert_array_equal(load_embeddings(cache, "test", layer=3).X, X)
    assert not np.allclose(load_embeddings(cache, "test", layer=1).X, X, atol=1e-3)
    both = [load_embeddings(cache, "test", layer=2, view=v).X for v in ("plain", "flip", "mean")]
    np.testing.assert_allclose(both[2], (both[0] + both[1]) / 2, atol=1e-6)


# --- probe ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer_cache(tiny_zip, tiny3, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("probe") / "tiny3.h5"
    extract(tiny_zip, "all", str(tiny3), device="cpu", dtype="float32", cache=cache, layers="all", progress=False)
    return cache


def test_probe_chooses_the_layer_on_validation_and_reports_every_layer(layer_cache, tmp_path):
    from fercache.heads import fit_linear
    from fercache.logreg import stratified_split

    run = cli("probe", "--cache", layer_cache, "--out", tmp_path / "out", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert [r["layer"] for r in result["layers"]] == [1, 2, 3, "pooled"]
    assert (result["train_count"], result["val_count"], result["test_count"]) == (28, 7, 14)
    # Each row by hand: a head on the same stratified 80% of train, scored on the other 20% and on test.
    y = load_embeddings(layer_cache, "train").y
    fit_rows, val_rows = stratified_split(y, 0.2, seed=0)
    for r, layer in zip(result["layers"], [1, 2, 3, None]):
        X, y = load_embeddings(layer_cache, "train", layer=layer)[:2]
        X_test, y_test = load_embeddings(layer_cache, "test", layer=layer)[:2]
        head, _ = fit_linear(X[fit_rows], y[fit_rows], seed=0)
        assert r["val_accuracy"] == head.score(X[val_rows], y[val_rows])[1]
        assert r["test_accuracy"] == pytest.approx(head.score(X_test, y_test)[1])
        assert r["test_accuracy_low"] <= r["test_accuracy"] <= r["test_accuracy_high"] and r["dim"] == 32
    assert result["best_layer"] == max(result["layers"], key=lambda r: r["val_accuracy"])["layer"]
    # the pooled feature is block 3's layer-normed CLS: the same arrays, the same seeded head
    assert result["layers"][2]["test_accuracy"] == result["layers"][3]["test_accuracy"]
    assert json.loads((tmp_path / "out" / "probe.json").read_text()) == result
    assert (tmp_path / "out" / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the challenge's protocol: all of train fits, PublicTest chooses, PrivateTest is reported
    public = json.loads(cli("probe", "--cache", layer_cache, "--out", tmp_path / "pub", "--val", "public_test",
                            "--json").stdout)
    assert (public["val_split"], public["test_split"]) == ("public_test", "private_test")
    assert (public["train_count"], public["val_count"], public["test_count"]) == (35, 7, 7)


def test_probe_table_and_default_folder(layer_cache, tmp_path):
    run = cli("probe", "--cache", layer_cache, "--method", "logreg", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[1].split()[:2] == ["layer", "dim"] and [l.split()[0] for l in lines[2:6]] == ["1", "2", "3", "pooled"]
    out = tmp_path / "runs" / "tiny3-probe"
    assert json.loads((out / "probe.json").read_text())["method"] == "logreg" and (out / "probe.png").is_file()


def test_probe_errors(tiny_zip, layer_cache, tmp_path):
    pixels = tmp_path / "pixels.h5"
    extract(tiny_zip, "all", "pixels", cache=pixels, progress=False)
    assert "--layers" in one_line_error(cli("probe", "--cache", pixels))
    assert "flip" in one_line_error(cli("probe", "--cache", layer_cache, "--views", "mean"))
    assert "method" in one_line_error(cli("probe", "--cache", layer_cache, "--method", "svm"))
    assert "no such cache" in one_line_error(cli("probe", "--cache", tmp_path / "missing.h5"))


# --- zeroshot -------------------------------------------------------------------------------


def test_zeroshot_is_the_argmax_of_prompt_cosines(faces_zip, full_clip):
    import torch
    from transformers import AutoTokenizer, CLIPModel

    from fercache.zeroshot import CLASS_NAMES, TEMPLATES, zeroshot

    run = cli("zeroshot", "--data", faces_zip, "--limit", 12, "--model", full_clip, "--device", "cpu",
              "--batch-size", 5, "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["count"] == 12
    assert list(summary["per_class_recall"]) == list(CLASSES) and summary["templates"] == list(TEMPLATES)

    result = zeroshot(faces_zip, "test", 12, str(full_clip), "cpu", 5, progress=False)
    assert result.summary()["accuracy"] == summary["accuracy"] == np.mean(result.scores.argmax(1) == result.labels)
    assert np.array_equal(result.labels, load_images(faces_zip, "test", limit=12).labels)
    pred = result.scores.argmax(1)
    for i, c in enumerate(CLASSES):  # each class's recall, from the cosine scores
        rows = result.labels == i
        assert summary["per_class_recall"][c] == (pytest.approx(np.mean(pred[rows] == i)) if rows.any() else None), c

    # the same guess computed independently: the processor's pixels, CLIP's own feature methods
    model, tok = CLIPModel.from_pretrained(full_clip).eval(), AutoTokenizer.from_pretrained(full_clip)
    faces = load_images(faces_zip, "test", limit=4)
    with torch.no_grad():
        inputs = pil_clip_processor().from_pretrained(full_clip)(images=as_rgb(faces.pixels), return_tensors="pt")
        img = model.get_image_features(**inputs)
        img = torch.nn.functional.normalize(getattr(img, "pooler_output", img), dim=-1)
        text = []
        for name in CLASS_NAMES:
            t = model.get_text_features(**tok([p.format(c=name) for p in TEMPLATES], padding=True, return_tensors="pt"))
            t = torch.nn.functional.normalize(getattr(t, "pooler_output", t), dim=-1).mean(0)
            text.append(t / t.norm())
        scores = (img @ torch.stack(text).T).numpy()
    np.testing.assert_allclose(result.scores[:4], scores, atol=1e-5)
    assert list(result.pred[:4]) == list(scores.argmax(1))


def test_zeroshot_errors(tiny3, tiny_zip, tmp_path):
    assert "text tower" in one_line_error(cli("zeroshot", "--data", tiny_zip, "--model", tiny3, "--device", "cpu"))
    from fercache.zeroshot import zeroshot

    with pytest.raises(UserError, match="cannot load model"):
        zeroshot(tiny_zip, model=str(tmp_path / "nothing"), device="cpu")
    with pytest.raises(UserError, match="batch-size"):
        zeroshot(tiny_zip, batch_size=0)


# --- compare --------------------------------------------------------------------------------


def write_run(folder: Path, **metrics) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_compare_sorts_runs_and_skips_folders_without_metrics(tmp_path):
    common = {"preprocess": "clip", "method": "linear", "views": ["plain"], "layer": None}
    a = write_run(tmp_path / "runs" / "a", model="pixels", test_accuracy=0.37, macro_f1=0.31, **common)
    b = write_run(tmp_path / "runs" / "b", model="openai/clip-vit-base-patch32", test_accuracy=0.65, macro_f1=0.6,
                  **{**common, "views": ["plain", "flip"], "layer": 10})
    (tmp_path / "runs" / "probe-only").mkdir()
    run = cli("compare", a, tmp_path / "runs" / "probe-only", b)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines() == [f"fercache: warning: {tmp_path / 'runs' / 'probe-only'}: "
                                               "no metrics.json (not a finished `fercache fit` run); skipped",
                                               *(f"fercache: warning: {run}: no predictions.csv (made by fercache "
                                                 "before 0.2); no p-value" for run in (b, a))]
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "model", "preprocessing"] and "macro-F1" in lines[0]
    assert lines[1].split()[:2] == [str(b), "openai/clip-vit-base-patch32"] and "plain+flip" in lines[1]
    assert lines[2].split()[1] == "pixels" and "pooled" in lines[2] and "0.3700" in lines[2]

    data = json.loads(cli("compare", a, b, "--json").stdout)
    assert [r["test_accuracy"] for r in data["runs"]] == [0.65, 0.37]
    assert "none of the 1 path" in one_line_error(cli("compare", tmp_path / "runs" / "probe-only"))



def test_compare_reads_what_fit_writes_and_tests_each_run_against_the_best(layer_cache, tmp_path):
    from fercache.fit import fit, read_predictions
    from fercache.stats import mcnemar

    fit(layer_cache, out=tmp_path / "pooled", plots=False)
    fit(layer_cache, layer=1, out=tmp_path / "block1", plots=False)
    fit(layer_cache, layer=2, val="public_test", out=tmp_path / "private", plots=False)  # scored on PrivateTest only
    run = cli("compare", tmp_path / "pooled", tmp_path / "block1", tmp_path / "private", "--json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)["runs"]
    want = {str(tmp_path / d): json.loads((tmp_path / d / "metrics.json").read_text())
            for d in ("pooled", "block1", "private")}
    assert sorted(r["run"] for r in rows) == sorted(want)
    for r in rows:
        assert r["layer"] == want[r["run"]]["layer"] and r["macro_f1"] == want[r["run"]]["macro_f1"]
        assert r["model"] == want[r["run"]]["model"] and r["method"] == "linear" and r["views"] == "plain"
    # the two runs on all of test are one set: the second against the best, McNemar from the saved predictions
    pooled, block1 = (next(r for r in rows if r["run"] == str(tmp_path / d)) for d in ("pooled", "block1"))
    best, other = sorted((pooled, block1), key=lambda r: -r["test_accuracy"])
    a, b = (read_predictions(Path(r["run"]) / "predictions.csv") for r in (best, other))
    assert a["id"] == b["id"] and len(a["id"]) == 14
    assert best["p_value"] is None and other["vs"] == best["run"]
    p = mcnemar(a["label"], a["predicted"], b["predicted"])["p_value"]
    assert other["p_value"] == other["p_raw"] == pytest.approx(p)  # one pair: Holm leaves it as it is
    assert best["test_set"] == other["test_set"] == "test of fer2013.zip (14 faces)"
    # the PrivateTest-only run is its own set: never paired or ranked with runs scored on all of test
    private = next(r for r in rows if r["run"] == str(tmp_path / "private"))
    assert private["p_value"] is None and private["test_set"] == "private_test of fer2013.zip (7 faces)"
    assert [r["run"] for r in rows].index(private["run"]) in (0, 2)  # not between the two it is not ranked with
    assert "2 different test sets" in run.stderr and "not paired" in run.stderr


def constructed_run(folder: Path, predicted: np.ndarray, label: np.ndarray, split: str = "test",
                    source: str = "/data/fer2013.zip") -> Path:
    """A run folder holding only what `compare` reads: metrics.json and predictions.csv."""
    from fercache.fit import write_predictions

    folder.mkdir(parents=True)
    metrics = {"model": folder.name, "preprocess": "none", "method": "linear", "views": "plain", "layer": None,
               "test_accuracy": float((predicted == label).mean()), "macro_f1": 0.0, "test_split": split,
               "test_count": len(label),
               "cache": {"meta": {"source": {"path": source, "fingerprint": "sha256:" + source}}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    write_predictions(folder / "predictions.csv", {"id": [f"{split}/{i}" for i in range(len(label))],
                                                    "usage": [split] * len(label), "label": label,
                                                    "proba": np.eye(7)[predicted]}, list(CLASSES))
    return folder


def test_compare_adjusts_over_all_pairs_and_ranks_within_each_test_set(tmp_path):
    """A constructed case, so every assertion runs: three runs on the same faces, one on another
    split and one on another dataset (more accurate than all, yet ranked apart)."""
    from fercache.probe import compare, compare_table
    from fercache.stats import holm, mcnemar

    label = np.zeros(60, dtype=np.int64)
    preds = {"a": np.r_[np.zeros(50), np.ones(10)].astype(int), "b": np.r_[np.ones(20), np.zeros(40)].astype(int),
             "c": np.r_[np.zeros(30), np.ones(30)].astype(int)}
    folders = [constructed_run(tmp_path / name, p, label) for name, p in preds.items()]
    folders.append(constructed_run(tmp_path / "private", np.zeros(30, dtype=int), label[:30], split="private_test"))
    folders.append(constructed_run(tmp_path / "other", np.zeros(60, dtype=int), label, source="/data/ckplus48.zip"))
    with pytest.warns(FERCacheWarning, match="3 different test sets") as caught:
        rows = compare(folders)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert [Path(r["run"]).name for r in rows] == ["private", "other", "a", "b", "c"]  # each set its best first
    pairs = [mcnemar(label, preds[x], preds[y])["p_value"] for x, y in (("a", "b"), ("a", "c"), ("b", "c"))]
    adjusted = holm(pairs)  # three pairs in the family, not the two best-vs-rest ones
    a, b, c = rows[2:]
    assert a["p_value"] is None and b["vs"] == c["vs"] == a["run"]
    assert (b["p_raw"], c["p_raw"]) == pytest.approx(pairs[:2])
    assert (b["p_value"], c["p_value"]) == pytest.approx(adjusted[:2])
    assert c["p_value"] < 0.05 < b["p_value"] and c["p_value"] > holm(pairs[:2])[1]
    assert all(r["p_value"] is None for r in rows[:2])  # alone in their sets: nothing to pair with
    headers, cells = compare_table(rows)
    sets = [row[headers.index("test set")] for row in cells]
    assert sets == ["private_test of fer2013.zip (30 faces)", "test of ckplus48.zip (60 faces)",
                    *["test of fer2013.zip (60 faces)"] * 3]


# --- the pixels floor on the real FER2013 ---------------------------------------------------


def test_pixels_baseline_matches_plain_scikit_learn(real_zip, tmp_path):
    """`--model pixels` end to end against scikit-learn on the very same pixels.

    The test split's two halves (3,589 faces each) make a real but cheap train/test pair: fit on
    public_test, score on private_test (lbfgs on all 28,709 x 2,304 train pixels takes minutes).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fercache.heads import fit_linear

    cache = tmp_path / "pixels.h5"
    run = cli("extract", "--data", real_zip, "--split", "test", "--model", "pixels", "--cache", cache)
    assert run.returncode == 0, run.stderr
    X, y, ids, _, meta = load_embeddings(cache, "public_test")
    X_test, y_test, *_ = load_embeddings(cache, "private_test")
    assert meta["model"] == "pixels" and X.shape == (3589, 48 * 48) and X_test.shape == (3589, 48 * 48)

    faces = load_images(real_zip, "test")
    public = np.array([u == "public_test" for u in faces.usage])
    assert ids == [i for i, p in zip(faces.ids, public) if p]
    np.testing.assert_array_equal(X, faces.pixels[public].reshape(-1, 48 * 48).astype(np.float32) / 255)
    np.testing.assert_array_equal(y, faces.labels[public])
    np.testing.assert_allclose(X_test, faces.pixels[~public].reshape(-1, 48 * 48) / 255.0, rtol=1e-6)

    head, _ = fit_linear(X, y)  # the reference recipe, as `fercache fit` runs it
    ours = head.score(X_test, y_test)[1]
    # plain scikit-learn, strongly regularised so lbfgs converges in seconds on 2,304 pixels
    plain = make_pipeline(StandardScaler(), LogisticRegression(C=1e-3, tol=1e-3, max_iter=300)).fit(
        faces.pixels[public].reshape(-1, 48 * 48) / 255.0, faces.labels[public])
    theirs = plain.score(faces.pixels[~public].reshape(-1, 48 * 48) / 255.0, faces.labels[~public])
    majority = np.bincount(y_test).max() / len(y_test)
    assert ours > majority + 0.03 and theirs > majority + 0.03, (ours, theirs, majority)
    assert abs(ours - theirs) < 0.06, (ours, theirs)
