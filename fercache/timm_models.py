"""timm checkpoints (EVA-02, ConvNeXt V2, EfficientNet V2, ViTs, ...): read as timm reads them.

A folder holding timm's `config.json` and `model.safetensors` (a `timm/<name>` hub snapshot, or a
local copy) loads through timm's own `create_model('local-dir:…', pretrained=True)`; its eval
preprocessing is `resolve_data_config` + `create_transform`. The pooled feature is timm's own probe
feature, `forward_head(forward_features(x), pre_logits=True)`. Block k's feature: for token towers
(ViT, EVA, DeiT, ...) block k's tokens through the final norm and the same head (so the last
block's is the pooled feature); for conv nets (ConvNeXt, ...) stage k's map averaged.

Stage three (`finetune`) tunes the top blocks of a ViT or EVA (`tuning`): the blocks called as
`forward_features` calls them (EVA's with its rotary embedding), then `head` on a copy of the final
norm and pooling head.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.data import DEFAULT_CROP_PCT, resolve_data_config

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
        """timm's eval transform (`transforms_imagenet_eval`): resize to floor(side / crop_pct), its
        shortest edge (`center`), a square (`squash`) or its longest edge (`border`: ResizeKeepRatio, then
        padded with the mean colour), then a centre crop to the side (torchvision's pads with 0)."""
        cfg = resolve_data_config(model=self.module)
        side, mode = cfg["input_size"][-1], cfg.get("crop_mode")
        fit = {"squash": "square", "border": "longest"}.get(mode, "shortest")  # timm: anything else is `center`
        fill = [round(255 * v) for v in cfg["mean"]] if mode == "border" else 0
        return torchvision_recipe(math.floor(side / (cfg.get("crop_pct") or DEFAULT_CROP_PCT)), side,
                                  cfg["interpolation"], cfg["mean"], cfg["std"], fit, fill)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward_head(self.module.forward_features(x), pre_logits=True)

    def read(self, h: torch.Tensor) -> torch.Tensor:
        if h.ndim == 4:  # a stage's (B, C, H, W) map
            return h.mean((-2, -1))
        return head(self.module, h, self.pre_logits)


def head(model: torch.nn.Module, h: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
    """A token tower's block output read as its pooled feature is: the final norm, then its own `forward_head`."""
    return model.forward_head(model.norm(h), pre_logits=pre_logits)


# What `head` reads after the blocks (`head`, the classifier, only when OpenCLIP projects with it)
HEAD_PARTS = ("norm", "fc_norm", "attn_pool")


def tunable(model: torch.nn.Module, where: str) -> None:
    """Stage three tunes timm's ViT and EVA (their blocks run in sequence, as `block_call` calls them)."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if type(model) not in (VisionTransformer, Eva):
        raise UserError(f"{where} (timm {type(model).__name__}) is not a tower fercache can tune "
                        "(timm ViT and EVA towers are, conv nets are not)")


def rope_embed(model: torch.nn.Module) -> torch.Tensor:
    """EVA's rotary embedding of the patch grid, as `_pos_embed` makes it, in float32 whatever the
    model's dtype: its buffers are computed at init, never loaded, so they are rebuilt rather than
    read back rounded from a bfloat16 model (a learnt one, `rope_mixed`, is read from the model)."""
    rope = model.rope
    if hasattr(rope, "reset_parameters") and not any(True for _ in rope.parameters()):
        rope = copy.deepcopy(rope).float()
        rope.reset_parameters()
    fixed = hasattr(rope, "feat_shape") and not model.dynamic_img_size
    with torch.no_grad():
        return (rope.get_embed() if fixed else rope.get_embed(shape=model.patch_embed.grid_size)).float()


def block_call(model: torch.nn.Module) -> Callable[[torch.nn.Module, int, torch.Tensor], torch.Tensor]:
    """How `forward_features` calls block `index` (0-based) on tokens (eval, no mask): EVA's with its
    rotary embedding (one per block when `rope_mixed`), a ViT's (or a rope-less EVA's) on the tokens alone."""
    if getattr(model, "rope", None) is None:
        return lambda block, _index, h: block(h)
    embed, mixed = rope_embed(model), getattr(model, "rope_mixed", False)
    return lambda block, index, h: block(h, rope=embed[index] if mixed else embed)


def tuning(model: torch.nn.Module, where: str):
    """Stage three's view of a timm ViT or EVA (`finetune.LibraryTower`); another model: a one-line error."""
    from fercache.finetune import LibraryTower

    tunable(model, where)
    return LibraryTower(model, "blocks", HEAD_PARTS, block_call(model), head, model.embed_dim)


def open(folder: Path, dtype: torch.dtype, weights: bool) -> TimmTower:  # noqa: A001 (the backend protocol)
    """The timm model in `folder`: with its weights in `dtype`, or empty on `meta`."""
    if not weights:
        with torch.device("meta"):
            return TimmTower(timm.create_model(f"local-dir:{folder}", pretrained=False).eval())
    net = timm.create_model(f"local-dir:{folder}", pretrained=True)
    return TimmTower(net.to(dtype).eval().requires_grad_(False))
