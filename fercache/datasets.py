"""Every dataset fercache reads, one registry entry each: its classes, their canonical names, its layouts.

A dataset declares its class names in its own order (what `Entry.label` indexes), the canonical
expression each class is (`names.EXPRESSIONS`: what cross-dataset evaluation matches on), whether
it has an official split (else `subject_folds`), and the layouts it is published in: how to
recognise one on disk (`detect`) and how to index it into a `data.Source`. Adding a dataset is
adding one `register(Dataset(...))` entry. `open_dataset` finds the layout by itself where only
one fits; `--dataset NAME` (a dataset or a layout name) says which where more could, or where a
layout is never guessed (FER+ votes joined to FER2013, any `<split>/<class>/` folder).

FER2013 itself is read by `fercache.data` exactly as before (same ids, order, fingerprints).
"""

from __future__ import annotations

import csv
import io
import lzma
import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib.resources import files as package_files
from pathlib import Path

import numpy as np

from fercache.data import USAGES, Entry, Files, Source, find_source, index_files, list_files, open_source
from fercache.errors import UserError
from fercache.identity import NATIVE, dataset_of
from fercache.names import CANONICAL, CLASSES, EXPRESSIONS, SPLITS, data_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
FERPLUS_VOTES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                 "unknown", "NF")  # fer2013new.csv's and label.csv's vote columns, in their order
UNKNOWN, NOT_FACE = 8, 9  # FER+ majorities that are no expression: such faces are dropped
KAGGLE_ROWS = "ferplus_kaggle_rows.csv.xz"  # Kaggle `<split>/<class>/<stem>` -> fer2013.csv row (scripts/)
SYNONYMS = {  # spellings of the canonical expressions in published datasets (for `--classes`)
    "neutral": "neutral", "ne": "neutral", "neu": "neutral",
    "happiness": "happiness", "happy": "happiness", "ha": "happiness", "hap": "happiness", "joy": "happiness",
    "sadness": "sadness", "sad": "sadness", "sa": "sadness",
    "surprise": "surprise", "surprised": "surprise", "su": "surprise", "sur": "surprise",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "fe": "fear", "fea": "fear",
    "disgust": "disgust", "disgusted": "disgust", "di": "disgust", "dis": "disgust",
    "anger": "anger", "angry": "anger", "an": "anger", "ang": "anger",
    "contempt": "contempt", "co": "contempt",
}


@dataclass(frozen=True)
class Options:
    """What a user may add to a path: `--classes` (a generic folder) and `--votes` (FER+)."""

    classes: tuple[str, ...] | None = None
    votes: Path | None = None


@dataclass(frozen=True)
class Layout:
    """One published on-disk form of a dataset."""

    name: str  # what `--dataset` accepts besides the dataset's name
    shape: str  # the layout in a few words, for errors and the README
    detect: Callable[[Path, Files | None], bool]  # Files is None for a single file (a CSV)
    index: Callable[[Path, Files | None, Options], Source]  # entries with labels into the dataset's classes
    auto: bool = True  # False: used only when asked for (`--dataset`), never guessed


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    classes: tuple[str, ...]  # its own names, in its own order (label codes in `codes` where they differ)
    canonical: tuple[str, ...]  # per class, one of names.EXPRESSIONS
    layouts: tuple[Layout, ...]
    split: str  # its official split, or "folds" (none: subject-independent cross-validation)
    codes: tuple[str, ...] = ()  # the labels as written on disk when they are not `classes` (RAF-DB 1-7)

    def __post_init__(self) -> None:
        assert len(self.canonical) == len(self.classes) and set(self.canonical) <= set(EXPRESSIONS), self.name


DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    """Add a dataset to the registry (its name and its layouts' names must be new)."""
    taken = set(DATASETS) | {layout.name for d in DATASETS.values() for layout in d.layouts}
    assert not ({dataset.name} | {layout.name for layout in dataset.layouts}) & (taken - {dataset.name}), dataset.name
    DATASETS[dataset.name] = dataset
    return dataset


def canonical_name(name: str) -> str | None:
    """The canonical expression a class name spells (`Happy`, `HA`, `sadness` ...), or None."""
    return SYNONYMS.get(name.strip().lower())


