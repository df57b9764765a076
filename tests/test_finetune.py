"""Stage three: the tuned top blocks are exact, resumable, safe to load, and learn on real labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import fake_faces, random_clip, save_tiny_clip
from fercache import finetune as ft
from fercache.encoder import load_encoder
from fercache.errors import UserError
from fercache.finetune import Settings, Split, TopModel, Tower, augment, load_tuned, tokens_of, tune


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: thread hand-offs cost more than they save (and the CI's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip3(tmp_path_factory):
    """A 3-block tiny CLIP and its encoder (float32, CPU)."""
    folder = save_tiny_clip(tmp_path_factory.mktemp("clip3"), image_size=64, layers=3)
    return folder, load_encoder(str(folder), "clip", "cpu", "float32")


def splits(encoder, first: int | None, n_train: int = 84, n_test: int = 28) -> tuple[Split, Split]:
    """Fake faces as tokens entering block first+1 (or as faces when `first` is None)."""
    (px, y), (pt, yt) = fake_faces(n_train, 0), fake_faces(n_test, 1)
    x, xt = (px, pt) if first is None else (tokens_of(encoder, px, first).astype(np.float16),
                                            tokens_of(encoder, pt, first).astype(np.float16))
    return (Split(x, y, [f"train/{i}" for i in range(n_train)], ["train"] * n_train),
            Split(xt, yt, [f"test/{i}" for i in range(n_test)], ["public_test", "private_test"] * (n_test // 2)))


def tiny_towers():
    """One random model per family fercache tunes: CLIP, SigLIP (attention-pooling head), DINOv2, ViT."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SiglipVisionConfig,
                              SiglipVisionModel, ViTConfig, ViTModel)

    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                patch_size=8)
    torch.manual_seed(0)
    return {"clip": CLIPVisionModel(CLIPVisionConfig(**size)), "siglip": SiglipVisionModel(SiglipVisionConfig(**size)),
            "dinov2": Dinov2Model(Dinov2Config(**size)), "vit": ViTModel(ViTConfig(**size), add_pooling_layer=False)}


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2", "vit"])
def test_lower_and_top_split_the_model_exactly(family):
    model = tiny_towers()[family].eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        tower = Tower.of(model)
        for first in range(tower.depth + 1):
            tokens = tower.lower(x, first)
            assert torch.equal(tokens, out.hidden_states[first])
            top = TopModel(tower, first).eval()
            pooled = out.pooler_output if out.pooler_output is not None else model.layernorm(out.last_hidden_state)[:, 0]
            torch.testing.assert_close(top.pooled(tokens), pooled, rtol=1e-5, atol=1e-5)


