"""Stage two: heads on cached features, their reports, saved heads, `predict` and the errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import cli, run_tiny
from fercache.cache import cache_meta, load_embeddings, write_split
from fercache.cli import app
from fercache.data import CLASSES, to_gray48
from fercache.errors import FERCacheWarning, UserError
from fercache.fit import evaluate, fit
from fercache.heads import Head, fit_linear
from fercache.identity import Identity
from fercache.logreg import fit_logreg


def synthetic(n: int, dim: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features around one random centre per class (shared by all seeds); `sep` sets how far apart."""
    centres = np.random.default_rng(1234).normal(size=(len(CLASSES), dim))
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    return (centres[y] * sep + rng.normal(size=(n, dim))).astype(np.float32), y


def write_cache(path: Path, dim: int = 16, sep: float = 3.0, model: str = "synthetic", n: int = 2800,
                splits: tuple[str, ...] = ("train", "test")) -> Path:
    """A cache-shaped HDF5 of synthetic features, written through the cache's own code."""
    meta = cache_meta(Identity(model, "none", "synthetic", "float32", image_size=48, source="s"), dim)
    for i, split in enumerate(splits):
        X, y = synthetic(n if split == "train" else n // 2, dim, sep, seed=i)
        usage = ["train"] * len(y) if split == "train" else (["public_test", "private_test"] * len(y))[:len(y)]
        write_split(path, split, meta, [f"{split}/{j}" for j in range(len(y))], y, usage, {"embeddings": X})
    return path


@pytest.fixture(scope="module")
def easy(tmp_path_factory) -> tuple[Path, Path]:
    """A separable synthetic cache and the linear run fitted on it."""
    folder = tmp_path_factory.mktemp("easy")
    cache = write_cache(folder / "easy.h5")
    fit(cache, out=folder / "run")
    return cache, folder / "run"


def test_linear_fit_learns_reports_and_writes_the_run(easy):
    cache, run = easy
    m = json.loads((run / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.95 and m["public_test_accuracy"] > 0.95 and m["private_test_accuracy"] > 0.95
    assert [r["epoch"] for r in m["history"]] == list(range(1, 21))
    assert set(m["history"][0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc"}
    assert m["history"][-1]["test_acc"] == pytest.approx(m["test_accuracy"], abs=1e-6)
    assert np.array(m["confusion"]).sum() == m["test_count"] == 1400
    assert np.trace(m["confusion"]) == round(m["test_accuracy"] * 1400)
    assert list(m["per_class"]) == list(CLASSES) and sum(r["support"] for r in m["per_class"].values()) == 1400
    assert m["settings"]["epochs"] == 20 and m["cache"]["path"] == str(cache) and m["cache"]["meta"]["dim"] == 16
    assert (m["method"], m["model"], m["preprocess"], m["views"], m["layer"]) == ("linear", "synthetic", "none",
                                                                                  "plain", None)
    assert (run / "history.csv").read_text().splitlines()[0] == "epoch,train_loss,train_acc,test_loss,test_acc"
    assert len((run / "history.csv").read_text().splitlines()) == 21
    for png in ("confusion.png", "curves.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    X, y = synthetic(400, 8, 1.0, seed=0)
    a, ha = fit_linear(X, y, epochs=3, seed=5)
    b, hb = fit_linear(X, y, epochs=3, seed=5)
    c, _ = fit_linear(X, y, epochs=3, seed=6)
    assert ha == hb and np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    assert not np.array_equal(a.weight, c.weight)
    la, sa = fit_logreg(X, y, seed=5)
    lb, sb = fit_logreg(X, y, seed=5)
    assert sa == sb and np.array_equal(la.weight, lb.weight)


def test_linear_head_is_the_reference_recipe_nn_linear_adam_cross_entropy():
    """fit_linear is nn.Linear + torch.optim.Adam + cross-entropy on seeded shuffles, to 1e-5, float64 input too."""
    import torch
    import torch.nn.functional as F

    X, y = synthetic(600, 12, 1.0, seed=0)
    head, history = fit_linear(X.astype(np.float64), y, epochs=3, batch_size=64, lr=1e-2, weight_decay=1e-3, seed=7,
                               standardize=False)
    torch.manual_seed(7)
    model = torch.nn.Linear(12, len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    gen, Xt, yt = torch.Generator().manual_seed(7), torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(3):
        losses = []
        for idx in torch.randperm(len(X), generator=gen).split(64):
            loss = F.cross_entropy(model(Xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item() * len(idx))
    np.testing.assert_allclose(head.weight, model.weight.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(head.bias, model.bias.detach().numpy(), atol=1e-5)
    assert history[-1]["train_loss"] == pytest.approx(sum(losses) / len(X), rel=1e-5)


def test_torch_and_sklearn_heads_agree_on_easy_data():
    X, y = synthetic(2800, 16, 4.0, seed=0)
    X_test, y_test = synthetic(1400, 16, 4.0, seed=1)
    linear, _ = fit_linear(X, y)
    logreg, search = fit_logreg(X, y)
    assert linear.score(X_test, y_test)[1] > 0.95 and logreg.score(X_test, y_test)[1] > 0.95
    assert (linear.predict(X_test) == logreg.predict(X_test)).mean() > 0.97
    assert search["C"] in [r["C"] for r in search["validation"]]
    assert all(set(r) == {"C", "val_loss", "val_loss_se", "val_acc", "val_se", "n_iter", "converged"}
               for r in search["validation"])


def test_logreg_at_least_as_accurate_as_plain_sklearn():
    from sklearn.linear_model import LogisticRegression

    X, y = synthetic(2100, 64, 0.25, seed=0)  # hard enough that C matters
    X_test, y_test = synthetic(2100, 64, 0.25, seed=1)
    head, _ = fit_logreg(X, y)
    plain = (LogisticRegression().fit(X, y).predict(X_test) == y_test).mean()
    assert head.score(X_test, y_test)[1] >= plain - 0.005


def test_logreg_run_reports_its_c_search(tmp_path):
    cache = write_cache(tmp_path / "c.h5", n=700)
    m = fit(cache, method="logreg", out=tmp_path / "run", plots=False).metrics
    assert m["logreg"]["C"] in [r["C"] for r in m["logreg"]["validation"]]
    assert len(m["history"]) == 1 and m["test_accuracy"] == pytest.approx(m["history"][0]["test_acc"])
    assert Head.load(tmp_path / "run").method == "logreg"


def test_saved_head_reloads_to_identical_predictions_and_is_no_pickle(easy):
    cache, run = easy
    head = Head.load(run)
    X, _ = synthetic(100, 16, 3.0, seed=9)
    head.save(run.parent / "copy")
    again = Head.load(run.parent / "copy")
    assert np.array_equal(head.predict_proba(X), again.predict_proba(X))
    assert np.allclose(head.predict_proba(X).sum(axis=1), 1, atol=1e-5)
    raw = (run / "head.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: header length, JSON header, raw tensors
    header = json.loads(raw[8:8 + n])
    assert {k: v["shape"] for k, v in header.items() if k != "__metadata__"} == \
        {"weight": [7, 16], "bias": [7], "mean": [16], "std": [16]}
    config = json.loads((run / "head.json").read_text())
    assert (config["dim"], config["method"], config["model"], config["classes"]) == (16, "linear", "synthetic",
                                                                                    list(CLASSES))
    for f in run.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"


def test_evaluate_reproduces_fit(easy, tmp_path):
    cache, run = easy
    fitted = json.loads((run / "metrics.json").read_text())
    report = evaluate(cache, run, out=tmp_path)
    assert report["accuracy"] == fitted["test_accuracy"] and report["confusion"] == fitted["confusion"]
    assert report["public_test_accuracy"] == fitted["public_test_accuracy"]
    assert np.array(report["confusion"]).sum() == report["count"] == 1400
    assert json.loads((tmp_path / "evaluate-test.json").read_text())["macro_f1"] == fitted["macro_f1"]
    assert (tmp_path / "confusion-test.png").exists()
    half = evaluate(cache, run, split="public_test", out=tmp_path)
    assert half["accuracy"] == fitted["public_test_accuracy"] and half["count"] == 700


def test_evaluate_refuses_another_model_or_dimension(easy, tmp_path):
    _, run = easy
    with pytest.raises(UserError, match="model 'other' vs 'synthetic'"):
        evaluate(write_cache(tmp_path / "other.h5", model="other", n=70), run)
    with pytest.raises(UserError, match="8-d features.*16-d"):
        evaluate(write_cache(tmp_path / "narrow.h5", dim=8, n=70), run)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model) -> Path:
    """A head fitted through `fercache run` on a tiny random CLIP over a small FER2013 zip."""
    folder = tmp_path_factory.mktemp("tiny")
    result = run_tiny(folder, tiny_model, {"train": 21, "test": 14}, epochs=3)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "head.safetensors" in result.output
    assert len(json.loads((folder / "run" / "metrics.json").read_text())["history"]) == 3
    return folder / "run"


def test_predict_any_image_through_the_cli(tiny_run, tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    gray = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(gray)
    colour = tmp_path / "colour.jpg"
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(colour)
    done = cli("predict", "--head", str(tiny_run), str(gray), str(colour), "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["image"] for r in results] == [str(gray), str(colour)]

    # The same numbers by hand: the readers' 48x48 gray, stage one's encoder, the saved head.
    from fercache.encoder import load_encoder

    pixels = np.stack([to_gray48(Image.open(p))[0] for p in (gray, colour)])
    head = Head.load(tiny_run)
    probs = head.predict_proba(load_encoder(str(tiny_model), "clip", "cpu", "float32").encode(pixels)["embeddings"])
    for r, p in zip(results, probs):
        assert list(r["probs"]) == list(CLASSES) and r["label"] == CLASSES[int(p.argmax())]
        assert np.allclose(list(r["probs"].values()), p, atol=1e-5)


def test_detect_face_without_a_face_warns_and_still_predicts(tiny_run, tmp_path):
    from fercache.predict import predict

    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (120, 80), (200, 180, 160)).save(blank)
    with pytest.warns(FERCacheWarning, match="blank.jpg: no face found"):
        [found] = predict(tiny_run, [blank], device="cpu", detect_face=True)
    [whole] = predict(tiny_run, [blank], device="cpu")
    assert found["probs"] == pytest.approx(whole["probs"])


def test_user_errors_are_one_line_and_exit_2(easy, tiny_run, tmp_path):
    cache, run = easy
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "head.json").write_text("{")
    (tmp_path / "broken" / "head.safetensors").write_bytes(b"junk")
    only_train = write_cache(tmp_path / "train-only.h5", n=70, splits=("train",))
    cases = {
        ("fit", "--cache", str(tmp_path / "missing.h5")): "no such cache; make it with `fercache extract`",
        ("fit", "--cache", str(only_train)): "split 'test' is not in this cache",
        ("fit", "--cache", str(cache), "--layer", "3"): "layer 3 is not stored",
        ("evaluate", "--cache", str(cache), "--head", str(tiny_run)): "the head was fitted on features of another encoder",
        ("evaluate", "--cache", str(cache), "--head", str(tmp_path)): "not a head folder",
        ("evaluate", "--cache", str(cache), "--head", str(tmp_path / "broken")): "broken head",
        ("predict", "--head", str(tiny_run), str(tmp_path / "notes.png")): "notes.png: not a readable image",
        ("predict", "--head", str(tiny_run), str(tmp_path / "nowhere.jpg")): "nowhere.jpg: not a readable image",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(app, list(args))
        assert isinstance(result.exception, UserError), (args, result.output)
        assert message in str(result.exception) and "\n" not in str(result.exception), args
    done = cli("predict", "--head", str(run), str(tmp_path / "notes.png"))  # the entry point: exit 2, one line
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "notes.png: not a readable image" in done.stderr


# --- issue 11: trustworthy figures ------------------------------------------------------------


def test_run_carries_intervals_balanced_accuracy_predictions_and_a_self_contained_report(easy):
    from fercache.fit import read_predictions

    cache, run = easy
    m = json.loads((run / "metrics.json").read_text())
    for key in ("test_accuracy", "macro_f1", "balanced_accuracy", "public_test_accuracy", "private_test_accuracy",
                "public_test_macro_f1", "private_test_macro_f1"):
        assert m[f"{key}_low"] <= m[key] <= m[f"{key}_high"], key
    recalls = [r["recall"] for r in m["per_class"].values()]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert 0 <= m["calibration"]["ece"] <= 1 and (m["val"], m["test_split"]) == ("train", "test")
    p = read_predictions(run / "predictions.csv")
    X_test, y_test, ids, *_ = load_embeddings(cache, "test")
    assert p["id"] == ids and np.array_equal(p["label"], y_test)
    assert np.array_equal(p["predicted"], Head.load(run).predict(X_test))
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # confusion, curves, reliability; no faces: no source
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert f"{m['test_accuracy']:.4f}" in page and f"{m['test_accuracy_low']:.4f}" in page
    assert "is not at hand" in page  # the gallery says why it shows no faces


def test_logreg_with_a_missing_class_saves_seven_rows_that_evaluate_loads(tmp_path):
    cache = tmp_path / "gaps.h5"
    meta = cache_meta(Identity("synthetic", "none", "synthetic", "float32", image_size=48, source="s"), 8)
    X, y = synthetic(420, 8, 3.0, seed=0)
    keep = (y != 1) & ((y != 5) | (np.arange(420) == 5))  # no disgust, one surprise: as a --limit can make
    write_split(cache, "train", meta, [f"train/{j}" for j in range(keep.sum())], y[keep], ["train"] * keep.sum(),
                {"embeddings": X[keep]})
    X_test, y_test = synthetic(140, 8, 3.0, seed=1)
    write_split(cache, "test", meta, [f"test/{j}" for j in range(140)], y_test, ["public_test", "private_test"] * 70,
                {"embeddings": X_test})
    result = CliRunner().invoke(app, ["fit", "--cache", str(cache), "--method", "logreg", "--out", str(tmp_path / "r")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "95% bootstrap intervals" in result.output and "chosen C" in result.output
    head = Head.load(tmp_path / "r")
    assert head.weight.shape == (7, 8) and head.bias.shape == (7,)
    report = evaluate(cache, tmp_path / "r", out=tmp_path)
    assert report["count"] == 140 and report["per_class"]["disgust"]["recall"] == 0.0
    assert report["accuracy"] == pytest.approx(json.loads((tmp_path / "r" / "metrics.json").read_text())["test_accuracy"])
    assert report["accuracy_low"] <= report["accuracy"] <= report["accuracy_high"] and "balanced_accuracy" in report


def test_val_public_test_chooses_on_publictest_and_reports_on_privatetest(tmp_path):
    cache = write_cache(tmp_path / "c.h5", n=1400, sep=0.4)
    m = fit(cache, method="logreg", val="public_test", out=tmp_path / "run", plots=False).metrics
    assert (m["val"], m["test_split"], m["test_count"], m["logreg"]["val_count"]) == ("public_test", "private_test",
                                                                                       350, 350)
    X_val, y_val = load_embeddings(cache, "public_test")[:2]
    chosen = next(r for r in m["logreg"]["validation"] if r["C"] == m["logreg"]["C"])
    assert Head.load(tmp_path / "run").score(X_val, y_val)[1] == pytest.approx(chosen["val_acc"])
    assert m["private_test_accuracy"] == m["test_accuracy"] and m["public_test_accuracy"] is None


def test_few_shot_fits_k_faces_per_class_n_times(tmp_path):
    cache = write_cache(tmp_path / "c.h5", n=1400, sep=0.6)
    m = fit(cache, shots=4, repeats=3, out=tmp_path / "run", plots=False).metrics
    fs = m["few_shot"]
    assert m["train_count"] == 28 and (fs["shots"], fs["repeats"], len(fs["runs"])) == (4, 3, 3)
    assert fs["accuracy_mean"] == pytest.approx(np.mean(fs["runs"]))
    assert fs["accuracy_std"] == pytest.approx(np.std(fs["runs"], ddof=1)) and fs["accuracy_std"] > 0
    assert m["test_accuracy"] == fs["runs"][0]  # the folder keeps the first draw's head
    with pytest.raises(UserError, match="--shots must be at least 1"):
        fit(cache, shots=0, out=tmp_path / "no")


def test_balanced_class_weight_lifts_the_rare_class_for_both_methods(tmp_path):
    X, y = synthetic(2800, 16, 0.35, seed=0)
    rare = (y != 1) | (np.arange(2800) % 70 == 1)  # disgust: 1 row in 10 of the others' share
    X_test, y_test = synthetic(1400, 16, 0.35, seed=1)
    for method in ("linear", "logreg"):
        recall = {}
        for weight in ("none", "balanced"):
            if method == "linear":
                head, _ = fit_linear(X[rare], y[rare], class_weight=weight)
            else:
                head, _ = fit_logreg(X[rare], y[rare], class_weight=weight)
            recall[weight] = np.mean(head.predict(X_test)[y_test == 1] == 1)
        assert recall["balanced"] > recall["none"] + 0.2, (method, recall)


def test_report_shows_the_most_confident_mistakes_as_faces_from_the_source(tiny_run):
    from fercache.fit import read_predictions

    page = (tiny_run / "report.html").read_text()
    p = read_predictions(tiny_run / "predictions.csv")
    mistakes = int((p["label"] != p["predicted"]).sum())
    assert mistakes > 0 and "is not at hand" not in page
    assert page.count("data:image/png;base64,") == 3 + min(mistakes, 24)  # three figures, one face per mistake
    wrong = [i for i, (a, b) in enumerate(zip(p["label"], p["predicted"])) if a != b]
    assert all(f'alt="{p["id"][i]}"' in page for i in wrong[:24])


def test_linear_head_never_predicts_a_class_without_training_rows():
    X, y = synthetic(700, 12, 2.0, seed=0)
    keep = y != 1  # no disgust, as a --limit can leave it out
    head, _ = fit_linear(X[keep], y[keep], epochs=3)
    far, _ = synthetic(500, 12, 30.0, seed=1)  # faces far from every training row
    assert head.weight.shape == (7, 12) and not head.weight[1].any()
    assert head.predict_proba(far)[:, 1].max() == 0 and (head.predict(far) != 1).all()
    assert np.isfinite(head.score(X, y)[0])  # a disgust face costs a large but finite loss


def test_curves_under_balanced_weights_draw_what_chose_c(tmp_path, monkeypatch):
    """C is chosen on balanced accuracy then: curves.png must draw that, not plain accuracy."""
    from matplotlib.axes import Axes

    drawn = []
    real = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar",
                        lambda self, x, y, *a, **k: (drawn.append((list(y), k)), real(self, x, y, *a, **k))[1])
    cache = write_cache(tmp_path / "c.h5", n=700, sep=0.5)
    m = fit(cache, method="logreg", class_weight="balanced", out=tmp_path / "run").metrics
    curve = m["logreg"]["validation"]
    assert (tmp_path / "run" / "curves.png").is_file() and m["logreg"]["criterion"] == "val_bacc"
    by_label = {k["label"]: (y, k["yerr"]) for y, k in drawn}
    assert set(by_label) == {"validation loss ± 1 SE", "validation balanced accuracy ± 1 SE"}
    assert by_label["validation balanced accuracy ± 1 SE"] == ([r["val_bacc"] for r in curve],
                                                                         [r["val_bacc_se"] for r in curve])
    assert by_label["validation loss ± 1 SE"] == ([r["val_loss"] for r in curve], [r["val_loss_se"] for r in curve])
