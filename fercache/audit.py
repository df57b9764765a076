"""`fercache audit`: is this copy of a dataset sound, and which test faces has train already seen?

Three checks a researcher needs before any figure means anything:

- **Shift.** Per split, per face: sharpness (mean absolute difference between neighbouring
  pixels), contrast (standard deviation), brightness (mean) and JPEG blockiness (neighbour
  differences across the 8x8 block grid over those inside it), plus the image files' format,
  mode, size and JPEG quality. Train is compared with test and with each test half (and the halves
  with each other) by Cliff's delta, the probability that a face of one split scores higher than
  one of the other minus the reverse: robust to FER2013's blank faces and free of any scale. A
  comparison is flagged at |delta| >= 0.33, the conventional boundary of a "medium" effect
  (Romano et al., 2006), fixed in advance: a copy whose train faces were blurred, equalised,
  resized or recompressed sits near |delta| = 1, a genuine one near 0. Files whose dominant
  format, size, mode or JPEG quality differ between splits are flagged too. A dataset without a
  split (CK+, JAFFE: one split, `all`) has nothing to compare: the verdict says so. Every face is
  measured as 48x48 gray (what the gray48 encoders see); the files column says how they are stored.
- **Duplicates.** Exact (identical decoded pixels, by SHA-1) and near (perceptual hashes, imagehash's
  pHash, at most `HASH_BITS` of 64 bits apart; given a cache, also cosine of the cached features,
  test faces against all),
  within each split and across train and test, with the groups whose labels conflict. Blank faces
  (pixel standard deviation below `BLANK_STD`) are identical to each other without being the same
  face: they are counted apart and left out of the groups. Without a split there is no "across":
  groups are counted within the one split and, where the dataset names each face's person, across
  subjects (two people's faces alike: what subject-independent folds would leak).
- **Label errors.** Given a cache: out-of-fold probabilities of cross-validated linear heads
  on train (every face without a split; folds keep subjects apart where known), ranked by
  cleanlab's `find_label_issues`; where FER+ votes can be tied to the faces, how often the flagged
  ones are faces FER+ annotators relabelled.

`test_duplicates` is the part scoring reuses: {test id: [train ids]} at the audit's threshold.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fercache.data import Source, _usages
from fercache.errors import FERCacheWarning, UserError, warn
from fercache.datasets import Origin
from fercache.html import CSS, data_uri, face_img, faces_of
from fercache.names import CANONICAL, data_dir

MEDIUM = 0.33  # |Cliff's delta| from which a difference between splits is flagged (Romano et al.'s "medium")
HASH_BITS = 4  # pHash distance (of 64 bits) up to which two faces are near duplicates; see `near_pairs`
BLANK_STD = 2.0  # a face whose pixels vary less than this (gray levels, sd) is blank: JPEG noise on a flat field
COSINE_QUANTILE = 0.5  # cached features: near if as similar as the median pair the hash calls near
FOLDS = 5
EPOCHS = 10  # of the out-of-fold linear heads (Adam, batches of 256, at LR: ten times the reference recipe's,
LR = 1e-2  # so that ten epochs fit the head well)
MIN_STEPS = 200  # ... and on small sets as many epochs as make this many Adam steps
GALLERY = 24
TOP = 1000  # the most confident suspected label errors, compared with FER+ apart
STATS = ("sharpness", "contrast", "brightness", "blockiness")
EXTRA = "fercache[audit]"
TEST_USAGES = frozenset(_usages("test"))
# The standard (IJG) luminance table: a JPEG's quality is read off how its own table scales it
_IJG = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
                 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])
# FER+ vote columns -> FER2013 class index, by canonical name (contempt, unknown and not-a-face have none)
_FERPLUS = {name: i for i, name in enumerate(CANONICAL)}


@dataclass
class Faces:
    """Every face of a source (train first, then the other splits), decoded as 48x48 gray."""

    ids: list[str]
    labels: np.ndarray  # int64
    usage: np.ndarray  # str: train, val, public_test, private_test, test (half unknown) or all (no split)
    pixels: np.ndarray  # uint8 N x 48 x 48
    files: list[tuple] | None  # per face (format, mode, "WxH", JPEG quality or None); None: no files (CSV)
    source: Source
    subjects: list[str | None]  # per face: the person, where the dataset says (CK+, JAFFE)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.source.classes)

    @property
    def unsplit(self) -> bool:
        """A dataset without a split (one split, `all`): nothing to compare across."""
        return bool(len(self.usage)) and bool((self.usage == "all").all())

    def split(self, name: str) -> np.ndarray:
        """Row mask of a split: test is both halves (and test faces of unknown half); others as named."""
        return np.isin(self.usage, list(TEST_USAGES)) if name == "test" else self.usage == name


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the audit needs {module}: pip install '{EXTRA}'") from None


def read_faces(source: str | os.PathLike | Source | None, dataset: str | None = None,
               classes: str | list[str] | None = None) -> Faces:
    """Decode every face of a source once (data.py's readers, as 48x48 gray), with its file's header.

    `source` is anything `datasets.open_dataset` reads (its layout detected, or named by `dataset`;
    a generic folder's `classes`).
    """
    from fercache.datasets import open_dataset

    src = source if isinstance(source, Source) else open_dataset(source, dataset, classes)
    entries = [e for e in src.entries if e.usage == "train"] + [e for e in src.entries if e.usage != "train"]
    if not entries:
        raise UserError(f"{src.path}: no images to audit")
    keep, chunks = [], []
    with warnings.catch_warnings():  # measured as 48x48 gray by design: the files column says how they are stored
        warnings.filterwarnings("ignore", ".* were not 48x48 gray and were converted", FERCacheWarning)
        for positions, chunk in src.stream(entries):
            keep += positions
            chunks.append(chunk)
    if not keep:
        raise UserError(f"{src.path}: none of its {len(entries)} images could be read")
    entries = [entries[i] for i in keep]
    return Faces([e.id for e in entries], np.array([e.label for e in entries], dtype=np.int64),
                 np.array([e.usage for e in entries]), np.concatenate(chunks), _file_headers(src, entries), src,
                 [e.subject for e in entries])


def _file_headers(src: Source, entries: list) -> list[tuple] | None:
    """(format, mode, size, JPEG quality) of each face's file as stored, before data.py made it 48x48 gray.

    Only headers are parsed (PIL opens lazily); sources without image files (CSV rows) give None.
    """
    from PIL import Image

    if not all(isinstance(e.ref, str) for e in entries):
        return None
    opened = src.archive is None and src.format != "folder"  # the zip the index read, else one opened here
    archive = zipfile.ZipFile(src.path) if opened else src.archive
    qualities: dict[bytes, int] = {}
    out = []
    try:
        for e in entries:
            data = Path(e.ref).read_bytes() if src.format == "folder" else archive.read(e.ref)
            with Image.open(io.BytesIO(data)) as im:
                table = (getattr(im, "quantization", None) or {}).get(0)
                quality = None
                if table is not None:
                    key = bytes(np.asarray(table, dtype=np.uint8))
                    quality = qualities.setdefault(key, jpeg_quality(np.asarray(table)))
                out.append((im.format or "?", im.mode, f"{im.size[0]}x{im.size[1]}", quality))
    except (OSError, KeyError, zipfile.BadZipFile):
        return None  # a file data.py skipped or could not read: the decoded statistics still stand
    finally:
        if opened:
            archive.close()
    return out


def jpeg_quality(table: np.ndarray) -> int:
    """The IJG quality (1-100) whose scaled standard luminance table is nearest this one (in sum)."""
    qs = np.arange(1, 101)
    scale = np.where(qs < 50, 5000 // qs, 200 - 2 * qs)[:, None]
    scaled = np.clip((_IJG[None] * scale + 50) // 100, 1, 255).sum(1)
    return int(qs[np.argmin(np.abs(scaled - np.asarray(table).sum()))])


def face_stats(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Per face: sharpness, contrast, brightness, blockiness (see the module docstring)."""
    out = {k: np.empty(len(pixels)) for k in STATS}
    for start in range(0, len(pixels), 4096):  # int16 differences, in bounded memory
        p = pixels[start:start + 4096].astype(np.int16)
        dx, dy = np.abs(np.diff(p, axis=2)), np.abs(np.diff(p, axis=1))
        sl = slice(start, start + len(p))
        out["sharpness"][sl] = (dx.mean((1, 2)) + dy.mean((1, 2))) / 2
        out["contrast"][sl] = p.reshape(len(p), -1).std(1)
        out["brightness"][sl] = p.reshape(len(p), -1).mean(1)
        grid = np.zeros(dx.shape[2], bool)
        grid[7::8] = True  # the difference between columns 7 and 8, 15 and 16, ...
        across = dx[:, :, grid].mean((1, 2)) + dy[:, grid, :].mean((1, 2))
        inside = dx[:, :, ~grid].mean((1, 2)) + dy[:, ~grid, :].mean((1, 2))
        out["blockiness"][sl] = across / np.maximum(inside, 1e-6)
    return out


def cliffs_delta(a: np.ndarray, b: np.ndarray) -> float:
    """P(a > b) - P(a < b) over all pairs, from ranks (Mann-Whitney's U) in O(n log n)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([a, b]))
    u = ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(2 * u / (len(a) * len(b)) - 1)


def smd(a: np.ndarray, b: np.ndarray) -> float:
    """Standardised mean difference (Cohen's d, pooled sd)."""
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / max(len(a) + len(b) - 2, 1))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0


def _describe_files(files: list[tuple]) -> dict:
    return {"formats": dict(Counter(f[0] for f in files)), "modes": dict(Counter(f[1] for f in files)),
            "sizes": dict(Counter(f[2] for f in files)),
            "jpeg_quality": {str(q): n for q, n in Counter(f[3] for f in files if f[3] is not None).items()}}


def split_stats(faces: Faces, stats: dict[str, np.ndarray]) -> dict:
    """Per split: count, quartiles of each statistic, blank faces, files as stored."""
    blank = stats["contrast"] < BLANK_STD
    out = {}
    for name in _splits(faces):
        rows = faces.split(name)
        entry = {"count": int(rows.sum()), "constant": int((stats["contrast"][rows] == 0).sum()),
                 "blank": int(blank[rows].sum())}
        for k in STATS:
            q1, med, q3 = np.percentile(stats[k][rows], [25, 50, 75])
            entry[k] = {"median": round(float(med), 4), "q1": round(float(q1), 4), "q3": round(float(q3), 4),
                        "mean": round(float(stats[k][rows].mean()), 4)}
        if faces.files is not None:
            entry["files"] = _describe_files([f for f, r in zip(faces.files, rows) if r])
        else:
            entry["files"] = {"note": "decoded from CSV text: no image files, 48x48 gray by construction"}
        out[name] = entry
    return out


def _splits(faces: Faces) -> list[str]:
    """The splits present, train first; `test` stands for its halves too, `all` for a dataset without splits."""
    present = set(faces.usage.tolist())
    names = [s for s in ("train", "val") if s in present] + (["test"] if present & TEST_USAGES else [])
    return names + [s for s in ("public_test", "private_test") if s in present] + sorted(
        present - TEST_USAGES - {"train", "val"})


def shift_test(faces: Faces, stats: dict[str, np.ndarray]) -> dict:
    """Train against test (and each half; the halves against each other): Cliff's delta per statistic."""
    splits = _splits(faces)
    pairs = [("train", s) for s in splits if s != "train" and "train" in splits]
    if "public_test" in splits and "private_test" in splits:
        pairs.append(("public_test", "private_test"))
    comparisons, reasons = [], []
    for a, b in pairs:
        ra, rb = faces.split(a), faces.split(b)
        row = {"a": a, "b": b, "stats": {}}
        for k in STATS:
            x, y = stats[k][ra], stats[k][rb]
            delta = cliffs_delta(x, y)
            row["stats"][k] = {"median_a": round(float(np.median(x)), 4), "median_b": round(float(np.median(y)), 4),
                               "cliffs_delta": round(delta, 4), "smd": round(smd(x, y), 4),
                               "flagged": abs(delta) >= MEDIUM}
            if abs(delta) >= MEDIUM:
                reasons.append(f"{a} vs {b}: {k} median {np.median(x):.2f} vs {np.median(y):.2f} "
                               f"(Cliff's delta {delta:+.2f})")
        if faces.files is not None:
            files_a = [f for f, r in zip(faces.files, ra) if r]
            files_b = [f for f, r in zip(faces.files, rb) if r]
            for i, what in enumerate(("format", "mode", "size", "JPEG quality")):
                ca, cb = Counter(f[i] for f in files_a).most_common(1), Counter(f[i] for f in files_b).most_common(1)
                if ca and cb and ca[0][0] != cb[0][0]:
                    row.setdefault("files_differ", []).append(what)
                    reasons.append(f"{a} vs {b}: {what} of the files {ca[0][0]} vs {cb[0][0]}")
        row["flagged"] = any(s["flagged"] for s in row["stats"].values()) or bool(row.get("files_differ"))
        comparisons.append(row)
    largest = max(((abs(s["cliffs_delta"]), k, c) for c in comparisons for k, s in c["stats"].items()),
                  default=None, key=lambda t: t[0])
    flagged = bool(reasons)
    if faces.unsplit:
        verdict = (f"no shift test: {faces.source.dataset} has no train/test split (one split, all), so there "
                   "is nothing to compare; its statistics and files are in the table")
    elif not comparisons:
        verdict = f"no shift test: the source has one split only ({', '.join(splits)})"
    elif flagged:
        verdict = "SHIFT: " + "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    else:
        verdict = (f"no shift: the splits look alike (largest |Cliff's delta| {largest[0]:.2f} < {MEDIUM}, "
                   f"{largest[1]}, {largest[2]['a']} vs {largest[2]['b']})")
    return {"flagged": flagged, "threshold": {"cliffs_delta": MEDIUM}, "verdict": verdict,
            "reasons": reasons, "comparisons": comparisons}


def phashes(pixels: np.ndarray) -> np.ndarray:
    """imagehash's pHash of each face as a uint64 (the 8x8 low DCT frequencies above their median)."""
    imagehash = _need("imagehash")
    from PIL import Image

    bits = np.array([imagehash.phash(Image.fromarray(p)).hash.ravel() for p in pixels], dtype=np.uint8)
    return np.packbits(bits.reshape(len(pixels), 64), axis=1).view(">u8").ravel().astype(np.uint64)


def popcount(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8).reshape(-1, 8), axis=1).sum(1)


def near_pairs(hashes: np.ndarray, bits: int = HASH_BITS) -> np.ndarray:
    """All pairs (i < j) of hashes at most `bits` apart, as an (M, 2) array.

    Multi-index hashing: cut the 64 bits into `bits + 1` chunks; two hashes within `bits` agree
    exactly on at least one chunk (pigeonhole), so only pairs sharing a chunk value are compared.
    Why 4 of 64: re-encoding a FER2013 face as JPEG (quality 50-75), blurring it (sigma 1) or
    halving and restoring its size moves its pHash by at most 4 bits in 99% of faces, while two
    different faces are 30 bits apart at the median and fewer than 1e-5 of random pairs come within 6.
    """
    n = len(hashes)
    bounds = np.linspace(0, 64, bits + 2).astype(int)
    found = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        key = (hashes >> np.uint64(64 - hi)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        key = key[order]
        for offset in range(1, n):  # sorted: equal keys sit within `offset` of each other, or nowhere further
            at = np.flatnonzero(key[offset:] == key[:-offset])
            if not len(at):
                break
            i, j = order[at], order[at + offset]
            close = popcount(hashes[i] ^ hashes[j]) <= bits
            found.append(np.minimum(i, j)[close] * n + np.maximum(i, j)[close])
    codes = np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)
    return np.stack([codes // n, codes % n], 1).astype(np.int64)


def _components(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Groups (of 2 or more rows) linked by `pairs`, largest first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return []
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    order = np.argsort(comp, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(comp[order])) + 1)
    return sorted((g for g in groups if len(g) > 1), key=lambda g: (-len(g), g[0]))


def exact_pairs(pixels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pairs (first, other) of `rows` whose decoded pixels are identical (SHA-1 of the bytes)."""
    first: dict[bytes, int] = {}
    pairs = []
    for r in rows:
        key = hashlib.sha1(pixels[r].tobytes()).digest()
        if first.setdefault(key, r) != r:
            pairs.append((first[key], r))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def summarise_groups(faces: Faces, groups: list[np.ndarray]) -> dict:
    """Counts of groups by where they lie and whether their labels agree, and the groups themselves.

    With a split: `within_train`, `within_test`, `across` (train and test), `with_val` (any other
    group holding a val face) and the test faces with a train copy. Without one (`Faces.unsplit`):
    `within` (every group) and, where subjects are known, `across_subjects`.
    """
    train, test = faces.split("train"), faces.split("test")
    if faces.unsplit:
        counts = {"groups": len(groups), "within": 0}
        if all(s is not None for s in faces.subjects):
            counts["across_subjects"] = 0
    else:
        counts = {"groups": len(groups), "within_train": 0, "within_test": 0, "across": 0,
                  **({"with_val": 0} if (faces.usage == "val").any() else {}), "test_with_train_copy": 0,
                  "public_test_with_train_copy": 0, "private_test_with_train_copy": 0}
    counts.update(conflicting_labels=0, faces=int(sum(len(g) for g in groups)))
    listed = []
    for g in groups:
        if faces.unsplit:
            where = "within"
        elif train[g].any() and test[g].any():
            where = "across"
            tests = g[test[g]]
            counts["test_with_train_copy"] += len(tests)
            for half in ("public_test", "private_test"):
                counts[f"{half}_with_train_copy"] += int((faces.usage[tests] == half).sum())
        else:
            where = "within_train" if train[g].all() else "within_test" if test[g].all() else "with_val"
        counts[where] += 1
        people = {faces.subjects[i] for i in g}
        if "across_subjects" in counts and len(people) > 1:
            counts["across_subjects"] += 1
        conflict = len(set(faces.labels[g].tolist())) > 1
        counts["conflicting_labels"] += conflict
        listed.append({"where": where, "conflict": conflict, "ids": [faces.ids[i] for i in g],
                       "splits": faces.usage[g].tolist(), "labels": [faces.classes[c] for c in faces.labels[g]],
                       **({"subjects": sorted(people)} if None not in people else {})})
    return {"counts": counts, "groups": listed}


def duplicate_groups(faces: Faces, stats: dict[str, np.ndarray] | None = None,
                     features: np.ndarray | None = None) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """Exact, near (pHash) and, given cached features aligned with the faces, cosine duplicate groups.

    Near links include exact ones (a near group holds the exact copies too). Blank faces are left out.
    """
    stats = stats if stats is not None else face_stats(faces.pixels)
    blank = stats["contrast"] < BLANK_STD
    rows = np.flatnonzero(~blank)
    exact = exact_pairs(faces.pixels, rows)
    unique = np.setdiff1d(rows, exact[:, 1]) if len(exact) else rows
    hashes = phashes(faces.pixels[unique])
    near = unique[near_pairs(hashes)]
    n = len(faces.ids)
    groups = {"exact": _components(n, exact), "near": _components(n, np.concatenate([exact, near]))}
    report = {"blank": {s: int(blank[faces.split(s)].sum()) for s in _splits(faces)},
              "threshold": {"phash_bits": HASH_BITS, "blank_std": BLANK_STD}}
    if faces.unsplit:
        report["note"] = (f"{faces.source.dataset} has no train/test split: no copies across splits; groups are "
                          "counted within its one split" + (", and across subjects (two people's faces alike: what "
                          "subject-independent folds would leak)" if None not in faces.subjects else ""))
    if features is not None:
        cos_pairs, threshold = cosine_pairs(features, rows, rows[faces.usage[rows] != "train"], near, exact)
        report["threshold"]["cosine"] = threshold
        groups["cosine"] = _components(n, np.concatenate([exact, cos_pairs]))
    for kind, g in groups.items():
        report[kind] = summarise_groups(faces, g)
    return report, groups


def cosine_pairs(features: np.ndarray, rows: np.ndarray, queries: np.ndarray, near: np.ndarray,
                 exact: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Pairs (query, row) whose cached features are as similar as the median hash-near pair.

    The threshold comes from the data, not from labels: the COSINE_QUANTILE quantile of the cosine
    over the pairs the perceptual hash calls near but whose pixels differ (with none, nothing is
    linked and the threshold is None). Only `queries` (the test faces) are searched against all
    rows: what leaks into scoring, at a quarter of the all-pairs cost.
    """
    import torch

    X = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features, dtype=np.float32)), dim=1)
    distinct = near[~np.isin(near[:, 1], exact[:, 1])] if len(exact) else near
    if len(distinct) == 0 or len(queries) == 0:
        return np.empty((0, 2), np.int64), None
    threshold = float(np.quantile((X[distinct[:, 0]] * X[distinct[:, 1]]).sum(1).numpy(), COSINE_QUANTILE))
    every = X[torch.as_tensor(rows)]
    found = []
    for start in range(0, len(queries), 1024):
        block = queries[start:start + 1024]
        i, j = torch.nonzero(X[torch.as_tensor(block)] @ every.T >= threshold, as_tuple=True)
        a, b = block[i.numpy()], rows[j.numpy()]
        found.append(np.stack([a, b], 1)[a != b])
    return np.sort(np.concatenate(found), axis=1), round(threshold, 6)


def test_duplicates(source: str | os.PathLike | Source | Origin | None, kind: str = "near",
                    store: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{test id: [ids of its train copies]} for every test face with a copy in train, `kind` exact or near.

    For scoring: drop the listed train faces (`--exclude-duplicates`) or report accuracy on the test
    faces absent from the keys. Kept in `<data dir>/cache/duplicates-<content hash>.json` (`store`
    to put it elsewhere) under the source's fingerprint, so a source is searched once; seconds to
    recompute where it cannot be written. An `Origin` (a cache's source) names its dataset and
    classes and the fingerprint the cache recorded: a list kept under it is read back without
    opening the source, and a source whose content differs from the cache's is refused.
    """
    if kind not in ("exact", "near"):
        raise UserError(f"unknown duplicate kind '{kind}': choose exact or near")
    from fercache.cache import write_json
    from fercache.datasets import open_dataset

    recorded = source.fingerprint if isinstance(source, Origin) else ""
    if recorded and (saved := _kept(_store(store, recorded), recorded)) is not None:
        return saved[kind]
    src = source if isinstance(source, Source) else source.open(verify=True) if isinstance(source, Origin) else \
        open_dataset(source)
    fingerprint = src.fingerprint()
    path = _store(store, fingerprint)
    if (saved := _kept(path, fingerprint)) is not None:
        return saved[kind]
    faces = read_faces(src)
    _, groups = duplicate_groups(faces)
    train, test = faces.split("train"), faces.split("test")
    found = {}
    for name, gs in groups.items():
        found[name] = {faces.ids[t]: [faces.ids[r] for r in g[train[g]]]
                       for g in gs if train[g].any() for t in g[test[g]]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"fingerprint": fingerprint, "phash_bits": HASH_BITS, **found})
    except OSError as exc:
        warn(f"{path}: could not keep the duplicate list ({exc}); it is recomputed next time")
    return found[kind]


def _store(store: str | os.PathLike | None, fingerprint: str) -> Path:
    """Where `test_duplicates` keeps a source's list: `store`, else by the source's content hash."""
    return Path(store) if store else data_dir() / "cache" / f"duplicates-{fingerprint.split(':')[1][:16]}.json"


def _kept(path: Path, fingerprint: str) -> dict | None:
    """The list kept at `path` if it was found for this content at this threshold, else None."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(saved, dict) and saved.get("fingerprint") == fingerprint and saved.get("phash_bits") == HASH_BITS
    return saved if ok else None


def ferplus_rows(faces: Faces) -> np.ndarray | None:
    """Each face's row in `fer2013.csv` (what FER+ votes are keyed by; -1: none), or None for other datasets.

    CSV sources name faces `<file>:<line>` (row = line - 2); Kaggle files go through fercache's
    table (`datasets.kaggle_rows`).
    """
    if getattr(faces.source, "dataset", "fer2013") != "fer2013":
        return None
    if faces.source.format.endswith(".csv"):
        return np.array([int(i.rsplit(":", 1)[1]) - 2 for i in faces.ids])
    from fercache.datasets import kaggle_rows

    table = kaggle_rows()
    return np.array([table.get(i.rsplit(".", 1)[0], -1) for i in faces.ids])


def ferplus_relabelled(path: str | os.PathLike, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per face (with a row): whether FER+'s majority (its own reader's rule) is not its FER2013 label.

    A face FER+ dropped (not a face, no majority) or gave contempt counts as relabelled.
    """
    from fercache.datasets import FERPLUS_VOTES, ferplus_majority, read_ferplus_votes

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such FER+ file (fer2013new.csv)")
    votes = read_ferplus_votes(path)
    if rows.max(initial=-1) >= len(votes):
        raise UserError(f"{path}: has {len(votes)} rows of votes, the faces need {rows.max() + 1}")
    to_fer = [_FERPLUS.get(name, -1) for name in FERPLUS_VOTES]
    return np.array([not votes[r][1] or to_fer[ferplus_majority(votes[r][2])] != y for r, y in zip(rows, labels)])


def label_issues(faces: Faces, features: np.ndarray, ferplus: str | os.PathLike | None = None,
                 seed: int = 0) -> dict:
    """Suspected label errors among train faces (every face without a split): cleanlab on out-of-fold
    probabilities of a linear head.

    Each of `FOLDS` stratified folds (keeping each person's faces in one fold where the dataset
    names them, as its own cross-validation does) is predicted by `heads.fit_linear` (Adam at `LR`, `EPOCHS`
    epochs or at least `MIN_STEPS` steps, nothing tuned) fitted on the other four: seconds even on raw
    pixels, where L-BFGS logistic regression with its C search takes minutes per fit on 2 cores.
    """
    cleanlab_filter = _need("cleanlab.filter")
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    from fercache.heads import fit_linear

    started = time.perf_counter()
    among = "all" if faces.unsplit else "train"
    train = np.flatnonzero(faces.usage == among)
    X, y = np.asarray(features[train], dtype=np.float32), faces.labels[train]
    proba = np.zeros((len(y), len(faces.classes)))
    people = [faces.subjects[i] for i in train]
    if None in people:
        people, folds = None, StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    else:
        folds = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=seed)
    for fit_rows, held in folds.split(X, y, people):
        epochs = max(EPOCHS, -(-MIN_STEPS // -(-len(fit_rows) // 256)))
        head, _ = fit_linear(X[fit_rows], y[fit_rows], epochs=epochs, lr=LR, seed=seed, classes=len(faces.classes))
        proba[held] = head.predict_proba(X[held])
    ranked = cleanlab_filter.find_label_issues(y, proba, return_indices_ranked_by="self_confidence", n_jobs=1)
    out = {"count": int(len(ranked)), "of": int(len(y)), "among": among, "folds": FOLDS,
           "by_subject": people is not None, "head": f"linear, {EPOCHS} epochs",
           "oof_accuracy": round(float((proba.argmax(1) == y).mean()), 4),
           "seconds": round(time.perf_counter() - started, 2),
           "ranked": [{"id": faces.ids[train[i]], "label": faces.classes[y[i]],
                       "predicted": faces.classes[int(proba[i].argmax())],
                       "label_probability": round(float(proba[i, y[i]]), 4)} for i in ranked]}
    rows = ferplus_rows(faces) if ferplus else None
    if ferplus and rows is None:
        out["ferplus"] = {"note": "FER+ votes are for FER2013 sources only"}
    elif rows is not None:
        flagged = np.zeros(len(y), bool)
        flagged[ranked] = True
        known = rows[train] >= 0  # Kaggle faces fercache's table ties to a CSV row
        relabelled = np.full(len(y), np.nan)
        relabelled[known] = ferplus_relabelled(ferplus, rows[train][known], y[known])

        def share(rows_: np.ndarray) -> float | None:
            values = relabelled[rows_][known[rows_]]
            return round(float(values.mean()), 4) if len(values) else None

        out["ferplus"] = {"relabelled_among_flagged": share(np.flatnonzero(flagged)),
                          "relabelled_among_rest": share(np.flatnonzero(~flagged)),
                          f"relabelled_among_first_{TOP}": share(np.asarray(ranked[:TOP], dtype=np.int64)),
                          "flagged": int(flagged[known].sum()), "faces_with_votes": int(known.sum())}
    return out


def cached_features(cache: str | os.PathLike, faces: Faces) -> np.ndarray:
    """The cache's pooled features in the faces' order; every face must be in it."""
    from fercache.cache import load_embeddings

    xs, ids = [], []
    for split in ("train", "val", "test", "all"):  # what `extract --split all` stores of each kind of dataset
        if faces.split(split).any():
            e = load_embeddings(cache, split)
            xs.append(e.X)
            ids += e.ids
    where = {i: k for k, i in enumerate(ids)}
    missing = [i for i in faces.ids if i not in where]
    if missing:
        raise UserError(f"{cache}: lacks {len(missing)} of the source's faces (e.g. {missing[0]}); "
                        "was it extracted from this source, with --split all?")
    return np.concatenate(xs)[[where[i] for i in faces.ids]]


def audit(data: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, ferplus: str | os.PathLike | None = None,
          dataset: str | None = None, classes: str | list[str] | None = None) -> dict:
    """Run every check; write `audit.json` and `audit.html` to `out` (when given); return the report.

    The source is `data` read as `dataset` (a generic folder: with its `classes`); given a `cache`
    and neither, as the cache was made (its dataset and classes; its source where `data` is None).
    """
    from fercache.cache import read_meta

    _need("imagehash")
    started = time.perf_counter()
    if cache is not None and dataset is None and classes is None:
        faces = read_faces(Origin.of(read_meta(Path(cache)), data).open(verify=True))
    else:
        faces = read_faces(data, dataset, classes)
    stats = face_stats(faces.pixels)
    features = cached_features(cache, faces) if cache else None
    duplicates, groups = duplicate_groups(faces, stats, features)
    report = {"source": {"path": str(faces.source.path), "format": faces.source.format, "count": len(faces.ids),
                         "dataset": faces.source.dataset, "classes": list(faces.classes)},
              "splits": split_stats(faces, stats), "shift": shift_test(faces, stats), "duplicates": duplicates}
    if features is not None and (faces.unsplit or (faces.usage == "train").any()):
        report["label_issues"] = label_issues(faces, features, ferplus)
    report["seconds"] = round(time.perf_counter() - started, 2)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "audit.json").write_text(json.dumps(report, indent=1))
        write_html(folder / "audit.html", report, faces, stats)
        report["files"] = {"json": str(folder / "audit.json"), "html": str(folder / "audit.html")}
    return report


COUNTS = ("groups", "within_train", "within_test", "across", "with_val", "within", "across_subjects",
          "conflicting_labels", "test_with_train_copy")  # the duplicate counts tables show, where a source has them


def _count_keys(d: dict) -> list[str]:
    counts = d["near"]["counts"]
    return [k for k in COUNTS if k in counts]


def summary_lines(report: dict) -> list[str]:
    """What the terminal shows: per-split medians, the verdict, duplicate counts, label issues."""
    from fercache.report import format_table

    rows = [[name, s["count"], *(s[k]["median"] for k in STATS), s["blank"]] for name, s in report["splits"].items()]
    lines = [f"{report['source']['path']} ({report['source']['format']}, {report['source']['count']:,} faces); "
             "per-split medians:",
             format_table(["split", "faces", *STATS, "blank"], rows), report["shift"]["verdict"]]
    d = report["duplicates"]
    keys = _count_keys(d)
    kinds = [k for k in ("exact", "near", "cosine") if k in d]
    lines.append(format_table(["duplicates", *keys], [[k, *(d[k]["counts"][c] for c in keys)] for k in kinds]))
    thresholds = d["threshold"]
    lines.append(f"near: pHash within {thresholds['phash_bits']} of 64 bits (exact copies included)"
                 + (f"; cosine >= {thresholds['cosine']:.4f}" if thresholds.get("cosine") else "")
                 + f"; blank faces left out: {', '.join(f'{s} {n:,}' for s, n in d['blank'].items())}")
    if d.get("note"):
        lines.append(d["note"])
    if "label_issues" in report:
        li = report["label_issues"]
        line = (f"suspected label errors: {li['count']:,} of {li['of']:,} {li['among']} faces (cleanlab, "
                f"{li['folds']}-fold out-of-fold {li['head']}{', folds by subject' if li['by_subject'] else ''}, "
                f"accuracy {li['oof_accuracy']:.4f})")
        fp = li.get("ferplus", {})
        if fp.get("relabelled_among_flagged") is not None:
            line += (f"; FER+ relabelled {fp['relabelled_among_flagged']:.1%} of them "
                     f"({fp[f'relabelled_among_first_{TOP}']:.1%} of the first {TOP:,}), "
                     f"{fp['relabelled_among_rest']:.1%} of the rest")
        lines.append(line)
    if "files" in report:
        lines.append(f"wrote {report['files']['json']} and {report['files']['html']} in {report['seconds']:.1f} s")
    return lines


def _histograms(faces: Faces, stats: dict[str, np.ndarray]) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (as in report.py)

    fig = Figure(figsize=(11, 2.8), dpi=100)
    for k, name in enumerate(STATS):
        ax = fig.add_subplot(1, len(STATS), k + 1)
        values = stats[name]
        bins = np.linspace(*np.percentile(values, [0.5, 99.5]), 50)
        for split in _splits(faces):
            if split != "test":
                ax.hist(values[faces.split(split)], bins=bins, density=True, histtype="step", label=split)
        ax.set_title(name, fontsize=10)
        ax.set_yticks([])
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _face(faces: Faces, row: int, caption: str, pictures: dict[str, np.ndarray]) -> str:
    """One face of a gallery: as stored where `pictures` holds it, else as audited (48x48 gray)."""
    esc = html.escape
    i = faces.ids[row]
    return f"<div class=face>{face_img(pictures.get(i, faces.pixels[row]), i)}<br>{caption}<br>" \
           f"<span class=ci>{esc(Path(i).name)}</span></div>"


def _group_gallery(faces: Faces, groups: list[dict], where: dict[str, int], pictures: dict[str, np.ndarray]) -> str:
    parts = ["<div class=groups>"]
    for g in groups[:GALLERY]:
        members = sorted(zip(g["ids"], g["splits"], g["labels"]), key=lambda m: m[1] == "train")[:6]  # test first
        parts.append("<div class=group>" + "".join(
            _face(faces, where[i], f"{s} · <span class={'pred' if g['conflict'] else 'true'}>{lab}</span>", pictures)
            for i, s, lab in members)
            + (f"<span class=ci>+{len(g['ids']) - 6}</span>" if len(g["ids"]) > 6 else "") + "</div>")
    return "".join(parts) + "</div>"


def _as_stored(faces: Faces, ids: list[str]) -> dict[str, np.ndarray]:
    """The shown faces as their files hold them (colour, own size) where those are not 48x48 gray,
    as `report.html` shows a native run's faces; {} where they are, or cannot be read again."""
    if faces.files is None or all(f[1] == "L" and f[2] == "48x48" for f in faces.files):
        return {}
    try:
        return faces_of(faces.source, ids, native=True)
    except (UserError, OSError, ValueError):
        return {}


def write_html(path: Path, report: dict, faces: Faces, stats: dict[str, np.ndarray]) -> Path:
    """`audit.html`, self-contained like `report.html`: tables, histograms and the faces themselves."""
    esc = html.escape
    where = {i: k for k, i in enumerate(faces.ids)}
    shift, d = report["shift"], report["duplicates"]
    css = CSS + (".groups{display:flex;flex-wrap:wrap;gap:12px}.group{display:flex;gap:4px;border:1px solid #ddd;"
                 "padding:4px;border-radius:4px}.flag{color:#b42318;font-weight:600}.ok{color:#1a7f37;font-weight:600}")
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>audit · {esc(report['source']['path'])}"
             f"</title><style>{css}</style></head><body>",
             f"<h1>Audit of {esc(report['source']['path'])}</h1>",
             f"<p class=sub>{esc(report['source']['dataset'])} as {esc(report['source']['format'])}, "
             f"{report['source']['count']:,} faces; statistics and hashes of each face as 48x48 gray, the faces "
             "below as stored</p>",
             f"<p class={'flag' if shift['flagged'] else 'ok'}>{esc(shift['verdict'])}</p>"]
    parts.append("<h2>Splits</h2><table><tr><th>split</th><th>faces</th>"
                 + "".join(f"<th>{k} median [q1, q3]</th>" for k in STATS) + "<th>blank</th><th>files</th></tr>")
    for name, s in report["splits"].items():
        files = s["files"]
        described = files.get("note") or "; ".join(
            ", ".join(f"{k} {n:,}" for k, n in files[key].items()) for key in ("formats", "modes", "sizes"))
        if files.get("jpeg_quality"):
            described += "; JPEG quality " + ", ".join(f"{q} ({n:,})" for q, n in files["jpeg_quality"].items())
        parts.append(f"<tr><td>{name}</td><td>{s['count']:,}</td>" + "".join(
            f"<td>{s[k]['median']:.2f} <span class=ci>[{s[k]['q1']:.2f}, {s[k]['q3']:.2f}]</span></td>" for k in STATS)
            + f"<td>{s['blank']:,}</td><td class=ci>{esc(described)}</td></tr>")
    parts.append("</table>")
    parts.append(f'<figure><img alt="histograms" src="{data_uri(_histograms(faces, stats))}"><figcaption>Per-split '
                 "distributions (density)</figcaption></figure>")
    if shift["comparisons"]:
        parts.append(f"<h2>Shift test</h2><p>Cliff's delta per statistic; flagged at |delta| &ge; {MEDIUM} (a medium "
                     "effect). Standardised mean differences beside it.</p><table><tr><th>comparison</th>"
                     + "".join(f"<th>{k}</th>" for k in STATS) + "</tr>")
        for c in shift["comparisons"]:
            parts.append(f"<tr><td>{c['a']} vs {c['b']}</td>" + "".join(
                f"<td class={'flag' if s['flagged'] else ''}>{s['cliffs_delta']:+.3f} <span class=ci>d "
                f"{s['smd']:+.2f}</span></td>" for s in c["stats"].values()) + "</tr>")
        parts.append("</table>")
    else:
        parts.append(f"<h2>Shift test</h2><p>{esc(shift['verdict'])}.</p>")
    keys = [*_count_keys(d), "faces"]
    kinds = [k for k in ("exact", "near", "cosine") if k in d]
    parts.append("<h2>Duplicates</h2><table><tr><th>kind</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>")
    for k in kinds:
        parts.append(f"<tr><td>{k}</td>" + "".join(f"<td>{d[k]['counts'][c]:,}</td>" for c in keys) + "</tr>")
    parts.append(f"</table><p class=sub>near: pHash within {HASH_BITS} of 64 bits, exact copies included; "
                 f"blank faces (pixel sd &lt; {BLANK_STD:g}) left out: "
                 f"{esc(', '.join(f'{s} {n:,}' for s, n in d['blank'].items()))}</p>")
    if d.get("note"):
        parts.append(f"<p class=note>{esc(d['note'])}</p>")
    crossing = (("Near duplicates across subjects", lambda g: len(g.get("subjects", ())) > 1) if faces.unsplit else
                ("Near duplicates across train and test", lambda g: g["where"] == "across"))
    galleries = [(crossing[0], [g for g in d["near"]["groups"] if crossing[1](g)]),
                 ("Near duplicates whose labels conflict", [g for g in d["near"]["groups"] if g["conflict"]]),
                 ("Near but not identical", [g for g in d["near"]["groups"]
                                             if len({faces.pixels[where[i]].tobytes() for i in g["ids"]}) > 1])]
    if "cosine" in d:
        near_group = {i: k for k, g in enumerate(d["near"]["groups"]) for i in g["ids"]}
        galleries.append((crossing[0].replace("Near", "Cosine") + ", not near by hash",
                          [g for g in d["cosine"]["groups"] if crossing[1](g)
                           and len({near_group.get(i, i) for i in g["ids"]}) > 1]))
    blank = np.flatnonzero(stats["contrast"] < BLANK_STD)
    ranked = report["label_issues"]["ranked"][:GALLERY] if "label_issues" in report else []
    pictures = _as_stored(faces, [i for _, groups in galleries for g in groups[:GALLERY] for i in g["ids"][:6]]
                          + [faces.ids[r] for r in blank[:GALLERY]] + [r["id"] for r in ranked])
    for title, groups in galleries:
        parts.append(f"<h2>{title}: {len(groups):,} groups{f', the first {GALLERY}' if len(groups) > GALLERY else ''}"
                     "</h2>")
        parts.append(_group_gallery(faces, groups, where, pictures))
    if len(blank):
        parts.append(f"<h2>Blank faces: {len(blank):,}</h2><div class=faces>" + "".join(
            _face(faces, r, f"{faces.usage[r]} · {faces.classes[faces.labels[r]]}", pictures)
            for r in blank[:GALLERY]) + "</div>")
    if "label_issues" in report:
        li = report["label_issues"]
        parts.append(f"<h2>Suspected label errors: {li['count']:,} of {li['of']:,} {li['among']} faces</h2>"
                     f"<p class=sub>cleanlab on {li['folds']}-fold out-of-fold probabilities ({li['head']} heads"
                     f"{', folds by subject' if li['by_subject'] else ''}); the most confident first: given label, "
                     "then the head's guess</p>")
        fp = li.get("ferplus", {})
        if fp.get("relabelled_among_flagged") is not None:
            parts.append(f"<p>FER+ annotators relabelled {fp['relabelled_among_flagged']:.1%} of these faces "
                         f"({fp[f'relabelled_among_first_{TOP}']:.1%} of the first {TOP:,}) and "
                         f"{fp['relabelled_among_rest']:.1%} of the others.</p>")
        elif fp.get("note"):
            parts.append(f"<p class=note>{esc(fp['note'])}</p>")
        parts.append("<div class=faces>" + "".join(
            _face(faces, where[r["id"]], f"<span class=true>{r['label']}</span> → <span class=pred>{r['predicted']}"
                                         f"</span> {r['label_probability']:.3f}", pictures) for r in ranked) + "</div>")
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
