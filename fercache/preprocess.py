"""Model inputs from FER2013's 48x48 uint8 arrays (or native images of any size), made in batches on the model's device.

Both recipes start from a gray face shown as 3 identical channels:
- `clip`: exactly what the model's own image processor does, read from its settings: resize (a
  shortest edge or a fixed height and width; ConvNeXt's `crop_pct`: shortest edge to size/crop_pct,
  then a centre crop to size, below 384), the optional centre crop, its resample filter, rescale
  (EfficientNet's `rescale_offset`), mean and std (EfficientNet's `include_top` divides by std
  twice). For CLIP: shortest edge to 224 bicubic, centre crop 224, CLIP's mean and std.
- `seed`: the reference project's recipe: resize to the model's size, bilinear, mean 0.5, std 0.5.
OpenCLIP's and timm's eval transforms (torchvision's Resize on a PIL image, CenterCrop, ToTensor,
Normalize; their ResizeKeepRatio and CenterCropOrPad) are recipes too (`torchvision_recipe`).

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
    """How a face becomes a model input: resize to `resize` (by `fit`), centre-crop (or pad) to `crop`, normalise."""

    name: str
    resize: int
    crop: int
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255
    rounded: bool = False  # the centre crop starts at round((side - crop) / 2), as torchvision's (else floor, as transformers')
    fit: str = "shortest"  # an image of another shape: its shortest edge to `resize`, a `square`, or its `longest` edge
    fill: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the colour (0-255) padding a side resized below `crop`

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of any shape is resized to: `shortest`: transformers'
        `get_resize_output_image_size` (the long edge truncated, as torchvision's Resize(int)); `square`;
        `longest`: OpenCLIP's and timm's ResizeKeepRatio(longest=1) (both edges rounded, then padded)."""
        if self.fit == "square":
            return self.resize, self.resize
        if self.fit == "longest":
            ratio = max(height / self.resize, width / self.resize)
            return round(height / ratio), round(width / ratio)
        short, long = min(height, width), max(height, width)
        long = int(self.resize * long / short)
        return (long, self.resize) if width <= height else (self.resize, long)

    def start(self, side: int) -> int:
        """The centre crop's first row (column) in a resized side: transformers' floor, torchvision's round;
        a side shorter than the crop: minus its padding before it, (crop - side) // 2 (torchvision's `pad`)."""
        if side < self.crop:
            return -((self.crop - side) // 2)
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
        return Recipe("seed", image_size, image_size, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), fit="square")
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
                  tuple(map(float, std)), rescale, fit="shortest" if shortest else "square")


