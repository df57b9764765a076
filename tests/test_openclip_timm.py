"""OpenCLIP and timm checkpoints: each library's own preprocessing and forward pass, reproduced exactly.

Tiny random-weight models are built offline and saved the way each library publishes them
(OpenCLIP: `open_clip_config.json` + `open_clip_model.safetensors`; timm: `save_for_hf`'s
`config.json` + `model.safetensors`); fercache loads them through the path users hit
(`load_encoder`), and every feature is checked on real FER2013 faces against the library's own
transform (`create_model_and_transforms`' eval preprocess; `resolve_data_config` +
`create_transform`) and its own model: `encode_image`, `forward_head(..., pre_logits=True)`, and
block outputs from the library's `forward_intermediates`. Native images (`--images native`: any size,
shape and colour) and each library's other eval modes (OpenCLIP's `longest`, timm's `squash` and
`border`, a resize below the crop) are checked the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from timm.models import save_for_hf

from conftest import assert_half_precision_agrees, cli
from fercache.data import decode_native, open_source
from fercache.encoder import load_encoder
from fercache.errors import UserError
from fercache.extract import extract
from fercache.fit import fit
from fercache.heads import Head
from fercache.names import feature_name
from fercache.zeroshot import CLASS_NAMES, TEMPLATES, zeroshot

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
OPENCLIP = {  # open_clip_config.json: a ViT-B-32 and a SigLIP (a timm trunk with MAP pooling, test_vit3), tiny
    "vit-b-32": {"model_cfg": {"embed_dim": 16,
                               "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 32,
                                              "head_width": 32},
                               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                            "layers": 1}},
                 "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}},
    "siglip": {"model_cfg": {"embed_dim": 96, "init_logit_bias": -10, "custom_text": True,
                             "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit3",
                                            "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
                             "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 2, "layers": 1,
                                          "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}},
               "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                  "resize_mode": "squash"}},
}
TIMM = {  # architecture, small arguments, pretrained_cfg overrides: a bilinear ViT; ConvNeXt's 175 -> 160 crop
    # starts at round(7.5) = 8, as torchvision's CenterCrop rounds, where transformers' processors start at 7
    "vit": ("vit_tiny_patch16_224", dict(img_size=64, depth=3), dict(interpolation="bilinear", crop_pct=0.9)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56, depth=3), {}),
    "convnext": ("test_convnext", {}, dict(crop_pct=0.91)),
}
MODELS = [f"openclip-{n}" for n in OPENCLIP] + [f"timm-{n}" for n in TIMM]
VARIANTS = {  # the same tiny weights under the libraries' other eval preprocessing: (model, config overrides)
    "openclip-longest": ("openclip-vit-b-32", {"resize_mode": "longest", "fill_color": 128,
                                               "interpolation": "bilinear"}),  # padded with gray
    "timm-squash": ("timm-vit", {"crop_mode": "squash"}),
    "timm-border": ("timm-eva02", {"crop_mode": "border"}),  # padded with the mean colour
    "timm-pad": ("timm-convnext", {"crop_pct": 1.15}),  # resized to 139 px: torchvision's CenterCrop pads with 0
}


def save_openclip(folder: Path, config: dict, seed: int = 0) -> Path:
    """An OpenCLIP checkpoint as the hub holds one: its config and its weights in safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def save_timm(folder: Path, name: str, seed: int = 0) -> Path:
    """A timm checkpoint as timm pushes one to the hub (`save_for_hf`: config.json + model.safetensors)."""
    arch, kwargs, overlay = TIMM[name]
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("libraries")
    out = {f"openclip-{n}": save_openclip(root / f"openclip-{n}", cfg) for n, cfg in OPENCLIP.items()}
    out.update({f"timm-{n}": save_timm(root / f"timm-{n}", n) for n in TIMM})
    return out


