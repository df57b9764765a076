"""Datasets beyond FER2013: each layout on a fixture built in its published form, and on the real copies."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_ZIP, cli, write_fer_csv
from fercache import datasets
from fercache.data import CLASSES, Entry, open_source
from fercache.datasets import (DATASETS, FERPLUS_VOTES, NOT_FACE, UNKNOWN, canonical_name, ferplus_majority,
                               ferplus_targets, open_dataset, read_ferplus_votes, read_rafdb_labels, subject_folds)
from fercache.errors import FERCacheWarning, UserError
from fercache.names import EXPRESSIONS

SHARED = REAL_ZIP.parent


def real(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    return path


def image(size=(48, 48), mode="L", value=0) -> bytes:
    """A PNG whose pixels encode `value`, so a test can tell images apart after decoding."""
    buf = io.BytesIO()
    colour = value if mode in ("L", "P") else (value, 255 - value, 7)
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def make_zip(path: Path, members: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def unpack(path: Path, folder: Path) -> Path:
    with zipfile.ZipFile(path) as z:
        z.extractall(folder)
    return folder


# --- registry and canonical names ---


def test_every_dataset_maps_its_classes_to_canonical_expressions():
    assert DATASETS["fer2013"].classes == CLASSES and DATASETS["fer2013"].canonical[CLASSES.index("happy")] == "happiness"
    assert dict(zip(DATASETS["ckplus48"].classes, DATASETS["ckplus48"].canonical))["sadness"] == "sadness"
    assert dict(zip(DATASETS["jaffe"].classes, DATASETS["jaffe"].canonical))["HA"] == "happiness"
    raf = DATASETS["rafdb"]
    assert [raf.canonical[raf.codes.index(c)] for c in "1234567"] == [
        "surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
    aff = DATASETS["affectnet"]
    assert [aff.canonical[aff.codes.index(c)] for c in "01234567"] == [
        "neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"]
    for d in DATASETS.values():
        assert set(d.canonical) <= set(EXPRESSIONS) and len(set(d.canonical)) == len(d.canonical)
    assert canonical_name("Happy") == "happiness" and canonical_name("AN") == "anger" and canonical_name("cat") is None


# --- FER2013 unchanged ---

KAGGLE = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def _fixed_fer2013(tmp_path: Path) -> tuple[Path, Path]:
    """A FER2013 zip (fixed timestamps, so its bytes are stable) and the same files as a folder."""
    with zipfile.ZipFile(tmp_path / "fer.zip", "w") as z:
        for i in range(12):
            top, prefix = ("train", "Training") if i < 8 else ("test", "PublicTest" if i % 2 else "PrivateTest")
            name = f"{top}/{KAGGLE[i % 7]}/{prefix}_{(i * 7919) % 1000}.jpg"
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), f"face {i}".encode())
            (tmp_path / "folder" / top / KAGGLE[i % 7]).mkdir(parents=True, exist_ok=True)
            (tmp_path / "folder" / name).write_bytes(f"face {i}".encode())
    return tmp_path / "fer.zip", tmp_path / "folder"


def test_fer2013_ids_order_and_fingerprints_are_as_before(tmp_path):
    """Values computed with the reader before datasets existed: existing caches keep matching their source."""
    zip_path, folder = _fixed_fer2013(tmp_path)
    before = {"fer.zip": "sha256:89902c0be37fb0dac6a6c16e0d47c0a385b093a5d2dc57978ae642b3c7bf66f0",
              "folder": "sha256:ea9ea62da72c58395930d0971bce1c6784fe29add467ddc3f0ff97b17aafb962"}
    for path in (zip_path, folder):
        for source in (open_source(path), open_dataset(path)):
            assert source.fingerprint() == before[path.name]
            ids = [e.id for e in source.entries]
            assert ids[:3] == ["test/sad/PublicTest_109.jpg", "test/happy/PrivateTest_190.jpg", "test/fear/PublicTest_271.jpg"]
            assert hashlib.sha256("|".join(ids).encode()).hexdigest()[:16] == "d9fcf2f741c5b069"
            assert source.dataset == "fer2013" and source.classes == CLASSES and source.splits[0] == "train"


def test_fer2013_zip_reads_the_same_through_open_dataset(fer_zip):
    a, b = open_source(fer_zip), open_dataset(fer_zip)
    assert [(e.id, e.label, e.usage) for e in a.entries] == [(e.id, e.label, e.usage) for e in b.entries]
    assert a.describe() == b.describe() and b.describe()["canonical"][CLASSES.index("angry")] == "anger"
    faces = b.load("train", native=True)
    assert isinstance(faces.pixels, list) and faces.pixels[0].shape == (48, 48, 3)
    assert np.array_equal(faces.pixels[0][..., 0], a.load("train").pixels[0])
    with pytest.raises(UserError, match="unknown class folder 'contempt'"):  # FER2013's own errors still speak
        open_dataset(make_zip(fer_zip.parent / "c.zip", {"train/contempt/Training_1.png": image()}))


def test_real_fer2013_fingerprint_unchanged(real_zip):
    src = open_dataset(real_zip)
    assert src.fingerprint() == "sha256:e61412c2d638bc8949958c464979590cc12ac45e5ba614f0b107b52337ae81a9"
    assert hashlib.sha256("|".join(e.id for e in src.entries).encode()).hexdigest() == (
        "5123acd74873671eff415cf1fd0a7499d528b83e46cdae17eb6f7789bd9cc49c")


# --- CK+48 and JAFFE (no split: subjects and folds) ---

CK = {"anger": 0, "contempt": 1, "happy": 4, "sadness": 5}


def ckplus_zip(tmp_path: Path) -> Path:
    members = {}
    for s in range(6):
        for cls in CK:
            for frame in (1, 2):
                members[f"CK+48/{cls}/S{100 + s:03d}_00{s}_0000001{frame}.png"] = image(value=10 * s + frame)
    return make_zip(tmp_path / "ckplus48.zip", members)


def test_ckplus48_classes_subjects_and_decoding(tmp_path):
    src = open_dataset(ckplus_zip(tmp_path))
    assert src.dataset == "ckplus48" and src.classes[1] == "contempt" and src.splits == ("all",)
    d = src.describe()
    assert d["splits"]["all"]["count"] == 48 and d["splits"]["all"]["subjects"] == 6
    assert d["splits"]["all"]["per_class"] == {c: (12 if c in CK else 0) for c in src.classes}
    assert src.entries[0].id == "anger/S100_000_00000011.png" and src.entries[0].subject == "S100"
    faces = src.load("all")
    assert faces.pixels.shape == (48, 48, 48) and faces.subjects[0] == "S100" and faces.classes == src.classes
    assert faces.canonical[faces.labels[0]] == "anger" and int(faces.pixels[0, 0, 0]) == 1
    with pytest.raises(UserError, match="unknown split 'train'"):
        src.select("train")


def test_jaffe_palette_images_keep_native_size_and_colour(tmp_path):
    buf = io.BytesIO()
    palette = Image.new("P", (256, 256), 3)
    palette.putpalette([0, 0, 0, 9, 9, 9, 50, 50, 50, 90, 90, 90] + [0] * 756)
    palette.save(buf, "TIFF")
    gray = io.BytesIO()
    Image.new("L", (256, 256), 40).save(gray, "TIFF")
    path = make_zip(tmp_path / "jaffe.zip", {"jaffe/KA.HA1.29.tiff": buf.getvalue(), "jaffe/YM.SU2.58.tiff": gray.getvalue(),
                                             "jaffe/README": "not an image"})
    src = open_dataset(path)
    assert src.dataset == "jaffe" and [e.subject for e in src.entries] == ["KA", "YM"]
    assert [src.classes[e.label] for e in src.entries] == ["HA", "SU"]
    native = src.load("all", native=True).pixels
    assert [p.shape for p in native] == [(256, 256, 3)] * 2 and (native[0] == 90).all() and (native[1] == 40).all()
    with pytest.warns(FERCacheWarning, match="2 image"):
        small = src.load("all").pixels
    assert small.shape == (2, 48, 48) and (small[0] == 90).all()


def test_subject_folds_keep_subjects_apart(tmp_path):
    entries = open_dataset(ckplus_zip(tmp_path)).entries
    for k in (3, "subjects"):
        folds = subject_folds(entries, k, seed=1)
        assert len(folds) == (3 if k == 3 else 6)
        tested = np.concatenate([test for _, test in folds])
        assert sorted(tested) == list(range(len(entries)))  # every face tested exactly once
        for train, test in folds:
            assert not {entries[i].subject for i in train} & {entries[i].subject for i in test}
            assert len(train) + len(test) == len(entries)
    assert [t.tolist() for _, t in subject_folds(entries, 3, seed=1)] == [t.tolist() for _, t in subject_folds(entries, 3, seed=1)]
    with pytest.raises(UserError, match="choose 2 to 6"):
        subject_folds(entries, 7)
    with pytest.raises(UserError, match="--folds ten: a number of folds, or 'subjects'"):
        subject_folds(entries, "ten")
    with pytest.raises(UserError, match="subject ids"):
        subject_folds([Entry("a", 0, "all", "a")], 2)


def test_real_ckplus48_and_jaffe(tmp_path):
    ck = open_dataset(real("ckplus48.zip")).describe()["splits"]["all"]
    assert ck["count"] == 981 and ck["subjects"] == 118
    assert ck["per_class"] == {"anger": 135, "contempt": 54, "disgust": 177, "fear": 75, "happy": 207,
                               "sadness": 84, "surprise": 249}
    jaffe = open_dataset(real("jaffe.zip"))
    d = jaffe.describe()["splits"]["all"]
    assert d["count"] == 213 and d["subjects"] == 10
    assert d["per_class"] == {"NE": 30, "HA": 31, "SA": 31, "SU": 30, "AN": 30, "DI": 29, "FE": 32}
    native = jaffe.load("all", native=True).pixels
    assert len(native) == 213 and {p.shape for p in native} == {(256, 256, 3)}
    folds = subject_folds(jaffe.entries, "subjects")
    assert len(folds) == 10 and all(len({jaffe.entries[i].subject for i in t}) == 1 for _, t in folds)


# --- FER+ ---


def test_ferplus_majority_follows_ferplus_reader():
    assert ferplus_majority([6, 0, 1, 1, 0, 0, 0, 0, 2, 0]) == 0  # 6 of the 8 votes left after single votes go
    assert ferplus_majority([3, 1, 1, 1, 1, 1, 1, 1, 0, 0]) == 0  # single votes are outliers: 3 of 3
    assert ferplus_majority([5, 5, 0, 0, 0, 0, 0, 0, 0, 0]) == UNKNOWN  # a tie is no majority (not more than half)
    assert ferplus_majority([4, 0, 0, 4, 2, 0, 0, 0, 0, 0]) == UNKNOWN  # a plurality is not a majority
    assert ferplus_majority([0, 0, 0, 0, 0, 0, 0, 0, 0, 10]) == NOT_FACE
    assert ferplus_majority([0, 0, 0, 0, 0, 0, 0, 0, 7, 3]) == UNKNOWN
    assert ferplus_majority([1, 1, 1, 1, 1, 1, 1, 1, 1, 1]) == UNKNOWN  # every vote an outlier
    # FER+'s reader (`_process_data`) drops single votes in its soft modes too, then renormalises over the
    # 8 emotions: the two single votes go, and contempt's 2 votes count while unknown's do not
    targets = ferplus_targets(np.array([[6, 0, 1, 1, 0, 0, 0, 0, 2, 0], [4, 0, 1, 0, 0, 0, 0, 2, 0, 3]]))
    assert targets.shape == (2, 8) and np.allclose(targets, [[1, 0, 0, 0, 0, 0, 0, 0], [4 / 6, 0, 0, 0, 0, 0, 0, 2 / 6]])


VOTES = [  # (votes, FER+ label or None when dropped)
    ((0, 8, 0, 0, 0, 0, 0, 0, 2, 0), 1), ((0, 0, 0, 0, 0, 0, 0, 9, 1, 0), 7), ((5, 5, 0, 0, 0, 0, 0, 0, 0, 0), None),
    ((0, 0, 0, 0, 0, 0, 0, 0, 0, 10), None), ((0, 0, 7, 0, 0, 0, 0, 0, 3, 0), 2), ((1, 0, 0, 0, 6, 3, 0, 0, 0, 0), 4),
]


def ferplus_folders_zip(tmp_path: Path, box: bool = True) -> Path:
    members, n = {}, 0
    for folder in ("FER2013Train", "FER2013Valid", "FER2013Test"):
        rows = []
        for votes, _ in VOTES:
            members[f"{folder}/fer{n:07d}.png"] = image(value=n)
            rows.append(f"fer{n:07d}.png," + ('"(0, 0, 48, 48)",' if box else "") + ",".join(map(str, votes)))
            n += 1
        members[f"{folder}/label.csv"] = "\n".join(rows) + "\n"
    return make_zip(tmp_path / "images.zip", members)


@pytest.mark.parametrize("box", [True, False])
def test_ferplus_own_folders_majority_votes_and_drops(tmp_path, box):
    src = open_dataset(ferplus_folders_zip(tmp_path, box))
    assert src.dataset == "ferplus" and src.classes == FERPLUS_VOTES[:8]
    kept = [label for _, label in VOTES if label is not None]
    assert [e.label for e in src.select("private_test")] == kept
    assert src.dropped == {"FER+ majority unknown, or no majority": 3, "FER+ majority not a face": 3}
    train = src.load("train")
    assert train.labels.tolist() == kept and train.ids[0] == "FER2013Train/fer0000000.png"
    assert train.votes.shape == (4, 10) and train.votes[0].tolist() == list(VOTES[0][0])
    assert [int(p[0, 0]) for p in train.pixels] == [0, 1, 4, 5]
    assert src.describe()["splits"]["public_test"]["count"] == 4
    folder = open_dataset(unpack(src.path, tmp_path / "ferplus"))
    assert folder.format == "folder" and folder.describe()["splits"] == src.describe()["splits"]
    before = folder.fingerprint()
    label = tmp_path / "ferplus" / "FER2013Test" / "label.csv"
    label.write_text(label.read_text().replace("0,8,0", "0,0,8"))  # new labels, same images
    assert open_dataset(folder.path).fingerprint() != before


def fer_csv_and_votes(tmp_path: Path, rows: int = 6) -> tuple[Path, Path]:
    pixels = np.stack([np.full((48, 48), i, np.uint8) for i in range(rows)])
    usages = ["Training"] * 4 + ["PublicTest", "PrivateTest"]
    fer = write_fer_csv(tmp_path / "fer2013.csv", pixels, np.arange(rows) % 7, usages)
    with open(tmp_path / "fer2013new.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Usage", "Image name", *FERPLUS_VOTES])
        for i, (usage, (votes, _)) in enumerate(zip(usages, VOTES)):
            w.writerow([usage, "" if i == 1 else f"fer{i:07d}.png", *votes])  # row 1: FER+ found no face
    return fer, tmp_path / "fer2013new.csv"


def test_ferplus_votes_join_a_fer2013_csv_by_row(tmp_path):
    fer, votes = fer_csv_and_votes(tmp_path)
    src = open_dataset(fer, "ferplus")  # the votes are found beside the CSV
    assert [(e.id, e.label) for e in src.entries] == [("fer2013.csv:2", 1), ("fer2013.csv:6", 2), ("fer2013.csv:7", 4)]
    assert src.dropped == {"no FER+ image (FER+: not a face)": 1, "FER+ majority unknown, or no majority": 1,
                           "FER+ majority not a face": 1}
    assert src.select("public_test")[0].votes == VOTES[4][0]
    assert src.fingerprint() != open_source(fer).fingerprint()  # the votes are part of what the labels are
    assert int(src.load("train").pixels[0, 0, 0]) == 0
    votes.unlink()
    with pytest.raises(UserError, match="fer2013new.csv\\) not found beside"):
        open_dataset(fer, "ferplus")


def test_ferplus_votes_for_another_copy_are_refused(tmp_path):
    fer, votes = fer_csv_and_votes(tmp_path)
    text = votes.read_text().replace("PublicTest", "Training")
    votes.write_text(text)
    with pytest.raises(UserError, match="row 6 is Training.*not for this FER2013 copy"):
        open_dataset(fer, "ferplus", votes=votes)
    with pytest.raises(UserError, match="not FER\\+ votes"):
        open_dataset(fer, "ferplus", votes=fer)


def test_ferplus_votes_join_the_kaggle_layout_through_the_table(fer_zip, tmp_path, monkeypatch):
    _, votes = fer_csv_and_votes(tmp_path)
    ids = [e.id.rsplit(".", 1)[0] for e in open_source(fer_zip).entries]
    train = [i for i in ids if i.startswith("train/")]
    public = [i for i in ids if "PublicTest" in i]
    table = {train[0]: 0, train[1]: 1, train[2]: 2, public[0]: 4}  # rows 3 and 5 unmatched
    monkeypatch.setattr(datasets, "kaggle_rows", lambda: table)
    src = open_dataset(fer_zip, "ferplus", votes=votes)
    assert [(e.id.rsplit(".", 1)[0], e.label) for e in src.entries] == [(public[0], 2), (train[0], 1)]
    assert src.dropped["not in fercache's FER+ table (no FER+ image, or an ambiguous duplicate face)"] == len(ids) - 4
    assert src.format == "zip" and src.load("train").votes.tolist() == [list(VOTES[0][0])]


def test_shipped_kaggle_table_is_one_to_one():
    table = datasets.kaggle_rows()
    assert len(table) == 35612 and len(set(table.values())) == len(table)
    assert all(name.split("/")[0] in ("train", "test") for name in table)


def test_real_ferplus_folders_and_kaggle_layout_agree(real_zip):
    """FER+'s own folders and the Kaggle JPEGs joined through fercache's table, both with fer2013new.csv's votes:
    the same PrivateTest, per class; the other splits lose only faces the table leaves out."""
    folders = open_dataset(real("ferplus/images.zip"))
    d = folders.describe()
    assert {s: v["count"] for s, v in d["splits"].items()} == {
        "train": 25045, "test": 6328, "public_test": 3191, "private_test": 3137}  # label.csv's votes
    assert d["dropped"] == {"FER+ majority unknown, or no majority": 4335, "FER+ majority not a face": 2}
    votes = read_ferplus_votes(real("ferplus/fer2013new.csv"))
    assert len(votes) == 35887 and sum(1 for _, name, _ in votes if not name) == 173
    by_name = Counter(name for _, name, _ in votes if name)
    expected = Counter()
    for usage, name, v in votes:  # FER+'s faces, with fer2013new.csv's votes (4 names given to two rows left out)
        if name and by_name[name] == 1 and ferplus_majority(v) < UNKNOWN:
            expected[({"Training": "train", "PublicTest": "public_test", "PrivateTest": "private_test"}[usage],
                      ferplus_majority(v))] += 1
    kaggle = open_dataset(real_zip, "ferplus", votes=real("ferplus/fer2013new.csv"))
    got = Counter((e.usage, e.label) for e in kaggle.entries)
    assert {k: v for k, v in got.items() if k[0] == "private_test"} == {k: v for k, v in expected.items() if k[0] == "private_test"}
    missing = {u: sum(expected[k] - got[k] for k in expected if k[0] == u) for u in ("train", "public_test")}
    assert missing == {"train": 81, "public_test": 2}
    assert kaggle.dropped["not in fercache's FER+ table (no FER+ image, or an ambiguous duplicate face)"] == 275


# --- RAF-DB ---

RAF_LINES = ["train_00001.jpg 5", "train_00002.jpg 1", "train_00003.jpg 7", "test_0001.jpg 4", "test_0002.jpg 6"]


def rafdb_zip(tmp_path: Path, kind: str = "aligned", missing: str = "") -> Path:
    members = {"basic/EmoLabel/list_patition_label.txt": "\n".join(RAF_LINES) + "\n"}
    for i, line in enumerate(RAF_LINES):
        name = line.split()[0]
        file = f"basic/Image/aligned/{name[:-4]}_aligned.jpg" if kind == "aligned" else f"basic/Image/original/{name}"
        if name != missing:
            members[file] = image((100, 100) if kind == "aligned" else (320, 240), "RGB", value=20 * i)
    return make_zip(tmp_path / f"rafdb-{kind}.zip", members)


@pytest.mark.parametrize("kind", ["aligned", "original"])
def test_rafdb_label_file_and_images(tmp_path, kind):
    src = open_dataset(rafdb_zip(tmp_path, kind, missing="train_00002.jpg"))
    assert src.dataset == "rafdb" and src.splits == ("train", "test")
    assert src.dropped == {"label without image": 1}
    train = src.load("train", native=True)
    assert [train.classes[y] for y in train.labels] == ["sadness", "neutral"]  # codes 5 and 7
    assert train.ids[0] == (f"Image/{kind}/train_00001" + ("_aligned.jpg" if kind == "aligned" else ".jpg"))
    assert train.pixels[0].shape == ((100, 100, 3) if kind == "aligned" else (240, 320, 3))
    assert tuple(train.pixels[0][0, 0]) == (0, 255, 7)  # colour kept
    assert [src.classes[e.label] for e in src.select("test")] == ["happiness", "anger"]


def test_rafdb_train_test_class_folders(tmp_path):
    path = make_zip(tmp_path / "raf.zip", {"DATASET/train/1/a.jpg": image(), "DATASET/train/7/b.jpg": image(),
                                           "DATASET/test/4/c.jpg": image()})
    src = open_dataset(path)
    assert src.dataset == "rafdb" and [(e.id, src.classes[e.label]) for e in src.entries] == [
        ("test/4/c.jpg", "happiness"), ("train/1/a.jpg", "surprise"), ("train/7/b.jpg", "neutral")]
    assert open_dataset(unpack(path, tmp_path / "raf")).describe()["splits"] == src.describe()["splits"]


def test_rafdb_bad_label_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="list_patition_label.txt:2: unknown class '9'"):
        read_rafdb_labels("train_00001.jpg 5\ntrain_00002.jpg 9\n", "list_patition_label.txt")


def test_real_rafdb_label_file(tmp_path):
    text = zipfile.ZipFile(real("rafdb_labels.zip")).read("basic/EmoLabel/list_patition_label.txt").decode()
    rows = read_rafdb_labels(text, "list_patition_label.txt")
    assert len(rows) == 15339
    assert Counter(name.split("_")[0] for name, _ in rows) == {"train": 12271, "test": 3068}
    with pytest.raises(UserError, match="RAF-DB labels but no images"):
        open_dataset(real("rafdb_labels.zip"))
    members = {"basic/EmoLabel/list_patition_label.txt": text}  # the published layout around the real labels
    members.update({f"basic/Image/aligned/{name[:-4]}_aligned.jpg": b"" for name, _ in rows})
    d = open_dataset(make_zip(tmp_path / "raf.zip", members)).describe()
    assert d["splits"]["train"]["count"] == 12271 and d["splits"]["test"]["count"] == 3068


# --- AffectNet ---


def test_affectnet_class_index_folders(tmp_path):
    members = {f"AffectNet/train_set/{c}/{c}{i}.jpg": image((224, 224), "RGB") for c in range(8) for i in range(2)}
    members.update({f"AffectNet/val_set/{c}/v{c}.jpg": image((300, 200), "RGB") for c in (0, 7)})
    src = open_dataset(make_zip(tmp_path / "affectnet.zip", members))
    assert src.dataset == "affectnet" and src.splits == ("train", "test")  # its validation set is the test set
    d = src.describe()["splits"]
    assert d["train"]["count"] == 16 and d["test"]["per_class"]["contempt"] == 1
    native = src.load("test", native=True).pixels
    assert [p.shape for p in native] == [(200, 300, 3)] * 2


def test_affectnet_csv_layout_drops_none_uncertain_and_non_faces(tmp_path):
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
    rows = [("1/a.jpg", 1), ("1/b.jpg", 8), ("2/c.jpg", 10), ("2/d.jpg", 7), ("3/gone.jpg", 0)]
    line = lambda p, e: f'{p},10,10,200,200,"1.0;2.0",{e},0.5,-0.2'
    members = {"Manually_Annotated_file_lists/training.csv": "\n".join([header] + [line(p, e) for p, e in rows]) + "\n",
               "Manually_Annotated_file_lists/validation.csv": "\n".join([header, line("4/e.jpg", 3)]) + "\n"}
    members.update({f"Manually_Annotated/Manually_Annotated_Images/{p}": image((400, 300), "RGB")
                    for p in ("1/a.jpg", "1/b.jpg", "2/c.jpg", "2/d.jpg", "4/e.jpg")})
    src = open_dataset(make_zip(tmp_path / "affectnet.zip", members))
    assert [(e.id, src.classes[e.label], e.usage) for e in src.entries] == [
        ("1/a.jpg", "happy", "train"), ("2/d.jpg", "contempt", "train"), ("4/e.jpg", "surprise", "test")]
    assert src.dropped == {"AffectNet label 8 (None)": 1, "AffectNet label 10 (Non-Face)": 1, "label without image": 1}


def test_affectnet_npy_annotations(tmp_path):
    members = {}
    for split, n, label in [("train_set", 0, "6"), ("train_set", 1, "9"), ("val_set", 5, "2")]:
        members[f"{split}/images/{n}.jpg"] = image((224, 224), "RGB")
        buf = io.BytesIO()
        np.save(buf, np.array(label))
        members[f"{split}/annotations/{n}_exp.npy"] = buf.getvalue()
    src = open_dataset(make_zip(tmp_path / "affectnet.zip", members))
    assert src.dataset == "affectnet"
    assert [(e.id, src.classes[e.label], e.usage) for e in src.entries] == [
        ("train_set/images/0.jpg", "anger", "train"), ("val_set/images/5.jpg", "sad", "test")]
    assert src.dropped == {"AffectNet label 9 (Uncertain)": 1}


# --- any labelled folder, detection, info ---


def test_generic_folders_with_classes(tmp_path):
    members = {"data/train/cat/1.png": image(), "data/train/Happy/2.png": image(), "data/val/cat/3.png": image(),
               "data/test/happy/4.png": image(), "data/.DS_Store": b""}
    path = make_zip(tmp_path / "mine.zip", members)
    src = open_dataset(path, classes="happy,cat")
    assert src.dataset == "folders" and src.classes == ("happy", "cat") and src.canonical == ("happiness", "cat")
    assert src.splits == ("train", "val", "test") and [len(src.select(s)) for s in ("train", "val", "test")] == [2, 1, 1]
    assert [e.id for e in src.select("all")] == ["train/Happy/2.png", "train/cat/1.png", "val/cat/3.png", "test/happy/4.png"]
    with pytest.raises(UserError, match="class folder 'cat' .* is not in --classes"):
        open_dataset(path, classes=["happy"])
    with pytest.raises(UserError, match="needs --classes"):
        open_dataset(path, "folders")
    with pytest.raises(UserError, match="distinct"):
        open_dataset(path, classes="a,a")


def test_generic_folders_above_the_class_keep_images_apart(tmp_path):
    """Two images of one name in other folders above <class> are two faces, with two ids."""
    members = {"dup/a/happy/1.png": image(), "dup/b/happy/1.png": image(), "dup/b/sad/1.png": image()}
    src = open_dataset(make_zip(tmp_path / "dup.zip", members), classes="happy,sad")
    assert sorted(e.id for e in src.select("all")) == ["a/happy/1.png", "b/happy/1.png", "b/sad/1.png"]


def test_ambiguous_layout_asks_for_dataset(tmp_path):
    members = {"CK+48/anger/S010_004_00000017.png": image(), "basic/EmoLabel/list_patition_label.txt": "x.jpg 1\n"}
    path = make_zip(tmp_path / "both.zip", members)
    with pytest.raises(UserError, match="could be ckplus48 or rafdb; say which with --dataset"):
        open_dataset(path)
    assert open_dataset(path, "ckplus48").dataset == "ckplus48"
    with pytest.raises(UserError, match="not a jaffe layout"):
        open_dataset(path, "jaffe")
    with pytest.raises(UserError, match="unknown dataset 'nope': choose one of fer2013, ferplus"):
        open_dataset(path, "nope")
    with pytest.raises(UserError, match="--classes names a generic folder's classes; ckplus48 has its own"):
        open_dataset(path, "ckplus48", classes="a,b")
    with pytest.raises(UserError, match="not a ferplus-fer2013 layout"):  # --votes alone means FER+ on FER2013
        open_dataset(path, votes=path)


def test_cli_info_reports_subjects_classes_and_dataset(tmp_path):
    path = ckplus_zip(tmp_path)
    out = cli("info", path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].endswith("CK+48 as zip") and "subjects" in out.stdout.splitlines()[1]
    info = json.loads(cli("info", path, "--json", "--dataset", "ckplus48").stdout)
    assert info["splits"]["all"]["subjects"] == 6 and info["canonical"][3] == "fear"
    mine = make_zip(tmp_path / "mine.zip", {"train/a/1.png": image(), "test/b/2.png": image()})
    table = cli("info", mine, "--classes", "b,a").stdout
    assert "labelled folders as zip" in table and table.splitlines()[1].split()[2:4] == ["b", "a"]
    bad = cli("info", path, "--dataset", "nope")
    assert bad.returncode == 2 and "unknown dataset 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_generic_folders_refuse_a_class_name_without_a_folder(tmp_path):
    """A --classes name no folder has is a typo, not an empty class: one line naming it and what is there."""
    path = make_zip(tmp_path / "mine.zip", {"train/cat/1.png": image(), "test/happy/2.png": image()})
    with pytest.raises(UserError, match=r"--classes names hapy, but no class folder has that name \(found: cat, happy\)"):
        open_dataset(path, classes="cat,hapy,happy")
    assert open_dataset(path, classes="Happy,CAT").classes == ("Happy", "CAT")  # case as folders are matched


def test_evaluate_scores_all_by_default_on_a_dataset_without_a_split(fer_zip, tmp_path):
    """`evaluate --head <FER2013 run> --cache <CK+>` with no --split scores CK+'s only split, `all`."""
    from fercache.extract import extract
    from fercache.fit import fit

    for data, cache in ((fer_zip, "fer.h5"), (ckplus_zip(tmp_path), "ck.h5")):
        extract(data, "all", "pixels", cache=tmp_path / cache, progress=False)
    fit(tmp_path / "fer.h5", epochs=2, out=tmp_path / "run", plots=False)
    out = cli("evaluate", "--head", tmp_path / "run", "--cache", tmp_path / "ck.h5", "--out", tmp_path / "eval")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("all (36 faces") and "left out: contempt (12 faces)" in lines[1]
    assert (tmp_path / "eval" / "evaluate-all.json").is_file()
    assert cli("evaluate", "--head", tmp_path / "run", "--cache", tmp_path / "fer.h5",
               "--out", tmp_path / "eval").stdout.startswith("test (14 faces")  # a split dataset: test, as before


def test_run_refuses_folds_on_a_split_dataset_before_encoding(fer_zip, tmp_path):
    """`run --folds` on FER2013 says in one line that it has a split, and writes no cache first."""
    out = cli("run", "--data", fer_zip, "--model", "pixels", "--folds", "5", "--cache", tmp_path / "c.h5")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("is fer2013, which has its own train/test split; folds are for datasets "
                                       "without one (CK+, JAFFE)") and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.h5").exists()
