"""timm checkpoints (EVA-02, ConvNeXt V2, EfficientNet V2, ViTs, ...): read as timm reads them.

A folder holding timm's `config.json` and `model.safetensors` (a `timm/<name>` hub snapshot, or a
local copy) loads through timm's own `create_model('local-dir:…', pretrained=True)`; its eval
preprocessing is `resolve_data_config` + `create_transform`. The pooled feature is timm's own probe
feature, `forward_head(forward_features(x), pre_logits=True)`. Block k's feature: for token towers
(ViT, EVA, DeiT, ...) block k's tokens through the final norm and the same head (so the last
block's is the pooled feature); for conv nets (ConvNeXt, ...) stage k's map averaged.
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

from fercache.backends import Tower
from fercache.errors import UserError
from fercache.preprocess import Recipe, torchvision_recipe


class TimmTower(Tower):
    """A timm model: its `blocks` (token towers) or `stages` (conv nets)."""

    feature = "pre_logits"

    def __init__(self, model: torch.nn.Module, pre_logits: bool = True):
        self.module = model
        self.pre_logits = pre_logits  # False: through the classifier too (OpenCLIP's trunks project with it)
        # conv nets keep their stages as `stages` (ConvNeXt, ResNet-like) or `blocks` (EfficientNet);
        # token towers (ViT, DeiT, EVA, ...) embed patches, then run `blocks`
        self.blocks = getattr(model, "stages", None) or getattr(model, "blocks", None)
        self.token_tower = hasattr(model, "patch_embed") and not hasattr(model, "stages")
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        if size[-1] != size[-2]:
            raise UserError(f"timm model input {size}: fercache reproduces square inputs only")
        self.image_size = int(size[-1])

    def recipe(self) -> Recipe:
        cfg = resolve_data_config(model=self.module)
        if cfg.get("crop_mode", "center") not in ("center", "squash"):
            raise UserError(f"timm crop mode '{cfg['crop_mode']}' is not reproduced (center and squash are)")
        side = cfg["input_size"][-1]
        return torchvision_recipe(math.floor(side / cfg["crop_pct"]), side, cfg["interpolation"], cfg["mean"],
                                  cfg["std"])

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward_head(self.module.forward_features(x), pre_logits=True)

    def read(self, h: torch.Tensor) -> torch.Tensor:
        if h.ndim == 4:  # a stage's (B, C, H, W) map
            return h.mean((-2, -1))
        return self.module.forward_head(self.module.norm(h), pre_logits=self.pre_logits)


def open(folder: Path, dtype: torch.dtype, weights: bool) -> TimmTower:  # noqa: A001 (the backend protocol)
    """The timm model in `folder`: with its weights in `dtype`, or empty on `meta`."""
    if not weights:
        with torch.device("meta"):
            return TimmTower(timm.create_model(f"local-dir:{folder}", pretrained=False).eval())
    net = timm.create_model(f"local-dir:{folder}", pretrained=True)
    return TimmTower(net.to(dtype).eval().requires_grad_(False))