def layouts(name: str | None = None) -> list[tuple[Dataset, Layout]]:
    """Every registered (dataset, layout), or those a `--dataset NAME` names (a dataset or one layout)."""
    pairs = [(d, layout) for d in DATASETS.values() for layout in d.layouts]
    if name is None:
        return pairs
    chosen = [(d, layout) for d, layout in pairs if name in (d.name, layout.name)]
    if not chosen:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(dataset_names())}")
    return chosen


def dataset_names() -> list[str]:
    """Names `--dataset` accepts: each dataset, then each layout with a name of its own."""
    return list(DATASETS) + [layout.name for d in DATASETS.values() for layout in d.layouts if layout.name != d.name]


def open_dataset(data: str | Path | None = None, dataset: str | None = None,
                 classes: Sequence[str] | str | None = None, votes: str | Path | None = None) -> Source:
    """Find and index any dataset: its layout detected, or the one `dataset` names.

    `classes` (a list, or `a,b,c`) names and orders the class folders of a generic
    `<split>/<class>/<image>` folder or zip (implies `dataset="folders"`); `votes` is FER+'s
    `fer2013new.csv` for `dataset="ferplus"` on a FER2013 source (default: beside it).
    """
    path = find_source(data)
    if isinstance(classes, str):
        classes = classes.split(",")
    if classes is not None:
        classes = tuple(c.strip() for c in classes)
        if not all(classes) or len(set(classes)) != len(classes):
            raise UserError(f"--classes '{','.join(classes)}': give distinct, non-empty class names")
    options = Options(classes, Path(votes) if votes is not None else None)
    if dataset is None:
        dataset = "folders" if classes is not None else "ferplus-fer2013" if votes is not None else None
    if classes is not None and dataset != "folders":
        raise UserError(f"--classes names a generic folder's classes; {dataset} has its own")
    if votes is not None and dataset not in ("ferplus", "ferplus-fer2013"):
        raise UserError("--votes is FER+'s fer2013new.csv, for --dataset ferplus on a FER2013 source")
    files = list_files(path) if path.is_dir() or zipfile.is_zipfile(path) else None
    candidates = layouts(dataset)
    fits = [(d, layout) for d, layout in candidates if (layout.auto or dataset) and layout.detect(path, files)]
    if not fits and dataset is None:
        return open_source(path)  # FER2013's own errors say best what is wrong with a near-FER2013 source
    if not fits:
        raise UserError(f"{path}: not a {dataset} layout (expected "
                        f"{' or '.join(layout.shape for _, layout in candidates)})")
    if len(fits) > 1:
        raise UserError(f"{path}: could be {' or '.join(layout.name for _, layout in fits)}; "
                        f"say which with --dataset")
    d, layout = fits[0]
    source = layout.index(path, files, options)
    if not source.entries:
        raise UserError(f"{path}: no images found in the {layout.name} layout ({layout.shape})")
    if d.name != "folders":
        source = replace(source, dataset=d.name, classes=d.classes, canonical=d.canonical)
    return source


