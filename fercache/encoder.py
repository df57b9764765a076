"""Stage one's model: a frozen vision encoder that maps 48x48 faces to feature vectors.

Any Hugging Face CLIP-family vision tower loads through the same path (hub id or local folder,
honouring HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE; never `trust_remote_code`). The feature is the
model's `pooler_output` (for CLIP the post-layernorm CLS token, what CLIP's paper probes); with
`layers`, the CLS token after chosen blocks, normalised the way the pooled output is (SigLIP has
no CLS token: there, the mean of its layer-normed tokens). `pixels` is
a floor for every table: the raw 48x48 pixels as a 2,304-d vector, no network at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fercache.errors import UserError, first_line
from fercache.identity import Identity
from fercache.names import DEFAULT_MODEL, DTYPES, PIXELS, PREPROCESS, SIZE, choice, feature_name
from fercache.preprocess import Preprocessor, recipe_for

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags of bf16 matmul instructions (Linux /proc/cpuinfo)


def pick_device(device: str = "auto") -> torch.device:
    """`auto` is the fastest device present: CUDA, then Apple's MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"unknown device '{device}': choose auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch on this machine")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available on this machine")
    return torch.device(device)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere: then nothing is assumed native)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is the fastest type the hardware computes natively, never an emulated one.

    CUDA: bfloat16 from compute capability 8.0 (Ampere) up, float16 below (T4, V100), since
    `torch.cuda.is_bf16_supported()` also counts emulation. CPU: bfloat16 where it has AMX-BF16 or
    AVX512-BF16 instructions, else float32 (emulated bf16 runs at a quarter of float32's speed).
    """
    if dtype != "auto":
        return getattr(torch, choice(dtype, DTYPES + ("auto",), "dtype"))
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if device.type == "cpu" and cpu_flags() & set(NATIVE_BF16_FLAGS):
        return torch.bfloat16
    return torch.float32


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """`--layers 1,6,12` or `all` -> sorted block numbers (1-based, as the blocks are counted)."""
    if not spec:
        return []
    if spec == "all":
        return list(range(1, n_layers + 1))
    try:
        layers = sorted({int(k) for k in spec.split(",")})
    except ValueError:
        raise UserError(f"--layers '{spec}': expected comma-separated block numbers or 'all'") from None
    if layers[0] < 1 or layers[-1] > n_layers:
        raise UserError(f"--layers '{spec}': this model has blocks 1 to {n_layers}")
    return layers


@dataclass
class Encoder:
    """A loaded, frozen encoder: `encode(pixels, views)` returns {feature name: float32 array}."""

    identity: Identity  # what a cache records of it (`source` empty: the encoder knows no data)
    dim: int
    model: torch.nn.Module | None = None  # None: the `pixels` baseline (or configs only)
    prep: Preprocessor | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        return self.identity.layers

    def encode(self, pixels: np.ndarray, views: tuple[str, ...] = ("plain",)) -> dict[str, np.ndarray]:
        """Every feature of these faces (`views`: plain, and flip for the mirrored faces), named as stored."""
        out = {}
        for view in views:
            faces = pixels if view == "plain" else np.ascontiguousarray(pixels[:, :, ::-1])
            out.update({feature_name(layer, view): f for layer, f in self._features(faces).items()})
        return out

    @torch.inference_mode()
    def _features(self, pixels: np.ndarray) -> dict[int | None, np.ndarray]:
        """{None: pooled feature, k: feature after block k} of one batch of faces."""
        if self.model is None:  # the `pixels` baseline
            return {None: pixels.reshape(len(pixels), -1).astype(np.float32) / 255}
        out = self.model(pixel_values=self.prep(pixels), output_hidden_states=bool(self.layers))
        feats = {None: out.pooler_output}
        if self.layers:
            tower = getattr(self.model, "vision_model", self.model)  # transformers 4 nests it, 5 does not
            norm = getattr(tower, "post_layernorm", None) or torch.nn.Identity()
            has_cls = hasattr(tower.embeddings, "class_embedding")  # SigLIP has none: pool its tokens
            for k in self.layers:
                h = out.hidden_states[k]
                feats[k] = norm(h[:, 0]) if has_cls else norm(h).mean(1)
        return {layer: f.float().cpu().numpy() for layer, f in feats.items()}


def load_encoder(model: str = DEFAULT_MODEL, preprocess: str = "clip", device: str = "auto",
                 dtype: str = "auto", layers: str | None = None, weights: bool = True) -> Encoder:
    """Load an encoder by hub id or local folder.

    With `weights=False` only the model's config is read: enough for the identity that decides
    whether a cache already holds what is asked, in about a second. `image_size`, which needs the
    image processor (slow to import), is filled in when the weights load.
    """
    dev = pick_device(device)
    if model == PIXELS:
        if layers:
            raise UserError("--layers needs a neural encoder; the pixels baseline has none")
        return Encoder(Identity(PIXELS, "none", "pixels", "float32", image_size=SIZE), SIZE * SIZE)
    choice(preprocess, PREPROCESS, "preprocessing")

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model '{model}': {first_line(exc)}") from None
    vision = getattr(config, "vision_config", config)
    if type(vision) not in MODEL_MAPPING:
        raise UserError(f"model '{model}' ({config.model_type}) has no vision tower fercache can load")
    torch_dtype = pick_dtype(dtype, dev)
    layer_ids = parse_layers(layers, vision.num_hidden_layers)
    identity = Identity(model, preprocess, "pooler_output", str(torch_dtype).removeprefix("torch."),
                        revision=getattr(config, "_commit_hash", None) or "", layers=tuple(layer_ids))
    enc = Encoder(identity, getattr(vision, "hidden_size"))
    if weights:
        processor = None
        if preprocess == "clip":
            from transformers import AutoImageProcessor

            try:
                processor = AutoImageProcessor.from_pretrained(model)
            except (OSError, ValueError) as exc:
                raise UserError(f"model '{model}' has no usable image processor config ({first_line(exc)}); "
                                "try --preprocess seed") from None
        recipe = recipe_for(preprocess, processor, vision.image_size)
        enc.identity = replace(identity, image_size=recipe.crop)
        cls = MODEL_MAPPING[type(vision)]
        # Weights cast to the compute dtype: measurably faster than autocast on CPU and GPU.
        net = cls.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa")
        enc.model = net.to(dev).eval().requires_grad_(False)
        enc.prep = Preprocessor(recipe, dev, torch_dtype)
    return enc