@pytest.fixture(scope="module")
def variants(saved, tmp_path_factory) -> dict[str, Path]:
    """Copies of saved models, other preprocessing configs (OpenCLIP's `preprocess_cfg`, timm's `pretrained_cfg`)."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name, (base, overrides) in VARIANTS.items():
        folder = shutil.copytree(saved[base], root / name)
        path = next(folder / f for f in ("open_clip_config.json", "config.json") if (folder / f).is_file())
        config = json.loads(path.read_text())
        config["preprocess_cfg" if base.startswith("openclip") else "pretrained_cfg"].update(overrides)
        path.write_text(json.dumps(config))
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def native_images() -> list[np.ndarray]:
    """Images as `--images native` feeds them, decoded as the datasets decode them (H x W x 3 uint8): 100x100
    colour (RAF-DB, two: one batch), 256x256 gray and palette (JAFFE), 640x480 colour, and odd shapes
    smaller than every crop (30x40) or tall (97x45)."""
    rng = np.random.default_rng(0)
    palette = Image.fromarray(rng.integers(0, 4, (256, 256), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 90, 30, 9, 50, 150, 50, 200, 90, 240] + [0] * 756)
    images = [Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)), palette,
              Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (97, 45, 3), dtype=np.uint8))]
    out = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        out.append(decode_native(buf.getvalue()))
    return out


@pytest.fixture(scope="module")
def faces(real_zip) -> np.ndarray:
    """Six real FER2013 test faces."""
    return open_source(real_zip).load("test", limit=6).pixels


class Reference:
    """The library's own model, transform and block outputs, loaded apart from fercache."""

    def __init__(self, name: str, folder: Path):
        self.openclip = name.startswith("openclip")
        if self.openclip:
            self.clip, _, self.transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
            self.clip.eval()
            self.model = getattr(self.clip.visual, "trunk", None)  # the timm trunk of a SigLIP
        else:
            self.model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
            self.transform = create_transform(**resolve_data_config(model=self.model))
        assert type(self.transform).__module__.startswith("torchvision")  # the library's real code path
        assert any(type(t).__name__ in ("Resize", "ResizeKeepRatio") for t in self.transform.transforms)

    def inputs(self, pixels: np.ndarray | list[np.ndarray], flip: bool = False) -> torch.Tensor:
        """The transform on each image (48x48 gray or H x W x 3), as PIL opens it in RGB (`flip`: mirrored)."""
        images = [Image.fromarray(p).convert("RGB") for p in pixels]
        return torch.stack([self.transform(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im)
                            for im in images])

    @torch.inference_mode()
    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.openclip:
            return self.clip.encode_image(x)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    @torch.inference_mode()
    def blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's (stage's) output, from the library's `forward_intermediates`, prefix tokens first."""
        if self.model is None:  # OpenCLIP's own ViT
            out = self.clip.visual.forward_intermediates(x, intermediates_only=True, output_fmt="NLC",
                                                         output_extra_tokens=True)
            return [torch.cat([p, t], 1) for p, t in zip(out["image_intermediates_prefix"],
                                                         out["image_intermediates"])]
        if hasattr(self.model, "stages"):
            return self.model.forward_intermediates(x, intermediates_only=True)
        out = self.model.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True,
                                               return_prefix_tokens=True)
        return [torch.cat([p, t], 1) for t, p in out]

    @torch.inference_mode()
    def layer(self, h: torch.Tensor) -> torch.Tensor:
        """A block's output read as the pooled feature reads the last one's (the model's own head)."""
        if self.model is None:
            pooled, _ = self.clip.visual._pool(h)
            return pooled @ self.clip.visual.proj
        if hasattr(self.model, "stages"):
            return h.mean((2, 3))
        out = self.model.forward_head(self.model.norm(h), pre_logits=True)
        return self.clip.visual.head(out) if self.openclip else out


def assert_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert got.dtype == np.float32 and got.shape == ref.shape, what
    assert np.abs(ref).max() > 0 and not np.allclose(ref[0], ref[1]), f"{what}: a degenerate reference"
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=what)


def test_torchvision_here_is_the_real_library():
    """The references below run torchvision's own transforms (the test-only shim defines op schemas only)."""
    assert torchvision.transforms.Resize.__module__ == "torchvision.transforms.transforms"


@pytest.mark.parametrize("name", MODELS)
def test_batched_preprocessing_is_the_library_transform(name, saved, faces):
    ref = Reference(name, saved[name]).inputs(faces)
    encoder = load_encoder(str(saved[name]), "clip", "cpu", "float32")
    ours = encoder.prep(faces)
    assert ours.shape == ref.shape and encoder.identity.image_size == ref.shape[-1]
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=0, atol=1e-5)  # one 8-bit level is > 0.007


