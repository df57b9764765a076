"""Every name and default that more than one module uses, in one place that imports nothing heavy.

The CLI imports this without torch; the library modules import it instead of spelling a value
again. Stored features are named by one rule (`feature_name`): `embeddings` (the pooled output),
`layers/<k>` (after block k), `tokens` (the token sequence stage three tunes from), each under
`flip/` for the mirrored faces.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# The canonical expression names every dataset's classes map to (`fercache.datasets`), and FER2013's.
EXPRESSIONS: tuple[str, ...] = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")
CANONICAL: tuple[str, ...] = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
SIZE = 48  # FER2013's faces are SIZE x SIZE, 8-bit gray
SPLITS: tuple[str, ...] = ("train", "test", "public_test", "private_test")
SPLIT_CHOICES: tuple[str, ...] = SPLITS + ("all",)

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
PIXELS = "pixels"  # the raw-pixel baseline, no network
PREPROCESS: tuple[str, ...] = ("clip", "seed")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
INT8 = "int8"  # --dtype int8: the tower's Linear layers quantised on the CPU (`fercache.accelerate`)
TTA: tuple[str, ...] = ("none", "flip")
IMAGES: tuple[str, ...] = ("gray48", "native")  # what the encoder sees: FER2013's 48x48 gray, or each image as stored
LABELS: tuple[str, ...] = ("ferplus-majority", "ferplus-votes")  # FER+: majority labels, or vote shares as soft targets
VIEWS: tuple[str, ...] = ("plain", "flip", "mean")  # mean: plain and flip averaged, never stored
METHODS: tuple[str, ...] = ("linear", "logreg")
CLASS_WEIGHTS: tuple[str, ...] = ("none", "balanced")  # balanced: n / (classes x rows of the class), as scikit-learn
VALS: tuple[str, ...] = ("train", "public_test")  # what chooses C / the layer: part of train, or PublicTest
POOLED = "pooled"  # how tables name the `embeddings` feature beside per-layer ones
TUNED_CONFIG = "tuned.json"  # marks a `finetune` run folder (beside tuned.safetensors)


def data_dir() -> Path:
    """Where datasets and caches live by default: $FERCACHE_DATA, else ./data."""
    return Path(os.environ.get("FERCACHE_DATA", "data"))


def model_slug(model: str) -> str:
    """A file-name-safe model name: a hub id `org/name` -> `org--name`; a local folder -> its own name."""
    if Path(model).is_dir():
        model = Path(model).resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").replace("/", "--")).strip("-") or "model"


def default_cache(model: str = DEFAULT_MODEL, preprocess: str = "clip", layers: list[int] | tuple[int, ...] = (),
                  tta: str = "none", tokens: int | None = None, dataset: str = "fer2013", images: str = "gray48",
                  dtype: str = "") -> Path:
    """`<data>/cache/<model-slug>__<preprocess>[__<dataset>][__native][__int8][__layers-…][__tokens-K][__flip].h5`:
    what `extract` writes, `fit` reads (FER2013 at 48x48 gray: the name it always had). int8 features
    are not float ones: they get a file of their own."""
    name = f"{model_slug(model)}__{preprocess}"
    name += f"__{dataset}" if dataset != "fer2013" else ""
    name += f"__{images}" if images != "gray48" else ""
    name += f"__{INT8}" if dtype == INT8 else ""
    if layers:
        name += "__layers-" + "-".join(map(str, layers))
    if tokens is not None:
        name += f"__tokens-{tokens}"
    if tta != "none":
        name += f"__{tta}"
    return data_dir() / "cache" / f"{name}.h5"


def feature_name(layer: int | None = None, view: str = "plain", tokens: bool = False) -> str:
    """The dataset of one stored feature: `embeddings`, `layers/6`, `tokens`, `flip/embeddings`, ..."""
    name = "tokens" if tokens else "embeddings" if layer is None else f"layers/{layer}"
    return name if view == "plain" else f"{view}/{name}"


def default_run(cache: Path, method: str, layer: int | None = None, views: str = "plain") -> Path:
    """`runs/<cache stem>-<method>[-layer<K>][-<views>]`."""
    name = f"{cache.stem}-{method}" + (f"-layer{layer}" if layer is not None else "")
    return Path("runs") / (name + (f"-{views}" if views != "plain" else ""))


def choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """`value` if it is one of `choices`, else a one-line user error naming them."""
    if value not in choices:
        from fercache.errors import UserError

        raise UserError(f"unknown {what} '{value}': choose one of {', '.join(choices)}")
    return value
