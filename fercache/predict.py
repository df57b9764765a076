"""Stage two on new images: any photo, made a FER2013 face, encoded as stage one does, scored by a head.

The face goes through the very code the dataset readers use (48x48 gray, centre crop, bicubic),
optionally after OpenCV's face detector, then through stage one's encoder with the head's model,
preprocessing, dtype, layer and view. A `finetune` run's faces go through its base model with the
tuned blocks and head swapped in (`finetune.load_tuned`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fercache.errors import UserError, warn
from fercache.fit import check_head
from fercache.heads import Head
from fercache.names import TUNED_CONFIG, feature_name


def read_image(path: str | os.PathLike):
    """Open any image file with PIL, upright (EXIF orientation applied, as photos are shown)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None


def crop_face(image, name: str):
    """The largest face OpenCV's bundled Haar cascade finds; the whole image (with a warning) if none."""
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        raise UserError(f"--detect-face needs OpenCV 4 (OpenCV {cv2.__version__} has no Haar cascades): "
                        "pip install 'opencv-python-headless<5'")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    faces = cascade.detectMultiScale(np.asarray(image.convert("L")), scaleFactor=1.1, minNeighbors=5,
                                     minSize=(24, 24))
    if len(faces) == 0:
        warn(f"{name}: no face found; using the whole image")
        return image
    x, y, w, h = max(faces, key=lambda f: int(f[2]) * int(f[3]))
    return image.crop((int(x), int(y), int(x + w), int(y + h)))


def predict(head_dir: str | os.PathLike, images: list[str | os.PathLike], device: str = "auto",
            detect_face: bool = False, batch_size: int = 64) -> list[dict]:
    """Label new images: 48x48 gray as the readers make them, stage one's encoder, then the head
    (or, for a `finetune` run, the base model with its tuned blocks and head swapped in).

    Returns `{"image", "label", "probs": {class: p}}` per image, in order.
    """
    from fercache.data import to_gray48
    from fercache.encoder import load_encoder

    tuned = (Path(head_dir) / TUNED_CONFIG).is_file()  # a `finetune` run: the base model, tuned blocks swapped in
    head = None if tuned else Head.load(head_dir)
    if head is not None and head.identity is None:
        raise UserError(f"{head_dir}: this head was fitted on arrays of unknown origin; predict needs a head "
                        "from `fercache fit`, which records its encoder")
    faces = []
    for name in images:
        image = read_image(name)
        faces.append(to_gray48(crop_face(image, str(name)) if detect_face else image)[0])
    pixels = np.stack(faces)
    if tuned:
        from fercache.finetune import load_tuned

        model = load_tuned(head_dir, device)
        z = model.logits_from_pixels(pixels, batch_size)
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        return _results(images, probs / probs.sum(axis=1, keepdims=True), model.config["classes"])
    model, layer = head.identity.model, head.layer
    encoder = load_encoder(model, head.identity.preprocess, device, head.identity.dtype,
                           layers=str(layer) if layer is not None else None,  # the very weights it was fitted on:
                           revision=head.identity.revision or None, fingerprint=head.identity.weights)
    check_head(head, encoder.identity, f"model '{model}'")
    views = ("plain", "flip") if head.views == "mean" else (head.views,)
    names = [feature_name(layer, view) for view in views]

    def encode(batch: np.ndarray) -> np.ndarray:
        feats = encoder.encode(batch, views)
        return np.mean([feats[name] for name in names], axis=0)

    X = np.concatenate([encode(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
    if X.shape[1] != head.dim:
        raise UserError(f"model '{model}' gives {X.shape[1]}-d features, but the head is {head.dim}-d")
    return _results(images, head.predict_proba(X), head.classes)


def _results(images: list, probs: np.ndarray, classes: list[str]) -> list[dict]:
    return [{"image": str(name), "label": classes[int(p.argmax())],
             "probs": {c: float(v) for c, v in zip(classes, p)}} for name, p in zip(images, probs)]