@pytest.mark.parametrize("name", MODELS)
def test_pooled_layer_and_token_features_equal_the_library_model(name, saved, faces):
    ref = Reference(name, saved[name])
    token_tower = name != "timm-convnext"
    encoder = load_encoder(str(saved[name]), "clip", "cpu", "float32", layers="all",
                           tokens=1 if token_tower else None)
    got = encoder.encode(faces)
    x = ref.inputs(faces)
    blocks = ref.blocks(x)
    assert list(encoder.layers) == list(range(1, len(blocks) + 1))
    assert encoder.identity.feature == ("encode_image" if ref.openclip else "pre_logits")
    assert_close(got["embeddings"], ref.pooled(x).numpy(), "embeddings")
    for k, h in enumerate(blocks, 1):
        assert_close(got[f"layers/{k}"], ref.layer(h).numpy(), f"layers/{k}")
        assert encoder.dims[k] == got[f"layers/{k}"].shape[1]
    assert encoder.dims[None] == got["embeddings"].shape[1]
    if token_tower:  # the tokens entering block 2, stored as float16; the last block reads as the pooled feature
        np.testing.assert_allclose(got["tokens"].astype(np.float32), blocks[0].numpy(), rtol=2e-3, atol=2e-3)
        assert_close(got[f"layers/{len(blocks)}"], got["embeddings"], "last block vs pooled")
    # the config-only encoder (what extract checks caches with) knows the same sizes without weights
    assert load_encoder(str(saved[name]), "clip", "cpu", "float32", layers="all", weights=False).dims == encoder.dims


