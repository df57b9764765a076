"""The embedding cache: one HDF5 file per encoder and preprocessing, plain arrays plus metadata.

Layout (documented in the README):

    /                      attrs: the identity (fercache.identity: model, model_revision, model_weights,
                                  preprocess, feature, dtype, image_size, images, layers, tokens, views,
                                  source, classes), dim, canonical, dataset, fercache_version, format_version
                           (classes: the label names in label order; canonical: each one's expression)
    /<split>/embeddings    float32 (N, D), chunked
    /<split>/labels        int64 (N,)
    /<split>/ids           UTF-8 strings (N,)
    /<split>/usage         UTF-8 strings (N,): train, public_test or private_test per row (all: no split)
    /<split>/votes         float32 (N, 10): FER+'s vote counts per row (only for FER+)
    /<split>/subjects      UTF-8 strings (N,): the person in each face (datasets that say: CK+, JAFFE)
    /<split>/layers/<k>    float32 (N, D_k): the feature after block k (only with --layers)
    /<split>/flip/...      the same features of the mirrored faces (only with --tta flip)
    /<split>/tokens        float16 (N, T, D): the token sequence entering block K+1 (only with --tokens K)
                           attrs: complete, selection

Nothing is ever lost or mixed: rows are first appended, batch by batch, to a part file in
`<cache>.partial/` (one per split, or per rank under torchrun), which a rerun resumes from. Only a
finished split is written into the cache, by building a new file and renaming it over the old one,
so the cache itself never holds a half-written split or a false `complete`.

What survives what: the part's row count is written only after the rows it counts are flushed
and fsynced, and is itself fsynced; the new cache is fsynced before the rename, its folder after.
A kill at any point loses at most the rows since the last flush. A power cut in the middle of
HDF5's own metadata write can still leave a part file that does not open: that shard starts anew.

Files are opened with HDF5's locks where the filesystem has them (`HDF5_USE_FILE_LOCKING`
overrides): a part another live process is writing is locked, and a lock error is never taken
for a damaged file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

try:
    import fcntl
except ImportError:  # Windows: commits are not serialised there
    fcntl = None

from fercache.errors import UserError, first_line, warn
from fercache.identity import Identity, dataset_of
from fercache.names import SPLIT_CHOICES, VIEWS, choice, feature_name

FORMAT_VERSION = 2  # 1: fercache 0.1.0 (no `model_weights`, no `format_version`); both read the same
JSON_ATTRS = ("classes", "canonical", "layers", "tokens", "views", "source", "selection")
STR = h5py.string_dtype("utf-8")
TOKENS = feature_name(tokens=True)  # stored as float16: 2.8 GB for all of FER2013 with ViT-B/32, not 5.5
FLOAT16_MAX = float(np.finfo(np.float16).max)
LOCKING: str | bool = "best-effort"  # HDF5's locks where the filesystem has them; see `file_locking`
SLICE_BYTES = 64 * 2**20  # commit moves rows from the parts into the cache this much at a time
CHUNK_BYTES = 4 * 2**20  # a cache dataset's chunks hold at most 1,024 rows and about this much


def write_json(path: Path, value: object) -> None:
    """A small JSON file beside a cache or run, whole or not at all: written aside, then renamed over."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value) + "\n")
    os.replace(tmp, path)


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


def cache_meta(identity: Identity, dim: int, source: dict | None = None, dataset: str = "fer2013",
               canonical: tuple[str, ...] | None = None) -> dict:
    """A cache's root attributes: its identity, the feature dimension and where the rows came from.

    `source` is `{"path", "format", "fingerprint"}`; its fingerprint must be `identity.source`.
    The labels index `identity.classes` (FER2013's when it names none); `canonical` gives each
    class's canonical expression (what a head of another dataset is matched on).
    """
    _, classes, canonical = dataset_of({"classes": identity.classes, "canonical": canonical})
    return {**identity.to_meta(), "dim": dim, "classes": classes, "canonical": canonical,
            "dataset": dataset, "fercache_version": fercache_version(), "format_version": FORMAT_VERSION,
            "source": source or {"fingerprint": identity.source}}



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


def file_locking(on: bool) -> None:
    """Use HDF5's file locks (the default) or not (`--no-file-locking`: NFS or Lustre without locks).

    HDF5_USE_FILE_LOCKING=FALSE in the environment at start does the same (HDF5 reads it once).
    Without locks a live run cannot be told from a dead one: run one job per cache at a time.
    """
    global LOCKING
    LOCKING = "best-effort" if on else False


