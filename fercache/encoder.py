"""Stage one's model: a frozen vision encoder that maps 48x48 faces to feature vectors.

Any Hugging Face CLIP-family vision tower loads through the same path (hub id or local folder,
honouring HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE; never `trust_remote_code`). The feature is the
model's `pooler_output` (for CLIP the post-layernorm CLS token, what CLIP's paper probes); with
`layers`, the CLS token after chosen blocks, normalised the way the pooled output is (SigLIP has
no CLS token: there, the mean of its layer-normed tokens). `pixels` is
a floor for every table: the raw 48x48 pixels as a 2,304-d vector, no network at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from fercache.data import SIZE
from fercache.errors import UserError, first_line
from fercache.preprocess import PREPROCESS, Preprocessor, recipe_for

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
PIXELS = "pixels"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 where the hardware computes it natively (CUDA; CPUs with AMX or
    AVX512-BF16), else float32: emulated bf16 is slower than float32."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype '{dtype}': choose auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def model_slug(model: str) -> str:
    """A file-name-safe name for a model: `openai/clip-vit-base-patch32` -> `openai--clip-vit-base-patch32`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").replace("/", "--")).strip("-") or "model"


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
    """A loaded, frozen encoder: `encode(pixels)` returns {feature name: float32 array}."""

    meta: dict  # model, revision, preprocess, dtype, dim, layers: what a cache records of it
    model: torch.nn.Module | None = None  # None: the `pixels` baseline (or configs only)
    prep: Preprocessor | None = None

    @property
    def layers(self) -> list[int]:
        return self.meta["layers"]

    @property
    def features(self) -> list[str]:
        """Names of the arrays `encode` returns; the cache stores each under its split."""
        return ["embeddings"] + [f"layers/{k}" for k in self.layers]

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        if self.model is None:  # the `pixels` baseline
            return {"embeddings": pixels.reshape(len(pixels), -1).astype(np.float32) / 255}
        out = self.model(pixel_values=self.prep(pixels), output_hidden_states=bool(self.layers))
        feats = {"embeddings": out.pooler_output}
        if self.layers:
            tower = getattr(self.model, "vision_model", self.model)  # transformers 4 nests it, 5 does not
            norm = getattr(tower, "post_layernorm", None) or torch.nn.Identity()
            has_cls = hasattr(tower.embeddings, "class_embedding")  # SigLIP has none: pool its tokens
            for k in self.layers:
                h = out.hidden_states[k]
                feats[f"layers/{k}"] = norm(h[:, 0]) if has_cls else norm(h).mean(1)
        return {name: f.float().cpu().numpy() for name, f in feats.items()}


def load_encoder(model: str = DEFAULT_MODEL, preprocess: str = "clip", device: str = "auto",
                 dtype: str = "auto", layers: str | None = None, weights: bool = True) -> Encoder:
    """Load an encoder by hub id or local folder.

    With `weights=False` only the model's config is read: enough for the metadata that decides
    whether a cache already holds what is asked, in about a second. `image_size`, which needs the
    image processor (2-3 s to import), is added to `meta` when the weights load.
    """
    dev = pick_device(device)
    if model == PIXELS:
        if layers:
            raise UserError("--layers needs a neural encoder; the pixels baseline has none")
        meta = {"model": PIXELS, "model_revision": "", "preprocess": "none", "feature": "pixels",
                "dtype": "float32", "image_size": SIZE, "dim": SIZE * SIZE, "layers": []}
        return Encoder(meta)
    if preprocess not in PREPROCESS:
        raise UserError(f"unknown preprocessing '{preprocess}': choose one of {', '.join(PREPROCESS)}")

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
    meta = {
        "model": model,
        "model_revision": getattr(config, "_commit_hash", None) or "",
        "preprocess": preprocess,
        "feature": "pooler_output",
        "dtype": str(torch_dtype).removeprefix("torch."),
        "dim": getattr(vision, "hidden_size"),
        "layers": layer_ids,
    }
    enc = Encoder(meta)
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
        meta["image_size"] = recipe.crop
        cls = MODEL_MAPPING[type(vision)]
        # Weights cast to the compute dtype: measurably faster than autocast on CPU and GPU.
        net = cls.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa")
        enc.model = net.to(dev).eval().requires_grad_(False)
        enc.prep = Preprocessor(recipe, dev, torch_dtype)
    return enc
