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

import numpy as np

from fercache.errors import UserError, warn
from fercache.fit import check_head
from fercache.heads import Head, softmax
from fercache.identity import NATIVE
from fercache.names import feature_name
from fercache.runs import is_tuned

Box = tuple[int, int, int, int]  # x, y, width, height in the image's pixels

# The cascade looks at every image twice: at a small working size (longer side, after a border), which
# finds large faces and tight crops such as FER2013's own faces (the border: found on 84% of 200 real
# FER2013 test faces with it, 66% without), and at the photo's own resolution (longer side capped), which
# finds faces too small for the working size (at 480 px a 4000 px photo's faces under ~300 px vanish).
DETECT_SIDE, DETECT_BORDER, NATIVE_SIDE, MIN_FACE = 480, 0.25, 1600, 24


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
    """Every face OpenCV's bundled Haar cascade finds in a PIL image, largest first.

    Two searches, merged: the whole image with a border at `DETECT_SIDE` (its smallest face: 7.5% of
    the longer side), and, where that shrinks the image more than twofold (longer side over 640 px),
    the image at its own resolution, longer side at most `NATIVE_SIDE` (smallest face: `MIN_FACE` px
    at that size, 60 px in a 4000 px photo). A 640x480 webcam frame gets the first search only: 48 px
    faces, at the working size's speed.
    """
    import cv2

    gray = np.asarray(image.convert("L"))
    pad = int(DETECT_BORDER * max(gray.shape))
    boxes = _search(cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE), DETECT_SIDE, pad)
    if max(gray.shape) + 2 * pad > 2 * DETECT_SIDE:
        boxes += _search(gray, NATIVE_SIDE, 0)
    height, width = gray.shape
    clipped = []
    for x, y, w, h in boxes:  # clipped to the image
        x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
        if x1 - x0 >= 8 and y1 - y0 >= 8:
            clipped.append((x0, y0, x1 - x0, y1 - y0))
    return _one_box_per_face(clipped)


def _search(gray: np.ndarray, side: int, pad: int) -> list[Box]:
    """The cascade's boxes in `gray` resized to at most `side` px (up to it when smaller), in the
    unpadded image's pixels."""
    import cv2

    scale = side / max(gray.shape)
    if scale < 1 or pad:  # the padded working image is always brought to `side`; the photo only down
        gray = cv2.resize(gray, None, fx=scale, fy=scale,
                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    else:
        scale = 1.0
    found = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(MIN_FACE, MIN_FACE))
    return [(round(x / scale) - pad, round(y / scale) - pad, round(w / scale), round(h / scale))
            for x, y, w, h in found]


def _one_box_per_face(boxes: list[Box]) -> list[Box]:
    """Largest first, dropping a box that mostly (over half its area) lies in a larger one kept:
    both searches find a mid-sized face, at slightly different boxes."""
    kept: list[Box] = []
    for x, y, w, h in sorted(boxes, key=lambda b: b[2] * b[3], reverse=True):
        if all(max(0, min(x + w, a + c) - max(x, a)) * max(0, min(y + h, b + d) - max(y, b)) <= w * h / 2
               for a, b, c, d in kept):
            kept.append((x, y, w, h))
    return kept


def face_pixels(image, box: Box | None = None, native: bool = False) -> np.ndarray:
    """The face the head sees: the box's crop (or the whole image), made as the readers do: 48x48 gray,
    or (a head fitted on `--images native` features) H x W x 3 as it is."""
    from fercache.data import to_gray48

    if box is not None:
        x, y, w, h = box
        image = image.crop((x, y, x + w, y + h))
    return np.asarray(image.convert("RGB"), dtype=np.uint8) if native else to_gray48(image)[0]


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
        self.native = False  # True: the head's features were of native images (faces go as they are)
        if is_tuned(head_dir):  # a `finetune` run: the base model, tuned blocks swapped in
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
            fingerprint=head.identity.weights, runtime=None)  # as `extract` encodes: ONNX Runtime on a CPU
        check_head(head, self.encoder.identity, f"model '{self.model}'")
        self.views = ("plain", "flip") if head.views == "mean" else (head.views,)
        self.names = [feature_name(layer, view) for view in self.views]
        self.classes = list(head.classes)
        self.native = head.identity.images == NATIVE

    def faces(self, faces: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """`face_pixels` arrays as `probs` takes them: one 48x48 batch, or the native images' list."""
        return faces if self.native else np.stack(faces)

    def probs(self, pixels: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """(N, 48, 48) uint8 faces (native: a list of H x W x 3) -> (N, classes) probabilities."""
        if self.tuned is not None:
            return softmax(self.tuned.logits_from_pixels(pixels, self.batch_size))
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
    crops = []
    for name in images:  # every image read before the model loads: a bad path fails at once
        image = read_image(name)
        crops.append(crop_face(image, str(name)) if detect_face else image)
    scorer = Scorer(head_dir, device, batch_size)
    probs = scorer.probs(scorer.faces([face_pixels(c, native=scorer.native) for c in crops]))
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
    probs = scorer.probs(scorer.faces([face_pixels(image, box, scorer.native) for box in boxes]))
    return [{"box": None if box is None else [int(v) for v in box], **labelled(p, scorer.classes)}
            for box, p in zip(boxes, probs)]