@pytest.mark.parametrize("name", MODELS + list(VARIANTS))
def test_native_images_are_preprocessed_as_the_library_transform(name, saved, variants, native_images):
    """Every size, shape and colour, each mode (shortest, squash, longest, border, a pad): the library's pixels."""
    folder = {**saved, **variants}[name]
    ref = Reference(name, folder)
    encoder = load_encoder(str(folder), "clip", "cpu", "float32")
    side = encoder.identity.image_size
    ours, theirs = encoder.prep(native_images), ref.inputs(native_images)
    assert ours.shape == theirs.shape == (len(native_images), 3, side, side)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=1e-5)  # one 8-bit level is > 0.007
    gray = np.random.default_rng(1).integers(0, 256, (3, 48, 48), dtype=np.uint8)  # and FER2013's batched path
    np.testing.assert_allclose(encoder.prep(gray).numpy(), ref.inputs(gray).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_native_features_equal_the_library_model_on_its_transform(name, saved, native_images):
    ref = Reference(name, saved[name])
    got = load_encoder(str(saved[name]), "clip", "cpu", "float32").encode(native_images, ("plain", "flip"))
    assert_close(got["embeddings"], ref.pooled(ref.inputs(native_images)).numpy(), "native embeddings")
    assert_close(got[feature_name(None, "flip")], ref.pooled(ref.inputs(native_images, flip=True)).numpy(),
                 "native mirrored embeddings")


@pytest.mark.parametrize("proj", ["", "linear"])
def test_a_timm_trunk_projected_either_way_reads_its_last_block_as_encode_image(proj, tmp_path, faces):
    """OpenCLIP projects a timm trunk with the trunk's own classifier (`timm_proj: ""`) or a head of its own."""
    config = json.loads(json.dumps(OPENCLIP["siglip"]))
    config["model_cfg"]["embed_dim"] = 48
    config["model_cfg"]["vision_cfg"].update(timm_model_name="test_vit", timm_pool="token", timm_proj=proj)
    encoder = load_encoder(str(save_openclip(tmp_path / "m", config)), "clip", "cpu", "float32", layers="all")
    got = encoder.encode(faces)
    assert encoder.dims == {None: 48, **{k: 48 for k in encoder.layers}}
    assert_close(got[f"layers/{encoder.layers[-1]}"], got["embeddings"], "last block vs encode_image")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", MODELS)
def test_half_precision_features_agree_with_float32(name, dtype, saved, faces):
    assert_half_precision_agrees(saved[name], dtype, faces)


def test_convnext_has_no_tokens_and_a_missing_extra_is_named(saved, monkeypatch):
    with pytest.raises(UserError, match=r"--tokens: model .* \(timm ConvNeXt\) has no token sequence"):
        load_encoder(str(saved["timm-convnext"]), "clip", "cpu", "float32", tokens=1)
    monkeypatch.setitem(__import__("sys").modules, "open_clip", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"^model 'hf-hub:org/anything' needs OpenCLIP: "
                                        r"pip install 'fercache\[openclip\]' \("):
        load_encoder("hf-hub:org/anything", "clip", "cpu", "float32")


def test_a_torchvision_that_does_not_match_torch_is_one_line(saved, monkeypatch):
    import importlib
    from types import SimpleNamespace

    import fercache.backends as backends

    def load(name):
        if name == "torchvision":  # what a CUDA torchvision wheel beside a CPU torch raises
            raise RuntimeError("operator torchvision::nms does not exist")
        return importlib.import_module(name)

    monkeypatch.setattr(backends, "importlib", SimpleNamespace(import_module=load))
    with pytest.raises(UserError, match=r"^torchvision \S+ does not match torch \S+ \(operator torchvision::nms does "
                                        r"not exist\): install the torchvision built for this torch$"):
        load_encoder(str(saved["timm-vit"]), "clip", "cpu", "float32")


COMMITS = [hashlib.sha1(name).hexdigest() for name in (b"first", b"second")]


def hub_repo(root: Path, repo: str, save) -> Path:
    """Two commits of `repo` in an offline HF cache (other random weights each), main at the first."""
    folder = root / f"models--{repo.replace('/', '--')}"
    for seed, commit in enumerate(COMMITS):
        save(folder / "snapshots" / commit, seed)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMITS[0])
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline HF cache with an OpenCLIP repo and a timm repo (huggingface_hub read its settings when
    imported: its constants are patched for this process; subprocesses get the environment)."""
    import huggingface_hub.constants as constants

    root = tmp_path / "hub"
    hub_repo(root, "org/tiny-openclip", lambda f, seed: save_openclip(f, OPENCLIP["vit-b-32"], seed))
    hub_repo(root, "timm/tiny-vit", lambda f, seed: save_timm(f, "vit", seed))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


@pytest.mark.parametrize("model", ["hf-hub:org/tiny-openclip", "timm/tiny-vit"])
def test_a_hub_model_is_loaded_and_reloaded_at_its_commit(model, hub, faces):
    first = load_encoder(model, "clip", "cpu", "float32")
    assert first.identity.revision == COMMITS[0] and first.identity.weights == ""
    before = first.encode(faces)["embeddings"]
    repo = hub / f"models--{model.removeprefix('hf-hub:').replace('/', '--')}"
    (repo / "refs" / "main").write_text(COMMITS[1])  # the repo moves on
    again = load_encoder(model, "clip", "cpu", "float32", revision=first.identity.revision)
    np.testing.assert_array_equal(again.encode(faces)["embeddings"], before)
    moved = load_encoder(model, "clip", "cpu", "float32")
    assert moved.identity.revision == COMMITS[1]
    assert not np.allclose(moved.encode(faces)["embeddings"], before)


def test_a_local_folder_is_pinned_by_its_content(saved, tmp_path):
    folder = shutil.copytree(saved["openclip-vit-b-32"], tmp_path / "copy")
    pinned = load_encoder(str(folder), "clip", "cpu", "float32", weights=False).identity.weights
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["mean"] = [0.5] * 3  # a changed preprocessing changes the features
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="weight files changed since this was made"):
        load_encoder(str(folder), "clip", "cpu", "float32", fingerprint=pinned)


def test_a_head_on_an_openclip_cache_predicts_and_evaluates_as_a_clip_head(hub, fer_zip, faces, tmp_path):
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    model = "hf-hub:org/tiny-openclip"
    cache, head = tmp_path / "c.h5", tmp_path / "head"
    extract(fer_zip, "all", model, device="cpu", dtype="float32", cache=cache, progress=False)
    fit(cache, epochs=3, out=head, plots=False)
    meta = json.loads((head / "head.json").read_text())
    assert meta["model_revision"] == COMMITS[0] and meta["feature"] == "encode_image"
    paths = []
    for i, face in enumerate(faces[:3]):
        paths.append(tmp_path / f"face{i}.png")
        Image.fromarray(face).save(paths[-1])
    (hub / "models--org--tiny-openclip" / "refs" / "main").write_text(COMMITS[1])  # the repo moves on
    done = cli("predict", *paths, "--head", head, "--device", "cpu", "--json", env=env)
    assert done.returncode == 0, done.stderr
    probs = Head.load(head).predict_proba(
        load_encoder(model, "clip", "cpu", "float32", revision=COMMITS[0]).encode(faces[:3])["embeddings"])
    for r, p in zip(json.loads(done.stdout), probs):
        assert np.allclose(list(r["probs"].values()), p, atol=1e-5)
    evaluated = cli("evaluate", "--head", head, "--cache", cache, "--json", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((head / "metrics.json").read_text())
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_zeroshot_with_openclip_uses_its_own_tokenizer_and_text_tower(saved, fer_zip):
    folder = saved["openclip-vit-b-32"]
    result = zeroshot(fer_zip, "test", 7, str(folder), "cpu", progress=False)
    clip, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.inference_mode():
        text = torch.stack([torch.nn.functional.normalize(
            clip.encode_text(tokenizer([t.format(c=c) for t in TEMPLATES])), dim=-1).mean(0) for c in CLASS_NAMES])
        pixels = open_source(fer_zip).load("test", limit=7).pixels
        image = clip.encode_image(torch.stack([transform(Image.fromarray(p).convert("RGB")) for p in pixels]))
        ref = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    np.testing.assert_allclose(result.scores, ref.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="timm image model with no text tower"):
        zeroshot(fer_zip, "test", 7, str(saved["timm-vit"]), "cpu", progress=False)
