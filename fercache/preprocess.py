"""Model inputs from FER2013's 48x48 uint8 arrays, made in batches on the model's device.

Both recipes start from a gray face shown as 3 identical channels:
- `clip`: exactly what the model's own image processor does, read from its settings: resize (a
  shortest edge or a fixed height and width; ConvNeXt's `crop_pct`: shortest edge to size/crop_pct,
  then a centre crop to size, below 384), the optional centre crop, its resample filter, rescale
  (EfficientNet's `rescale_offset`), mean and std (EfficientNet's `include_top` divides by std
  twice). For CLIP: shortest edge to 224 bicubic, centre crop 224, CLIP's mean and std.
- `seed`: the reference project's recipe: resize to the model's size, bilinear, mean 0.5, std 0.5.

PIL resizes an 8-bit image in two separable passes (horizontal, then vertical) with fixed-point
weights, rounding to uint8 after each. For a fixed 48 -> S resize each pass is a small matrix
product, so a batch is resized with two matmuls over PIL's own integer weights: the same pixels as
the processor's PIL path, bit for bit, without per-image PIL calls and without ever holding a whole
split of 224x224 tensors. Normalising is one multiply-add per channel, within float32 rounding of
the processor's steps. (transformers 5's torchvision-backed processors, used where torchvision is
installed, resize with torchvision instead and differ from PIL by a few levels; the PIL path is
the reference, as it is transformers 4's only one.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fercache.errors import UserError
from fercache.names import PREPROCESS, SIZE
PRECISION_BITS = 22  # PIL's fixed-point precision for 8-bit resampling (32 - 8 - 2)


def _sinc(x: float) -> float:
    return 1.0 if x == 0 else math.sin(math.pi * x) / (math.pi * x)


def _hamming(x: float) -> float:
    x = abs(x)
    return 1.0 if x == 0 else 0.0 if x >= 1 else math.sin(math.pi * x) / (math.pi * x) * (0.54 + 0.46 * math.cos(math.pi * x))


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


NEAREST = 0  # PIL's code for nearest-neighbour resampling (EfficientNet's configs use it)
# PIL's convolution filters by the integer codes image-processor configs store: (kernel, support).
FILTERS: dict[int, tuple[Callable[[float], float], float]] = {
    1: (lambda x: _sinc(x) * _sinc(x / 3) if -3 <= x < 3 else 0.0, 3.0),  # lanczos
    2: (lambda x: max(0.0, 1 - abs(x)), 1.0),  # bilinear
    3: (_bicubic, 2.0),
    4: (lambda x: 1.0 if -0.5 < x <= 0.5 else 0.0, 0.5),  # box
    5: (_hamming, 1.0),
}


@dataclass(frozen=True)
class Recipe:
    """How a 48x48 face becomes a model input: resize to `resize`, centre-crop to `crop`, normalise."""

    name: str
    resize: int
    crop: int
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255
    rounded: bool = False  # the centre crop starts at round((side - crop) / 2), as torchvision's (else floor, as transformers')
    shortest: bool = True  # an image of another shape: its shortest edge to `resize` (else a resize x resize square)

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of any shape is resized to: transformers' `get_resize_output_image_size`
        (shortest edge, the long one truncated, as torchvision's Resize(int)), or a square."""
        if not self.shortest:
            return self.resize, self.resize
        short, long = min(height, width), max(height, width)
        long = int(self.resize * long / short)
        return (long, self.resize) if width <= height else (self.resize, long)

    def start(self, side: int) -> int:
        """The centre crop's first row (column) in a resized side: transformers' floor, torchvision's round."""
        return int(round((side - self.crop) / 2.0)) if self.rounded else (side - self.crop) // 2


