"""Stage two on new images: any photo, made a FER2013 face, encoded as stage one does, scored by a head.

The face goes through the very code the dataset readers use (48x48 gray, centre crop, bicubic),
optionally after OpenCV's face detector, then through stage one's encoder with the head's model,
preprocessing, dtype, layer and view. A `finetune` run's faces go through its base model with the
tuned blocks and head swapped in (`finetune.load_tuned`). `Scorer`, `detect_faces` and `face_pixels`
are the pieces `serve` and `predict --video` share, so every entry point gives the same numbers.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from fercache.errors import UserError, warn
from fercache.fit import check_head
from fercache.heads import Head
from fercache.names import TUNED_CONFIG, feature_name

Box = tuple[int, int, int, int]  # x, y, width, height in the image's pixels

# The cascade looks at every image at one working size (longer side, after a border), so a face is found
# whether the photo is 48 px or 4000 px wide; the border lets it find tight crops such as FER2013's own
# faces (found on 84% of 200 real FER2013 test faces with it, 66% without).
DETECT_SIDE, DETECT_BORDER = 480, 0.25


def read_image(path: str | os.PathLike):
    """Open any image file with PIL, upright (EXIF orientation applied, as photos are shown)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None


@lru_cache(maxsize=1)
def _cascade():
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        raise UserError(f"face detection needs OpenCV 4 (OpenCV {cv2.__version__} has no Haar cascades): "
                        "pip install 'opencv-python-headless<5'")
    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def detect_faces(image) -> list[Box]:
    """Every face OpenCV's bundled Haar cascade finds in a PIL image, largest first."""
    import cv2

    cascade = _cascade()
    gray = np.asarray(image.convert("L"))
    pad = int(DETECT_BORDER * max(gray.shape))
    padded = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    scale = DETECT_SIDE / max(padded.shape)
    small = cv2.resize(padded, None, fx=scale, fy=scale,
                       interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    found = cascade.detectMultiScale(small, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    height, width = gray.shape
    boxes = []
    for x, y, w, h in found:  # back to the image's pixels, clipped to it
        x0, y0 = max(0, round(x / scale) - pad), max(0, round(y / scale) - pad)
        x1, y1 = min(width, round((x + w) / scale) - pad), min(height, round((y + h) / scale) - pad)
        if x1 - x0 >= 8 and y1 - y0 >= 8:
            boxes.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)


def face_pixels(image, box: Box | None = None) -> np.ndarray:
    """The 48x48 gray face the head sees: the box's crop (or the whole image), made as the readers do."""
    from fercache.data import to_gray48

    if box is not None:
        x, y, w, h = box
        image = image.crop((x, y, x + w, y + h))
    return to_gray48(image)[0]


def crop_face(image, name: str):
    """The largest face `detect_faces` finds; the whole image (with a warning) if none."""
    boxes = detect_faces(image)
    if not boxes:
        warn(f"{name}: no face found; using the whole image")
        return image
    x, y, w, h = boxes[0]
    return image.crop((x, y, x + w, y + h))


class Scorer:
    """A head (or a `finetune` run) loaded once, turning 48x48 gray faces into class probabilities."""

    def __init__(self, head_dir: str | os.PathLike, device: str = "auto", batch_size: int = 64):
        from fercache.encoder import load_encoder

        self.batch_size = batch_size
        self.tuned = None
        if (Path(head_dir) / TUNED_CONFIG).is_file():  # a `finetune` run: the base model, tuned blocks swapped in
            from fercache.finetune import load_tuned

            self.tuned = load_tuned(head_dir, device)
            self.classes = list(self.tuned.config["classes"])
            return
        head = self.head = Head.load(head_dir)
        if head.identity is None:
            raise UserError(f"{head_dir}: this head was fitted on arrays of unknown origin; predict needs a head "
                            "from `fercache fit`, which records its encoder")
        self.model, layer = head.identity.model, head.layer
        self.encoder = load_encoder(  # the very weights it was fitted on:
            self.model, head.identity.preprocess, device, head.identity.dtype,
            layers=str(layer) if layer is not None else None, revision=head.identity.revision or None,
            fingerprint=head.identity.weights)
        check_head(head, self.encoder.identity, f"model '{self.model}'")
        self.views = ("plain", "flip") if head.views == "mean" else (head.views,)
        self.names = [feature_name(layer, view) for view in self.views]
        self.classes = list(head.classes)

    def probs(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 48, 48) uint8 faces -> (N, classes) probabilities."""
        if self.tuned is not None:
            z = self.tuned.logits_from_pixels(pixels, self.batch_size)
            p = np.exp(z - z.max(axis=1, keepdims=True))
            return p / p.sum(axis=1, keepdims=True)
        X = np.concatenate([self._encode(pixels[i:i + self.batch_size])
                            for i in range(0, len(pixels), self.batch_size)])
        if X.shape[1] != self.head.dim:
            raise UserError(f"model '{self.model}' gives {X.shape[1]}-d features, but the head is {self.head.dim}-d")
        return self.head.predict_proba(X)

    def _encode(self, batch: np.ndarray) -> np.ndarray:
        feats = self.encoder.encode(batch, self.views)
        return np.mean([feats[name] for name in self.names], axis=0)


def predict(head_dir: str | os.PathLike, images: list[str | os.PathLike], device: str = "auto",
            detect_face: bool = False, batch_size: int = 64) -> list[dict]:
    """Label new images: 48x48 gray as the readers make them, stage one's encoder, then the head
    (or, for a `finetune` run, the base model with its tuned blocks and head swapped in).

    Returns `{"image", "label", "probs": {class: p}}` per image, in order.
    """
    faces = []
    for name in images:  # every image read before the model loads: a bad path fails at once
        image = read_image(name)
        faces.append(face_pixels(crop_face(image, str(name)) if detect_face else image))
    scorer = Scorer(head_dir, device, batch_size)
    probs = scorer.probs(np.stack(faces))
    return [{"image": str(name), **labelled(p, scorer.classes)} for name, p in zip(images, probs)]


def labelled(p: np.ndarray, classes: list[str]) -> dict:
    """One face's `{"label", "probs": {class: p}}`, as every entry point reports it."""
    return {"label": classes[int(p.argmax())], "probs": {c: float(v) for c, v in zip(classes, p)}}


def label_faces(scorer: Scorer, image, whole_if_none: bool = False) -> list[dict]:
    """Every face in a PIL image, largest first, as `{"box": [x, y, w, h], "label", "probs"}`.

    With `whole_if_none`, an image without a face is scored whole (box None), as `predict
    --detect-face` does; the largest face's numbers are `predict --detect-face`'s for the same image.
    """
    boxes: list[Box | None] = list(detect_faces(image))
    if not boxes and whole_if_none:
        boxes = [None]
    if not boxes:
        return []
    probs = scorer.probs(np.stack([face_pixels(image, box) for box in boxes]))
    return [{"box": None if box is None else [int(v) for v in box], **labelled(p, scorer.classes)}
            for box, p in zip(boxes, probs)]
