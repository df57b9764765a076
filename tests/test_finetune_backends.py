"""Stage three on OpenCLIP and timm towers: the split into lower and top is exact, and a tuned run
loads back into the library's own model.

The tiny random-weight models are `tests/test_openclip_timm.py`'s, saved as each library publishes
them and loaded through `load_encoder`; the reference is the library's own forward pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fake_faces
from fercache.encoder import load_encoder
from fercache.errors import UserError
from fercache.finetune import Settings, TopModel, Tower, finetune, load_tuned, tokens_of, tune
from test_finetune import one_thread, splits  # noqa: F401 (one_thread: an autouse fixture)
from test_openclip_timm import OPENCLIP, Reference, save_openclip, save_timm

TOWERS = ["openclip-vit-b-32", "openclip-siglip", "timm-vit", "timm-eva02"]  # SigLIP: a timm trunk, MAP pooling


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("towers")
    out = {f"openclip-{n}": save_openclip(root / f"openclip-{n}", OPENCLIP[n]) for n in ("vit-b-32", "siglip")}
    out.update({f"timm-{n}": save_timm(root / f"timm-{n}", n) for n in ("vit", "eva02", "convnext")})
    return out


def expected_names(tower, first: int) -> set[str]:
    """The base model's names of the blocks above `first` and of the head parts, and the new classifier."""
    base = tower.module.state_dict()
    top = {n for n in base if any(n.startswith(f"{tower.blocks_name}.{k}.") for k in range(first, tower.depth))
           or any(n == p or n.startswith(f"{p}.") for p in tower.head_parts)}
    return top | {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("name", TOWERS)
def test_lower_and_top_split_the_library_model_exactly(name, saved):
    ref = Reference(name, saved[name])
    encoder = load_encoder(str(saved[name]), "clip", "cpu", "float32")
    x = encoder.prep(fake_faces(3, 0)[0])
    pooled, blocks = ref.pooled(x), ref.blocks(x)  # the library's own forward and forward_intermediates
    tower = Tower.of(encoder.model)
    assert tower.depth == len(blocks)
    with torch.no_grad():
        for first in range(tower.depth + 1):
            tokens = tower.lower(x, first)
            if first:
                torch.testing.assert_close(tokens, blocks[first - 1], rtol=1e-5, atol=1e-5)
            top = TopModel(tower, first).eval()
            torch.testing.assert_close(top.pooled(tokens), pooled, rtol=1e-5, atol=1e-5)
            # the top holds the blocks above `first` and the head, under the base model's names: no stem
            assert set(top.tuned_state()) == expected_names(tower, first)


@pytest.mark.parametrize("name", TOWERS)
def test_a_tuned_library_run_gives_the_logits_its_tokens_and_its_library_give(name, saved, tmp_path):
    folder = saved[name]
    encoder = load_encoder(str(folder), "clip", "cpu", "float32")
    first = Tower.of(encoder.model).depth - 2
    train, test = splits(encoder, first=first, n_train=42, n_test=14)
    tune(encoder, train, test, Settings(blocks=2, epochs=1, lr=1e-3, batch_size=16), tmp_path / "run",
         device="cpu", progress=False)
    config = json.loads((tmp_path / "run" / "tuned.json").read_text())
    tower = Tower.of(encoder.model)
    assert config["parts"] == {"blocks": tower.blocks_name, "head": ""} and config["first_block"] == first
    saved_tensors = load_file(tmp_path / "run" / "tuned.safetensors")
    assert set(saved_tensors) == expected_names(tower, first)
    # every tuned tensor moved: each must be swapped into the base model for the logits below to agree
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in saved_tensors.items()},
              tmp_path / "run" / "tuned.safetensors")
    tuned = load_tuned(tmp_path / "run", device="cpu")
    faces = fake_faces(6, 3)[0]
    from_tokens = tuned.logits_from_tokens(tokens_of(encoder, faces, first))
    np.testing.assert_allclose(from_tokens, tuned.logits_from_pixels(faces), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the library's own forward (encode_image, forward_head) of the swapped base model
        whole = tuned.top.classifier(tuned.encoder.tower.pooled(tuned.encoder.prep(faces))).numpy()
    np.testing.assert_allclose(from_tokens, whole, rtol=1e-5, atol=1e-5)
    base = load_encoder(str(folder), "clip", "cpu", "float32").model.state_dict()
    swapped = tuned.encoder.model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], swapped[k])}
    assert changed == {k for k in saved_tensors if not k.startswith("classifier.")}  # the lower part untouched


