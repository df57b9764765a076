"""The embedding cache: one HDF5 file per encoder and preprocessing, plain arrays plus metadata.

Layout (documented in the README):

    /                      attrs: the identity (fercache.identity: model, model_revision, model_weights,
                                  preprocess, feature, dtype, image_size, layers, tokens, views, source),
                                  dim, classes, fercache_version, format_version
    /<split>/embeddings    float32 (N, D), chunked
    /<split>/labels        int64 (N,)
    /<split>/ids           UTF-8 strings (N,)
    /<split>/usage         UTF-8 strings (N,): train, public_test or private_test per row
    /<split>/layers/<k>    float32 (N, D): CLS after block k (only with --layers)
    /<split>/flip/...      the same features of the mirrored faces (only with --tta flip)
                           attrs: complete, selection

Nothing is ever lost or mixed: rows are first appended, batch by batch, to a part file in
`<cache>.partial/` (one per split, or per rank under torchrun), which a rerun resumes from. Only a
finished split is written into the cache, by building a new file and renaming it over the old one,
so the cache itself never holds a half-written split or a false `complete`.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from fercache.errors import UserError
from fercache.identity import Identity
from fercache.names import CLASSES, SPLIT_CHOICES, VIEWS, choice, feature_name

FORMAT_VERSION = 2  # 1: fercache 0.1.0 (no `model_weights`, no `format_version`); both read the same
JSON_ATTRS = ("classes", "layers", "tokens", "views", "source", "selection")
STR = h5py.string_dtype("utf-8")


def fercache_version() -> str:
    try:
        return version("fercache")
    except PackageNotFoundError:
        return "unknown"


class Embeddings(NamedTuple):
    """What `load_embeddings` returns; unpacks as `X, y, ids, classes, meta = ...`."""

    X: np.ndarray
    y: np.ndarray
    ids: list[str]
    classes: list[str]
    meta: dict


def cache_meta(identity: Identity, dim: int, source: dict | None = None) -> dict:
    """A cache's root attributes: its identity, the feature dimension and where the rows came from.

    `source` is `{"path", "format", "fingerprint"}`; its fingerprint must be `identity.source`.
    """
    return {**identity.to_meta(), "dim": dim, "classes": list(CLASSES), "fercache_version": fercache_version(),
            "format_version": FORMAT_VERSION, "source": source or {"fingerprint": identity.source}}


def write_attrs(obj: h5py.HLObject, attrs: dict) -> None:
    for key, value in attrs.items():
        obj.attrs[key] = json.dumps(value) if key in JSON_ATTRS else value


def read_attrs(obj: h5py.HLObject) -> dict:
    out = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        out[key] = json.loads(value) if key in JSON_ATTRS else value.item() if isinstance(value, np.generic) else value
    return out


def _open(path: Path, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise UserError(f"{path}: no such cache; make it with `fercache extract`") from None
    except OSError as exc:
        raise UserError(f"{path}: not a readable fercache HDF5 file ({exc})") from None


def read_meta(path: Path) -> dict:
    with _open(path) as f:
        return read_attrs(f)


def read_identity(path: Path) -> Identity:
    """The identity a cache records (fercache 0.1.0 caches included); not a cache is a `UserError`."""
    try:
        return Identity.from_meta(read_meta(path))
    except UserError as exc:
        raise UserError(f"{path}: an HDF5 file, but not a fercache cache ({exc})") from None


def split_state(path: Path, split: str) -> tuple[dict, dict | None]:
    """The cache's root metadata and the `selection` of a complete split (None if absent)."""
    with _open(path) as f:
        meta = read_attrs(f)
        group = f.get(split)
        if group is None or not group.attrs.get("complete", False):
            return meta, None
        return meta, read_attrs(group).get("selection")


