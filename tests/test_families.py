"""Every Hugging Face vision family: its own processor reproduced, its pooled and per-layer features exact.

Each family gets a tiny random model and its image processor saved like a hub checkout; fercache
loads it through the path users hit (`load_encoder`), and every feature is checked against the
family's own PIL processor and model class in float32, read the way each family documents it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import assert_half_precision_agrees, cli
from fercache.encoder import load_encoder
from fercache.errors import UserError
from fercache.preprocess import FILTERS, NEAREST, Preprocessor, Recipe, recipe_for


def pil_processor(name: str):
    """The PIL-backed processor class: `XImageProcessorPil` in transformers 5, `XImageProcessor` in 4."""
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


@dataclass
class Tiny:
    """A family in miniature: config, model class, processor class and settings, and the reference
    reading of `hidden_states` for `--layers` (written out here, apart from fercache's own)."""

    config: object
    model: str
    processor: str
    settings: dict
    layer: object  # (model, hidden_states, k) -> (B, D) reference feature after block/stage k
    init: object = None  # re-initialises a random model whose features would otherwise vanish

    def save(self, folder: Path) -> Path:
        torch.manual_seed(0)
        net = getattr(transformers, self.model)(self.config)
        if self.init:
            self.init(net)
        net.save_pretrained(folder)
        pil_processor(self.processor)(**self.settings).save_pretrained(folder)
        return folder


def tower(model: torch.nn.Module) -> torch.nn.Module:
    """CLIP's and SigLIP's vision tower: nested as `vision_model` in transformers 4, the model itself in 5."""
    return getattr(model, "vision_model", model)


def unit_batchnorm(net: torch.nn.Module) -> None:
    """EfficientNet's init draws BatchNorm scales near 0 (std 0.02): through 10 blocks every feature
    of a random net is 0, and a comparison of zeros proves nothing. Unit scales, He-initialised convs."""
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
        elif isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)


def assert_close(got: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    """Equal in float32 up to summation order, at the feature's own scale; never vacuous."""
    assert got.dtype == np.float32 and got.shape == ref.shape, what
    assert np.abs(ref).max() > 0 and not np.allclose(ref[0], ref[1]), f"{what}: a degenerate reference"
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=what)


TOKENS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=64,
              patch_size=16)
EFFICIENTNET_STAGE_ENDS = (1, 2, 3, 5, 7, 9, 10)  # b0's repeats 1,2,2,3,3,4,1 halved, rounded up: 1,1,1,2,2,2,1
FAMILIES = {
    "clip": Tiny(transformers.CLIPVisionConfig(**TOKENS), "CLIPVisionModel", "CLIPImageProcessor",
                 dict(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
                 lambda m, hs, k: tower(m).post_layernorm(hs[k][:, 0])),
    "siglip": Tiny(transformers.SiglipVisionConfig(**TOKENS), "SiglipVisionModel", "SiglipImageProcessor",
                   dict(size={"height": 64, "width": 64}),
                   lambda m, hs, k: tower(m).post_layernorm(hs[k]).mean(1)),
    "dinov2": Tiny(transformers.Dinov2Config(**TOKENS), "Dinov2Model", "BitImageProcessor",
                   dict(size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64},
                        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
                   lambda m, hs, k: m.layernorm(hs[k])[:, 0]),
    "vit": Tiny(transformers.ViTConfig(**TOKENS), "ViTModel", "ViTImageProcessor",
                dict(size={"height": 64, "width": 64}),
                lambda m, hs, k: m.layernorm(hs[k])[:, 0]),
    "convnext": Tiny(transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1]),
                     "ConvNextModel", "ConvNextImageProcessor", dict(size={"shortest_edge": 56}, crop_pct=0.875),
                     lambda m, hs, k: hs[k].mean((2, 3))),
    "resnet": Tiny(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1]),
                   "ResNetModel", "ConvNextImageProcessor",
                   dict(size={"shortest_edge": 56}, crop_pct=0.875, resample=2),
                   lambda m, hs, k: hs[k].mean((2, 3))),
    "efficientnet": Tiny(transformers.EfficientNetConfig(width_coefficient=0.1, depth_coefficient=0.5, hidden_dim=128,
                                                          image_size=64),
                         "EfficientNetModel", "EfficientNetImageProcessor",
                         dict(size={"height": 64, "width": 64}, resample=NEAREST, rescale_offset=True,
                              image_std=[0.47853944, 0.4732864, 0.47434163]),
                         lambda m, hs, k: hs[EFFICIENTNET_STAGE_ENDS[k - 1]].mean((2, 3)), unit_batchnorm),
}


