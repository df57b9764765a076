"""Stage one's model: a frozen vision encoder that maps 48x48 faces to feature vectors.

Any Hugging Face vision backbone with a pooled output loads through the same path (hub id or
local folder, honouring HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE; never `trust_remote_code`), at
one exact checkpoint (`fercache.checkpoint`: a hub commit or a folder's weight fingerprint). What
its features are, per family (CLIP, SigLIP, DINOv2, ViT, ConvNeXt, ResNet, EfficientNet), is
`fercache.families`' business. OpenCLIP and timm checkpoints load through their own libraries
(`fercache.backends`: one registered entry per library), pinned the same way. `pixels` is a floor
for every table: the raw 48x48 pixels as a 2,304-d vector, no network at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fercache.accelerate import int8_encoder
from fercache.backends import TOKENS, Backend, Tower, backend_of
from fercache.checkpoint import resolve
from fercache.errors import UserError, first_line
from fercache.families import (FAMILIES, Family, family_of, feature_dims, features, layer_count, model_class,
                                vision_config)
from fercache.identity import Identity
from fercache.names import DEFAULT_MODEL, DTYPES, INT8, PIXELS, PREPROCESS, SIZE, choice, feature_name
from fercache.onnxrt import ORT, TORCH, Graph, onnx_graph, pick_runtime
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
    AVX512-BF16 instructions and torch may use them (ATEN_CPU_CAPABILITY below AVX-512 caps them),
    else float32 (emulated bf16 runs at a quarter of float32's speed).
    """
    if dtype != "auto":
        return getattr(torch, choice(dtype, DTYPES + ("auto",), "dtype"))
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if (device.type == "cpu" and cpu_flags() & set(NATIVE_BF16_FLAGS)
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512")):
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
    """A loaded, frozen encoder: `encode(pixels, views)` returns {feature name: array}: float32, tokens float16."""

    identity: Identity  # what a cache records of it (`source` empty: the encoder knows no data)
    dims: dict[int | None, int]  # size of each feature: None the pooled one, k after block or stage k
    model: torch.nn.Module | None = None  # None: the `pixels` baseline (or configs only)
    prep: Preprocessor | None = None
    family: Family | None = None  # None: a vision model of no known family (pooled feature only)
    config: object = None  # the vision tower's config (where stage k's blocks end, ...)
    tower: Tower | None = None  # an OpenCLIP or timm model (then `model` is its module)
    reference: Encoder | None = None  # --dtype int8: the float32 encoder it is measured against, once
    graph: Graph | None = None  # ONNX Runtime's session of `forward` (`fercache.onnxrt`), else torch runs it

    @property
    def layers(self) -> tuple[int, ...]:
        return self.identity.layers

    @property
    def dim(self) -> int:
        """The pooled feature's size."""
        return self.dims[None]

    def encode(self, pixels: np.ndarray, views: tuple[str, ...] = ("plain",)) -> dict[str, np.ndarray]:
        """Every feature of these faces (`views`: plain, and flip for the mirrored faces), named as stored."""
        return {name: f.cpu().numpy() for name, f in self.tensors(pixels, views).items()}

    def tensors(self, pixels: np.ndarray | torch.Tensor, views: tuple[str, ...] = ("plain",)) -> dict[str, torch.Tensor]:
        """`encode`'s features as tensors on the model's device, not yet copied to the host.

        On a GPU the work is only queued: nothing waits for it (`pixels` may be a tensor already on
        the device, sent there asynchronously from pinned memory).
        """
        out = {}
        for view in views:
            faces = pixels if view == "plain" else (
                pixels.flip(-1) if isinstance(pixels, torch.Tensor) else
                [np.ascontiguousarray(p[:, ::-1]) for p in pixels] if isinstance(pixels, list)  # native H x W x 3
                else np.ascontiguousarray(pixels[:, :, ::-1]))
            feats = self._features(faces, tokens=view == "plain")  # tokens of the plain faces only
            out.update({feature_name(None, view, tokens=True) if layer == TOKENS else feature_name(layer, view): f
                        for layer, f in feats.items()})
        return out

    def token_shape(self) -> tuple[int, ...]:
        """(T, D) of the stored token sequence (`tokens` set): one face through the lower blocks."""
        return tuple(self._features(np.zeros((1, SIZE, SIZE), np.uint8))[TOKENS].shape[1:])

    @torch.inference_mode()
    def _features(self, pixels: np.ndarray | torch.Tensor, tokens: bool = True) -> dict[int | str | None, torch.Tensor]:
        """{None: pooled feature, k: feature after block k, `TOKENS`: hidden_states[tokens]} of one batch."""
        if self.model is None:  # the `pixels` baseline
            flat = torch.as_tensor(pixels).reshape(len(pixels), -1)
            return {None: flat.float() / 255}
        keep = self.identity.tokens if tokens else None
        x = self.prep(pixels)
        feats = self.graph(x) if self.graph is not None else self.forward(x, keep)
        # tokens as stored, float16 (made on the device: half the bytes to copy); a graph makes them for every view
        return {layer: f.half() if layer == TOKENS else f.float() for layer, f in feats.items()
                if layer != TOKENS or keep is not None}

    def forward(self, pixel_values: torch.Tensor, keep: int | None) -> dict[int | str | None, torch.Tensor]:
        """The model's own pass in its dtype: {None: pooled, k: after block k, `TOKENS`: entering block keep + 1}."""
        if self.tower is not None:
            return self.tower.features(pixel_values, self.layers, keep)
        out = self.model(pixel_values=pixel_values, output_hidden_states=bool(self.layers) or keep is not None)
        feats = features(self.family, self.model, out, self.config, self.layers)
        if keep is not None:  # the token sequence entering block keep + 1, for stage three
            feats[TOKENS] = out.hidden_states[keep]
        return feats


def load_encoder(model: str = DEFAULT_MODEL, preprocess: str = "clip", device: str = "auto",
                 dtype: str = "auto", layers: str | None = None, weights: bool = True, tokens: int | None = None,
                 revision: str | None = None, fingerprint: str = "", runtime: str | None = TORCH) -> Encoder:
    """Load an encoder by hub id or local folder, at one exact checkpoint.

    `revision` (a branch, tag or commit; default `main`) is resolved to the commit hash that is
    loaded and recorded. A head or cache loads its encoder again with the `revision` it recorded,
    and a local folder's `fingerprint` (the sha256 of its weight files) must still match.
    With `weights=False` only the model's config is read: enough for the identity that decides
    whether a cache already holds what is asked, in about a second. `image_size`, which needs the
    image processor (slow to import), is filled in when the weights load. `runtime` (`fercache.onnxrt`):
    torch (the default: callers that tune or read the model itself need it), onnxruntime, or
    None/auto (ONNX Runtime for float32 and int8 on the CPU where installed), what encodes faces.
    """
    dev = pick_device(device)
    if dtype == INT8:  # the float32 encoder, its Linear layers then quantised (`fercache.accelerate`)
        return int8_encoder(load_encoder(model, preprocess, device, "float32", layers=layers, weights=weights,
                                         tokens=tokens, revision=revision, fingerprint=fingerprint), dev,
                            pick_runtime(runtime, dev, INT8, model))
    if model == PIXELS:
        pick_runtime(runtime, dev, "float32", model)  # --runtime onnxruntime: a one-line error
        if layers:
            raise UserError("--layers needs a neural encoder; the pixels baseline has none")
        if revision or tokens is not None:
            raise UserError(f"{'--revision' if revision else '--tokens'} needs a neural encoder; the pixels baseline "
                            "has none")
        return Encoder(Identity(PIXELS, "none", "pixels", "float32", image_size=SIZE), {None: SIZE * SIZE})
    choice(preprocess, PREPROCESS, "preprocessing")
    backend = backend_of(model)
    enc = (_library_encoder(backend, model, preprocess, dev, dtype, layers, weights, tokens, revision, fingerprint)
           if backend is not None else _hf_encoder(model, preprocess, dev, dtype, layers, weights, tokens, revision,
                                                   fingerprint))
    enc.identity = replace(enc.identity, runtime=pick_runtime(runtime, dev, enc.identity.dtype, model))
    if enc.identity.runtime == ORT and enc.model is not None:
        enc.graph = onnx_graph(enc)
        enc.model.to("meta")  # ONNX Runtime holds the weights now: torch's copy is let go (the module stays)
    return enc


def _hf_encoder(model: str, preprocess: str, dev: torch.device, dtype: str, layers: str | None, weights: bool,
                tokens: int | None, revision: str | None, fingerprint: str) -> Encoder:
    """A Hugging Face vision model as an `Encoder`, on torch."""
    checkpoint = resolve(model, revision, fingerprint)
    pin = checkpoint.load_kwargs

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, **pin)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model '{model}': {first_line(exc)}") from None
    cls, family, vision = model_class(model, config), family_of(config), vision_config(config)
    n_layers = layer_count(config)
    if layers and n_layers is None:
        known = ", ".join(f.name for f in FAMILIES.values())
        raise UserError(f"--layers: model '{model}' ({config.model_type}) is of no family whose layers fercache "
                        f"reads ({known}); its pooled feature works")
    check_tokens(model, config.model_type, tokens, n_layers if family and family.kind != "stage" else None)
    torch_dtype = pick_dtype(dtype, dev)
    layer_ids = tuple(parse_layers(layers, n_layers or 0))
    identity = Identity(model, preprocess, family.feature if family else "pooler_output",
                        str(torch_dtype).removeprefix("torch."), revision=checkpoint.revision,
                        weights=checkpoint.weights, layers=layer_ids, tokens=tokens)
    enc = Encoder(identity, feature_dims(model, config, layer_ids), family=family, config=vision)
    if weights:
        processor = None
        if preprocess == "clip":
            from transformers import AutoImageProcessor

            try:
                processor = AutoImageProcessor.from_pretrained(model, **pin)
            except (OSError, ValueError) as exc:
                raise UserError(f"model '{model}' has no usable image processor config ({first_line(exc)}); "
                                "try --preprocess seed") from None
        recipe = recipe_for(preprocess, processor, getattr(vision, "image_size", None) or 224)
        enc.identity = replace(identity, image_size=recipe.crop)
        # Weights cast to the compute dtype: measurably faster than autocast on CPU and GPU.
        attn = {"attn_implementation": "sdpa"} if getattr(cls, "_supports_sdpa", False) else {}  # conv nets: none
        try:
            net, info = cls.from_pretrained(model, dtype=torch_dtype, output_loading_info=True, **attn, **pin,
                                            **(family.load if family else {}))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the weights of model '{model}': {first_line(exc)}") from None
        if info["missing_keys"]:  # newly initialised: random numbers, not the model's features
            raise UserError(f"model '{model}' lacks {len(info['missing_keys'])} of {cls.__name__}'s weights "
                            f"(first: {sorted(info['missing_keys'])[0]}); they would be random numbers")
        enc.model = net.to(dev).eval().requires_grad_(False)
        enc.prep = Preprocessor(recipe, dev, torch_dtype)
    return enc