def h5open(path: Path, mode: str = "r") -> h5py.File:
    """`h5py.File` with fercache's locking; a lock that fails is a `UserError`, never a bad file.

    Either another process holds the file (a live fercache run writing it), or the filesystem
    refuses locks (NFS or Lustre mounted without them: `--no-file-locking`).
    """
    try:
        return h5py.File(path, mode, locking=LOCKING)
    except OSError as exc:
        if "unable to lock file" not in str(exc):
            raise
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise UserError(f"{path}: another process holds this file (a fercache run writing it?); "
                            "wait for it to end, or stop it, then run again") from None
        raise UserError(f"{path}: the filesystem refuses file locks ({first_line(exc)}); pass --no-file-locking "
                        "(or set HDF5_USE_FILE_LOCKING=FALSE) and run one job per cache at a time") from None


def _open(path: Path, mode: str = "r") -> h5py.File:
    try:
        return h5open(path, mode)
    except FileNotFoundError:
        raise UserError(f"{path}: no such cache; make it with `fercache extract`") from None
    except OSError as exc:
        raise UserError(f"{path}: not a readable fercache HDF5 file ({exc})") from None


def read_meta(path: Path) -> dict:
    with _open(path) as f:
        return read_attrs(f)


def read_identity(path: Path) -> Identity:
    """The identity a cache records (fercache 0.1.0 caches included); not a cache is a `UserError`."""
    meta = read_meta(path)  # a missing or unreadable file says so itself
    try:
        return Identity.from_meta(meta)
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
    """One split's rows (or one rank's shard of them) as they are encoded: resumable after a crash.

    Made for a shard of `capacity` images (`shard`: a digest of their ids); rows are the images
    that decoded, in order, with their ids, labels and usage. `append` writes rows, `flush` makes
    them durable: rows first (flush, fsync), then the attributes a rerun trusts (`rows`, and
    `consumed`, the shard's images looked at so far) and `done`, flushed and fsynced again. A part
    another live process holds is refused (`h5open`), never deleted; one that does not open
    (torn by a crash) or was made for another shard or encoder is started anew.

    `fresh`: always start anew. `forced` (`extract --force`): start anew a part made before, but
    resume one an earlier forced run made (the part records `forced`), so the same `--force`
    command, interrupted, goes on where it stopped. `resumed`: the rows already here when opened.
    """

    def __init__(self, path: Path, meta: dict, shard: str, capacity: int, shapes: dict[str, tuple[int, ...]],
                 chunk: int, fresh: bool = False, forced: bool = False, subjects: bool = False):
        self.path = path
        self.file = self._resume(path, meta, shard, fresh, forced)
        if self.file is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.file = h5open(path, "w-")  # never truncates: a second run made it first, it stays its own
            except FileExistsError:
                raise UserError(f"{path}: another run made this part file just now; run one job per cache "
                                "at a time") from None
            write_attrs(self.file, {**meta, "shard": shard})
            self.file.attrs.update({"rows": 0, "consumed": 0, "done": False, "forced": forced})
            rows = max(1, min(chunk, capacity))
            self.file.create_dataset("ids", shape=(capacity,), dtype=STR, chunks=(rows,) if capacity else None)
            self.file.create_dataset("labels", shape=(capacity,), dtype=np.int64)
            self.file.create_dataset("usage", shape=(capacity,), dtype=STR, chunks=(rows,) if capacity else None)
            if subjects:  # the person in each face, where the dataset says (CK+, JAFFE): folds keep them apart
                self.file.create_dataset("subjects", shape=(capacity,), dtype=STR, chunks=(rows,) if capacity else None)
            for name, shape in shapes.items():
                self.file.create_dataset(name, shape=(capacity, *shape),
                                         dtype=np.float16 if name == TOKENS else np.float32,
                                         chunks=(rows, *shape) if capacity else None)
            self.file.flush()
            _fsync_folder(path.parent)  # the new part's name survives a power cut too
        self.rows, self.consumed = int(self.file.attrs["rows"]), int(self.file.attrs["consumed"])
        self.resumed = self.rows

    @staticmethod
    def _resume(path: Path, meta: dict, shard: str, fresh: bool, forced: bool) -> h5py.File | None:
        """Reopen a part left by an interrupted run, or None (deleted) if it cannot be used."""
        if not path.exists():
            return None
        try:
            f = h5open(path, "r+")  # another live process holding it: a UserError, the file untouched
        except OSError as exc:
            if exc.errno is not None or "errno =" in str(exc):  # the system failed (EIO, ESTALE, EACCES...)
                raise UserError(f"{path}: cannot open this part file ({first_line(exc)}); it was left as it "
                                "is: fix the filesystem and run again, or delete it to redo its rows") from None
            path.unlink()  # HDF5 cannot read it (torn by a crash in the middle of a flush): start it again
            return None
        attrs = read_attrs(f)
        stale = fresh or (forced and not attrs.get("forced", False))  # made before this --force command
        if stale or attrs.get("shard") != shard or Identity.from_meta(attrs).differences(Identity.from_meta(meta)):
            f.close()
            path.unlink()  # --force, or made for another selection or encoder: its rows do not apply
            return None
        return f

    def append(self, ids: list[str], labels: np.ndarray, usage: list[str], consumed: int,
               features: dict[str, np.ndarray], subjects: list[str] | None = None) -> None:
        """Write rows after those already here (durable only after the next `flush`)."""
        lo, hi = self.rows, self.rows + len(ids)
        for name, rows in features.items():  # float16 overflow (tokens, or a float16 encoder's) and NaN
            finite = np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
            if not finite.all():
                face, dtype = ids[int(np.argmin(finite))], self.file.attrs["dtype"]
                if name == TOKENS:
                    raise UserError(f"{self.path}: tokens of {face} exceed float16's range (|x| > {FLOAT16_MAX:g}) "
                                    f"or are NaN (computed in {dtype}); if --dtype float32 does not help, this "
                                    "model's tokens cannot be cached: tune it --from-images")
                how = ("the model gives them even in float32): check its weights" if dtype == "float32" else
                       f"{dtype} overflowed?): extract with --dtype float32")
                raise UserError(f"{self.path}: feature '{name}' of {face} is NaN or infinite ({how}")
        self.file["ids"][lo:hi] = np.array(ids, dtype=object)
        self.file["labels"][lo:hi] = labels
        self.file["usage"][lo:hi] = np.array(usage, dtype=object)
        if subjects is not None:
            self.file["subjects"][lo:hi] = np.array(subjects, dtype=object)
        for name, rows in features.items():
            self.file[name][lo:hi] = rows
        self.rows, self.consumed = hi, consumed

    def flush(self, done: bool = False) -> None:
        """Make the rows durable, then the count that trusts them (see the class docstring)."""
        fd = self.file.id.get_vfd_handle()
        self.file.flush()
        os.fsync(fd)
        self.file.attrs.update({"rows": self.rows, "consumed": self.consumed, "done": done, "resumed": self.resumed})
        self.file.flush()
        os.fsync(fd)

    def close(self) -> None:
        self.file.close()