def test_from_images_tunes_every_block_of_an_eva_with_its_rotary_embedding(saved, tmp_path):
    encoder = load_encoder(str(saved["timm-eva02"]), "clip", "cpu", "float32")
    train, test = splits(encoder, first=None, n_train=42, n_test=14)
    result = tune(encoder, train, test, Settings(blocks=3, epochs=1, lr=1e-3, batch_size=16, from_images=True),
                  tmp_path / "run", device="cpu", progress=False)
    config = json.loads((tmp_path / "run" / "tuned.json").read_text())
    assert (config["first_block"], config["blocks"]) == (0, [1, 2, 3]) and len(result.history) == 2
    tuned = load_tuned(tmp_path / "run", device="cpu")
    faces = fake_faces(6, 4)[0]
    with torch.no_grad():
        whole = tuned.top.classifier(tuned.encoder.tower.pooled(tuned.encoder.prep(faces))).numpy()
    np.testing.assert_allclose(tuned.logits_from_pixels(faces), whole, rtol=1e-5, atol=1e-5)


def test_an_openclip_run_tuned_from_a_token_cache_evaluates_and_predicts(saved, tmp_path):
    import zipfile

    from PIL import Image
    from typer.testing import CliRunner

    from conftest import make_fer_layout
    from fercache.cli import app
    from fercache.extract import extract

    with zipfile.ZipFile(tmp_path / "fer.zip", "w") as z:
        for member, (data, _, _) in make_fer_layout({"train": 56, "test": 28}).items():
            z.writestr(member, data)
    model = str(saved["openclip-vit-b-32"])
    extract(tmp_path / "fer.zip", "all", model, "clip", "cpu", "float32", batch_size=16, cache=tmp_path / "c.h5",
            tokens=1, progress=False)
    run, invoke = tmp_path / "run", CliRunner().invoke
    done = invoke(app, ["finetune", "--cache", str(tmp_path / "c.h5"), "--epochs", "1", "--lr", "1e-3",
                        "--batch-size", "16", "--device", "cpu", "--dtype", "float32", "--val", "public_test",
                        "--out", str(run)], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    m = json.loads((run / "metrics.json").read_text())
    assert (m["method"], m["blocks"], m["test_count"]) == ("finetune-top2", [2, 3], 14)
    scored = invoke(app, ["evaluate", "--head", str(run), "--cache", str(tmp_path / "c.h5"), "--split",
                          "private_test", "--json"], catch_exceptions=False)
    report = json.loads(scored.stdout)
    assert (report["accuracy"], report["loss"], report["confusion"]) == (m["test_accuracy"], m["test_loss"],
                                                                         m["confusion"])
    face = fake_faces(1, 9)[0][0]
    Image.fromarray(face).save(tmp_path / "face.png")
    said = invoke(app, ["predict", "--head", str(run), str(tmp_path / "face.png"), "--device", "cpu", "--json"],
                  catch_exceptions=False)
    assert said.exit_code == 0, said.output
    probs = list(json.loads(said.stdout)[0]["probs"].values())
    expected = torch.softmax(torch.from_numpy(load_tuned(run, "cpu").logits_from_pixels(face[None])), 1)[0]
    np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_conv_towers_are_refused_in_one_line(saved, fer_zip, tmp_path):
    encoder = load_encoder(str(saved["timm-convnext"]), "clip", "cpu", "float32")
    with pytest.raises(UserError, match=r"model 'x' \(timm ConvNeXt\) is not a tower fercache can tune") as err:
        Tower.of(encoder.model, "model 'x'")
    assert "\n" not in str(err.value)
    config = json.loads(json.dumps(OPENCLIP["vit-b-32"]))
    config["model_cfg"]["vision_cfg"].update(layers=[1, 1, 1, 1], width=16, head_width=16)  # an OpenCLIP ResNet
    resnet = save_openclip(tmp_path / "rn", config)
    with pytest.raises(UserError, match=r"\(OpenCLIP ModifiedResNet\) is not a tower fercache can tune"):
        finetune(from_images=True, data=fer_zip, model=str(resnet), device="cpu", out=tmp_path / "run",
                 progress=False)


def test_eva_rotary_embedding_is_float32_whatever_the_model_dtype(saved):
    """A bfloat16 base model (`load_tuned` with bfloat16 tokens) rounds EVA's rope buffers; the tuned
    top must call its blocks with the float32 embedding it was trained with."""
    from fercache.timm_models import rope_embed

    folder = str(saved["timm-eva02"])
    full, half = (load_encoder(folder, "clip", "cpu", dtype).model for dtype in ("float32", "bfloat16"))
    assert torch.equal(rope_embed(full), full.rope.get_embed())  # as the float32 model's own forward
    assert torch.equal(rope_embed(half), rope_embed(full)) and rope_embed(half).dtype == torch.float32
    assert not torch.equal(half.rope.get_embed().float(), rope_embed(full))  # what the bfloat16 model holds