def test_token_path_equals_the_full_model_with_the_tuned_weights(clip3, tmp_path):
    from safetensors.torch import load_file, save_file

    from fercache.families import pooled

    folder, encoder = clip3
    train, test = splits(encoder, first=1)
    result = tune(encoder, train, test, Settings(blocks=2, epochs=2, lr=1e-3, batch_size=16), tmp_path / "run",
                  device="cpu", progress=False)
    config = json.loads((tmp_path / "run" / "tuned.json").read_text())
    assert config["encoder"]["model"] == str(folder) and "model_revision" in config["encoder"]
    chosen = max(result.history, key=lambda r: (r["val_acc"], -r["val_loss"]))  # the first best: ties go to the earlier
    assert (config["first_block"], config["blocks"], config["best_epoch"]) == (1, [2, 3], chosen["epoch"])
    assert config["tokens_dtype"] == "float32" and config["probe"]["val_acc"] == result.history[0]["val_acc"]
    names = set(load_file(tmp_path / "run" / "tuned.safetensors"))
    assert {"classifier.weight", "classifier.bias", "post_layernorm.weight", "encoder.layers.1.mlp.fc1.weight"} <= names
    assert not any(n.startswith("encoder.layers.0.") or n.startswith("embeddings.") for n in names)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tuned.json", "tuned.safetensors"]  # checkpoint gone
    assert [r["epoch"] for r in result.history] == [0, 1, 2]  # 0: the start, the probe
    assert set(result.history[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"}

    saved = load_file(tmp_path / "run" / "tuned.safetensors")  # every tuned tensor moved: all must be swapped in
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in saved.items()}, tmp_path / "run" / "tuned.safetensors")
    tuned = load_tuned(tmp_path / "run", device="cpu")
    faces = fake_faces(10, 7)[0]
    from_tokens = tuned.logits_from_tokens(tokens_of(encoder, faces, 1))
    np.testing.assert_allclose(from_tokens, tuned.logits_from_pixels(faces), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the whole base model, tuned tensors swapped in, end to end
        out = tuned.encoder.model(pixel_values=tuned.encoder.prep(faces))
        whole = tuned.top.classifier(pooled(tuned.encoder.family, out)).numpy()
    np.testing.assert_allclose(from_tokens, whole, rtol=1e-5, atol=1e-5)
    base = load_encoder(str(folder), "clip", "cpu", "float32").model.state_dict()
    swapped = tuned.encoder.model.state_dict()
    assert not torch.equal(base["encoder.layers.2.mlp.fc1.weight"], swapped["encoder.layers.2.mlp.fc1.weight"])
    assert torch.equal(base["encoder.layers.0.mlp.fc1.weight"], swapped["encoder.layers.0.mlp.fc1.weight"])


@pytest.mark.parametrize("family, processor", [
    ("siglip", dict(cls="SiglipImageProcessor", size={"height": 32, "width": 32})),
    ("dinov2", dict(cls="BitImageProcessor", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
    ("vit", dict(cls="ViTImageProcessor", size={"height": 32, "width": 32})),
])
def test_a_tuned_run_of_every_family_gives_the_logits_its_tokens_give(family, processor, tmp_path):
    import transformers

    tiny_towers()[family].save_pretrained(tmp_path / "model")
    getattr(transformers, processor.pop("cls"))(**processor).save_pretrained(tmp_path / "model")
    encoder = load_encoder(str(tmp_path / "model"), "clip", "cpu", "float32")
    train, test = splits(encoder, first=1, n_train=42, n_test=14)
    tune(encoder, train, test, Settings(blocks=2, epochs=1, lr=1e-3, batch_size=16), tmp_path / "run",
         device="cpu", progress=False)
    tuned = load_tuned(tmp_path / "run", device="cpu")
    faces = fake_faces(6, 3)[0]
    np.testing.assert_allclose(tuned.logits_from_tokens(tokens_of(encoder, faces, 1)), tuned.logits_from_pixels(faces),
                               rtol=1e-5, atol=1e-5)


def test_transformers_4_is_a_one_line_error(clip3, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.56.0")
    with pytest.raises(UserError, match=r"stage three needs transformers 5 or newer \(this is 4.56.0\)"):
        Tower.of(clip3[1].model)


def test_interrupted_run_resumes_to_the_same_weights(clip3, tmp_path, monkeypatch):
    _, encoder = clip3
    train, test = splits(encoder, first=1)
    settings = Settings(blocks=2, epochs=3, lr=1e-3, batch_size=16, patience=3, label_smoothing=0.1)
    whole = tune(encoder, train, test, settings, tmp_path / "whole", device="cpu", progress=False)

    real_save = ft.save_checkpoint

    def save_then_die(path, model, opt, best, gen, state):
        real_save(path, model, opt, best, gen, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # as Ctrl-C or a kill right after epoch 1's checkpoint

    monkeypatch.setattr(ft, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tune(encoder, train, test, settings, tmp_path / "cut", device="cpu", progress=False)
    assert (tmp_path / "cut" / "checkpoint.safetensors").exists() and not (tmp_path / "cut" / "tuned.json").exists()
    monkeypatch.setattr(ft, "save_checkpoint", real_save)
    with pytest.raises(UserError, match="checkpoint of another run \\(settings differ\\)"):
        tune(encoder, train, test, Settings(**{**settings.__dict__, "lr": 2e-3}), tmp_path / "cut", device="cpu",
             progress=False)
    torch.manual_seed(123)  # the resumed run restores every generator it uses from the checkpoint
    resumed = tune(encoder, train, test, settings, tmp_path / "cut", device="cpu", progress=False)
    assert resumed.resumed_from == 1 and resumed.history == whole.history
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / "tuned.safetensors"), load_file(tmp_path / "cut" / "tuned.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_from_images_tunes_every_block_with_augmentation(clip3, tmp_path):
    _, encoder = clip3
    train, test = splits(encoder, first=None, n_train=42, n_test=14)
    result = tune(encoder, train, test, Settings(blocks=3, epochs=2, lr=1e-3, batch_size=16, from_images=True,
                                                 val="public_test"), tmp_path / "run", device="cpu", progress=False)
    assert len(result.history) == 3 and result.test_logits.shape == (7, 7)  # PrivateTest: every other test face
    config = json.loads((tmp_path / "run" / "tuned.json").read_text())
    assert config["blocks"] == [1, 2, 3] and config["settings"]["from_images"] is True
    tuned = load_tuned(tmp_path / "run", device="cpu")
    np.testing.assert_allclose(tuned.logits_from_pixels(test.x[1::2]), result.test_logits, rtol=1e-5, atol=1e-5)


def test_augmentation_crops_flips_and_rotates_whole_batches():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    plain = augment(x, gen, scale=(1, 1), ratio=(1, 1), degrees=0)  # only the flip is left to chance
    for out, src in zip(plain, x):
        assert torch.allclose(out, src, atol=1e-4) or torch.allclose(out, src.flip(-1), atol=1e-4)
    flips = [bool(torch.allclose(augment(x[:1], gen, (1, 1), (1, 1), 0), x[:1].flip(-1), atol=1e-4)) for _ in range(40)]
    assert 5 < sum(flips) < 35
    a = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(3))) and not torch.equal(a, x)
    assert a.shape == x.shape


def test_schedule_and_layerwise_learning_rates(clip3):
    s = Settings(blocks=2, warmup=0.1)
    factors = [s.lr_factor(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] < 0.001
    assert factors[55] == pytest.approx(0.5) and factors[40] == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))
    top = TopModel(Tower.of(clip3[1].model), first=1)
    groups = top.param_groups(lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert lr_of[id(top.classifier.weight)] == (1.0, 0.05) and lr_of[id(top.norm.weight)] == (1.0, 0.0)
    assert lr_of[id(top.blocks[1].mlp.fc1.weight)] == (0.5, 0.05)  # the top block
    assert lr_of[id(top.blocks[0].mlp.fc1.weight)] == (0.25, 0.05) and lr_of[id(top.blocks[0].mlp.fc1.bias)][1] == 0
    assert len(lr_of) == len(list(top.parameters()))


def test_validation_is_never_test():
    y = np.arange(700) % 7
    train = Split(np.zeros((700, 1)), y, [f"train/{i}" for i in range(700)], ["train"] * 700)
    test = Split(np.zeros((70, 1)), y[:70], [f"test/{i}" for i in range(70)], ["public_test", "private_test"] * 35)
    parts = ft.choose_parts(train, test, "train", seed=0)
    fit_rows, val_rows = parts["fit"][1], parts["val"][1]
    assert parts["val"][0] is train and not set(fit_rows) & set(val_rows) and len(fit_rows) + len(val_rows) == 700
    assert np.bincount(y[val_rows]).tolist() == [10] * 7  # stratified: 10% of each class
    parts = ft.choose_parts(train, test, "public_test", seed=0)
    assert parts["val"][0] is test and parts["test"][0] is test and len(parts["fit"][1]) == 700
    assert {test.usage[i] for i in parts["val"][1]} == {"public_test"}
    assert {test.usage[i] for i in parts["test"][1]} == {"private_test"}
    with pytest.raises(UserError, match="unknown --val 'test'"):
        ft.choose_parts(train, test, "test", seed=0)
    few = Split(np.zeros((28, 1)), y[:28], train.ids[:28], train.usage[:28])  # 4 faces a class: 10% rounds to 0
    with pytest.raises(UserError, match="--val train leaves no faces to validate on"):
        ft.choose_parts(few, test, "train", seed=0)


def test_bad_settings_and_models_are_one_line_errors(clip3, tmp_path):
    _, encoder = clip3
    train, test = splits(encoder, first=None, n_train=21, n_test=14)
    cases = {Settings(blocks=4): "--blocks 4: model '.*' has 3 blocks",
             Settings(blocks=1, dtype="float16"): "--dtype float16: training runs in float32 or bfloat16",
             Settings(blocks=1, epochs=0): "--epochs must be at least 1",
             Settings(blocks=1, layer_decay=0): "0 < --layer-decay <= 1"}
    for settings, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            tune(encoder, train, test, settings, tmp_path / "run", device="cpu", progress=False)
        assert "\n" not in str(err.value)
    from transformers import ResNetConfig, ResNetModel

    with pytest.raises(UserError, match="not a ViT-like tower"):
        Tower.of(ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])), "model 'r'")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tuned.json").write_text("{")
    (tmp_path / "broken" / "tuned.safetensors").write_bytes(b"junk")
    for folder, message in ((tmp_path, "not a tuned run"), (tmp_path / "broken", "broken tuned run")):
        with pytest.raises(UserError, match=message):
            load_tuned(folder, device="cpu")


def test_tuning_the_top_block_beats_the_probe_on_real_labels(real_zip, tmp_path):
    """A random-weight tiny CLIP on real FER2013 faces: its top block, tuned, beats a linear probe
    of its pooled feature on held-out training faces (the full measurement is bench/finetune.py).

    Position embeddings are drawn at the scale of the patch embeddings, as trained ViTs have them:
    at CLIP's init scale (std 0.02) a random tower hands its top block a bag of patches.
    """
    from fercache.data import load_images
    from fercache.heads import fit_linear

    folder = random_clip(tmp_path / "model")
    encoder = load_encoder(str(folder), "clip", "cpu", "float32")
    faces = load_images(real_zip, "train", limit=8000)
    n = 6000  # fit and choose on the first 6,000, score on the next 2,000
    pooled = np.concatenate([encoder.encode(faces.pixels[i:i + 500])["embeddings"] for i in range(0, 8000, 500)])
    _, history = fit_linear(pooled[:n], faces.labels[:n], pooled[n:], faces.labels[n:], epochs=50)
    probe = max(r["test_acc"] for r in history)  # the probe's best epoch, judged on the held-out faces: generous
    tokens = tokens_of(encoder, faces.pixels, first=1).astype(np.float16)
    part = lambda s: Split(tokens[s], faces.labels[s], faces.ids[s], faces.usage[s])  # noqa: E731
    result = tune(encoder, part(slice(0, n)), part(slice(n, None)),
                  Settings(blocks=1, epochs=6, lr=2e-3, batch_size=32, layer_decay=1.0), tmp_path / "run",
                  device="cpu", progress=False)
    tuned = float((result.test_logits.argmax(1) == faces.labels[n:]).mean())
    assert tuned > probe + 0.03, (tuned, probe)


def test_finetune_from_images_through_the_cli_is_a_first_class_run(fer_zip, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from conftest import cli
    from fercache.cli import app

    model = save_tiny_clip(tmp_path / "model", image_size=64, layers=2)
    args = ["finetune", "--from-images", "--data", str(fer_zip), "--model", str(model), "--blocks", "all",
            "--epochs", "2", "--lr", "1e-3", "--batch-size", "8", "--device", "cpu", "--dtype", "float32",
            "--val", "public_test", "--out", str(tmp_path / "run")]
    done = CliRunner().invoke(app, args, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert "epoch  train_loss  train_acc  val_loss  val_acc  test_loss  test_acc" in done.output  # fit's table
    assert "tuned.safetensors, tuned.json" in done.output and "chosen at epoch" in done.output
    run = tmp_path / "run"
    for name in ("metrics.json", "history.csv", "confusion.png", "curves.png", "report.html", "predictions.csv",
                 "tuned.safetensors", "tuned.json"):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    assert (m["method"], m["blocks"], m["test_count"], len(m["history"])) == ("finetune-top2-images", [1, 2], 7, 3)
    assert np.array(m["confusion"]).sum() == 7 and m["model"] == str(model) and m["test_split"] == "private_test"
    assert m["private_test_accuracy"] == m["test_accuracy"] and (m["val_count"], m["train_count"]) == (7, 21)
    assert (run / "history.csv").read_text().splitlines()[0] == \
        "epoch,train_loss,train_acc,val_loss,val_acc,test_loss,test_acc"

    face = tmp_path / "face.png"
    Image.fromarray(fake_faces(1, 5)[0][0]).save(face)
    shown = cli("predict", "--head", str(run), str(face), "--json", "--device", "cpu")
    assert shown.returncode == 0, shown.stderr
    [result] = json.loads(shown.stdout)
    expected = load_tuned(run, device="cpu").logits_from_pixels(fake_faces(1, 5)[0])[0]
    probs = np.exp(expected - expected.max())
    np.testing.assert_allclose(list(result["probs"].values()), probs / probs.sum(), atol=1e-5)

    listed = CliRunner().invoke(app, ["compare", str(run), "--json"], catch_exceptions=False)
    assert json.loads(listed.stdout)["runs"][0]["method"] == "finetune-top2-images"

    again = cli(*args[:-2], "--val", "test", "--out", str(tmp_path / "other"))
    assert again.returncode == 2 and again.stderr.strip() == \
        "fercache: error: unknown --val 'test': choose one of train, public_test"


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    """A tiny 3-block CLIP's cache of a small FER2013 zip with the tokens entering block 2 (`--tokens 1`)."""
    import zipfile

    from conftest import make_fer_layout
    from fercache.extract import extract

    folder = tmp_path_factory.mktemp("tokens")
    with zipfile.ZipFile(folder / "fer.zip", "w") as z:
        for name, (data, _, _) in make_fer_layout({"train": 70, "test": 28}).items():
            z.writestr(name, data)
    model = save_tiny_clip(folder / "model", image_size=64, layers=3)
    extract(folder / "fer.zip", "all", str(model), "clip", "cpu", "float32", batch_size=16, cache=folder / "c.h5",
            tokens=1, progress=False)
    return folder / "fer.zip", model, folder / "c.h5"


def test_extract_tokens_stores_the_tokens_entering_the_next_block(token_cache, tmp_path):
    import fercache
    from fercache.cache import read_identity
    from fercache.data import load_images
    from fercache.extract import extract

    data, model, cache = token_cache
    t = fercache.load_tokens(cache, "train")
    assert t.X.dtype == np.float16 and t.X.shape == (70, 5, 32)  # 4 patches of 32x32 in 64x64, and the CLS token
    faces = load_images(data, "train")
    assert t.ids == faces.ids and np.array_equal(t.y, faces.labels)
    expected = tokens_of(load_encoder(str(model), "clip", "cpu", "float32"), faces.pixels, 1)
    np.testing.assert_array_equal(t.X, expected.astype(np.float16))  # float32 tokens, rounded once
    assert read_identity(cache).tokens == 1 and len(fercache.load_tokens(cache, "private_test").ids) == 14
    assert fercache.load_embeddings(cache, "test").X.shape == (28, 32)  # the pooled feature as ever
    args = dict(model=str(model), device="cpu", dtype="float32", cache=cache, progress=False)
    assert extract(data, "train", tokens=1, **args)[0].skipped  # complete and matching: skipped
    for tokens, message in ((2, "tokens 1 vs 2"), (None, "tokens 1 vs None")):
        with pytest.raises(UserError, match=message):
            extract(data, "train", tokens=tokens, **args)
    with pytest.raises(UserError, match="--tokens 3: model '.*' has blocks 1 to 3; tokens 0 to 2"):
        extract(data, "train", tokens=3, **{**args, "cache": tmp_path / "x.h5"})
    plain = tmp_path / "plain.h5"
    extract(data, "train", **{**args, "cache": plain})
    with pytest.raises(UserError, match="no tokens stored.*extract --tokens"):
        fercache.load_tokens(plain, "train")


def test_tokens_that_overflow_float16_are_refused(fer_zip, tmp_path):
    from transformers import CLIPVisionModel

    from fercache.extract import extract

    model = save_tiny_clip(tmp_path / "model", image_size=64, layers=2)
    net = CLIPVisionModel.from_pretrained(model)
    with torch.no_grad():
        net.encoder.layers[0].mlp.fc2.weight.mul_(1e6)  # block 1's output far beyond float16's 65,504
    net.save_pretrained(model)
    with pytest.raises(UserError, match="tokens .* exceed float16's range") as err:
        extract(fer_zip, "train", str(model), "clip", "cpu", "float32", cache=tmp_path / "c.h5", tokens=1,
                progress=False)
    assert "\n" not in str(err.value)


def test_finetune_from_a_token_cache_through_the_cli(token_cache, tmp_path):
    from typer.testing import CliRunner

    from conftest import cli
    from fercache.cli import app

    data, model, cache = token_cache
    run = tmp_path / "run"
    done = CliRunner().invoke(app, ["finetune", "--cache", str(cache), "--epochs", "2", "--lr", "1e-3",
                                    "--batch-size", "16", "--device", "cpu", "--dtype", "float32",
                                    "--val", "public_test", "--out", str(run)], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    m = json.loads((run / "metrics.json").read_text())
    assert (m["method"], m["blocks"], m["test_count"], m["from_images"]) == ("finetune-top2", [2, 3], 14, False)
    scored = CliRunner().invoke(app, ["evaluate", "--head", str(run), "--cache", str(cache), "--split",
                                      "private_test", "--json"], catch_exceptions=False)
    report = json.loads(scored.stdout)
    assert report["accuracy"] == m["test_accuracy"] and report["confusion"] == m["confusion"]
    assert report["loss"] == m["test_loss"]  # both in float32, in the same batches

    other = save_tiny_clip(tmp_path / "other", image_size=64, layers=3, seed=1)
    from fercache.extract import extract

    extract(data, "test", str(other), "clip", "cpu", "float32", cache=tmp_path / "other.h5", tokens=1,
            progress=False)
    extract(data, "test", str(model), "clip", "cpu", "float32", cache=tmp_path / "plain.h5", progress=False)
    cases = {
        ("finetune", "--cache", tmp_path / "plain.h5"): "no tokens stored; extract them with `fercache extract --tokens",
        ("finetune", "--cache", cache, "--blocks", "1"): "stores the tokens entering block 2 (--tokens 1): tune "
                                                        "--blocks 2 from it, or extract --tokens 2 for --blocks 1",
        ("evaluate", "--head", run, "--cache", tmp_path / "other.h5"): "was tuned from another encoder",
        ("evaluate", "--head", run, "--cache", tmp_path / "plain.h5"): "stores no tokens; ",
    }
    for args, message in cases.items():
        out = cli(*args, "--device", "cpu") if args[0] == "finetune" else cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.startswith("fercache: error:")]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr, (args, out.stderr)


def test_options_a_token_cache_fixes_are_refused_not_ignored(token_cache, tmp_path):
    for option in ({"limit": 5}, {"revision": "main"}, {"data": "elsewhere.zip"}):
        with pytest.raises(UserError, match=f"--{next(iter(option))}: for --from-images; a cache fixes"):
            ft.finetune(token_cache[2], out=tmp_path / "run", device="cpu", progress=False, **option)


def test_a_tuned_run_missing_a_tensor_is_refused_not_filled_from_the_base(clip3, tmp_path):
    from safetensors.torch import load_file, save_file

    _, encoder = clip3
    train, test = splits(encoder, first=2, n_train=42, n_test=14)
    tune(encoder, train, test, Settings(blocks=1, epochs=1, batch_size=16), tmp_path / "run", device="cpu",
         progress=False)
    tensors = load_file(tmp_path / "run" / "tuned.safetensors")
    dropped = next(k for k in tensors if k.endswith("mlp.fc1.weight"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / "run" / "tuned.safetensors")
    with pytest.raises(UserError, match=rf"broken tuned run \(1 tensor\(s\) missing .* e.g. {dropped}"):
        load_tuned(tmp_path / "run", device="cpu")


class ScriptedValidation:
    """Wraps `score_rows`: records every call's logits and, from a given epoch on, reports the
    scripted validation accuracy instead of the real one (above any real one), so that which epoch is
    best is fixed. Validation is a part of train here (`val="train"`): its rows are train's."""

    def __init__(self, monkeypatch, script: dict[int, float]):
        self.real = getattr(ft.score_rows, "real", ft.score_rows)  # the function itself, not an earlier wrapper
        self.script, self.epoch, self.test_logits = script, 1, {}
        monkeypatch.setattr(ft, "score_rows", self)

    def __call__(self, model, feed, split, rows):
        loss, acc, z = self.real(model, feed, split, rows)
        if split.usage[rows[0]] == "train":  # validation (epoch 0 is scored by the probe, never here)
            acc = self.script[self.epoch]
            self.epoch += 1
        else:
            self.test_logits.setdefault(self.epoch - 1, []).append(z)  # epoch e's test logits (and the final ones)
        return loss, acc, z


def test_the_best_epoch_before_the_last_is_restored_and_patience_stops(clip3, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _, encoder = clip3
    train, test = splits(encoder, first=1)
    scripted = ScriptedValidation(monkeypatch, {1: 2.0, 2: 3.0, 3: 2.5, 4: 2.5})
    settings = Settings(blocks=2, epochs=6, lr=1e-3, batch_size=16, patience=2)
    result = tune(encoder, train, test, settings, tmp_path / "run", device="cpu", progress=False)
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3, 4]  # 2 epochs without a better score: stopped
    assert result.best_epoch == 2 and json.loads((tmp_path / "run" / "tuned.json").read_text())["best_epoch"] == 2
    at = scripted.test_logits
    assert not np.array_equal(at[2][0], at[4][0])  # the weights moved after epoch 2
    np.testing.assert_array_equal(result.test_logits, at[2][0])  # the chosen weights are epoch 2's, not the last
    tokens = test.x  # all of test (val="train")
    np.testing.assert_array_equal(load_tuned(tmp_path / "run", device="cpu").logits_from_tokens(tokens), at[2][0])
    assert set(load_file(tmp_path / "run" / "tuned.safetensors")) == set(result.model.tuned_state())


def test_a_run_resumed_after_validation_stalled_stops_where_the_whole_run_stops(clip3, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _, encoder = clip3
    train, test = splits(encoder, first=1)
    script = {1: 2.0, 2: 3.0, 3: 2.5, 4: 2.5, 5: 9.0, 6: 9.0}  # epochs 5 and 6 would win, were they run
    settings = Settings(blocks=2, epochs=6, lr=1e-3, batch_size=16, patience=2)
    ScriptedValidation(monkeypatch, script)
    whole = tune(encoder, train, test, settings, tmp_path / "whole", device="cpu", progress=False)
    real_save = ft.save_checkpoint

    def save_then_die(path, model, opt, best, gen, state):
        real_save(path, model, opt, best, gen, state)
        if state["epoch"] == 3:  # validation has stalled for one epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_checkpoint", save_then_die)
    ScriptedValidation(monkeypatch, script)
    with pytest.raises(KeyboardInterrupt):
        tune(encoder, train, test, settings, tmp_path / "cut", device="cpu", progress=False)
    monkeypatch.setattr(ft, "save_checkpoint", real_save)
    ScriptedValidation(monkeypatch, script).epoch = 4
    resumed = tune(encoder, train, test, settings, tmp_path / "cut", device="cpu", progress=False)
    assert resumed.resumed_from == 3 and resumed.best_epoch == whole.best_epoch == 2
    assert resumed.history == whole.history and len(whole.history) == 5  # the stall's count survived the cut
    a, b = load_file(tmp_path / "whole" / "tuned.safetensors"), load_file(tmp_path / "cut" / "tuned.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_from_images_resumes_its_augmentation_bit_for_bit(clip3, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _, encoder = clip3
    train, test = splits(encoder, first=None, n_train=42, n_test=14)
    settings = Settings(blocks=1, epochs=3, lr=1e-3, batch_size=16, from_images=True, val="public_test")
    whole = tune(encoder, train, test, settings, tmp_path / "whole", device="cpu", progress=False)
    real_save = ft.save_checkpoint

    def save_then_die(path, model, opt, best, gen, state):
        real_save(path, model, opt, best, gen, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tune(encoder, train, test, settings, tmp_path / "cut", device="cpu", progress=False)
    monkeypatch.setattr(ft, "save_checkpoint", real_save)
    torch.manual_seed(7)
    resumed = tune(encoder, train, test, settings, tmp_path / "cut", device="cpu", progress=False)
    assert resumed.resumed_from == 1 and resumed.history == whole.history
    a, b = load_file(tmp_path / "whole" / "tuned.safetensors"), load_file(tmp_path / "cut" / "tuned.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = tune(encoder, train, test, Settings(**{**settings.__dict__, "augment": False}), tmp_path / "plain",
                 device="cpu", progress=False)
    assert plain.history[1]["train_loss"] != whole.history[1]["train_loss"]  # augmentation did change what it saw


def learnable(encoder, first: int, n_train: int = 140, n_test: int = 70) -> tuple[Split, Split]:
    """Fake faces whose brightness says their class, as tokens: a probe of the pooled feature learns them."""
    def faces(n, seed):
        noise, y = fake_faces(n, seed)
        return (y[:, None, None] * 16 + noise // 2).astype(np.uint8), y  # overlapping: logreg's C stays moderate

    (px, y), (pt, yt) = faces(n_train, 0), faces(n_test, 1)
    return (Split(tokens_of(encoder, px, first), y, [f"train/{i}" for i in range(n_train)], ["train"] * n_train),
            Split(tokens_of(encoder, pt, first), yt, [f"test/{i}" for i in range(n_test)], ["public_test"] * n_test))


def test_tuning_starts_from_the_probe_and_never_ends_below_it_on_validation(clip3, tmp_path):
    from fercache.logreg import fit_logreg

    _, encoder = clip3
    train, test = learnable(encoder, first=2)
    parts = ft.choose_parts(train, test, "train", seed=0)
    start = TopModel(Tower.of(encoder.model), 2).eval()
    with torch.no_grad():
        X, X_val = (start.pooled(torch.from_numpy(train.x[parts[k][1]])).numpy() for k in ("fit", "val"))
    probe, _ = fit_logreg(X, train.y[parts["fit"][1]], val=(X_val, train.y[parts["val"][1]]))
    probe_val = probe.score(X_val, train.y[parts["val"][1]])[1]
    assert probe_val > 0.5  # the probe learns brightness: there is something to lose
    for lr, folder in ((1e-3, "gentle"), (1.0, "wrecking")):
        result = tune(encoder, train, test, Settings(blocks=1, epochs=2, lr=lr, batch_size=16), tmp_path / folder,
                      device="cpu", progress=False)
        assert result.history[0]["val_acc"] == pytest.approx(probe_val, abs=1e-6)  # epoch 0: the probe (folded)
        chosen = result.history[result.best_epoch]
        assert chosen["val_acc"] >= result.history[0]["val_acc"]
    assert result.best_epoch == 0 and all(r["val_acc"] < probe_val for r in result.history[1:])  # lr 1 wrecks it
    np.testing.assert_allclose(result.test_logits, probe.logits(result.model.pooled(
        torch.from_numpy(test.x)).detach().numpy()), rtol=1e-4, atol=1e-4)  # the start restored: the probe


def test_finetune_scores_as_evaluate_does_under_bfloat16(token_cache, tmp_path):
    """bfloat16 autocast trains; validation and test are scored in float32, as `evaluate` scores,
    so `evaluate --head RUN` gives metrics.json's figures exactly."""
    from fercache.fit import evaluate

    _, _, cache = token_cache
    m = ft.finetune(cache, out=tmp_path / "run", device="cpu", dtype="bfloat16", epochs=2, lr=1e-3, batch_size=16,
                    val="public_test", plots=False, progress=False).metrics
    assert m["settings"]["dtype"] == "bfloat16" and m["tokens_dtype"] == "float32"
    report = evaluate(cache, tmp_path / "run", "private_test", plots=False)
    assert (report["accuracy"], report["loss"]) == (m["test_accuracy"], m["test_loss"])


def test_bfloat16_tokens_are_recorded_and_checked(token_cache, tmp_path):
    import fercache
    from fercache.data import load_images
    from fercache.extract import extract
    from fercache.fit import evaluate

    data, model, cache = token_cache
    bf16 = tmp_path / "bf16.h5"
    extract(data, "all", str(model), "clip", "cpu", "bfloat16", batch_size=16, cache=bf16, tokens=1, progress=False)
    m = ft.finetune(bf16, out=tmp_path / "run", device="cpu", epochs=1, batch_size=16, val="public_test",
                    plots=False, progress=False).metrics
    assert m["tokens_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "run" / "tuned.json").read_text())["tokens_dtype"] == "bfloat16"
    report = evaluate(bf16, tmp_path / "run", "private_test", plots=False)
    assert (report["accuracy"], report["loss"]) == (m["test_accuracy"], m["test_loss"])
    with pytest.raises(UserError, match="holds tokens computed in float32; .* tuned on tokens computed in bfloat16 "
                                        r"\(extract --dtype bfloat16\)") as err:
        evaluate(cache, tmp_path / "run", "private_test", plots=False)
    assert "\n" not in str(err.value)
    tuned = load_tuned(tmp_path / "run", device="cpu")  # its lower blocks compute in bfloat16, as extract's did
    assert next(tuned.encoder.model.parameters()).dtype == torch.bfloat16
    assert next(tuned.top.parameters()).dtype == torch.float32
    faces = load_images(data, "test")
    np.testing.assert_allclose(tuned.logits_from_pixels(faces.pixels),
                               tuned.logits_from_tokens(fercache.load_tokens(bf16, "test").X), rtol=0, atol=2e-3)


# --- datasets without a split (CK+, JAFFE): subject-independent folds --------------------------------------


@pytest.fixture(scope="module")
def ck_tokens(tmp_path_factory, token_cache):
    """`token_cache`'s tiny CLIP's cache of a small CK+-like zip (6 subjects, 48 faces, split `all`
    with subjects) with the tokens entering block 2."""
    from test_datasets import ckplus_zip

    from fercache.extract import extract

    folder = tmp_path_factory.mktemp("ck-tokens")
    extract(ckplus_zip(folder), "all", str(token_cache[1]), "clip", "cpu", "float32", batch_size=16,
            cache=folder / "ck.h5", tokens=1, progress=False)
    return folder / "ck.h5"


FOLDS = dict(folds="3", epochs=2, lr=1e-3, batch_size=8, device="cpu", dtype="float32", plots=False, progress=False)


def test_finetune_over_folds_keeps_subjects_apart_pools_every_face_once_and_resumes(ck_tokens, tmp_path, monkeypatch):
    import csv

    from fercache.cache import load_subjects, load_tokens

    subject = dict(zip(load_tokens(ck_tokens, "all").ids, load_subjects(ck_tokens, "all")))
    calls = []  # (train ids, test ids, folder) of every `tune`
    real_tune, real_save = ft.tune, ft.save_checkpoint

    def recording_tune(encoder, train, test, settings, out, *args):
        calls.append((train.ids, test.ids, out.name))
        return real_tune(encoder, train, test, settings, out, *args)

    monkeypatch.setattr(ft, "tune", recording_tune)
    whole = ft.finetune(ck_tokens, out=tmp_path / "whole", **FOLDS).metrics
    assert [c[2] for c in calls] == ["fold-01", "fold-02", "fold-03"]
    for train_ids, test_ids, _ in calls:  # no person in both parts of a fold; validation is a part of train
        assert not {subject[i] for i in train_ids} & {subject[i] for i in test_ids}
    tested = [i for _, test_ids, _ in calls for i in test_ids]
    assert sorted(tested) == sorted(subject)  # every face held out exactly once

    f = whole["folds"]
    assert (f["count"], f["subjects"], len(f["per_fold"])) == (3, 6, 3)
    assert (whole["test_count"], whole["test_split"], whole["dataset"]) == (48, "all", "ckplus48")
    assert f["accuracy_mean"] == pytest.approx(np.mean([r["accuracy"] for r in f["per_fold"]]))
    assert f["accuracy_std"] == pytest.approx(np.std([r["accuracy"] for r in f["per_fold"]], ddof=1))
    for key in ("test_accuracy", "test_accuracy_low", "macro_f1", "balanced_accuracy", "calibration", "confusion",
                "blocks", "settings", "history", "macro_f1_mean", "balanced_accuracy_std"):
        assert key in whole or key in f, key
    assert all(r["val_count"] > 0 and not r["read_back"] for r in f["per_fold"]) and whole["settings"]["folds"] == "3"
    assert {h["fold"] for h in whole["history"]} == {1, 2, 3}
    with open(tmp_path / "whole" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["id"] for r in rows) == sorted(subject)  # pooled: every face predicted once, by its fold
    assert all(r["id"] in calls[int(r["fold"]) - 1][1] for r in rows)
    assert whole["test_accuracy"] == pytest.approx(np.mean([r["label"] == r["predicted"] for r in rows]))
    for k in (1, 2, 3):  # each fold is a tuned run of its own
        assert sorted(p.name for p in (tmp_path / "whole" / f"fold-0{k}").iterdir()) == [
            "fold.json", "tuned.json", "tuned.safetensors"]
    # fold 2's held-out faces are predicted by fold 2's tuned model, at the epoch chosen on its validation part
    tokens = load_tokens(ck_tokens, "all")
    held = [tokens.ids.index(i) for i in calls[1][1]]
    logits = load_tuned(tmp_path / "whole" / "fold-02", device="cpu").logits_from_tokens(tokens.X[held])
    proba = {r["id"]: [float(v) for k, v in r.items() if k.startswith("p_")] for r in rows}
    np.testing.assert_allclose([proba[i] for i in calls[1][1]], torch.softmax(torch.from_numpy(logits), 1), atol=2e-6)
    assert json.loads((tmp_path / "whole" / "fold-02" / "tuned.json").read_text())["best_epoch"] == \
        f["per_fold"][1]["best_epoch"]

    # interrupted in fold 2 after its first epoch: fold 1 is read back, fold 2 resumes, fold 3 is tuned
    def save_then_die(path, model, opt, best, gen, state):
        real_save(path, model, opt, best, gen, state)
        if path.parent.name == "fold-02" and state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_checkpoint", save_then_die)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(ck_tokens, out=tmp_path / "cut", **FOLDS)
    monkeypatch.setattr(ft, "save_checkpoint", real_save)
    calls.clear()
    cut = ft.finetune(ck_tokens, out=tmp_path / "cut", **FOLDS).metrics
    assert [c[2] for c in calls] == ["fold-02", "fold-03"]
    assert [(r["read_back"], r["resumed_from_epoch"]) for r in cut["folds"]["per_fold"]] == [(True, 0), (False, 1),
                                                                                            (False, 0)]
    same = (tmp_path / "whole" / "predictions.csv").read_text()
    assert (tmp_path / "cut" / "predictions.csv").read_text() == same  # as if never interrupted
    # a later fold's outputs removed: only that fold is tuned again
    import shutil

    shutil.rmtree(tmp_path / "cut" / "fold-03")
    calls.clear()
    again = ft.finetune(ck_tokens, out=tmp_path / "cut", **FOLDS).metrics
    assert [c[2] for c in calls] == ["fold-03"] and (tmp_path / "cut" / "predictions.csv").read_text() == same
    assert [r["read_back"] for r in again["folds"]["per_fold"]] == [True, True, False]
    calls.clear()
    ft.finetune(ck_tokens, out=tmp_path / "cut", restart=True, **FOLDS)
    assert len(calls) == 3  # --restart tunes every fold anew
    with pytest.raises(UserError, match=r"fold-01/fold.json is a fold of another run \(settings differ\); use another "
                                        "--out, or --restart") as err:
        ft.finetune(ck_tokens, out=tmp_path / "cut", **{**FOLDS, "lr": 2e-3})
    assert "\n" not in str(err.value)


def test_finetune_folds_through_the_cli_and_its_refusals(ck_tokens, token_cache, tmp_path):
    from conftest import cli

    run = tmp_path / "run"
    done = cli("finetune", "--cache", ck_tokens, "--folds", "subjects", "--epochs", "1", "--lr", "1e-3",
               "--batch-size", "8", "--device", "cpu", "--dtype", "float32", "--out", run)
    assert done.returncode == 0, done.stderr
    assert "6 subject-independent folds (6 subjects, --folds subjects)" in done.stdout
    assert "each fold's tuned model is in its fold-<k>/" in done.stdout and "fold-*/ (tuned.safetensors" in done.stdout
    assert "each fold chose its epoch on a stratified 10% of its training part" in done.stdout
    assert all((run / name).exists() for name in ("report.html", "confusion.png", "curves.png", "fold-06/tuned.json"))
    assert (run / "history.csv").read_text().splitlines()[0].startswith("fold,epoch,")
    cases = {
        (): "has no train/test split; cross-validate with --folds K or --folds subjects",
        ("--folds", "3", "--val", "public_test"): "--folds chooses inside each fold's training part",
        ("--folds", "3", "--from-images"): "--folds chooses inside each fold's training part",
        ("--folds", "9"): "--folds 9: choose 2 to 6",
    }
    for args, message in cases.items():
        out = cli("finetune", "--cache", ck_tokens, *args, "--device", "cpu", "--out", tmp_path / "bad")
        lines = [line for line in out.stderr.splitlines() if line.startswith("fercache: error:")]
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], (args, out.stderr)
    out = cli("finetune", "--cache", token_cache[2], "--folds", "3", "--device", "cpu", "--out", tmp_path / "bad")
    assert out.returncode == 2 and "--folds 3: " in out.stderr and "holds fer2013's train/test split" in out.stderr
