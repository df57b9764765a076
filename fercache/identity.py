"""What makes features comparable: one typed identity, recorded by caches and heads, compared in one place.

Two caches may share rows, a head may score a cache, ranks may join one cache, and a resumed run
may reuse a part file only when the features come from the same encoder (model, revision,
weights, preprocessing, feature, image size, and the images it saw: 48x48 gray or native) and,
for rows in one file, the same dtype and runtime (torch or ONNX Runtime), stored layers, views,
dataset and class order (a folder's fingerprint does not change with `--classes` order; its
labels do). `Identity.differences` names every field that differs, so each refusal is one line
that says what differs.

Stored flat, as a cache's root attributes and in `head.json`, under the keys of `ATTRS`. Files
written by fercache 0.1.0 lack `model_weights` (and heads `image_size`), before 0.3.0 `images`
and (heads) `classes` in the identity; an empty value means "not known" and is not compared, so
they still load. Files before 0.4.0 record no `runtime`: their neural encoders ran on torch, and
read so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fercache.errors import UserError
from fercache.names import CANONICAL, CLASSES, PIXELS

# field -> key in cache attributes and head.json (0.1.0's names, kept so old files read as they are)
ATTRS = {"model": "model", "revision": "model_revision", "weights": "model_weights", "preprocess": "preprocess",
         "feature": "feature", "image_size": "image_size", "dtype": "dtype", "layers": "layers",
         "tokens": "tokens", "views": "views", "source": "source", "images": "images", "classes": "classes",
         "runtime": "runtime"}
ENCODER = ("model", "revision", "weights", "preprocess", "feature", "image_size", "images")  # what a head needs
CACHE = ENCODER + ("dtype", "runtime", "layers", "tokens", "views", "source", "classes")  # what rows in one file share
HEAD = ENCODER + ("dtype",)  # what head.json records (dtype: the one `predict` encodes in)
OPTIONAL = ("revision", "weights", "image_size", "images", "classes", "runtime")  # compared only where both sides know them
GRAY48, NATIVE = "48x48 gray", "native"  # what the encoder saw: FER2013's faces, or each image as stored
# (`tokens` None is known: no tokens stored, as in every file older than stage three)


@dataclass(frozen=True)
class Identity:
    """Where a cache's features come from; a head keeps the encoder part of it."""

    model: str  # hub id, local folder or `pixels`
    preprocess: str
    feature: str  # pooler_output, pixels, ...
    dtype: str  # the encoder's compute dtype
    image_size: int | None = None  # the model input's side (None: not recorded)
    revision: str = ""  # hub commit hash that was loaded ("" for local folders and old files)
    weights: str = ""  # sha256 of a local folder's weight files ("" for hub models and old files)
    layers: tuple[int, ...] = ()
    tokens: int | None = None  # block whose input token sequence is stored (stage three)
    views: tuple[str, ...] = ("plain",)
    source: str = ""  # the dataset's content fingerprint ("" for a head: heads score any source)
    images: str = ""  # GRAY48 or NATIVE ("": not recorded, files before 0.3.0: always GRAY48)
    classes: tuple[str, ...] = ()  # the rows' label names in label order (a folder's --classes order too)
    runtime: str = ""  # what ran the encoder: torch or onnxruntime ("": the pixels baseline)

    def to_meta(self, keys: tuple[str, ...] = tuple(ATTRS)) -> dict:
        """The flat attributes a cache's root (all keys) or `head.json` (`HEAD`) stores, JSON-friendly."""
        out = {}
        for key in keys:
            value = getattr(self, key)
            out[ATTRS[key]] = list(value) if isinstance(value, tuple) else value
        if "source" in keys:
            out["source"] = {"fingerprint": self.source}
        return out

    @classmethod
    def from_meta(cls, meta: dict) -> Identity:
        """Read what `to_meta` (or fercache 0.1.0) wrote; missing optional keys read as unknown."""
        missing = [ATTRS[k] for k in ("model", "preprocess", "feature", "dtype") if ATTRS[k] not in meta]
        if missing:
            raise UserError(f"no fercache metadata ({', '.join(missing)} missing)")
        source = meta.get("source") or {}
        size = meta.get("image_size")
        tokens = meta.get("tokens")
        return cls(model=meta["model"], preprocess=meta["preprocess"], feature=meta["feature"], dtype=meta["dtype"],
                   image_size=int(size) if size else None, revision=meta.get("model_revision") or "",
                   weights=meta.get("model_weights") or "", layers=tuple(meta.get("layers") or ()),
                   tokens=int(tokens) if tokens is not None and tokens != -1 else None,
                   views=tuple(meta.get("views") or ("plain",)), images=meta.get("images") or "",
                   classes=tuple(meta.get("classes") or ()),
                   # files before 0.4.0 ran every neural encoder on torch
                   runtime=meta["runtime"] if "runtime" in meta else "" if meta["model"] == PIXELS else "torch",
                   source=source.get("fingerprint", "") if isinstance(source, dict) else str(source))

    def encoder(self) -> Identity:
        """Only what a head depends on: which encoder made its features, not which rows or files."""
        return replace(self, layers=(), tokens=None, views=("plain",), source="", classes=(), runtime="")

    def differences(self, other: Identity, keys: tuple[str, ...] = CACHE) -> list[str]:
        """`key: here vs there` for every field in `keys` that differs (unknown optional values match)."""
        out = []
        for key in keys:
            mine, theirs = getattr(self, key), getattr(other, key)
            if key == "model" and self.weights and other.weights:
                continue  # local folders: the weights' fingerprint says which model, under any path
            if key in OPTIONAL and (mine in ("", None) or theirs in ("", None)):
                continue
            if mine != theirs:
                short = (lambda v: v[:19] + "…" if isinstance(v, str) and len(v) > 20 else v)
                out.append(f"{'dataset' if key == 'source' else ATTRS[key]} {short(mine)!r} vs {short(theirs)!r}")
        return out

    def check(self, wanted: Identity, where: object, keys: tuple[str, ...] = CACHE, hint: str = "") -> None:
        """Raise one `UserError` line naming every difference between what `where` holds and what is wanted."""
        diff = self.differences(wanted, keys)
        if diff:
            raise UserError(f"{where} differs from what is asked ({'; '.join(diff)}; here vs asked)"
                            + (f": {hint}" if hint else ""))


def dataset_of(meta: dict) -> tuple[str, list[str], list[str]]:
    """(dataset, classes, canonical names) of a cache's or head's metadata; files before 0.3.0 are FER2013's."""
    classes = list(meta.get("classes") or CLASSES)
    canonical = meta.get("canonical") or (list(CANONICAL) if tuple(classes) == CLASSES else classes)
    return meta.get("dataset") or "fer2013", classes, list(canonical)