def shard_digest(ids: list[str]) -> str:
    """What a part file is for: the ids of its shard's images, in order, as one short digest."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]


def part_path(cache: Path, split: str, rank: int = 0, world: int = 1) -> Path:
    """Where one rank's rows of a split wait until the split is complete: `<cache>.partial/<split>.<rank>-of-<world>.h5`."""
    return cache.with_name(cache.name + ".partial") / f"{split}.{rank}-of-{world}.h5"


def resumed_rows(parts: list[Path]) -> int:
    """The rows the parts already held when this run opened them (encoded by an interrupted run)."""
    total = 0
    for p in parts:
        with h5open(p, "r") as f:
            total += int(f.attrs.get("resumed", 0))
    return total


def write_split(cache: str | os.PathLike, split: str, meta: dict, ids: list[str], labels: np.ndarray,
                usage: list[str], features: dict[str, np.ndarray], subjects: list[str] | None = None) -> None:
    """Write a whole split already in memory (a converted or synthetic cache) the way `extract` does
    (`features` may hold FER+'s `votes`; `subjects`: each face's person)."""
    cache = Path(cache)
    lengths = {len(ids), len(labels), len(usage), *(len(x) for x in features.values())}
    if len(lengths) > 1:
        raise ValueError(f"write_split: ids, labels, usage and features differ in length ({sorted(lengths)})")
    part = PartFile(part_path(cache, split), meta, shard_digest(ids), len(ids),
                    {name: x.shape[1:] for name, x in features.items()}, chunk=1024, fresh=True,
                    subjects=subjects is not None)
    part.append(ids, labels, usage, len(ids), features, subjects)
    part.flush(done=True)
    part.close()
    commit(cache, split, [part.path], meta, {"split": split, "limit": None, "count": len(ids)})


