"""Reading FER2013 in every form it is published in.

Three formats, one result: Kaggle's image folders (unpacked, or read straight from the zip), the
original challenge CSV `fer2013.csv` and its `icml_face_data.csv` variant. Reading happens in two
steps: an index (ids, labels and usage, cheap: `fercache info` stops there) and decoding of the
pixels (threads, since JPEG decoding releases the GIL).

Order is stable and documented. Folder and zip sources are identified by member path relative to
the dataset root (`test/angry/PrivateTest_10131363.jpg`) and ordered by split folder, then the file
name's number (the part after `Training_`, `PublicTest_`, `PrivateTest_`), then the whole name and
class: the numbers follow neither class nor usage, so any prefix (`--limit N`) holds every class,
and both test halves, in about their share, as the CSV's rows do. CSV sources keep file order and are identified as
`<file name>:<line number>` (the header is line 1).

Other datasets (FER+, CK+, JAFFE, RAF-DB, AffectNet, any labelled folder) are indexed by
`fercache.datasets` into the same `Source`, which then carries their own classes, subjects and FER+
votes; decoding is shared: the 48x48 gray path encoders consume, or each image as it is (`native`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import threading
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from fercache.errors import UserError, warn
from fercache.names import CANONICAL, CLASSES, SIZE, SPLITS, choice, data_dir
# CSV `Usage` values and Kaggle file-name prefixes -> the finest split a row belongs to.
USAGES = {"Training": "train", "PublicTest": "public_test", "PrivateTest": "private_test"}
CANDIDATES = ("fer2013.zip", "fer2013", "fer2013.csv", "icml_face_data.csv")
WHERE_TO_GET = (
    "get FER2013 from Kaggle (msambare/fer2013, the image zip; or the original fer2013.csv) "
    "and put it in ./data (data/fer2013.zip, data/fer2013/, data/fer2013.csv) or pass --data PATH"
)
DECODE_THREADS = 16  # enough to outrun a GPU's encoder; more only hold more chunks in memory
_MEMBER = re.compile(r"^(?P<root>(?:.*/)?)(?P<top>train|test)/(?P<cls>[^/]+)/(?P<name>[^/]+)$", re.I)


@dataclass
class Entry:
    """One image before decoding: where it is and what it is."""

    id: str
    label: int
    usage: str  # train | public_test | private_test | test (a test image of unknown origin) | val | all (no split)
    ref: str | int  # zip member or file path; CSV: row index into the parsed pixel strings
    subject: str | None = None  # the person, where the dataset says (CK+, JAFFE): folds keep them apart
    votes: tuple[int, ...] | None = None  # FER+: the 10 annotators' votes, in `datasets.FERPLUS_VOTES` order


@dataclass
class FERImages:
    """A decoded split: the arrays stage one encodes and stage two labels."""

    pixels: np.ndarray | list[np.ndarray]  # uint8, N x 48 x 48; native: a list of H x W x 3
    labels: np.ndarray  # int64, N: indices into `classes`
    ids: list[str]
    usage: list[str]  # per row: train, public_test, private_test (or test when unknown)
    classes: tuple[str, ...] = CLASSES
    source: str = ""
    format: str = ""
    split: str = ""
    canonical: tuple[str, ...] = CANONICAL  # per class: its canonical expression name
    subjects: list[str | None] = field(default_factory=list)  # per row, where known
    votes: np.ndarray | None = None  # FER+: int64 N x 10 votes (soft targets), else None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Source:
    """A FER2013 source on disk and its index of every image, all splits."""

    path: Path
    format: str  # folder | zip | fer2013.csv | icml_face_data.csv: how images are stored and decoded
    entries: list[Entry]
    _csv_pixels: list[str] = field(default_factory=list, repr=False)
    dataset: str = "fer2013"  # the `fercache.datasets` entry that indexed it
    classes: tuple[str, ...] = CLASSES  # the dataset's own class names; Entry.label indexes them
    canonical: tuple[str, ...] = CANONICAL  # per class: its canonical expression (names.EXPRESSIONS)
    splits: tuple[str, ...] = SPLITS  # what `select` and `describe` know; ("all",): no split (use folds)
    dropped: dict[str, int] = field(default_factory=dict)  # faces the reader left out, by reason
    joined: tuple[Path, ...] = ()  # files besides the images that the labels come from (fingerprinted)
    archive: zipfile.ZipFile | None = field(default=None, repr=False, compare=False)  # the zip the index read

    def select(self, split: str) -> list[Entry]:
        """The entries of one split (`all` is train followed by test, or every entry without a split)."""
        choice(split, self.splits if "all" in self.splits else self.splits + ("all",), "split")
        if split == "all" and "all" not in self.splits:
            return [e for s in ("train", "val", "test") if s in self.splits for e in self.select(s)]
        chosen = [e for e in self.entries if e.usage in _usages(split)]
        if not chosen:
            raise UserError(f"{self.path}: no images in split '{split}'")
        return chosen

    def fingerprint(self) -> str:
        """A content hash of the source, so a cache can tell which data it was made from."""
        h = hashlib.sha256()
        if self.path.is_file():
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            for e in sorted(self.entries, key=lambda e: e.id):
                h.update(e.id.encode())
                h.update(Path(e.ref).read_bytes())
        for path in self.joined:  # FER2013 has none: its fingerprints are as they always were
            h.update(path.name.encode())
            h.update(path.read_bytes() if path.is_file() else path.name.encode())
        return "sha256:" + h.hexdigest()

    def describe(self) -> dict:
        """Dataset, format, classes and per-split, per-class (and subject) counts: `fercache info --json`."""
        splits = {}
        for split in self.splits:
            rows = [e for e in self.entries if e.usage in _usages(split)]
            counts = np.bincount([e.label for e in rows], minlength=len(self.classes))
            splits[split] = {"count": len(rows),
                             "per_class": {c: int(n) for c, n in zip(self.classes, counts)}}
            if any(e.subject is not None for e in rows):
                splits[split]["subjects"] = len({e.subject for e in rows})
        return {"dataset": self.dataset, "format": self.format, "path": str(self.path),
                "classes": list(self.classes), "canonical": list(self.canonical), "splits": splits,
                "dropped": dict(self.dropped)}

    def load(self, split: str, strict: bool = False, limit: int | None = None, native: bool = False) -> FERImages:
        """Decode one split (its first `limit` images, if given) to uint8 48x48 arrays (`native`: a
        list of each image as stored, H x W x 3)."""
        entries = self.select(split)[:limit]
        keep, pixels = [], []
        for positions, chunk in self.stream(entries, strict, native=native):
            keep += positions
            pixels.append(chunk)
        if not keep:
            raise UserError(f"{self.path}: none of the {len(entries)} images in split '{split}' could be read")
        kept = [entries[i] for i in keep]
        return FERImages(
            pixels=[p for c in pixels for p in c] if native else np.concatenate(pixels),
            labels=np.array([e.label for e in kept], dtype=np.int64),
            ids=[e.id for e in kept],
            usage=[e.usage for e in kept],
            classes=self.classes,
            source=str(self.path),
            format=self.format,
            split=split,
            canonical=self.canonical,
            subjects=[e.subject for e in kept],
            votes=np.array([e.votes for e in kept], dtype=np.int64) if kept[0].votes is not None else None,
        )

    def stream(self, entries: list[Entry], strict: bool = False, chunk: int = 256,
               native: bool = False) -> Iterator[tuple[list[int], np.ndarray | list[np.ndarray]]]:
        """Decode `entries` chunk by chunk, in order: (the positions in `entries` of the images that
        decoded, their uint8 N x 48 x 48 pixels; `native`: a list of H x W x 3 arrays as stored).

        A thread pool decodes up to two chunks per core ahead of the caller, so decoding overlaps
        whatever the caller does with the chunks it has (encoding them), in bounded memory. An
        unreadable image is skipped with a warning that names it (`strict`: an error); images that
        were not 48x48 gray are counted in one warning at the end (not for `native`).
        """
        decode = _decoder(self, native)

        def task(start: int) -> tuple[int, list]:
            return start, [decode(e) for e in entries[start:start + chunk]]

        starts = iter(range(0, len(entries), chunk))
        workers = min(DECODE_THREADS, rank_cores())
        pool = ThreadPoolExecutor(workers)
        converted = 0
        try:
            ahead = deque(pool.submit(task, s) for s in islice(starts, 2 * workers))
            while ahead:
                start, decoded = ahead.popleft().result()
                ahead.extend(pool.submit(task, s) for s in islice(starts, 1))
                keep = []
                for i, d in enumerate(decoded, start):
                    if isinstance(d, str):
                        if strict:
                            raise UserError(f"{self.path}: {entries[i].id}: unreadable image ({d})")
                        warn(f"{self.path}: skipped unreadable image {entries[i].id} ({d})")
                    else:
                        keep.append(i)
                        converted += d[1]
                if keep:
                    arrays = [decoded[i - start][0] for i in keep]
                    yield keep, arrays if native else np.stack(arrays)
        finally:
            pool.shutdown(cancel_futures=True)
        if converted:
            warn(f"{self.path}: {converted} image(s) were not 48x48 gray and were converted")


def rank_cores() -> int:
    """The cores this process may use (its CPU affinity: SLURM's cgroup, taskset), shared among the
    ranks torchrun started on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def to_gray48(image: Image.Image) -> tuple[np.ndarray, bool]:
    """Any PIL image as FER2013 sees faces: 48x48, 8-bit gray (centre-cropped to square).

    Returns the array and whether a conversion was needed. Shared by the readers and `predict`,
    so new photos reach the model exactly as dataset images do.
    """
    converted = image.mode != "L" or image.size != (SIZE, SIZE)
    if image.mode != "L":
        image = image.convert("L")
    if image.size != (SIZE, SIZE):
        image = ImageOps.fit(image, (SIZE, SIZE), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8), converted


def decode_image(data: bytes) -> tuple[np.ndarray, bool]:
    """Decode an encoded image file to a 48x48 gray array (see `to_gray48`).

    FER2013's own files (48x48 gray JPEG) take OpenCV's decoder: faster than PIL's (README, benchmarks), the same
    pixels on all 35,887 images, and it releases the GIL. Anything else goes through PIL.
    """
    fast = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if fast is not None and fast.shape == (SIZE, SIZE) and fast.dtype == np.uint8:
        return fast, False
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_gray48(image)


def decode_native(data: bytes) -> np.ndarray:
    """Decode an encoded image file as it is stored: H x W x 3 uint8 (gray and palette images as RGB),
    the colour and resolution a model's own processor should start from."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def find_source(data: str | os.PathLike | None = None) -> Path:
    """The path to read: `data` as given, else the first known name in $FERCACHE_DATA or ./data."""
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise UserError(f"{path}: no such file or folder; {WHERE_TO_GET}")
        return path
    folder = data_dir()
    for name in CANDIDATES:
        if (folder / name).exists():
            return folder / name
    raise UserError(f"no FER2013 found in {folder}/ (looked for {', '.join(CANDIDATES)}); {WHERE_TO_GET}")


def open_source(data: str | os.PathLike | None = None) -> Source:
    """Find and index a FER2013 source (folder, zip or CSV); raises `UserError` on bad input."""
    path = find_source(data)
    if path.is_dir() or zipfile.is_zipfile(path):
        return index_files(list_files(path))
    if path.suffix.lower() == ".zip":
        raise UserError(f"{path}: not a valid zip archive (corrupt or truncated?)")
    if path.suffix.lower() == ".csv":
        return _index_csv(path)
    raise UserError(f"{path}: not a FER2013 source (expected a folder, a .zip or a .csv)")


def load_images(source: str | os.PathLike | None = None, split: str = "train",
                strict: bool = False, limit: int | None = None) -> FERImages:
    """Read one split of FER2013 from a folder, zip or CSV: `pixels`, `labels`, `ids`, `classes`."""
    return open_source(source).load(split, strict=strict, limit=limit)


def _usages(split: str) -> set[str]:
    """The row usages a split is made of (`test` is both halves, plus test images of unknown origin;
    any other split, `all` of an unsplit dataset included, is itself)."""
    return {"public_test", "private_test", "test"} if split == "test" else {split}


def _usage_of(top: str, name: str) -> str:
    for prefix, usage in USAGES.items():
        if name.startswith(prefix + "_"):
            return usage
    return "train" if top == "train" else "test"


def _entries_from_paths(paths: list[str], where: Path) -> list[Entry]:
    """Turn `…/train/<class>/<file>` paths into entries; ids are relative to the dataset root."""
    entries = []
    for p in paths:
        m = _MEMBER.match(p)
        name = p.rsplit("/", 1)[-1]
        if not m or name.startswith(".") or "__MACOSX" in p:
            continue
        cls = m["cls"].lower()
        if cls not in CLASSES:
            raise UserError(f"{where}: unknown class folder '{m['cls']}' at {p} (expected one of "
                            f"{', '.join(CLASSES)}; another dataset: --dataset NAME, or --classes a,b,c)")
        top = m["top"].lower()
        entries.append(Entry(f"{top}/{cls}/{m['name']}", CLASSES.index(cls), _usage_of(top, m["name"]), p))
    if not entries:
        raise UserError(f"{where}: no FER2013 images found (expected train/<class>/*.jpg and "
                        f"test/<class>/*.jpg); {WHERE_TO_GET}")
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}: holds more than one copy of the dataset (duplicate image paths)")
    def order(e: Entry) -> tuple:
        top, _, name = e.id.split("/")
        return top, name.split("_", 1)[-1], name, e.label  # the number after `PublicTest_` etc. first

    return sorted(entries, key=order)


@dataclass
class Files:
    """The files of a folder or zip, by path relative to it: what dataset readers index."""

    path: Path
    format: str  # folder | zip
    names: list[str]  # sorted for a folder, archive order for a zip; no folders
    _zip: zipfile.ZipFile | None = field(default=None, repr=False)  # opened once: a big zip's index takes a second

    def ref(self, name: str) -> str:
        """What `Entry.ref` holds for a file: its path (folder) or member name (zip)."""
        return str(self.path / name) if self.format == "folder" else name

    def read(self, name: str) -> bytes:
        try:
            if self.format == "folder":
                return (self.path / name).read_bytes()
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            return self._zip.read(name)
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise UserError(f"{self.path}: cannot read {name} ({exc})") from None

    def text(self, name: str) -> str:
        try:
            return self.read(name).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"{self.path}: {name} is not a text file") from None


def list_files(path: Path) -> Files:
    """The files under a folder or in a zip (`UserError` for a bad zip)."""
    if path.is_dir():
        return Files(path, "folder", sorted(str(p.relative_to(path).as_posix()) for p in path.rglob("*") if p.is_file()))
    try:
        z = zipfile.ZipFile(path)  # kept open for `Files.read` (a reader's label files)
        return Files(path, "zip", [i.filename for i in z.infolist() if not i.is_dir()], z)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path}: not a valid zip archive ({exc})") from None


def index_files(files: Files) -> Source:
    """A FER2013 folder or zip as `open_source` reads it, from its listed files (listed once: a
    caller that already listed them to tell the layout passes them on)."""
    entries = _entries_from_paths(files.names, files.path)
    if files.format == "folder":
        for e in entries:
            e.ref = str(files.path / e.ref)
        return Source(files.path, "folder", entries)
    return Source(files.path, "zip", entries, archive=files._zip)


def _decoder(source: Source, native: bool = False) -> Callable[[Entry], tuple[np.ndarray, bool] | str]:
    """Decodes one entry of `source` in any thread: (array, converted), or why it is unreadable.

    A bad CSV row is a `UserError` that names its line; a bad image file is returned as a reason,
    for the caller to skip or refuse (`--strict`). The zip the index read (`Source.archive`; else
    one opened on first use) is shared by every thread (zipfile's reads are thread-safe: each seeks
    under the archive's lock): a zip of 290,000 images takes seconds and ~100 MB to index, which a
    copy per thread would multiply by the threads (`bench/scale.py`). `native`: the image as stored
    (H x W x 3; a CSV row is 48x48 gray, repeated to 3 channels).
    """
    if source.format.endswith(".csv"):
        if native:
            return lambda e: (np.repeat(_csv_row(source._csv_pixels[e.ref], source.path, e.id)[0][..., None], 3, 2), False)
        return lambda e: _csv_row(source._csv_pixels[e.ref], source.path, e.id)
    shared: list[zipfile.ZipFile] = [source.archive] if source.archive is not None else []
    opening = threading.Lock()

    def read(e: Entry) -> bytes:
        if source.format == "folder":
            return Path(e.ref).read_bytes()
        if not shared:
            with opening:
                if not shared:
                    shared.append(zipfile.ZipFile(source.path))
        return shared[0].read(e.ref)

    def one(e: Entry) -> tuple[np.ndarray, bool] | str:
        try:
            return (decode_native(read(e)), False) if native else decode_image(read(e))
        except (OSError, ValueError, zipfile.BadZipFile, Image.DecompressionBombError) as exc:
            return str(exc) or type(exc).__name__

    return one


def _index_csv(path: Path) -> Source:
    """Index `fer2013.csv` (`emotion,pixels,Usage`) or `icml_face_data.csv` (`emotion, Usage, pixels`)."""
    entries, pixels = [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in ("emotion", "pixels", "Usage") if c not in header]
            if missing:
                raise UserError(f"{path}:1: CSV header lacks column(s) {', '.join(missing)} "
                                f"(expected emotion, pixels, Usage)")
            ie, ip, iu = header.index("emotion"), header.index("pixels"), header.index("Usage")
            fmt = "fer2013.csv" if header[:3] == ["emotion", "pixels", "Usage"] else "icml_face_data.csv"
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise UserError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
                code, usage = row[ie].strip(), row[iu].strip()
                if code not in {str(i) for i in range(len(CLASSES))}:
                    raise UserError(f"{path}:{line}: unknown emotion code '{code}' (expected 0-6)")
                if usage not in USAGES:
                    raise UserError(f"{path}:{line}: unknown Usage '{usage}' "
                                    f"(expected {', '.join(USAGES)})")
                text = row[ip].strip()  # the count is checked here, cheaply, so `info` catches it too
                if text.count(" ") != SIZE * SIZE - 1 and len(text.split()) != SIZE * SIZE:
                    raise UserError(f"{path}:{line}: expected {SIZE * SIZE} integer pixel values, got "
                                    f"{len(text.split())} space-separated fields")
                entries.append(Entry(f"{path.name}:{line}", int(code), USAGES[usage], len(pixels)))
                pixels.append(row[ip])
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text CSV file") from None
    except csv.Error as exc:
        raise UserError(f"{path}: malformed CSV ({exc})") from None
    if not entries:
        raise UserError(f"{path}: CSV has no rows")
    return Source(path, fmt, entries, pixels)


def _csv_row(text: str, path: Path, id_: str) -> tuple[np.ndarray, bool]:
    """Parse one CSV `pixels` field; a wrong count or value is an error that names the line."""
    where = f"{path}:{id_.rsplit(':', 1)[1]}"
    try:
        values = np.fromstring(text, dtype=np.int64, sep=" ")  # faster than str.split() + int()
    except ValueError:
        raise UserError(f"{where}: pixel values must be integers 0-255 separated by spaces") from None
    if values.size != SIZE * SIZE:  # the index counted fields; this catches what it cannot see
        raise UserError(f"{where}: expected {SIZE * SIZE} integer pixel values, got {values.size}")
    if values.min() < 0 or values.max() > 255:
        raise UserError(f"{where}: pixel values must be 0-255")
    return values.astype(np.uint8).reshape(SIZE, SIZE), False