def _side(size, key: str) -> int | None:
    """One entry of an image processor's `size`: a dict in transformers 4, a `SizeDict` in 5."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _per_channel(value) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (3,))


# Processors that only resize, centre-crop, rescale and normalise, each setting read from the
# processor (LeViT's resize rule, MobileViT's channel flip and others are not modelled).
PIPELINES = ("CLIP", "Siglip", "ViT", "DeiT", "Bit", "ConvNext", "EfficientNet")


def recipe_for(name: str, processor, image_size: int) -> Recipe:
    """The recipe `name` for a model, given its image processor (needed for `clip` only).

    Reads only the processor's settings, so every family whose processor is one of transformers'
    resize / crop / rescale / normalise pipelines is covered by the same code: CLIP, SigLIP, ViT
    and DINOv2 (BiT), ConvNeXt and ResNet (crop_pct), EfficientNet (offset, include_top).
    """
    if name == "seed":
        return Recipe("seed", image_size, image_size, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), shortest=False)
    if name != "clip":
        raise UserError(f"unknown preprocessing '{name}': choose one of {', '.join(PREPROCESS)}")
    kind = type(processor).__name__
    if re.sub(r"ImageProcessor(Pil|Fast)?$", "", kind) not in PIPELINES:
        raise UserError(f"{kind}: not one of the image processors fercache reproduces exactly "
                        f"({', '.join(p + 'ImageProcessor' for p in PIPELINES)}); try --preprocess seed")
    resize = crop = SIZE
    shortest = True
    if getattr(processor, "do_resize", True):
        size = processor.size
        height, width, edge = _side(size, "height"), _side(size, "width"), _side(size, "shortest_edge")
        if edge is None and (height is None or height != width):
            raise UserError(f"{kind} resizes to {size}: fercache supports a shortest edge or a square size")
        resize = crop = int(edge or height)
        crop_pct = getattr(processor, "crop_pct", None)
        shortest = edge is not None and not (crop_pct and edge >= 384)  # ConvNeXt from 384 px: a square
        if crop_pct and edge is not None and edge < 384:  # ConvNeXt's rule (its `resize`)
            resize = int(edge / crop_pct)
    if getattr(processor, "do_center_crop", False):
        crop = _side(processor.crop_size, "height")
        if crop != _side(processor.crop_size, "width") or crop > resize:
            raise UserError(f"{kind} crops {resize} px to {processor.crop_size}: fercache supports a square "
                            "crop no larger than the resized image")
    # pixel * rescale - offset - mean, divided by std (by std squared with EfficientNet's include_top)
    do_rescale = getattr(processor, "do_rescale", True)
    rescale = float(processor.rescale_factor) if do_rescale else 1.0
    offset = 1.0 if do_rescale and getattr(processor, "rescale_offset", False) else 0.0
    normalize = getattr(processor, "do_normalize", True)
    std = _per_channel(processor.image_std)
    mean = (_per_channel(processor.image_mean) if normalize else np.zeros(3)) + offset
    std = (std if normalize else np.ones(3)) * (std if getattr(processor, "include_top", False) else 1.0)
    return Recipe("clip", int(resize), int(crop), int(processor.resample), tuple(map(float, mean)),
                  tuple(map(float, std)), rescale, shortest=shortest)


INTERPOLATIONS = {"nearest": NEAREST, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def torchvision_recipe(resize: int, crop: int, interpolation: str, mean, std) -> Recipe:
    """torchvision's Resize (on a PIL image: PIL's own resize), CenterCrop, ToTensor and Normalize,
    the eval pipeline OpenCLIP and timm build: CenterCrop starts at round((resize - crop) / 2)."""
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"interpolation '{interpolation}' is not reproduced (use one of {', '.join(INTERPOLATIONS)})")
    if crop > resize:
        raise UserError(f"a {crop} px crop of a {resize} px image pads it: fercache reproduces crops only")
    return Recipe("clip", resize, crop, INTERPOLATIONS[interpolation], tuple(map(float, _per_channel(mean))),
                  tuple(map(float, _per_channel(std))), 1 / 255, rounded=True)


def resize_weights(size_in: int, size_out: int, resample: int) -> np.ndarray:
    """PIL's 8-bit 1-D resize as an integer (size_out x size_in) matrix of fixed-point weights.

    A transcription of Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` (Resample.c):
    output = clip((x @ W.T + 2**21) >> 22, 0, 255), exactly as PIL computes each pass (the
    `Preprocessor` divides W by 2**22 up front, exact for a power of 2, and rounds half up).
    Nearest (0) is Pillow's `ImagingScaleAffine`: a source position accumulated in double steps.
    """
    if resample == NEAREST:
        weights = np.zeros((size_out, size_in))
        step, pos = size_in / size_out, size_in / size_out * 0.5
        for xx in range(size_out):
            weights[xx, int(pos)] = 1 << PRECISION_BITS
            pos += step
        return weights
    if resample not in FILTERS:
        raise UserError(f"resampling filter {resample} is not supported (use nearest, bilinear, bicubic, "
                        "lanczos, box or hamming)")
    kernel, support = FILTERS[resample]
    scale = size_in / size_out
    filterscale = max(scale, 1.0)
    support *= filterscale
    weights = np.zeros((size_out, size_in))
    for xx in range(size_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), size_in)
        w = np.array([kernel((x - center + 0.5) / filterscale) for x in range(xmin, xmax)])
        weights[xx, xmin:xmax] = w / w.sum() if w.sum() != 0 else w
    return np.trunc(weights * (1 << PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5))


class Preprocessor:
    """Turns uint8 (B, 48, 48) batches into normalised (B, 3, crop, crop) model inputs."""

    def __init__(self, recipe: Recipe, device: torch.device, dtype: torch.dtype = torch.float32):
        # float64 holds PIL's integer sums exactly; MPS has no float64 (then: within one level).
        self.exact = torch.float32 if device.type == "mps" else torch.float64
        w = resize_weights(SIZE, recipe.resize, recipe.resample) / (1 << PRECISION_BITS)  # exact: a power of 2
        top = recipe.start(recipe.resize)
        w = torch.from_numpy(w[top:top + recipe.crop]).to(device, self.exact)
        self.wx, self.wy = w.T.contiguous(), w  # horizontal pass right-multiplies, vertical left
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # native shapes' matrices
        mean, std = torch.tensor(recipe.mean), torch.tensor(recipe.std)
        # normalise as one multiply-add per channel: (x * rescale - mean) / std
        self.scale = (recipe.rescale / std).view(1, 3, 1, 1).to(device)
        self.shift = (-mean / std).view(1, 3, 1, 1).to(device)
        self.device, self.dtype, self.recipe = device, dtype, recipe

    def __call__(self, pixels: np.ndarray | torch.Tensor | list[np.ndarray]) -> torch.Tensor:
        """A (B, 48, 48) gray batch, or (`extract --images native`) a list of H x W x 3 images of any sizes."""
        if isinstance(pixels, list):
            return self.native(pixels)
        x = torch.as_tensor(pixels).to(self.device, non_blocking=True).to(self.exact)
        x = torch.matmul(x, self.wx).add_(0.5).floor_().clamp_(0, 255)  # (B, 48, C): PIL's horizontal pass
        x = torch.matmul(self.wy, x).add_(0.5).floor_().clamp_(0, 255)  # (B, C, C): then the vertical one
        x = torch.addcmul(self.shift, x.float().unsqueeze(1), self.scale)  # gray -> 3 normalised channels
        return x.to(self.dtype)

    def native(self, images: list[np.ndarray]) -> torch.Tensor:
        """Colour images as stored, each resized by the processor's rule for its own shape (`Recipe.resized`),
        with the same two PIL passes per channel as the gray path; images of one shape go as one batch."""
        out = torch.empty((len(images), 3, self.recipe.crop, self.recipe.crop), dtype=self.dtype, device=self.device)
        shapes: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            shapes.setdefault(image.shape, []).append(i)
        for (height, width, _), rows in shapes.items():
            wy, wx = self._weights(height, width)
            x = torch.from_numpy(np.stack([images[i] for i in rows])).to(self.device).permute(0, 3, 1, 2).to(self.exact)
            x = torch.matmul(x, wx).add_(0.5).floor_().clamp_(0, 255)  # (B, 3, H, C): horizontal pass
            x = torch.matmul(wy, x).add_(0.5).floor_().clamp_(0, 255)  # (B, 3, C, C): vertical pass
            out[rows] = torch.addcmul(self.shift, x.float(), self.scale).to(self.dtype)
        return out

    def _weights(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The vertical (crop x H) and horizontal (W x crop) resize-and-crop matrices for one image shape."""
        key = (height, width)
        if key not in self._cache:
            crop, sides = self.recipe.crop, self.recipe.resized(height, width)
            if min(sides) < crop:
                raise UserError(f"a {height}x{width} image resizes to {sides[0]}x{sides[1]}, smaller than the "
                                f"{crop} px crop: fercache reproduces crops only")
            wy, wx = (resize_weights(n, side, self.recipe.resample) / (1 << PRECISION_BITS) for n, side in
                      ((height, sides[0]), (width, sides[1])))
            wy, wx = wy[self.recipe.start(sides[0]):][:crop], wx[self.recipe.start(sides[1]):][:crop]
            self._cache[key] = (torch.from_numpy(wy).to(self.device, self.exact),
                                torch.from_numpy(wx.T.copy()).to(self.device, self.exact))
        return self._cache[key]
