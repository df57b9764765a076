"""CLIP's zero-shot guess: the baseline a trained linear probe has to beat.

No training: each class is the average of CLIP's normalised text embeddings of a few prompts
(CLIP's own FER2013 templates, from the paper's evaluation suite), and each face goes to the class
whose text embedding is nearest by cosine to its projected image embedding. The faces reach the
model through stage one's exact `clip` preprocessing, so the image side is the one the cache holds
(before the projection). CLIP_benchmark reports 40.9% for ViT-B/32 (openai) on FER2013's test set.
An OpenCLIP checkpoint (LAION, DataComp, DFN, SigLIP, ...) answers with its own tokenizer, text
tower and preprocessing, to the same prompts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from fercache.backends import Backend, backend_of
from fercache.checkpoint import resolve
from fercache.encoder import pick_device
from fercache.errors import UserError, at_least_one, first_line
from fercache.names import CLASSES, DEFAULT_MODEL, IMAGES, PIXELS, choice
from fercache.preprocess import Preprocessor, recipe_for

# CLIP's prompts for FER2013 (openai/CLIP, data/prompts.md) and the class names they were written
# for, here in FER2013's label order.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} looking face.",
    "a photo of a face showing the emotion: {c}.",
    "a photo of a face looking {c}.",
    "a face that looks {c}.",
    "they look {c}.",
    "look at how {c} they are.",
)
CLASS_NAMES: tuple[str, ...] = ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
# The same words for every canonical expression, so any dataset's classes get CLIP's prompts
# (a generic folder's class of no known expression is prompted by its own name).
PROMPT_NAMES: dict[str, str] = {"anger": "angry", "disgust": "disgusted", "fear": "fearful", "happiness": "happy",
                                "sadness": "sad", "surprise": "surprised", "neutral": "neutral",
                                "contempt": "contemptuous"}


def prompt_names(canonical: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The word each class is prompted with: CLIP's FER2013 adjective for its expression."""
    return tuple(PROMPT_NAMES.get(c, c) for c in canonical)


@dataclass
class ZeroShotResult:
    """Per-image predictions and cosine scores, plus what `summary` reports."""

    model: str
    split: str
    ids: list[str]
    labels: np.ndarray
    pred: np.ndarray
    scores: np.ndarray  # (N, K) cosine similarity of each face to each class
    revision: str = ""  # the hub commit the model was loaded at ("" for a local folder)
    classes: tuple[str, ...] = CLASSES  # the dataset's classes, in label order
    names: tuple[str, ...] = CLASS_NAMES  # the word each class was prompted with
    dataset: str = "fer2013"

    def summary(self) -> dict:
        """Accuracy and per-class recall (the JSON of `fercache zeroshot`)."""
        recall = {c: float(np.mean(self.pred[self.labels == i] == i)) if np.any(self.labels == i) else None
                  for i, c in enumerate(self.classes)}
        return {"model": self.model, "revision": self.revision, "dataset": self.dataset, "split": self.split,
                "count": len(self.ids), "accuracy": float(np.mean(self.pred == self.labels)),
                "per_class_recall": recall, "templates": list(TEMPLATES),
                "class_names": dict(zip(self.classes, self.names))}