def commit(cache: Path, split: str, parts: list[Path], meta: dict, selection: dict,
           replace: bool = False) -> int:
    """Write a finished split into the cache atomically: a new file, then a rename over the old.

    Other complete splits are carried over (unless `replace`), so space of a redone split is
    reclaimed and a crash at any point leaves the previous cache untouched; they are carried only
    if the old cache's identity is this split's, checked under the commit lock (another job may
    have made the cache since this one started): a mismatch is a `UserError` that keeps the parts.
    Rows move from the parts into preallocated datasets `SLICE_BYTES` at a time and other splits
    are copied by HDF5, so memory stays flat whatever the split's size. The new file is fsynced
    before the rename and the folder after it, so a power cut leaves the old cache or the new one.
    Returns the split's number of rows.
    """
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    sources = [h5open(p, "r") for p in parts]
    try:
        for p, s in zip(parts, sources):
            if not s.attrs.get("done", False):
                raise UserError(f"{p}: this part is not finished ({int(s.attrs['rows'])} rows); run the same "
                                "command again to finish it")
        counts = [int(s.attrs["rows"]) for s in sources]
        if not sum(counts):
            raise UserError(f"{meta.get('source', {}).get('path', 'the data')}: none of the images of split "
                            f"'{split}' could be read")
        with _one_commit_at_a_time(cache):
            carry = cache.exists() and not replace
            if carry:
                read_identity(cache).check(Identity.from_meta(meta), cache, hint=(
                    f"another job wrote it since this one started; this job's finished rows stay in "
                    f"{parts[0].parent}: move or delete {cache} and rerun the same command, which reuses them "
                    "(not --force, which discards them; one job per cache at a time)"))
            with h5open(tmp, "w") as out:
                write_attrs(out, meta)
                if carry:
                    with _open(cache) as old:
                        for name in old:
                            if name != split and old[name].attrs.get("complete", False):
                                old.copy(old[name], out, name=name)  # by HDF5, chunk by chunk
                group = out.create_group(split)
                for name in _datasets(sources[0]):
                    _join(name, sources, counts, group)
                write_attrs(group, {"selection": selection})
                group.attrs["complete"] = True
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, cache)
            _fsync_folder(cache.parent)
    finally:
        for s in sources:
            s.close()
        tmp.unlink(missing_ok=True)
    for p in parts:
        p.unlink()
    if parts and not any(parts[0].parent.iterdir()):
        parts[0].parent.rmdir()
    return sum(counts)