class PartFile:
    """The rows of one split (or one rank's shard of it), appended batch by batch.

    Ids, labels and usage are written when the file is made; feature rows follow, each batch
    flushed with the attribute `rows`, the count a rerun can trust after a crash.
    """

    def __init__(self, path: Path, meta: dict, ids: list[str], labels: np.ndarray, usage: list[str],
                 dims: dict[str, int], chunk: int):
        self.path = path
        self.file = self._resume(path, meta, ids) if path.exists() else None
        if self.file is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = h5py.File(path, "w")
            write_attrs(self.file, meta)
            self.file.attrs["rows"] = 0
            self.file.create_dataset("ids", data=np.array(ids, dtype=object), dtype=STR)
            self.file.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            self.file.create_dataset("usage", data=np.array(usage, dtype=object), dtype=STR)
            for name, dim in dims.items():
                self.file.create_dataset(name, shape=(len(ids), dim), dtype=np.float32,
                                         chunks=(min(chunk, len(ids)), dim) if ids else None)
            self.file.flush()
        self.rows = int(self.file.attrs["rows"])

    @staticmethod
    def _resume(path: Path, meta: dict, ids: list[str]) -> h5py.File | None:
        """Reopen a part file left by an interrupted run, or None if it cannot be trusted."""
        try:
            f = h5py.File(path, "r+")
        except OSError:
            path.unlink()  # killed in the middle of a flush: start this part again
            return None
        same = not Identity.from_meta(read_attrs(f)).differences(Identity.from_meta(meta))
        if not same or [s.decode() for s in f["ids"][:]] != ids:
            f.close()
            path.unlink()  # made for another selection of this same cache: its rows do not apply
            return None
        return f

    def append(self, feats: dict[str, np.ndarray]) -> None:
        n = len(next(iter(feats.values())))
        for name, rows in feats.items():
            self.file[name][self.rows:self.rows + n] = rows
        self.rows += n
        self.file.attrs["rows"] = self.rows
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def part_path(cache: Path, split: str, rank: int = 0, world: int = 1) -> Path:
    """Where one rank's rows of a split wait until the split is complete: `<cache>.partial/<split>.<rank>-of-<world>.h5`."""
    return cache.with_name(cache.name + ".partial") / f"{split}.{rank}-of-{world}.h5"


def write_split(cache: str | os.PathLike, split: str, meta: dict, ids: list[str], labels: np.ndarray,
                usage: list[str], features: dict[str, np.ndarray]) -> None:
    """Write a whole split already in memory (a converted or synthetic cache) the way `extract` does."""
    cache = Path(cache)
    part = PartFile(part_path(cache, split), meta, ids, labels, usage,
                    {name: x.shape[1] for name, x in features.items()}, chunk=1024)
    part.append(features)
    part.close()
    commit(cache, split, [part.path], meta, {"split": split, "limit": None, "count": len(ids)})


def commit(cache: Path, split: str, parts: list[Path], meta: dict, selection: dict,
           replace: bool = False) -> None:
    """Write a finished split into the cache atomically: a new file, then a rename over the old.

    Other complete splits are carried over (unless `replace`), so space of a redone split is
    reclaimed and a crash at any point leaves the previous cache untouched.
    """
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    sources = [h5py.File(p, "r") for p in parts]
    try:
        with h5py.File(tmp, "w") as out:
            write_attrs(out, meta)
            if cache.exists() and not replace:
                with _open(cache) as old:
                    for name in old:
                        if name != split and old[name].attrs.get("complete", False):
                            old.copy(old[name], out, name=name)
            group = out.create_group(split)
            names = [n for n in _datasets(sources[0]) if n not in ("ids", "labels", "usage")]
            for name in ("ids", "labels", "usage") + tuple(names):
                data = np.concatenate([s[name][:] for s in sources])
                if name in ("ids", "usage"):
                    group.create_dataset(name, data=data, dtype=STR)
                else:
                    chunks = (max(1, min(1024, len(data))), data.shape[1]) if data.ndim == 2 else None
                    group.create_dataset(name, data=data, chunks=chunks)
            write_attrs(group, {"selection": selection})
            group.attrs["complete"] = True
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, cache)
    finally:
        for s in sources:
            s.close()
        tmp.unlink(missing_ok=True)
    for p in parts:
        p.unlink()
    if parts and not any(parts[0].parent.iterdir()):
        parts[0].parent.rmdir()