def check_tokens(model: str, kind: str, tokens: int | None, n_blocks: int | None) -> None:
    """`--tokens K` needs a token tower (`n_blocks`: its block count; None: it has none) with K < blocks."""
    if tokens is None:
        return
    if n_blocks is None:
        raise UserError(f"--tokens: model '{model}' ({kind}) has no token sequence to store; "
                        "stage three tunes ViT-like towers (CLIP, SigLIP, DINOv2, ViT)")
    if not 0 <= tokens < n_blocks:
        raise UserError(f"--tokens {tokens}: model '{model}' has blocks 1 to {n_blocks}; tokens 0 to {n_blocks - 1} "
                        "(--tokens K stores what enters block K+1)")


def _library_encoder(backend: Backend, model: str, preprocess: str, dev: torch.device, dtype: str,
                     layers: str | None, weights: bool, tokens: int | None, revision: str | None,
                     fingerprint: str) -> Encoder:
    """An OpenCLIP or timm model as an `Encoder`: the same checks, identity and features as the HF families'."""
    backend.library(model)  # a missing extra is named before anything is fetched
    checkpoint = resolve(model, revision, fingerprint, repo=backend.repo(model), config=backend.config)
    torch_dtype = pick_dtype(dtype, dev)
    empty = backend.open(model, checkpoint, torch_dtype, weights=False)  # on `meta`: its config and sizes, fast
    kind = f"{backend.name} {type(empty.module).__name__}"
    if layers and empty.depth is None:
        raise UserError(f"--layers: model '{model}' ({kind}) has no blocks fercache reads; its pooled feature works")
    check_tokens(model, kind, tokens, empty.depth if empty.token_tower else None)
    layer_ids = tuple(parse_layers(layers, empty.depth or 0))
    recipe = recipe_for(preprocess, None, empty.image_size) if preprocess == "seed" else empty.recipe()
    identity = Identity(model, preprocess, empty.feature, str(torch_dtype).removeprefix("torch."),
                        image_size=recipe.crop, revision=checkpoint.revision, weights=checkpoint.weights,
                        layers=layer_ids, tokens=tokens)
    enc = Encoder(identity, empty.dims(layer_ids))
    if weights:
        enc.tower = backend.open(model, checkpoint, torch_dtype, weights=True)
        enc.model = enc.tower.module.to(dev)
        enc.prep = Preprocessor(recipe, dev, torch_dtype)
    return enc
