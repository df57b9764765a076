"""OpenCLIP checkpoints (LAION, DataComp, DFN, EVA-CLIP, SigLIP, MetaCLIP): read as OpenCLIP reads them.

A folder holding `open_clip_config.json` and its weights (a hub snapshot, or a local copy) loads
through OpenCLIP's own `create_model('local-dir:…')`. The pooled feature is `encode_image`: the
projected image embedding CLIP_benchmark probes. Block k's feature is its tokens read by the
tower's own head: OpenCLIP's ViT pools them (`_pool`: final norm, CLS or mean) and projects them;
a timm trunk (SigLIP, EVA-CLIP) reads them as timm does, then through the projection head. So the
last block's feature is `encode_image` itself. A timm conv trunk's stage k is its map averaged;
OpenCLIP's own ResNets give their pooled feature only.

Stage three (`finetune`) tunes the top blocks of an OpenCLIP ViT or of a timm ViT/EVA trunk
(`tuning`): blocks as the tower calls them, then `head` on a copy of what reads the last block.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from fercache.backends import Tower
from fercache.errors import UserError
from fercache.preprocess import Recipe, torchvision_recipe
from fercache.timm_models import HEAD_PARTS, TimmTower, block_call, tunable
from fercache.timm_models import head as timm_head


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
        # the model's preprocessing config over OpenCLIP's defaults, as `create_model_and_transforms` reads it
        self.cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), open_clip.get_model_preprocess_cfg(clip)))
        size = self.cfg.size
        if not isinstance(size, int) and size[0] != size[1]:
            raise UserError(f"OpenCLIP model input {size}: fercache reproduces square inputs only")
        self.image_size = size if isinstance(size, int) else size[0]

    def recipe(self) -> Recipe:
        """OpenCLIP's eval transform (`image_transform`): `shortest` (Resize + CenterCrop), `squash`
        (Resize to a square) or `longest` (ResizeKeepRatio + CenterCropOrPad with `fill_color`);
        bilinear where it says so, else bicubic."""
        fit = {"shortest": "shortest", "squash": "square", "longest": "longest"}.get(self.cfg.resize_mode)
        if fit is None:
            raise UserError(f"OpenCLIP resize mode '{self.cfg.resize_mode}' is not reproduced "
                            "(shortest, squash and longest are)")
        interpolation = "bilinear" if self.cfg.interpolation == "bilinear" else "bicubic"
        return torchvision_recipe(self.image_size, self.image_size, interpolation, self.cfg.mean, self.cfg.std, fit,
                                  self.cfg.fill_color)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)

    def read(self, h: torch.Tensor) -> torch.Tensor:
        if self.trunk is not None and h.ndim == 4:  # a conv trunk's stage: its map averaged (the head takes the last's)
            return self.trunk.read(h)
        return head(self.module, h)


def head(visual: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A block's tokens read as `encode_image` reads the last block's: a timm trunk's own head, then
    OpenCLIP's projection head; an OpenCLIP ViT's `_pool` (final norm, CLS or mean pooling), then `proj`."""
    if hasattr(visual, "trunk"):
        return visual.head(timm_head(visual.trunk, h, pre_logits=False))
    pooled, _ = visual._pool(h)
    return pooled @ visual.proj if visual.proj is not None else pooled


def tuning(visual: torch.nn.Module, where: str):
    """Stage three's view of an OpenCLIP image tower (`finetune.LibraryTower`); a ResNet or a timm
    conv trunk: a one-line error."""
    from fercache.finetune import LibraryTower

    if hasattr(visual, "trunk"):
        tunable(visual.trunk, where)
        parts = tuple(f"trunk.{p}" for p in (*HEAD_PARTS, "head")) + ("head",)  # the trunk's classifier projects
        return LibraryTower(visual, "trunk.blocks", parts, block_call(visual.trunk), head, visual.trunk.embed_dim)
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise UserError(f"{where} (OpenCLIP {type(visual).__name__}) is not a tower fercache can tune "
                        "(OpenCLIP ViTs and timm ViT or EVA trunks are)")
    parts = ("ln_post", "attn_pool", "attn_pool_contrastive", "proj")
    return LibraryTower(visual, "transformer.resblocks", parts, _call_block, head, visual.transformer.width)


def _call_block(block: torch.nn.Module, _index: int, h: torch.Tensor) -> torch.Tensor:
    return block(h)  # as `Transformer.forward` calls its resblocks for images: no attention mask


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
