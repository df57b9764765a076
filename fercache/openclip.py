"""OpenCLIP checkpoints (LAION, DataComp, DFN, EVA-CLIP, SigLIP, MetaCLIP): read as OpenCLIP reads them.

A folder holding `open_clip_config.json` and its weights (a hub snapshot, or a local copy) loads
through OpenCLIP's own `create_model('local-dir:…')`. The pooled feature is `encode_image`: the
projected image embedding CLIP_benchmark probes. Block k's feature is its tokens read by the
tower's own head: OpenCLIP's ViT pools them (`_pool`: final norm, CLS or mean) and projects them;
a timm trunk (SigLIP, EVA-CLIP) reads them as timm does, then through the projection head. So the
last block's feature is `encode_image` itself. A timm conv trunk's stage k is its map averaged;
OpenCLIP's own ResNets give their pooled feature only.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from fercache.backends import Tower
from fercache.errors import UserError
from fercache.preprocess import Recipe, torchvision_recipe
from fercache.timm_models import TimmTower


class OpenClipTower(Tower):
    """OpenCLIP's image tower (`model.visual`), of a whole CLIP model whose text tower zeroshot uses."""

    feature = "encode_image"

    def __init__(self, clip: torch.nn.Module):
        self.clip = clip
        self.module = clip.visual
        # a timm image tower, run as OpenCLIP runs it: `trunk(x)`, its classifier included, then `head`
        self.trunk = TimmTower(self.module.trunk, pre_logits=False) if hasattr(self.module, "trunk") else None
        transformer = getattr(self.module, "transformer", None)
        self.blocks = self.trunk.blocks if self.trunk else getattr(transformer, "resblocks", None)
        self.token_tower = self.trunk.token_tower if self.trunk else self.blocks is not None
        if transformer is not None and not getattr(transformer, "batch_first", True):
            raise UserError("this OpenCLIP version runs its blocks sequence-first: upgrade open_clip_torch")
        cfg = open_clip.get_model_preprocess_cfg(clip)
        size = cfg["size"]
        if not isinstance(size, int) and size[0] != size[1]:
            raise UserError(f"OpenCLIP model input {size}: fercache reproduces square inputs only")
        self.image_size = size if isinstance(size, int) else size[0]
        self.cfg = cfg

    def recipe(self) -> Recipe:
        # A square 48x48 face: OpenCLIP's `shortest` (Resize + CenterCrop), `squash` (Resize to a
        # square) and `longest` (ResizeKeepRatio + CenterCropOrPad) all resize it to the input side.
        return torchvision_recipe(self.image_size, self.image_size, self.cfg.get("interpolation", "bicubic"),
                                  self.cfg["mean"], self.cfg["std"])

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)

    def read(self, h: torch.Tensor) -> torch.Tensor:
        if self.trunk is not None:  # a conv trunk's stage: its map averaged (the head takes the last stage's only)
            return self.module.head(self.trunk.read(h)) if h.ndim == 3 else self.trunk.read(h)
        pooled, _ = self.module._pool(h)  # final norm and CLS (or mean) pooling, as its forward
        return pooled @ self.module.proj if self.module.proj is not None else pooled


def _create(folder: Path, weights: bool, device: str = "cpu") -> torch.nn.Module:
    return open_clip.create_model(f"local-dir:{folder}", load_weights=weights, device=device
                                  ).eval().requires_grad_(False)


def open(folder: Path, dtype: torch.dtype, weights: bool) -> OpenClipTower:  # noqa: A001 (the backend protocol)
    """The tower of the OpenCLIP model in `folder`: with its weights in `dtype`, or empty on `meta`."""
    if not weights:
        with torch.device("meta"):
            return OpenClipTower(_create(folder, False, "meta"))
    return OpenClipTower(_create(folder, True).to(dtype))


def text_tower(folder: Path, device: torch.device):
    """A whole OpenCLIP model in float32 and its own tokenizer, for zero-shot."""
    clip = _create(folder, True).to(device)
    return clip, open_clip.get_tokenizer(f"local-dir:{folder}")