def subject_folds(entries: Sequence[Entry], k: int | str = 10, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Subject-independent cross-validation: per fold (train positions, test positions) into `entries`.

    No subject is in both parts of a fold; every entry is tested exactly once. `k="subjects"` is
    leave-one-subject-out; an integer k splits subjects into k folds of similar class make-up
    (scikit-learn's StratifiedGroupKFold, shuffled by `seed`), as CK+ and JAFFE papers report.
    """
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

    subjects = [e.subject for e in entries]
    if any(s is None for s in subjects):
        raise UserError("folds need subject ids, and this dataset does not give them for every face")
    labels = np.array([e.label for e in entries])
    people = len(set(subjects))
    if k == "subjects":
        splitter = LeaveOneGroupOut()
    else:
        if not str(k).isdigit():
            raise UserError(f"--folds {k}: a number of folds, or 'subjects' (leave one subject out)")
        k = int(k)
        if not 2 <= k <= people:
            raise UserError(f"--folds {k}: choose 2 to {people} (the number of subjects), or 'subjects'")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(train, test) for train, test in splitter.split(np.zeros(len(entries)), labels, subjects)]


def ferplus_majority(votes: Sequence[int]) -> int:
    """FER+'s majority label, as its reader defines it (microsoft/FERPlus src/ferplus.py, 'majority').

    Votes of one annotator are outliers and removed (`ferplus_outliers_removed`); the label is the
    emotion holding more than half of the remaining votes, else UNKNOWN. Since the winner holds more
    than half, there are no ties. UNKNOWN (also: no majority) and NOT_FACE are no expression: FER+
    drops those faces.
    """
    kept = ferplus_outliers_removed(votes)
    top = int(np.argmax(kept))  # the first largest
    return top if kept[top] > 0.5 * kept.sum() else UNKNOWN


def ferplus_outliers_removed(votes: Sequence[int] | np.ndarray) -> np.ndarray:
    """FER+ votes (10, or N x 10) with every single vote set to 0: FER+'s reader (`_process_data`) takes
    one annotator's vote for an outlier in every training mode, majority and soft alike."""
    votes = np.asarray(votes)
    return np.where(votes > 1, votes, 0)


def check_labels(labels: str | None, dataset: str, soft: bool = True) -> str | None:
    """`--labels` checked against the data: None for datasets other than FER+, `ferplus-majority` by
    default for FER+; `ferplus-votes` (soft targets) only where the trainer takes them (`soft`)."""
    from fercache.names import LABELS, choice

    if labels is None:
        return "ferplus-majority" if dataset == "ferplus" else None
    choice(labels, LABELS, "--labels")
    if dataset != "ferplus":
        raise UserError(f"--labels {labels} needs a FER+ cache (extract --dataset ferplus); this one is {dataset}")
    if labels == "ferplus-votes" and not soft:
        raise UserError("--labels ferplus-votes trains on soft targets: use --method linear (logreg fits hard labels)")
    return labels


def ferplus_targets(votes: np.ndarray) -> np.ndarray:
    """Soft targets from N x 10 FER+ votes: each face's share of the votes over the 8 emotions left once
    outliers are removed (N x 8), as FER+'s reader renormalises them."""
    emotions = ferplus_outliers_removed(votes)[:, :8].astype(np.float64)
    return emotions / np.maximum(emotions.sum(axis=1, keepdims=True), 1)


# --- helpers shared by the layouts ---------------------------------------------------------------


def _images(files: Files) -> list[str]:
    return [n for n in files.names if n.lower().endswith(IMAGE_SUFFIXES) and not _hidden(n)]


def _hidden(name: str) -> bool:
    return "__MACOSX" in name or name.rsplit("/", 1)[-1].startswith(".")


def _all_match(files: Files | None, pattern: re.Pattern) -> bool:
    """Every image of `files` fits `pattern` (and there is one)."""
    images = _images(files) if files is not None else []
    return bool(images) and all(pattern.match(n) for n in images)


def _source(path: Path, files: Files, entries: list[Entry], splits: tuple[str, ...], **more) -> Source:
    """A Source over a folder or zip, entries in id order, refs resolved."""
    for e in entries:
        e.ref = files.ref(e.ref)
    return Source(path, files.format, sorted(entries, key=lambda e: e.id), splits=splits, archive=files._zip, **more)


def _label(code: str, codes: tuple[str, ...], where: str) -> int:
    if code not in codes:
        raise UserError(f"{where}: unknown class '{code}' (expected one of {', '.join(codes)})")
    return codes.index(code)


def _splits_of(usages: set[str]) -> tuple[str, ...]:
    return tuple(s for s in ("train", "val", "test") if s in usages) or ("all",)


# --- FER2013 (read by fercache.data, unchanged) ----------------------------------------------------

_KAGGLE = re.compile(r"^(?:.*/)?(?:train|test)/(?P<cls>[^/]+)/[^/]+$", re.I)


def _fer2013(path: Path, files: Files | None) -> Source:
    """FER2013 as `data.open_source` reads it, from the files `open_dataset` already listed."""
    return open_source(path) if files is None else index_files(files)


def _fer2013_detect(path: Path, files: Files | None) -> bool:
    if files is None:
        return path.suffix.lower() == ".csv" and path.name != "fer2013new.csv"
    folders = {m["cls"].lower() for n in files.names if (m := _KAGGLE.match(n)) and not _hidden(n)}
    return bool(folders) and folders <= set(CLASSES)


register(Dataset(
    "fer2013", "FER2013", CLASSES, CANONICAL, split="train / PublicTest / PrivateTest",
    layouts=(Layout("fer2013", "train|test/<class>/<file> (Kaggle), or fer2013.csv / icml_face_data.csv",
                    _fer2013_detect, lambda path, files, options: _fer2013(path, files)),),
))


# --- FER+ ------------------------------------------------------------------------------------------

FERPLUS_FOLDERS = {"FER2013Train": "train", "FER2013Valid": "public_test", "FER2013Test": "private_test"}
_FERPLUS_LABELS = re.compile(r"^(?P<root>(?:.*/)?)(?P<folder>FER2013(?:Train|Valid|Test))/label\.csv$")


def _ferplus_entry(entry: Entry, votes: tuple[int, ...], dropped: Counter) -> Entry | None:
    """`entry` labelled by FER+'s majority of `votes`, or None (counted in `dropped`) when it has none."""
    label = ferplus_majority(votes)
    if label >= UNKNOWN:
        dropped["FER+ majority not a face" if label == NOT_FACE else "FER+ majority unknown, or no majority"] += 1
        return None
    return replace(entry, label=label, votes=votes)


def _votes(text: str, where: str) -> tuple[int, ...]:
    """Ten vote counts from fields of a FER+ file."""
    try:
        votes = tuple(int(v) for v in text)
    except ValueError:
        raise UserError(f"{where}: FER+ votes must be integers") from None
    if len(votes) != len(FERPLUS_VOTES) or min(votes) < 0:
        raise UserError(f"{where}: expected {len(FERPLUS_VOTES)} vote counts ({', '.join(FERPLUS_VOTES)})")
    return votes


def _ferplus_folders(path: Path, files: Files, options: Options) -> Source:
    """FER+'s generator output: FER2013Train|Valid|Test/ferNNNNNNN.png + label.csv (name, [box,] 10 votes)."""
    names, entries, dropped = set(files.names), [], Counter()
    for label_file in sorted(n for n in files.names if _FERPLUS_LABELS.match(n)):
        m = _FERPLUS_LABELS.match(label_file)
        usage = FERPLUS_FOLDERS[m["folder"]]
        for line, row in enumerate(csv.reader(io.StringIO(files.text(label_file))), 1):
            if not row:
                continue
            where = f"{path}:{label_file}:{line}"
            votes = _votes(row[2:] if row[1].lstrip().startswith("(") else row[1:], where)  # older files have a crop box
            image = f"{m['root']}{m['folder']}/{row[0].strip()}"
            if image not in names:
                dropped["label without image"] += 1
                continue
            entry = _ferplus_entry(Entry(f"{m['folder']}/{row[0].strip()}", 0, usage, image), votes, dropped)
            if entry is not None:
                entries.append(entry)
    joined = tuple(files.path / n for n in files.names if _FERPLUS_LABELS.match(n)) if files.format == "folder" else ()
    return _source(path, files, entries, SPLITS, dropped=dict(dropped), joined=joined)


def _votes_file(path: Path, options: Options) -> Path:
    """FER+'s fer2013new.csv: as given, else beside the FER2013 source, else in the data folder."""
    if options.votes is not None:
        if not options.votes.is_file():
            raise UserError(f"{options.votes}: no such file (FER+ votes, fer2013new.csv)")
        return options.votes
    near = [path.parent, path.parent / "ferplus", data_dir(), data_dir() / "ferplus"]
    for folder in ([path] if path.is_dir() else []) + near:
        if (folder / "fer2013new.csv").is_file():
            return folder / "fer2013new.csv"
    raise UserError(f"{path}: FER+ votes (fer2013new.csv) not found beside it or in {data_dir()}/; pass --votes PATH")


def read_ferplus_votes(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """fer2013new.csv: per fer2013.csv row, (usage, FER+ image name or "" for not a face, votes)."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if header[:2] != ["Usage", "Image name"] or tuple(header[2:]) != FERPLUS_VOTES:
                raise UserError(f"{path}:1: not FER+ votes (expected Usage, Image name, {', '.join(FERPLUS_VOTES)})")
            for row in reader:
                if row:
                    rows.append((row[0].strip(), row[1].strip(), _votes(row[2:], f"{path}:{reader.line_num}")))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc})") from None
    return rows


@lru_cache(maxsize=1)
def kaggle_rows() -> dict[str, int]:
    """fercache's table: Kaggle `<split>/<class>/<file stem>` -> fer2013.csv row (scripts/ferplus_kaggle_rows.py)."""
    text = lzma.decompress((package_files("fercache") / KAGGLE_ROWS).read_bytes()).decode()
    return {name: int(row) for name, row in (line.split(",") for line in text.splitlines()[1:])}


def _ferplus_joined(path: Path, files: Files | None, options: Options) -> Source:
    """FER+ votes joined to a FER2013 source: CSV rows by position, Kaggle files through `kaggle_rows`."""
    base = _fer2013(path, files)
    votes_path = _votes_file(path, options)
    votes = read_ferplus_votes(votes_path)
    csv_form = base.format.endswith(".csv")
    if csv_form and len(votes) != len(base.entries):
        raise UserError(f"{votes_path}: {len(votes)} rows of votes for {len(base.entries)} rows of {path.name}")
    table = {} if csv_form else kaggle_rows()
    entries, dropped = [], Counter()
    for e in base.entries:
        row = e.ref if csv_form else table.get(e.id.rsplit(".", 1)[0])
        if row is None:
            dropped["not in fercache's FER+ table (no FER+ image, or an ambiguous duplicate face)"] += 1
            continue
        usage, name, counts = votes[row]
        if USAGES.get(usage) != e.usage:
            raise UserError(f"{votes_path}: row {row + 2} is {usage}, but {e.id} is {e.usage}: "
                            f"these votes are not for this FER2013 copy")
        if not name:
            dropped["no FER+ image (FER+: not a face)"] += 1
            continue
        entry = _ferplus_entry(e, counts, dropped)
        if entry is not None:
            entries.append(entry)
    joined = (votes_path,) if csv_form else (votes_path, Path(str(package_files("fercache") / KAGGLE_ROWS)))
    return replace(base, entries=entries, dropped=dict(dropped), joined=joined)


register(Dataset(
    "ferplus", "FER+", FERPLUS_VOTES[:8], ("neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                                            "fear", "contempt"),
    split="FER2013Train / Valid (PublicTest) / Test (PrivateTest)",
    layouts=(
        Layout("ferplus", "FER2013Train|Valid|Test/ferNNNNNNN.png + label.csv",
               lambda path, files: files is not None and any(_FERPLUS_LABELS.match(n) for n in files.names),
               _ferplus_folders),
        Layout("ferplus-fer2013", "a FER2013 source (Kaggle layout or fer2013.csv) + fer2013new.csv",
               _fer2013_detect, _ferplus_joined, auto=False),
    ),
))


# --- CK+48 -----------------------------------------------------------------------------------------

CKPLUS = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")  # CK+ codes 1-7 (0, neutral, absent)
_CKPLUS = re.compile(rf"^(?:.*/)?(?P<id>(?P<cls>{'|'.join(CKPLUS)})/(?P<subject>S\d+)_\d+_\d+\.png)$")


def _by_name(pattern: re.Pattern, codes: tuple[str, ...]) -> tuple[Callable, Callable]:
    """`detect` and `index` for a dataset without a split whose every file path says its class and
    subject (`pattern` groups: id, cls, subject)."""
    def index(path: Path, files: Files, options: Options) -> Source:
        entries = [Entry(m["id"], codes.index(m["cls"]), "all", n, subject=m["subject"])
                   for n in _images(files) if (m := pattern.match(n))]
        return _source(path, files, entries, ("all",))

    return (lambda path, files: _all_match(files, pattern)), index


register(Dataset(
    "ckplus48", "CK+48", CKPLUS, ("anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise"),
    split="folds", layouts=(Layout("ckplus48", "CK+48/<class>/S<subject>_<sequence>_<frame>.png",
                                   *_by_name(_CKPLUS, CKPLUS)),),
))


# --- JAFFE -----------------------------------------------------------------------------------------

JAFFE = ("NE", "HA", "SA", "SU", "AN", "DI", "FE")
_JAFFE = re.compile(rf"^(?:.*/)?(?P<id>(?P<subject>[A-Z]{{2}})\.(?P<cls>{'|'.join(JAFFE)})\d*\.\d+\.tiff?)$")

register(Dataset(
    "jaffe", "JAFFE", JAFFE, ("neutral", "happiness", "sadness", "surprise", "anger", "disgust", "fear"),
    split="folds", layouts=(Layout("jaffe", "jaffe/<subject>.<class><n>.<id>.tiff", *_by_name(_JAFFE, JAFFE)),),
))


# --- RAF-DB (basic) --------------------------------------------------------------------------------

RAFDB_CODES = tuple("1234567")
_RAFDB_LABELS = re.compile(r"^(?P<root>(?:.*/)?)EmoLabel/list_patition_label\.txt$")
_RAFDB_FOLDERS = re.compile(r"^(?:.*/)?(?P<split>train|test)/(?P<cls>[1-7])/[^/]+$")


def read_rafdb_labels(text: str, where: str) -> list[tuple[str, int]]:
    """list_patition_label.txt: (image name, class index 0-6) per line (`train_00001.jpg 5`)."""
    rows = []
    for line, row in enumerate(text.splitlines(), 1):
        fields = row.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise UserError(f"{where}:{line}: expected '<image> <label 1-7>', got '{row.strip()}'")
        rows.append((fields[0], _label(fields[1], RAFDB_CODES, f"{where}:{line}")))
    return rows


def _rafdb(path: Path, files: Files, options: Options) -> Source:
    """EmoLabel/list_patition_label.txt + Image/aligned/<stem>_aligned.jpg (preferred) or Image/original/<name>."""
    label_file = next(n for n in files.names if _RAFDB_LABELS.match(n))
    root = _RAFDB_LABELS.match(label_file)["root"]
    names = set(files.names)
    aligned = any(n.startswith(f"{root}Image/aligned/") for n in names)
    entries, dropped = [], Counter()
    for name, label in read_rafdb_labels(files.text(label_file), f"{path}:{label_file}"):
        stem = name.rsplit(".", 1)[0]
        image = f"Image/aligned/{stem}_aligned.jpg" if aligned else f"Image/original/{name}"
        if root + image not in names:
            dropped["label without image"] += 1
            continue
        entries.append(Entry(image, label, "train" if name.startswith("train") else "test", root + image))
    if not entries:
        raise UserError(f"{path}: RAF-DB labels but no images (expected {root}Image/aligned/ or {root}Image/original/)")
    joined = (files.path / label_file,) if files.format == "folder" else ()
    return _source(path, files, entries, ("train", "test"), dropped=dict(dropped), joined=joined)


def _rafdb_folders(path: Path, files: Files, options: Options) -> Source:
    entries = [Entry(n[m.start("split"):], RAFDB_CODES.index(m["cls"]), m["split"], n)
               for n in _images(files) if (m := _RAFDB_FOLDERS.match(n))]
    return _source(path, files, entries, _splits_of({e.usage for e in entries}))


register(Dataset(
    "rafdb", "RAF-DB (basic)", ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"),
    ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"), codes=RAFDB_CODES,
    split="train / test (in the label file)",
    layouts=(
        Layout("rafdb", "EmoLabel/list_patition_label.txt + Image/aligned/ or Image/original/",
               lambda path, files: files is not None and any(_RAFDB_LABELS.match(n) for n in files.names), _rafdb),
        Layout("rafdb-folders", "train|test/<1..7>/<image>",
               lambda path, files: _all_match(files, _RAFDB_FOLDERS), _rafdb_folders),
    ),
))


# --- AffectNet -------------------------------------------------------------------------------------

AFFECTNET_CODES = tuple("01234567")
AFFECTNET_OTHER = {8: "None", 9: "Uncertain", 10: "Non-Face"}  # labels beyond the 8 expressions: dropped
_AFFECTNET_FOLDERS = re.compile(r"^(?:.*/)?(?P<split>train_set|val_set|train|val|valid|validation|test)/(?P<cls>[0-7])/[^/]+$")
_AFFECTNET_CSV = re.compile(r"^(?P<root>(?:.*/)?)(?P<file>training|validation)\.csv$")
_AFFECTNET_NPY = re.compile(r"^(?:.*/)?(?P<split>train_set|val_set)/images/(?P<n>[^/.]+)\.[A-Za-z]+$")


def _affectnet_usage(split: str, has_test: bool) -> str:
    """AffectNet's test set is not public: its validation set is the test set papers report on."""
    if split.startswith("train"):
        return "train"
    return "val" if split.startswith("val") and has_test else "test"


def _affectnet_folders(path: Path, files: Files, options: Options) -> Source:
    matches = [(n, m) for n in _images(files) if (m := _AFFECTNET_FOLDERS.match(n))]
    has_test = any(m["split"] == "test" for _, m in matches)
    entries = [Entry(n[m.start("split"):], int(m["cls"]), _affectnet_usage(m["split"], has_test), n)
               for n, m in matches]
    return _source(path, files, entries, _splits_of({e.usage for e in entries}))


def _affectnet_folders_detect(path: Path, files: Files | None) -> bool:
    if not _all_match(files, _AFFECTNET_FOLDERS):
        return False  # class 0 or AffectNet's own split names tell it from RAF-DB's train|test/<1..7>/
    return any(m["cls"] == "0" or m["split"].endswith("_set") for n in _images(files)
               if (m := _AFFECTNET_FOLDERS.match(n)))


def _affectnet_csv(path: Path, files: Files, options: Options) -> Source:
    """training.csv / validation.csv (subDirectory_filePath, ..., expression, ...) + Manually_Annotated_Images/."""
    images = {n.split("Manually_Annotated_Images/", 1)[1]: n for n in _images(files) if "Manually_Annotated_Images/" in n}
    entries, dropped = [], Counter()
    for name in sorted(n for n in files.names if _AFFECTNET_CSV.match(n)):
        reader = csv.reader(io.StringIO(files.text(name)))
        header = [h.strip() for h in next(reader, [])]
        if "subDirectory_filePath" not in header or "expression" not in header:
            raise UserError(f"{path}:{name}:1: expected AffectNet columns subDirectory_filePath and expression")
        ip, ie = header.index("subDirectory_filePath"), header.index("expression")
        usage = "train" if name.endswith("training.csv") else "test"
        for row in reader:
            if not row:
                continue
            where = f"{path}:{name}:{reader.line_num}"
            if len(row) != len(header) or not row[ie].strip().isdigit():
                raise UserError(f"{where}: expected {len(header)} fields with an integer expression")
            code = int(row[ie])
            if code in AFFECTNET_OTHER:
                dropped[f"AffectNet label {code} ({AFFECTNET_OTHER[code]})"] += 1
            elif row[ip].strip() not in images:
                dropped["label without image"] += 1
            else:
                image = images[row[ip].strip()]
                entries.append(Entry(image.split("Manually_Annotated_Images/", 1)[1], _label(str(code), AFFECTNET_CODES, where),
                                     usage, image))
    joined = tuple(files.path / n for n in files.names if _AFFECTNET_CSV.match(n)) if files.format == "folder" else ()
    return _source(path, files, entries, _splits_of({e.usage for e in entries}), dropped=dict(dropped), joined=joined)


def _affectnet_npy(path: Path, files: Files, options: Options) -> Source:
    """train_set|val_set/images/<n>.jpg + annotations/<n>_exp.npy (a 0-d array holding the label)."""
    names, entries, dropped = set(files.names), [], Counter()
    for n in _images(files):
        if not (m := _AFFECTNET_NPY.match(n)):
            continue
        annotation = f"{n[:m.start('split')]}{m['split']}/annotations/{m['n']}_exp.npy"
        if annotation not in names:
            dropped["image without annotation"] += 1
            continue
        try:
            code = int(str(np.load(io.BytesIO(files.read(annotation)), allow_pickle=False)))
        except ValueError as exc:
            raise UserError(f"{path}:{annotation}: not an AffectNet label ({exc})") from None
        if code in AFFECTNET_OTHER or not 0 <= code < len(AFFECTNET_CODES):
            dropped[f"AffectNet label {code} ({AFFECTNET_OTHER.get(code, 'unknown')})"] += 1
            continue
        entries.append(Entry(n[m.start("split"):], code, _affectnet_usage(m["split"], False), n))
    return _source(path, files, entries, _splits_of({e.usage for e in entries}), dropped=dict(dropped))


register(Dataset(
    "affectnet", "AffectNet", ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"),
    ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"), codes=AFFECTNET_CODES,
    split="train / validation (the test set papers use)",
    layouts=(
        Layout("affectnet", "train_set|val_set/<0..7>/<image> (class-index folders)",
               _affectnet_folders_detect, _affectnet_folders),
        Layout("affectnet-csv", "training.csv / validation.csv + Manually_Annotated_Images/",
               lambda path, files: files is not None and any(_AFFECTNET_CSV.match(n) for n in files.names),
               _affectnet_csv),
        Layout("affectnet-npy", "train_set|val_set/images/<n>.jpg + annotations/<n>_exp.npy",
               lambda path, files: files is not None and any(_AFFECTNET_NPY.match(n) for n in files.names),
               _affectnet_npy),
    ),
))


# --- any labelled folder ---------------------------------------------------------------------------

SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def _folders(path: Path, files: Files, options: Options) -> Source:
    """[<split>/]<class>/<image>, classes named and ordered by `--classes`."""
    if not options.classes:
        raise UserError(f"{path}: a generic <split>/<class>/<image> layout needs --classes a,b,c (their order)")
    lower = [c.lower() for c in options.classes]
    found = []
    for n in _images(files):
        parts = n.split("/")
        if len(parts) < 2:
            continue
        split = SPLIT_FOLDERS.get(parts[-3].lower()) if len(parts) >= 3 else None
        if parts[-2].lower() not in lower:
            raise UserError(f"{path}: class folder '{parts[-2]}' at {n} is not in --classes ({', '.join(options.classes)})")
        found.append((n, parts, split))
    folders = {parts[-2].lower() for _, parts, _ in found}
    if found and (missing := [c for c in options.classes if c.lower() not in folders]):
        # more likely a typo than a class with no faces, which would give a head an output no face teaches
        raise UserError(f"{path}: --classes names {', '.join(missing)}, but no class folder has that name "
                        f"(found: {', '.join(sorted(folders))})")
    # ids: the path below the folders every image shares (a wrapping folder), so images in other folders
    # above <split>/<class> keep ids of their own
    common = len(os.path.commonprefix([parts[:-3 if split else -2] for _, parts, split in found]))
    entries = [Entry("/".join(parts[common:]), lower.index(parts[-2].lower()), split or "all", n)
               for n, parts, split in found]
    usages = {e.usage for e in entries}
    if "all" in usages and len(usages) > 1:
        raise UserError(f"{path}: some images are in <split>/<class>/ folders and some only in <class>/ folders")
    return _source(path, files, entries, _splits_of(usages), dataset="folders", classes=options.classes,
                   canonical=tuple(canonical_name(c) or c for c in options.classes))


register(Dataset(
    "folders", "labelled folders", (), (), split="its split folders, or folds without",
    layouts=(Layout("folders", "[<split>/]<class>/<image> with --classes",
                    lambda path, files: bool(files and _images(files)), _folders, auto=False),),
))


@dataclass(frozen=True)
class Origin:
    """Where a cache's faces come from and how it read them: what reopens them (a run's report, the
    copies across train and test) the way the cache was made."""

    path: str | None  # the source ("": none recorded)
    dataset: str | None = None  # a `datasets` name; None: detected from the files
    classes: tuple[str, ...] = ()  # a generic folder's `--classes`, in label order (other datasets name their own)
    native: bool = False  # the cache saw each image as stored (`--images native`), not 48x48 gray
    fingerprint: str = ""  # the source's content hash as the cache recorded it ("": unknown)

    @classmethod
    def of(cls, meta: dict, path: str | os.PathLike | None = None) -> Origin:
        """From a cache's metadata (`cache.read_meta`); `path` where the source is [default: where it was]."""
        dataset, classes, _ = dataset_of(meta)
        source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
        return cls(str(path or source.get("path") or ""), dataset, tuple(classes), meta.get("images") == NATIVE,
                   source.get("fingerprint", ""))

    @property
    def at_hand(self) -> bool:
        return bool(self.path) and Path(self.path).exists()

    def open(self, verify: bool = False) -> Source:
        """The source indexed as the cache read it (`open_dataset`); a `UserError` where it is not at
        hand or no longer reads so, and (`verify`: where faces are paired with the cache's rows by id)
        where its content is no longer what the cache recorded."""
        if not self.at_hand:
            raise UserError(f"the source {self.path or '(none recorded)'} is not at hand")
        source = open_dataset(self.path, self.dataset, self.classes if self.dataset == "folders" else None)
        if verify and self.fingerprint and source.fingerprint() != self.fingerprint:
            raise UserError(f"{source.path} is not the source the cache was made from (its content has changed)")
        return source