def _features(out) -> torch.Tensor:
    """transformers 4 returns the projected features as a tensor, 5 as an output's `pooler_output`."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class TwoTowers:
    """A model with a text tower: its projected image and text embeddings, its own preprocessing."""

    image: Callable[[torch.Tensor], torch.Tensor]  # model inputs -> (B, P) image embeddings
    text: Callable[[list[str]], torch.Tensor]  # prompts -> (N, P) text embeddings
    prep: Preprocessor
    revision: str  # the hub commit it was loaded at ("" for a local folder)


def load_clip(model: str, device: torch.device, revision: str | None = None) -> TwoTowers:
    """A full CLIP model (both towers), its tokenizer and stage one's `clip` preprocessing: a
    transformers CLIP, or an OpenCLIP checkpoint."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel

    if model == PIXELS:
        raise UserError("the pixels baseline has no text tower; zero-shot needs a full CLIP model "
                        f"such as {DEFAULT_MODEL}")
    backend = backend_of(model)
    if backend is not None:
        return _library_clip(backend, model, device, revision)
    checkpoint = resolve(model, revision)
    pin = checkpoint.load_kwargs
    try:
        config = AutoConfig.from_pretrained(model, **pin)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model '{model}': {first_line(exc)}") from None
    if config.model_type != "clip" or getattr(config, "text_config", None) is None:
        raise UserError(f"model '{model}' ({config.model_type}) has no CLIP text tower; zero-shot needs a full "
                        f"CLIP model such as {DEFAULT_MODEL}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **pin)
        processor = AutoImageProcessor.from_pretrained(model, **pin)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"model '{model}' lacks a usable tokenizer or image processor: {first_line(exc)}") from None
    net = CLIPModel.from_pretrained(model, dtype=torch.float32, **pin).to(device).eval().requires_grad_(False)
    prep = Preprocessor(recipe_for("clip", processor, config.vision_config.image_size), device)

    def text(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
        return _features(net.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))

    return TwoTowers(lambda x: _features(net.get_image_features(pixel_values=x)), text, prep, checkpoint.revision)


def _library_clip(backend: Backend, model: str, device: torch.device, revision: str | None) -> TwoTowers:
    """An OpenCLIP model's two towers, its own tokenizer and preprocessing (a timm model has no text tower)."""
    backend.library(model)
    if backend.name != "OpenCLIP":
        raise UserError(f"model '{model}' is a {backend.name} image model with no text tower; zero-shot needs a "
                        f"full CLIP model such as {DEFAULT_MODEL} or an OpenCLIP checkpoint")
    from fercache.openclip import OpenClipTower, text_tower

    checkpoint = resolve(model, revision, repo=backend.repo(model), config=backend.config)
    clip, tokenizer = text_tower(backend.folder(model, checkpoint), device)
    prep = Preprocessor(OpenClipTower(clip).recipe(), device)
    return TwoTowers(clip.encode_image, lambda prompts: clip.encode_text(tokenizer(prompts).to(device)), prep,
                     checkpoint.revision)


@torch.inference_mode()
def class_embeddings(towers: TwoTowers, names: tuple[str, ...] = CLASS_NAMES) -> torch.Tensor:
    """(K, P): per class, the mean of its prompts' normalised text embeddings, normalised again."""
    rows = []
    for name in names:
        emb = towers.text([t.format(c=name) for t in TEMPLATES])
        rows.append(torch.nn.functional.normalize(emb, dim=-1).mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def zeroshot(data: str | os.PathLike | None = None, split: str = "test", limit: int | None = None,
             model: str = DEFAULT_MODEL, device: str = "auto", batch_size: int = 64,
             progress: bool = True, revision: str | None = None, dataset: str | None = None,
             classes: str | None = None, votes: str | os.PathLike | None = None,
             images: str = "gray48") -> ZeroShotResult:
    """Classify a split of any dataset (FER2013 by default) with CLIP's text prompts alone (no
    training), each class prompted by its expression's word; `images` as `extract` takes it."""
    from fercache.datasets import open_dataset

    at_least_one(batch_size=batch_size, limit=limit)
    choice(images, IMAGES, "--images")
    source = open_dataset(data, dataset, classes, votes)  # the index only: a wrong path fails before the model loads
    dev = pick_device(device)
    towers = load_clip(model, dev, revision)
    names = prompt_names(source.canonical)
    faces = source.load(split, limit=limit, native=images == "native")
    text = class_embeddings(towers, names)
    scores = []
    with torch.inference_mode(), tqdm(total=len(faces), unit="img", desc=f"zeroshot {split}",
                                      disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(faces), batch_size):
            batch = faces.pixels[i:i + batch_size]
            emb = towers.image(towers.prep(batch))
            scores.append((torch.nn.functional.normalize(emb, dim=-1) @ text.T).float().cpu().numpy())
            bar.update(len(batch))
    scores_np = np.concatenate(scores)
    return ZeroShotResult(model, split, faces.ids, faces.labels, scores_np.argmax(1), scores_np, towers.revision,
                          tuple(source.classes), names, source.dataset)