def _join(name: str, sources: list[h5py.File], counts: list[int], group: h5py.Group) -> None:
    """Dataset `name` of every part, in order, into one new dataset of `group`, a slice at a time."""
    first = sources[0][name]
    shape, total = first.shape[1:], sum(counts)
    row_bytes = first.dtype.itemsize * int(np.prod(shape))  # strings: their pointers
    if first.dtype.kind == "O":  # ids, usage
        out = group.create_dataset(name, shape=(total,), dtype=STR)
    else:
        rows = max(1, min(1024, total, CHUNK_BYTES // row_bytes))
        out = group.create_dataset(name, shape=(total, *shape), dtype=first.dtype,
                                   chunks=(rows, *shape) if shape else None)
    step = max(1, SLICE_BYTES // row_bytes)
    if out.chunks:
        step = max(1, step // out.chunks[0]) * out.chunks[0]  # whole chunks where the slices line up
    at = 0
    for source, count in zip(sources, counts):
        for lo in range(0, count, step):
            hi = min(count, lo + step)
            out[at + lo:at + hi] = source[name][lo:hi]
        at += count


@contextmanager
def _one_commit_at_a_time(cache: Path) -> Iterator[None]:
    """Hold `<cache>.lock` from reading the old cache to the rename; a second commit waits for it.

    Two jobs committing other splits of one cache at once would each carry the old cache over
    without the other's split, and the last rename would win. Without locks (`--no-file-locking`,
    or a filesystem that refuses them) nothing is held: run one job per cache at a time. A
    filesystem that refuses them (Lustre mounted `noflock`) is said once, in one line; HDF5's
    best-effort locking goes on without them silently.
    """
    if LOCKING is False or fcntl is None:
        yield
        return
    with open(cache.with_name(cache.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:  # as HDF5's best effort, go on without, but say so
            warn(f"{cache.parent}: no file locks on this filesystem ({first_line(exc)}): run one job per cache "
                 "at a time")
        yield


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform can open a folder: not Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                    view: str = "plain", tokens: bool = False) -> Embeddings:
    """Cached features of one split as numpy arrays: `X, y, ids, classes, meta`.

    `split` may be a stored group or a part of one (`public_test` and `private_test` of `test`;
    `all` is train then test). `layer` picks a stored block (`extract --layers`), `view` is
    `plain`, `flip` (`extract --tta flip`) or `mean` (the two averaged); `tokens`: see `load_tokens`.
    """
    path = Path(cache)
    choice(view, VIEWS, "view")
    with _open(path) as f:
        meta = read_attrs(f)
        xs, ys, ids = [], [], []
        for group, usage in _groups(f, split, path):
            names = [feature_name(layer, v) for v in (("plain", "flip") if view == "mean" else (view,))]
            if tokens:
                names = [TOKENS]
                if TOKENS not in group:
                    raise UserError(f"{path}: no tokens stored; extract them with `fercache extract --tokens K` "
                                    "(K: the blocks below those stage three tunes)")
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
    return Embeddings(np.concatenate(xs), np.concatenate(ys), ids, dataset_of(meta)[1], meta)


def load_tokens(cache: str | os.PathLike, split: str = "train") -> Embeddings:
    """The token sequences of one split that stage three tunes from (`extract --tokens K`): `X` is
    float16 (N, T, D), what enters block K+1 (`meta["tokens"]` is K); `y, ids, classes, meta` as
    `load_embeddings` gives them. ViT-B/32: T = 50 (49 patches and CLS), D = 768."""
    return load_embeddings(cache, split, tokens=True)


def load_votes(cache: str | os.PathLike, split: str) -> np.ndarray:
    """FER+'s vote counts of a split's rows (N x 10, in `datasets.FERPLUS_VOTES` order), as `extract` stored them."""
    return _rows(cache, split, "votes", "no FER+ votes stored (a FER+ cache has them: extract --dataset ferplus)")


def load_subjects(cache: str | os.PathLike, split: str) -> list[str]:
    """The person in each of a split's faces (CK+, JAFFE), as `extract` stored them: what folds keep apart."""
    return [s.decode() for s in _rows(cache, split, "subjects", "no subject ids stored (its dataset gives none): "
                                                                  "folds need a dataset with subjects, as CK+ and JAFFE")]


def _rows(cache: str | os.PathLike, split: str, name: str, missing: str) -> np.ndarray:
    """Dataset `name` of a split's rows (its groups joined, a half filtered by usage), or a `UserError`."""
    path = Path(cache)
    with _open(path) as f:
        out = []
        for group, usage in _groups(f, split, path):
            if name not in group:
                raise UserError(f"{path}: {missing}")
            rows = group[name][:]
            if usage is not None:
                rows = rows[np.array([u.decode() == usage for u in group["usage"][:]], dtype=bool)]
            out.append(rows)
    return np.concatenate(out)


def usage_of(cache: str | os.PathLike, split: str) -> list[str]:
    """Per-row usage (train, public_test, private_test) of a split, to report test halves apart."""
    return [u.decode() for u in _rows(cache, split, "usage", "no usage stored")]


def describe_cache(cache: str | os.PathLike) -> dict:
    """Metadata and per-split counts of a cache (the JSON of `fercache info CACHE`)."""
    path = Path(cache)
    read_identity(path)
    with _open(path) as f:
        meta = read_attrs(f)
        classes = dataset_of(meta)[1]
        splits = {}
        order = list(SPLIT_CHOICES)  # train before test, as `info DATASET` lists them (HDF5 keeps names sorted)
        for name in sorted(f, key=lambda n: (order.index(n) if n in order else len(order), n)):
            g = f[name]
            counts = np.bincount(g["labels"][:], minlength=len(classes))
            splits[name] = {"count": int(g["labels"].shape[0]), "complete": bool(g.attrs.get("complete", False)),
                            "dim": int(g["embeddings"].shape[1]),
                            "features": sorted(n for n in _datasets(g) if n not in ("ids", "labels", "usage", "votes", "subjects")),
                            "per_class": {c: int(n) for c, n in zip(classes, counts)}}
    return {"format": "fercache-cache", "path": str(path), **meta, "splits": splits}