def faces(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48), dtype=np.uint8)


def processed(processor, pixels: np.ndarray) -> torch.Tensor:
    """The family's own processor, one RGB PIL image per face: the reference model input."""
    images = [Image.fromarray(p).convert("RGB") for p in pixels]
    return processor(images=images, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny checkout, saved once per module."""
    root = tmp_path_factory.mktemp("families")
    return {name: tiny.save(root / name) for name, tiny in FAMILIES.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_preprocessing_is_the_family_processor(family, saved):
    processor = pil_processor(FAMILIES[family].processor).from_pretrained(saved[family])
    pixels = faces()
    ref = processed(processor, pixels)
    ours = Preprocessor(recipe_for("clip", processor, 64), torch.device("cpu"))(pixels)
    assert ours.shape == ref.shape
    # one 8-bit level is >= 1/255/std^2 > 0.015 after normalising: 1e-5 means the same resized pixels
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_and_layer_features_equal_the_family_model(family, saved):
    tiny, folder = FAMILIES[family], saved[family]
    encoder = load_encoder(str(folder), "clip", "cpu", "float32", layers="all")
    pixels = faces(6, seed=1)
    got = encoder.encode(pixels)

    net = getattr(transformers, tiny.model).from_pretrained(folder).eval()
    with torch.inference_mode():
        out = net(pixel_values=processed(pil_processor(tiny.processor).from_pretrained(folder), pixels),
                  output_hidden_states=True)
        pooled = out.last_hidden_state[:, 0] if family == "vit" else out.pooler_output.flatten(1)
        layers = {f"layers/{k}": tiny.layer(net, out.hidden_states, k) for k in encoder.layers}
    n_layers = 7 if family == "efficientnet" else 4 if family in ("convnext", "resnet") else 3
    assert list(encoder.layers) == list(range(1, n_layers + 1))
    assert set(got) == {"embeddings", *layers}
    assert_close(got["embeddings"], pooled.numpy(), "embeddings")
    for name, ref in layers.items():
        assert_close(got[name], ref.numpy(), name)
    # the last layer and the pooled output agree where the family's pooler is that same reading
    last = got[f"layers/{n_layers}"]
    if family in ("clip", "dinov2", "vit", "resnet"):
        assert_close(last, got["embeddings"], "last layer vs pooled")
    if family == "convnext":  # pooled = the final layer norm of the last stage's average
        assert_close(net.layernorm(torch.from_numpy(last)).detach().numpy(), got["embeddings"], "last stage vs pooled")


@pytest.mark.parametrize("resample", [NEAREST, *sorted(FILTERS)])
@pytest.mark.parametrize("size", [37, 64, 100, 224])
def test_every_resample_filter_is_bit_exact_with_pil(resample, size):
    pixels = faces(4, seed=resample)
    ours = Preprocessor(Recipe("test", size, size, resample, (0.0,) * 3, (1.0,) * 3, 1.0), torch.device("cpu"))(pixels)
    ref = np.stack([np.asarray(Image.fromarray(p).resize((size, size), resample)) for p in pixels])
    assert np.array_equal(ours[:, 1].numpy(), ref)


def test_text_only_model_is_a_one_line_error(tmp_path, fer_zip):
    folder = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, vocab_size=99)).save_pretrained(folder)
    out = cli("extract", "--data", fer_zip, "--model", folder, "--device", "cpu", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"fercache: error: model '{folder}' (bert) has no vision tower "
                                               "fercache can load"]


@pytest.mark.parametrize("device, native, expected", [
    ("cuda", (7, 0), torch.float16),  # V100: no bf16 units (torch.cuda.is_bf16_supported() says True: emulated)
    ("cuda", (7, 5), torch.float16),  # T4
    ("cuda", (8, 0), torch.bfloat16),  # A100
    ("cuda", (9, 0), torch.bfloat16),  # H100
    ("cpu", {"avx2", "avx512f"}, torch.float32),
    ("cpu", {"avx2", "avx512_bf16"}, torch.bfloat16),
    ("cpu", {"amx_bf16", "amx_tile"}, torch.bfloat16),
    ("cpu", set(), torch.float32),  # flags unknown (not Linux): nothing assumed
    ("cpu", {"avx2", "avx512_bf16", "avx2-capped"}, torch.float32),  # ATEN_CPU_CAPABILITY=avx2: torch may not use it
])
def test_auto_dtype_is_what_the_device_computes_natively(monkeypatch, device, native, expected):
    import fercache.encoder as encoder

    def private(*_):
        raise AssertionError("only public APIs decide the dtype")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", private)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", private, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", private, raising=False)
    if device == "cuda":
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: native)
    else:
        monkeypatch.setattr(encoder, "cpu_flags", lambda: native)
        capability = "AVX2" if "avx2-capped" in native else "AVX512" if native & {"avx512f", "avx512_bf16", "amx_bf16"} \
            else "DEFAULT"
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert encoder.pick_dtype("auto", torch.device(device)) == expected
    assert encoder.pick_dtype("float32", torch.device(device)) == torch.float32  # an explicit choice stands


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_features_agree_with_float32(family, dtype, saved):
    assert_half_precision_agrees(saved[family], dtype, faces(8, seed=2))


TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_style_checkpoints_load_their_vision_tower(family, tmp_path):
    """Hub checkpoints are mostly whole models: CLIP and SigLIP with their text tower, the rest with
    an ImageNet classifier (ViT's without the pooler). Their vision part loads, nothing left random."""
    tiny = FAMILIES[family]
    if family in ("clip", "siglip"):
        name = "CLIPModel" if family == "clip" else "SiglipModel"
        config = getattr(transformers, name).config_class(text_config=TEXT, vision_config=tiny.config.to_dict())
    else:
        name, config = tiny.model.replace("Model", "ForImageClassification"), tiny.config
    torch.manual_seed(0)
    whole = getattr(transformers, name)(config).eval()
    if tiny.init:
        tiny.init(whole)
    whole.save_pretrained(tmp_path)
    pil_processor(tiny.processor)(**tiny.settings).save_pretrained(tmp_path)
    encoder = load_encoder(str(tmp_path), "clip", "cpu", "float32")
    pixels = faces(3, seed=4)
    with torch.inference_mode():
        out = getattr(whole, "vision_model", None) or getattr(whole, whole.base_model_prefix)
        out = out(pixel_values=encoder.prep(pixels))
    ref = out.last_hidden_state[:, 0] if family == "vit" else out.pooler_output.flatten(1)
    assert_close(encoder.encode(pixels)["embeddings"], ref.numpy(), name)


def test_a_checkpoint_missing_weights_is_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(saved["convnext"], tmp_path / "convnext")
    weights = load_file(folder / "model.safetensors")
    del weights["layernorm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks 1 of ConvNextModel's weights \(first: layernorm.weight\)"):
        load_encoder(str(folder), "clip", "cpu", "float32")


def test_another_vision_family_gives_its_pooled_feature_only(tmp_path):
    config = transformers.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8)
    torch.manual_seed(0)
    net = transformers.RegNetModel(config).eval()
    net.save_pretrained(tmp_path)
    pil_processor("ConvNextImageProcessor")(size={"shortest_edge": 56}).save_pretrained(tmp_path)
    encoder = load_encoder(str(tmp_path), "clip", "cpu", "float32")
    pixels = faces(3)
    with torch.inference_mode():
        ref = net(pixel_values=encoder.prep(pixels)).pooler_output.flatten(1).numpy()
    assert encoder.dim == 16 and encoder.identity.feature == "pooler_output"
    assert_close(encoder.encode(pixels)["embeddings"], ref, "regnet")
    with pytest.raises(UserError, match=r"--layers: model .* \(regnet\) is of no family whose layers fercache reads"):
        load_encoder(str(tmp_path), "clip", "cpu", "float32", layers="1")