def _datasets(group: h5py.Group) -> list[str]:
    names: list[str] = []
    group.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _groups(f: h5py.File, split: str, path: Path) -> list[tuple[h5py.Group, str | None]]:
    """Where a split's rows are: its own group, or the `test` group filtered by usage, or both halves."""
    if split in f and f[split].attrs.get("complete", False):
        return [(f[split], None)]
    if split in ("public_test", "private_test") and "test" in f and f["test"].attrs.get("complete", False):
        return [(f["test"], split)]
    if split == "test" and all(s in f for s in ("public_test", "private_test")):
        return _groups(f, "public_test", path) + _groups(f, "private_test", path)
    if split == "all":
        return _groups(f, "train", path) + _groups(f, "test", path)
    have = [s for s in f if f[s].attrs.get("complete", False)]
    choice(split, SPLIT_CHOICES, "split")
    state = "is incomplete" if split in f else "is not"
    raise UserError(f"{path}: split '{split}' {state} in this cache (complete: {', '.join(have) or 'none'}); "
                    f"run `fercache extract --split {split}`")


def load_embeddings(cache: str | os.PathLike, split: str = "train", layer: int | None = None,
                    view: str = "plain") -> Embeddings:
    """Cached features of one split as numpy arrays: `X, y, ids, classes, meta`.

    `split` may be a stored group or a part of one (`public_test` and `private_test` of `test`;
    `all` is train then test). `layer` picks a stored block (`extract --layers`), `view` is
    `plain`, `flip` (`extract --tta flip`) or `mean` (the two averaged).
    """
    path = Path(cache)
    choice(view, VIEWS, "view")
    with _open(path) as f:
        meta = read_attrs(f)
        xs, ys, ids = [], [], []
        for group, usage in _groups(f, split, path):
            names = [feature_name(layer, v) for v in (("plain", "flip") if view == "mean" else (view,))]
            for name in names:
                if name not in group:
                    no_layer = layer is not None and layer not in (meta.get("layers") or [])
                    what, how = (f"layer {layer}", "--layers") if no_layer else (f"the {view} view", "--tta flip")
                    raise UserError(f"{path}: {what} is not stored (layers: {meta.get('layers') or 'none'}, "
                                    f"views: {', '.join(meta.get('views', ['plain']))}); extract it with {how}")
            x = np.mean([group[n][:] for n in names], axis=0) if len(names) > 1 else group[names[0]][:]
            y, i = group["labels"][:], [s.decode() for s in group["ids"][:]]
            if usage is not None:
                keep = np.array([u.decode() == usage for u in group["usage"][:]], dtype=bool)
                x, y, i = x[keep], y[keep], [s for s, k in zip(i, keep) if k]
            xs.append(x), ys.append(y), ids.extend(i)
    meta["split"] = split
    return Embeddings(np.concatenate(xs), np.concatenate(ys), ids, list(meta.get("classes", CLASSES)), meta)


def usage_of(cache: str | os.PathLike, split: str) -> list[str]:
    """Per-row usage (train, public_test, private_test) of a split, to report test halves apart."""
    path = Path(cache)
    with _open(path) as f:
        out: list[str] = []
        for group, usage in _groups(f, split, path):
            rows = [u.decode() for u in group["usage"][:]]
            out.extend(r for r in rows if usage is None or r == usage)
        return out


def describe_cache(cache: str | os.PathLike) -> dict:
    """Metadata and per-split counts of a cache (the JSON of `fercache info CACHE`)."""
    path = Path(cache)
    read_identity(path)
    with _open(path) as f:
        meta = read_attrs(f)
        splits = {}
        for name in f:
            g = f[name]
            counts = np.bincount(g["labels"][:], minlength=len(CLASSES))
            splits[name] = {"count": int(g["labels"].shape[0]), "complete": bool(g.attrs.get("complete", False)),
                            "dim": int(g["embeddings"].shape[1]),
                            "features": sorted(n for n in _datasets(g) if n not in ("ids", "labels", "usage")),
                            "per_class": {c: int(n) for c, n in zip(meta.get("classes", CLASSES), counts)}}
    return {"format": "fercache-cache", "path": str(path), **meta, "splits": splits}
