"""What a vision model's features are, per Hugging Face family: the one place that knows families.

The pooled feature (`embeddings`) is the model's `pooler_output`, flattened; `--layers k` reads
`hidden_states[k]` as the family's own pooled output would read it:

- tokens with a CLS token (CLIP, DINOv2, ViT): the CLS token after block k, through the final norm;
- tokens without one (SigLIP): the mean of the tokens after block k, each through the final norm;
- stages (ConvNeXt, ResNet, EfficientNet): stage k's feature map, averaged over its positions.

Any other model whose config maps to a transformers vision model (`AutoModel`, no remote code)
with a pooled output loads too, for its pooled feature only. Feature sizes come from one forward
pass on the `meta` device (shapes, no weights, no memory), through the same code that extracts.
OpenCLIP and timm checkpoints are read by their own libraries instead (`fercache.backends`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fercache.errors import UserError


@dataclass(frozen=True)
class Family:
    """How one architecture's features are read (the README's Models table says it in words)."""

    name: str
    kind: str  # "cls", "mean" or "stage": how hidden_states[k] becomes a vector
    norm: str = ""  # the final norm a token is read through ("cls" and "mean")
    feature: str = "pooler_output"  # what caches and heads record; "cls_token": the final-normed CLS
    load: dict = field(default_factory=dict)  # extra arguments to the model class (and from_pretrained)

    def blocks(self, config) -> int:
        """How many blocks (tokens) or stages (conv nets) `--layers` counts."""
        if self.kind != "stage":
            return config.num_hidden_layers
        return len(getattr(config, "num_block_repeats", None) or config.depths)

    def hidden_index(self, config, k: int) -> int:
        """Where block or stage k is in `hidden_states` (index 0 is the embeddings' output)."""
        repeats = getattr(config, "num_block_repeats", None)
        if repeats is None:
            return k
        # EfficientNet lists every block; stage k ends after the first k stages' (rounded) repeats
        return sum(int(math.ceil(config.depth_coefficient * r)) for r in repeats[:k])

    def read(self, model: torch.nn.Module, out, config, k: int) -> torch.Tensor:
        """The feature after block or stage k of one forward pass's `out`."""
        h = out.hidden_states[self.hidden_index(config, k)]
        if self.kind == "stage":
            return h.mean((-2, -1))
        norm = getattr(getattr(model, "vision_model", model), self.norm)  # transformers 4 nests CLIP's tower
        return norm(h[:, 0]) if self.kind == "cls" else norm(h).mean(1)


FAMILIES: dict[str, Family] = {  # model_type -> family; what the pooled output is, in the comments
    "clip_vision_model": Family("CLIP", "cls", "post_layernorm"),  # the CLS token through post_layernorm
    "siglip_vision_model": Family("SigLIP", "mean", "post_layernorm"),  # its attention-pooling (MAP) head
    "dinov2": Family("DINOv2", "cls", "layernorm"),  # the CLS token through the final layer norm
    # ViT's pooler (dense + tanh) is newly initialised, so random, in fine-tuned checkpoints such as
    # google/vit-base-patch16-224: the feature is what ViTForImageClassification reads instead.
    "vit": Family("ViT", "cls", "layernorm", "cls_token", {"add_pooling_layer": False}),
    "convnext": Family("ConvNeXt", "stage"),  # the last stage averaged, through the final layer norm
    "resnet": Family("ResNet", "stage"),  # the last stage averaged
    "efficientnet": Family("EfficientNet", "stage"),  # the top 1x1 convolution's map averaged
}


def vision_config(config):
    """The vision tower's config: CLIP and SigLIP nest it beside a text tower, the rest are one."""
    return getattr(config, "vision_config", None) or config


def family_of(config) -> Family | None:
    """The known family of a (vision) config; None for any other vision model (pooled feature only)."""
    return FAMILIES.get(vision_config(config).model_type)


def model_class(model: str, config) -> type:
    """The transformers class that loads `model`'s vision tower, or a one-line error if it has none."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    vision = vision_config(config)
    cls = MODEL_MAPPING[type(vision)] if type(vision) in MODEL_MAPPING else None
    if cls is None or getattr(cls, "main_input_name", None) != "pixel_values":
        raise UserError(f"model '{model}' ({config.model_type}) has no vision tower fercache can load")
    return cls


def pooled(family: Family | None, out) -> torch.Tensor:
    """The pooled feature: `pooler_output` flattened (ResNet's is (B, C, 1, 1)); ViT's final-normed CLS."""
    if family is not None and family.feature == "cls_token":
        return out.last_hidden_state[:, 0]
    return out.pooler_output.flatten(1)


def features(family: Family | None, model: torch.nn.Module, out, config,
             layers: tuple[int, ...]) -> dict[int | None, torch.Tensor]:
    """{None: pooled feature, k: feature after block or stage k} of one forward pass."""
    feats = {None: pooled(family, out)}
    for k in layers:
        feats[k] = family.read(model, out, config, k)
    return feats


def layer_count(config) -> int | None:
    """How many blocks or stages `--layers` may name; None: this model has no documented layer feature."""
    family = family_of(config)
    return family.blocks(vision_config(config)) if family else None


def feature_dims(model: str, config, layers: tuple[int, ...]) -> dict[int | None, int]:
    """The size of every feature, from one forward pass of an empty model on the `meta` device."""
    cls, family, vision = model_class(model, config), family_of(config), vision_config(config)
    side = getattr(vision, "image_size", None) or 224
    try:
        with torch.device("meta"):
            net = cls(vision, **(family.load if family else {})).eval()
            out = net(pixel_values=torch.empty(1, getattr(vision, "num_channels", 3), side, side),
                      output_hidden_states=bool(layers))
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise UserError(f"model '{model}' ({config.model_type}) is not a vision backbone fercache can run on "
                        f"images alone ({type(exc).__name__})") from None
    if getattr(out, "pooler_output", None) is None and not (family and family.feature == "cls_token"):
        raise UserError(f"model '{model}' ({config.model_type}) has no pooled output to use as its feature")
    return {k: int(f.shape[-1]) for k, f in features(family, net, out, vision, layers).items()}