INTERPOLATIONS = {"nearest": NEAREST, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def torchvision_recipe(resize: int, crop: int, interpolation: str, mean, std, fit: str = "shortest",
                       fill=0) -> Recipe:
    """The eval pipeline OpenCLIP and timm build: torchvision's Resize (on a PIL image: PIL's own resize;
    an int: the shortest edge, a pair: a `square`) or their ResizeKeepRatio (`longest`), then CenterCrop
    or CenterCropOrPad (start at round((side - crop) / 2); a shorter side padded with `fill`), ToTensor
    and Normalize."""
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"interpolation '{interpolation}' is not reproduced (use one of {', '.join(INTERPOLATIONS)})")
    return Recipe("clip", resize, crop, INTERPOLATIONS[interpolation], tuple(map(float, _per_channel(mean))),
                  tuple(map(float, _per_channel(std))), 1 / 255, rounded=True, fit=fit,
                  fill=tuple(map(float, _per_channel(fill))))


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
    """Turns uint8 (B, 48, 48) batches, or lists of H x W x 3 images, into normalised (B, 3, crop, crop) inputs."""

    def __init__(self, recipe: Recipe, device: torch.device, dtype: torch.dtype = torch.float32):
        # float64 holds PIL's integer sums exactly; MPS has no float64 (then: within one level).
        self.exact = torch.float32 if device.type == "mps" else torch.float64
        self.device, self.dtype, self.recipe = device, dtype, recipe
        # per image shape: the resize-and-crop matrices and where their output lies in the crop (48x48 made now)
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}
        self._weights(SIZE, SIZE)
        mean, std = torch.tensor(recipe.mean), torch.tensor(recipe.std)
        # normalise as one multiply-add per channel: (x * rescale - mean) / std
        self.scale = (recipe.rescale / std).view(1, 3, 1, 1).to(device)
        self.shift = (-mean / std).view(1, 3, 1, 1).to(device)
        self.fill = torch.tensor(recipe.fill, dtype=self.exact).view(1, 3, 1, 1).to(device)

    def __call__(self, pixels: np.ndarray | torch.Tensor | list[np.ndarray]) -> torch.Tensor:
        """A (B, 48, 48) gray batch, or (`extract --images native`) a list of H x W x 3 images of any sizes."""
        if isinstance(pixels, list):
            return self.native(pixels)
        x = torch.as_tensor(pixels).to(self.device, non_blocking=True).to(self.exact).unsqueeze(1)
        x = self._resize(x, SIZE, SIZE)  # (B, 1, C, C), or (B, 3, C, C) where padded with a colour
        return torch.addcmul(self.shift, x.float(), self.scale).to(self.dtype)  # gray -> 3 normalised channels

    def native(self, images: list[np.ndarray]) -> torch.Tensor:
        """Colour images as stored, each resized by the recipe's rule for its own shape (`Recipe.resized`),
        with the same two PIL passes per channel as the gray path; images of one shape go as one batch."""
        out = torch.empty((len(images), 3, self.recipe.crop, self.recipe.crop), dtype=self.dtype, device=self.device)
        shapes: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            shapes.setdefault(image.shape, []).append(i)
        for (height, width, _), rows in shapes.items():
            x = torch.from_numpy(np.stack([images[i] for i in rows])).to(self.device).permute(0, 3, 1, 2).to(self.exact)
            out[rows] = torch.addcmul(self.shift, self._resize(x, height, width).float(), self.scale).to(self.dtype)
        return out

    def _resize(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, C, H, W) pixels resized and cropped as PIL does, horizontal pass first, each rounded to
        uint8; a side resized below the crop lies centred on the fill colour (then C becomes 3)."""
        wy, wx, (top, left) = self._weights(height, width)
        x = torch.matmul(x, wx).add_(0.5).floor_().clamp_(0, 255)  # (B, C, H, w): PIL's horizontal pass
        x = torch.matmul(wy, x).add_(0.5).floor_().clamp_(0, 255)  # (B, C, h, w): then the vertical one
        crop = self.recipe.crop
        if x.shape[-2:] == (crop, crop):
            return x
        canvas = self.fill.expand(len(x), 3, crop, crop).clone()
        canvas[:, :, top:top + x.shape[-2], left:left + x.shape[-1]] = x
        return canvas

    def _weights(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """The vertical (h x H) and horizontal (W x w) resize-and-crop matrices for one image shape, and
        where their (h x w) output starts in the crop (not 0 where a side is padded)."""
        key = (height, width)
        if key not in self._cache:
            crop, sides = self.recipe.crop, self.recipe.resized(height, width)
            wy, wx = (resize_weights(n, side, self.recipe.resample) / (1 << PRECISION_BITS)  # exact: a power of 2
                      for n, side in ((height, sides[0]), (width, sides[1])))
            top, left = (self.recipe.start(side) for side in sides)
            wy, wx = wy[max(top, 0):][:crop], wx[max(left, 0):][:crop]
            self._cache[key] = (torch.from_numpy(wy).to(self.device, self.exact),
                                torch.from_numpy(wx.T.copy()).to(self.device, self.exact),
                                (max(-top, 0), max(-left, 0)))
        return self._cache[key]
