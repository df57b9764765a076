"""Datasets through the whole pipeline: their own classes in caches and heads, folds, cross-dataset
evaluation, FER+ soft labels, native images; FER2013 exactly as before."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, pil_clip_processor, save_tiny_clip
from test_datasets import ckplus_zip, make_zip, real
from fercache.cache import cache_meta, load_embeddings, load_subjects, read_meta, write_split
from fercache.crossdata import class_map
from fercache.datasets import FERPLUS_VOTES, ferplus_majority, ferplus_targets, open_dataset
from fercache.errors import UserError
from fercache.extract import extract
from fercache.fit import evaluate, fit
from fercache.heads import Head, fit_linear
from fercache.identity import GRAY48, NATIVE, Identity
from fercache.names import CANONICAL, CLASSES, default_cache
from fercache.preprocess import Preprocessor, recipe_for


def folders_zip(tmp_path: Path, n: int = 12) -> Path:
    """A generic `<split>/<class>/<image>` zip of three classes, each face's pixels telling its class."""
    rng = np.random.default_rng(0)
    members = {}
    for split in ("train", "test"):
        for i in range(n):
            cls = ("calm", "happy", "sad")[i % 3]
            pixels = np.clip(rng.normal(60 + 70 * (i % 3), 5, (48, 48)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "PNG")
            members[f"mine/{split}/{cls}/{i}.png"] = buf.getvalue()
    return make_zip(tmp_path / "mine.zip", members)


def test_a_folder_dataset_gets_heads_of_its_own_classes(tmp_path):
    data = folders_zip(tmp_path)
    extract(data, "all", "pixels", cache=tmp_path / "c.h5", classes="calm,happy,sad", progress=False)
    meta = read_meta(tmp_path / "c.h5")
    assert meta["classes"] == ["calm", "happy", "sad"] and meta["canonical"] == ["calm", "happiness", "sadness"]
    assert meta["dataset"] == "folders" and meta["images"] == GRAY48
    result = fit(tmp_path / "c.h5", epochs=30, out=tmp_path / "run", plots=False)
    head = Head.load(tmp_path / "run")
    assert head.weight.shape == (3, 48 * 48) and head.classes == ["calm", "happy", "sad"]  # 2,304 x 3 classes
    assert head.canonical == ["calm", "happiness", "sadness"] and head.dataset == "folders"
    test = load_embeddings(tmp_path / "c.h5", "test")
    assert list(result.metrics["per_class"]) == ["calm", "happy", "sad"] and len(result.metrics["confusion"]) == 3
    assert result.metrics["test_accuracy"] == pytest.approx(np.mean(head.predict(test.X) == test.y))
    # the same files labelled in another order: same fingerprint, other labels, so not the same cache
    with pytest.raises(UserError, match="classes"):
        extract(data, "all", "pixels", cache=tmp_path / "c.h5", classes="happy,calm,sad", progress=False)


def test_fer2013_caches_and_heads_are_as_before(fer_zip, tmp_path):
    extract(fer_zip, "all", "pixels", progress=False)
    path = default_cache("pixels", "none")
    assert path.name == "pixels__none.h5" and path.exists()  # the name it always had
    meta = read_meta(path)
    assert meta["classes"] == list(CLASSES) and meta["canonical"] == list(CANONICAL) and meta["dataset"] == "fer2013"
    fit(path, epochs=2, out=tmp_path / "run", plots=False)
    config = json.loads((tmp_path / "run" / "head.json").read_text())
    assert config["classes"] == list(CLASSES) and Head.load(tmp_path / "run").weight.shape[0] == 7
    old = {k: v for k, v in config.items() if k not in ("canonical", "dataset", "images")}  # a 0.2.0 head
    (tmp_path / "run" / "head.json").write_text(json.dumps(old))
    head = Head.load(tmp_path / "run")
    assert head.canonical == list(CANONICAL) and head.dataset == "fer2013" and head.identity.images == ""
    assert evaluate(path, tmp_path / "run", "test", plots=False)["count"] == 14


def ck_cache(tmp_path: Path) -> Path:
    extract(ckplus_zip(tmp_path), "all", "pixels", cache=tmp_path / "ck.h5", progress=False)
    return tmp_path / "ck.h5"


def subjects_cache(tmp_path: Path, n: int = 72) -> Path:
    """A dataset without a split: 6 subjects of 12 faces each, 4 classes, 5-d features telling the class."""
    rng = np.random.default_rng(3)
    y = np.arange(n) % 4
    X = (np.eye(4)[y] @ rng.normal(size=(4, 5)) + rng.normal(scale=0.7, size=(n, 5))).astype(np.float32)
    classes = ("calm", "happy", "sad", "angry")
    meta = cache_meta(Identity("synthetic", "none", "synthetic", "float32", image_size=48, source="s", classes=classes),
                      5, dataset="folders")
    write_split(tmp_path / "s.h5", "all", meta, [f"f{i}" for i in range(n)], y, ["all"] * n, {"embeddings": X},
                subjects=[f"S{i // 12}" for i in range(n)])
    return tmp_path / "s.h5"


@pytest.mark.parametrize("folds", ["3", "subjects"])
def test_folds_keep_subjects_apart_and_pool_every_face_once(tmp_path, folds, monkeypatch):
    import fercache.fit

    cache = subjects_cache(tmp_path)
    X, subjects = load_embeddings(cache, "all").X, load_subjects(cache, "all")
    seen = []  # the rows each logistic regression was given: where its C was chosen
    real_logreg = fercache.fit.fit_logreg
    monkeypatch.setattr(fercache.fit, "fit_logreg", lambda X, y, **kw: seen.append(X) or real_logreg(X, y, **kw))
    m = fit(cache, method="logreg", folds=folds, out=tmp_path / "run", plots=False).metrics
    assert m["folds"]["count"] == (3 if folds == "3" else 6) and len(m["folds"]["per_fold"]) == m["folds"]["count"]
    accs = [r["accuracy"] for r in m["folds"]["per_fold"]]
    assert m["folds"]["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert m["folds"]["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    with open(tmp_path / "run" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(f"f{i}" for i in range(72))  # every face predicted once
    fold_subjects = {}
    for r in rows:
        fold_subjects.setdefault(r["fold"], set()).add(subjects[int(r["id"][1:])])
    assert len(fold_subjects) == m["folds"]["count"] and sum(map(len, fold_subjects.values())) == 6  # none in two
    assert m["test_accuracy"] == pytest.approx(np.mean([r["label"] == r["predicted"] for r in rows]))
    assert m["test_accuracy"] > 0.5  # the features tell the classes
    # each fold's C was chosen on rows of that fold's training subjects only (then one head on all faces)
    assert len(seen) == m["folds"]["count"] + 1 and len(seen[-1]) == 72
    for fold, rows_seen in zip(sorted(fold_subjects, key=int), seen):
        held_out = [i for i in range(72) if subjects[i] in fold_subjects[fold]]
        assert len(rows_seen) == 72 - len(held_out) and not (rows_seen[:, None] == X[held_out][None]).all(-1).any()
    with pytest.raises(UserError, match="--folds"):
        fit(cache, out=tmp_path / "nofolds", plots=False)


def test_a_fer2013_head_on_ckplus_scores_the_shared_classes_and_names_the_rest(fer_zip, tmp_path):
    extract(fer_zip, "all", "pixels", cache=tmp_path / "fer.h5", progress=False)
    fit(tmp_path / "fer.h5", epochs=3, out=tmp_path / "run", plots=False)
    cache = ck_cache(tmp_path)
    report = evaluate(cache, tmp_path / "run", "all", plots=False)
    assert report["left_out"] == {"contempt": 12} and report["head_classes_unused"] == ["neutral"]
    assert report["count"] == 36 and "contempt" not in report["per_class"]
    head, emb = Head.load(tmp_path / "run"), load_embeddings(cache, "all")
    keep = emb.y != 1  # CK+'s contempt
    ck = ["anger", "disgust", "fear", "happy", "sadness", "surprise"]
    rows = [CLASSES.index({"happy": "happy", "sadness": "sad"}.get(c, c.replace("anger", "angry"))) for c in ck]
    pred = head.logits(emb.X[keep])[:, rows].argmax(1)  # the head restricted to CK+'s classes
    truth = [ck.index(["anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise"][y]) for y in emb.y[keep]]
    assert report["accuracy"] == pytest.approx(np.mean(pred == np.array(truth)))
    assert report["dataset"] == "ckplus48" and report["head_dataset"] == "fer2013"


def test_class_map_matches_by_canonical_name():
    m = class_map(list(CLASSES), list(CANONICAL), ["NE", "HA", "XX"], ["neutral", "happiness", "XX"])
    assert m.classes == ["NE", "HA"] and m.head_rows.tolist() == [6, 3] and m.left_out == ["XX"]
    keep, y, z = m.restrict(np.array([2, 0, 1]), np.arange(21.0).reshape(3, 7))
    assert keep.tolist() == [False, True, True] and y.tolist() == [0, 1] and z.tolist() == [[13, 10], [20, 17]]
    with pytest.raises(UserError, match="share no expression"):
        class_map(["a"], ["anger"], ["b"], ["neutral"])


def test_soft_targets_train_the_linear_head():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 5)).astype(np.float32), np.arange(60) % 8
    hard, _ = fit_linear(X, y, epochs=3, classes=8)
    one_hot, _ = fit_linear(X, y, epochs=3, classes=8, targets=np.eye(8)[y])
    np.testing.assert_allclose(one_hot.weight, hard.weight, rtol=1e-5, atol=1e-6)  # one-hot targets are labels
    votes = rng.integers(0, 5, (60, 10))
    soft, _ = fit_linear(X, y, epochs=3, classes=8, targets=ferplus_targets(votes))
    assert soft.weight.shape == (8, 5) and not np.allclose(soft.weight, hard.weight)
    with pytest.raises(UserError, match="soft targets"):
        fit_linear(X, y, classes=8, targets=np.ones((60, 3)))


def ferplus_cache(tmp_path: Path) -> Path:
    """A synthetic FER+ cache: 8 classes, majority labels and the 10 votes behind them."""
    rng = np.random.default_rng(1)
    identity = Identity("synthetic", "none", "synthetic", "float32", image_size=48, source="s",
                        classes=FERPLUS_VOTES[:8])
    meta = cache_meta(identity, 6, dataset="ferplus", canonical=("neutral", "happiness", "surprise", "sadness",
                                                                 "anger", "disgust", "fear", "contempt"))
    for split, n in (("train", 160), ("test", 80)):
        votes = np.zeros((n, 10), np.int64)
        for i in range(n):
            votes[i, i % 8] = 6
            votes[i, rng.integers(0, 8)] += 4
        y = np.array([ferplus_majority(v) for v in votes])
        X = (np.eye(8)[y] @ rng.normal(size=(8, 6)) + rng.normal(scale=0.5, size=(n, 6))).astype(np.float32)
        usage = ["train"] * n if split == "train" else ["public_test", "private_test"] * (n // 2)
        write_split(tmp_path / "fp.h5", split, meta, [f"{split}{i}" for i in range(n)], y, usage,
                    {"embeddings": X, "votes": votes.astype(np.float32)})
    return tmp_path / "fp.h5"


def test_ferplus_votes_are_soft_targets_and_accuracy_is_against_the_majority(tmp_path):
    cache = ferplus_cache(tmp_path)
    majority = fit(cache, epochs=5, out=tmp_path / "maj", plots=False, labels="ferplus-majority")
    votes = fit(cache, epochs=5, out=tmp_path / "votes", plots=False, labels="ferplus-votes")
    assert votes.metrics["labels"] == "ferplus-votes" and majority.metrics["labels"] == "ferplus-majority"
    assert votes.head.weight.shape == (8, 6) and not np.allclose(votes.head.weight, majority.head.weight)
    test = load_embeddings(cache, "test")
    assert votes.metrics["test_accuracy"] == pytest.approx(np.mean(votes.head.predict(test.X) == test.y))
    with pytest.raises(UserError, match="ferplus-votes"):
        fit(cache, method="logreg", out=tmp_path / "x", plots=False, labels="ferplus-votes")
    with pytest.raises(UserError, match="votes"):
        fit(subjects_cache(tmp_path), folds="3", out=tmp_path / "y", plots=False, labels="ferplus-votes")


def jaffe_like(tmp_path: Path) -> Path:
    """JAFFE's layout with a palette TIFF, a gray one and (another size) a colour one."""
    rng = np.random.default_rng(2)
    palette = Image.fromarray(rng.integers(0, 4, (256, 256), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 90, 30, 9, 50, 150, 50, 200, 90, 240] + [0] * 756)
    colour = Image.fromarray(rng.integers(0, 256, (181, 240, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8))
    members = {}
    for name, im in (("KA.HA1.29", palette), ("YM.SU2.58", colour), ("KL.NE1.1", gray)):
        buf = io.BytesIO()
        im.save(buf, "TIFF")
        members[f"jaffe/{name}.tiff"] = buf.getvalue()
    return make_zip(tmp_path / "jaffe.zip", members)


def reference_inputs(processor, path: Path, names: list[str]) -> torch.Tensor:
    """The processor on each image as PIL opens it (in RGB): the reference model input."""
    with zipfile.ZipFile(path) as z:
        images = [Image.open(io.BytesIO(z.read(n))).convert("RGB") for n in names]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def test_native_images_are_preprocessed_exactly_as_the_model_processor(tmp_path):
    path = jaffe_like(tmp_path)
    faces = open_dataset(path).load("all", native=True)
    for settings in (dict(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
                     dict(size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64}, resample=2),
                     dict(size={"height": 64, "width": 64}, do_center_crop=False)):
        processor = pil_clip_processor()(**settings)
        ours = Preprocessor(recipe_for("clip", processor, 64), torch.device("cpu"))(faces.pixels)
        ref = reference_inputs(processor, path, [f"jaffe/{i}" for i in faces.ids])
        assert ours.shape == ref.shape == (3, 3, 64, 64)
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=0, atol=1e-5)  # the same resized pixels


def test_real_jaffe_native_images_match_the_processor(tmp_path):
    path = real("jaffe.zip")
    faces = open_dataset(path).load("all", limit=4, native=True)
    processor = pil_clip_processor()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    ours = Preprocessor(recipe_for("clip", processor, 224), torch.device("cpu"))(faces.pixels)
    with zipfile.ZipFile(path) as z:
        members = {n.rsplit("/", 1)[-1]: n for n in z.namelist()}
    ref = reference_inputs(processor, path, [members[i] for i in faces.ids])
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=0, atol=1e-5)


def test_native_extract_records_its_images_and_heads_keep_them_apart(tmp_path):
    model = save_tiny_clip(tmp_path / "clip", image_size=64)
    data = jaffe_like(tmp_path)
    native = extract(data, "all", str(model), cache=tmp_path / "n.h5", images="native", progress=False)
    gray = extract(data, "all", str(model), cache=tmp_path / "g.h5", progress=False)
    assert native[0].count == gray[0].count == 3
    assert read_meta(tmp_path / "n.h5")["images"] == NATIVE and read_meta(tmp_path / "g.h5")["images"] == GRAY48
    n, g = load_embeddings(tmp_path / "n.h5", "all"), load_embeddings(tmp_path / "g.h5", "all")
    assert not np.allclose(n.X, g.X)  # colour and resolution reached the model
    # a head on native features: `predict` feeds it the image as it is, as extract did
    from fercache.predict import predict

    rng = np.random.default_rng(4)
    k = len(n.classes)  # JAFFE's 7
    head = Head(rng.normal(size=(k, n.X.shape[1])).astype(np.float32), np.zeros(k, np.float32),
                np.zeros(n.X.shape[1], np.float32), np.ones(n.X.shape[1], np.float32), "linear", False,
                classes=list(n.classes), identity=Identity.from_meta(n.meta).encoder())
    head.save(tmp_path / "head")
    with zipfile.ZipFile(data) as z:
        (tmp_path / "face.tiff").write_bytes(z.read("jaffe/YM.SU2.58.tiff"))
    probs = predict(tmp_path / "head", [tmp_path / "face.tiff"], "cpu")[0]["probs"]
    row = n.ids.index("YM.SU2.58.tiff")
    np.testing.assert_allclose(list(probs.values()), head.predict_proba(n.X[row:row + 1])[0], rtol=1e-5)
    with pytest.raises(UserError, match="pixels baseline is 48x48 gray"):
        extract(data, "all", "pixels", cache=tmp_path / "p.h5", images="native", progress=False)
    with pytest.raises(UserError, match="images"):
        Identity.from_meta(read_meta(tmp_path / "n.h5")).check(Identity.from_meta(read_meta(tmp_path / "g.h5")),
                                                               "n.h5", keys=("images",))


def test_cli_run_on_a_dataset_without_a_split_uses_folds(tmp_path):
    out = cli("run", "--data", ckplus_zip(tmp_path), "--model", "pixels", "--epochs", "2",
              "--cache", tmp_path / "ck.h5", "--out", tmp_path / "run", "--folds", "3")
    assert out.returncode == 0, out.stderr
    assert "3 subject-independent folds" in out.stdout and "all: 48 images" in out.stdout
    bad = cli("fit", "--cache", tmp_path / "ck.h5", "--folds", "9")
    assert bad.returncode == 2 and "--folds 9: choose 2 to 6" in bad.stderr and "Traceback" not in bad.stderr


def test_finetune_tunes_a_head_of_the_dataset_classes_on_ferplus_votes(tmp_path):
    from test_datasets import ferplus_folders_zip

    from fercache.finetune import finetune

    model = save_tiny_clip(tmp_path / "clip", image_size=64, layers=3)
    extract(ferplus_folders_zip(tmp_path), "all", str(model), "clip", "cpu", "float32", cache=tmp_path / "fp.h5",
            tokens=1, progress=False)
    args = dict(epochs=1, lr=1e-2, batch_size=4, val="public_test", device="cpu", dtype="float32", plots=False,
                progress=False)
    votes = finetune(tmp_path / "fp.h5", labels="ferplus-votes", out=tmp_path / "votes", **args).metrics
    majority = finetune(tmp_path / "fp.h5", out=tmp_path / "majority", **args).metrics
    config = json.loads((tmp_path / "votes" / "tuned.json").read_text())
    assert config["classes"] == list(FERPLUS_VOTES[:8]) and list(votes["per_class"]) == config["classes"]
    assert votes["labels"] == "ferplus-votes" and majority["labels"] == "ferplus-majority"
    assert votes["history"][0] == majority["history"][0]  # the same probe to start from
    assert votes["history"][1]["val_loss"] != majority["history"][1]["val_loss"]  # trained on other targets
    with pytest.raises(UserError, match="FER\\+ cache"):
        finetune(ck_cache(tmp_path), labels="ferplus-votes", out=tmp_path / "x", **args)


def test_zeroshot_prompts_any_dataset_by_its_expressions(tmp_path, full_clip):
    from fercache.zeroshot import CLASS_NAMES, prompt_names, zeroshot

    assert prompt_names(CANONICAL) == CLASS_NAMES  # FER2013's prompts as before
    result = zeroshot(jaffe_like(tmp_path), "all", model=str(full_clip), device="cpu", progress=False,
                      images="native")
    summary = result.summary()
    assert summary["dataset"] == "jaffe" and result.scores.shape == (3, 7)
    assert summary["class_names"] == {"NE": "neutral", "HA": "happy", "SA": "sad", "SU": "surprised",
                                      "AN": "angry", "DI": "disgusted", "FE": "fearful"}
    assert list(summary["per_class_recall"]) == list(summary["class_names"])


def test_probe_over_folds_chooses_each_fold_s_layer_on_its_own_training_part(tmp_path):
    from fercache.probe import probe

    rng = np.random.default_rng(5)
    n, y = 72, np.arange(72) % 4
    classes = ("calm", "happy", "sad", "angry")
    meta = cache_meta(Identity("synthetic", "none", "synthetic", "float32", image_size=48, source="s", layers=(1,),
                               classes=classes), 5, dataset="folders")
    good = (np.eye(4)[y] @ rng.normal(size=(4, 5)) + rng.normal(scale=0.5, size=(n, 5))).astype(np.float32)
    noise = rng.normal(size=(n, 5)).astype(np.float32)  # block 1 knows nothing, the pooled feature everything
    write_split(tmp_path / "p.h5", "all", meta, [f"f{i}" for i in range(n)], y, ["all"] * n,
                {"embeddings": good, "layers/1": noise}, subjects=[f"S{i // 12}" for i in range(n)])
    result = probe(tmp_path / "p.h5", tmp_path / "out", method="logreg", folds="3")
    assert result["folds"]["count"] == 3 and result["chosen"]["layers"] == ["pooled"] * 3
    rows = {r["layer"]: r for r in result["layers"]}
    assert rows["pooled"]["test_accuracy"] > rows[1]["test_accuracy"] and result["best_layer"] == "pooled"
    assert result["chosen"]["accuracy"] == rows["pooled"]["test_accuracy"]  # every fold chose it
