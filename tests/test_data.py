"""FER2013 readers: every format gives the same images, counts and order; every bad input is one clear error."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli, make_fer_layout, write_fer_csv
from fercache.data import CLASSES, FERImages, load_images, open_source
from fercache.errors import FERCacheWarning, UserError


def unpack(zip_path: Path, folder: Path) -> Path:
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(folder)
    return folder


def csv_from(faces_by_split: dict[str, FERImages], path: Path, icml: bool = False) -> Path:
    """A challenge CSV holding the same images as a folder source (train rows, then test)."""
    pixels = np.concatenate([f.pixels for f in faces_by_split.values()])
    labels = np.concatenate([f.labels for f in faces_by_split.values()])
    usage_names = {"train": "Training", "public_test": "PublicTest", "private_test": "PrivateTest"}
    usages = [usage_names[u] for f in faces_by_split.values() for u in f.usage]
    return write_fer_csv(path, pixels, labels, usages, icml=icml)


def test_zip_reads_pixels_labels_ids_in_path_order(fer_zip):
    expected = make_fer_layout({"train": 21, "test": 14})
    faces = load_images(fer_zip, "train")
    assert faces.pixels.dtype == np.uint8 and faces.pixels.shape == (21, 48, 48)
    assert faces.labels.dtype == np.int64
    numbers = [i.rsplit("_", 1)[1] for i in faces.ids]
    assert numbers == sorted(numbers) and all(i.startswith("train/") for i in faces.ids)
    assert faces.classes == CLASSES
    for i, pixels, label in zip(faces.ids, faces.pixels, faces.labels):
        assert np.array_equal(pixels, expected[i][1]) and label == expected[i][2]


def test_splits_partition_the_test_folder_by_file_name(fer_zip):
    src = open_source(fer_zip)
    test = src.load("test")
    public, private = src.load("public_test"), src.load("private_test")
    assert len(test) == 14 and len(public) + len(private) == 14
    assert all("PublicTest_" in i for i in public.ids) and all("PrivateTest_" in i for i in private.ids)
    assert set(public.usage) == {"public_test"} and set(private.usage) == {"private_test"}
    every = src.load("all")
    assert every.ids == src.load("train").ids + test.ids


def test_folder_zip_and_both_csvs_agree(fer_zip, tmp_path):
    folder = unpack(fer_zip, tmp_path / "fer2013")
    by_split = {s: load_images(folder, s) for s in ("train", "public_test", "private_test")}
    fer_csv = csv_from(by_split, tmp_path / "fer2013.csv")
    icml_csv = csv_from(by_split, tmp_path / "icml_face_data.csv", icml=True)
    described = [open_source(p).describe() for p in (fer_zip, folder, fer_csv, icml_csv)]
    assert [d["format"] for d in described] == ["zip", "folder", "fer2013.csv", "icml_face_data.csv"]
    for d in described[1:]:
        assert d["splits"] == described[0]["splits"] and d["classes"] == list(CLASSES)
    for split in ("train", "public_test", "private_test"):
        a, b = load_images(fer_zip, split), load_images(icml_csv, split)
        assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.labels, b.labels)
        assert b.ids[0].startswith("icml_face_data.csv:")
    assert load_images(fer_csv, "train").ids[:2] == ["fer2013.csv:2", "fer2013.csv:3"]


def test_default_location_and_env(fer_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("FERCACHE_DATA", str(fer_zip.parent))
    assert open_source().path == fer_zip
    monkeypatch.setenv("FERCACHE_DATA", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no FER2013 found.*Kaggle"):
        open_source()


def test_non_48x48_and_colour_images_are_converted_with_a_warning(tmp_path):
    path = tmp_path / "odd.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i, (size, mode) in enumerate([((48, 48), "L"), ((96, 64), "RGB"), ((48, 48), "RGB")]):
            buf = io.BytesIO()
            Image.new(mode, size, color=(200, 100, 50) if mode == "RGB" else 128).save(buf, "PNG")
            z.writestr(f"train/happy/Training_{i}.png", buf.getvalue())
    with pytest.warns(FERCacheWarning, match="2 image"):
        faces = load_images(path, "train")
    assert faces.pixels.shape == (3, 48, 48)
    gray = np.asarray(Image.new("RGB", (1, 1), (200, 100, 50)).convert("L"))[0, 0]
    assert (faces.pixels[1] == gray).all() and (faces.pixels[0] == 128).all()


def test_unreadable_image_is_skipped_with_a_warning_or_fatal_when_strict(fer_zip, tmp_path):
    path = tmp_path / "broken.zip"
    with zipfile.ZipFile(fer_zip) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("train/sad/Training_999.jpg", b"not a jpeg at all")
    with pytest.warns(FERCacheWarning, match="train/sad/Training_999.jpg"):
        faces = load_images(path, "train")
    assert len(faces) == 21 and "train/sad/Training_999.jpg" not in faces.ids
    with pytest.raises(UserError, match="Training_999.jpg: unreadable"):
        load_images(path, "train", strict=True)


def test_limit_takes_the_first_images_in_reader_order(fer_zip):
    assert load_images(fer_zip, "train", limit=5).ids == load_images(fer_zip, "train").ids[:5]


def test_reader_order_mixes_classes_so_a_limit_samples_every_class(real_zip):
    """Sorted by file number, not by class folder or usage: a prefix holds every class and both test halves."""
    counts = np.bincount(load_images(real_zip, "train", limit=700).labels, minlength=7)
    share = np.bincount(open_source(real_zip).load("train").labels, minlength=7) / 28709
    assert (counts > 0).all() and np.abs(counts / 700 - share).max() < 0.05
    usage = load_images(real_zip, "test", limit=400).usage
    assert 150 < usage.count("public_test") < 250 and 150 < usage.count("private_test") < 250


def _zip_with(tmp_path, names: list[str]) -> Path:
    path = tmp_path / "custom.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            z.writestr(name, make_fer_layout({"train": 1})["train/angry/Training_1000.png"][0])
    return path


def _file(tmp_path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _csv(tmp_path, text: str) -> Path:
    return _file(tmp_path, "fer2013.csv", text)


PIX = " ".join(["7"] * 2304)


@pytest.mark.parametrize("make, split, message", [
    (lambda t: t / "missing.zip", "train", r"missing.zip: no such file"),
    (lambda t: (t / "empty").mkdir() or t / "empty", "train", r"empty: no FER2013 images found"),
    (lambda t: _zip_with(t, ["train/contempt/Training_1.png"]), "train", r"unknown class folder 'contempt'"),
    (lambda t: _file(t, "bad.zip", b"PK\x03\x04 garbage"), "train", r"bad.zip: not a valid zip"),
    (lambda t: _zip_with(t, ["train/angry/Training_1.png"]), "public_test", r"no images in split 'public_test'"),
    (lambda t: _zip_with(t, ["train/angry/Training_1.png"]), "validation", r"unknown split 'validation'"),
    (lambda t: _csv(t, "emotion,Usage\n0,Training\n"), "train", r"fer2013.csv:1: CSV header lacks column\(s\) pixels"),
    (lambda t: _csv(t, f"emotion,pixels,Usage\n0,{PIX},Training\n3,1 2 3,Training\n"), "train", r"fer2013.csv:3: expected 2304 integer pixel values, got 3"),
    (lambda t: _csv(t, f"emotion,pixels,Usage\n0,{PIX} x,Training\n"), "train", r"fer2013.csv:2: expected 2304 integer pixel values, got 2305"),
    (lambda t: _csv(t, f"emotion,pixels,Usage\n0,{PIX[:-1]}300,Training\n"), "train", r"fer2013.csv:2: pixel values must be 0-255"),
    (lambda t: _csv(t, f"emotion,pixels,Usage\n0,{PIX[:-1]}x,Training\n"), "train", r"fer2013.csv:2: pixel values must be integers"),
    (lambda t: _csv(t, f"emotion,pixels,Usage\n9,{PIX},Training\n"), "train", r"fer2013.csv:2: unknown emotion code '9'"),
    (lambda t: _csv(t, f"emotion,pixels,Usage\n1,{PIX},Validation\n"), "train", r"fer2013.csv:2: unknown Usage 'Validation'"),
    (lambda t: _csv(t, f"emotion,pixels,Usage\n1,{PIX}\n"), "train", r"fer2013.csv:2: expected 3 fields, got 2"),
    (lambda t: _file(t, "x.txt", "hello"), "train", r"x.txt: not a FER2013 source"),
])
def test_bad_inputs_are_one_line_user_errors(tmp_path, make, split, message):
    with pytest.raises(UserError, match=message) as err:
        load_images(make(tmp_path), split)
    assert "\n" not in str(err.value)


def test_truncated_zip_is_a_user_error(fer_zip, tmp_path):
    data = fer_zip.read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.zip: not a valid zip"):
        load_images(cut, "train")


def test_cli_info_json_and_errors_exit_2(fer_zip, tmp_path):
    out = cli("info", str(fer_zip), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format"] == "zip" and info["classes"] == list(CLASSES)
    assert info["splits"]["train"]["count"] == 21 and sum(info["splits"]["test"]["per_class"].values()) == 14
    bad = cli("info", str(tmp_path / "nope.zip"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope.zip" in bad.stderr
    assert "Traceback" not in bad.stderr


# --- the real FER2013 (CI has it beside the repo; skipped elsewhere) ---

TEST_PER_CLASS = {"angry": 958, "disgust": 111, "fear": 1024, "happy": 1774, "sad": 1247, "surprise": 831, "neutral": 1233}


def test_real_zip_counts(real_zip):
    d = open_source(real_zip).describe()
    counts = {s: v["count"] for s, v in d["splits"].items()}
    assert counts == {"train": 28709, "test": 7178, "public_test": 3589, "private_test": 3589}
    assert d["splits"]["test"]["per_class"] == TEST_PER_CLASS
    assert sum(d["splits"]["train"]["per_class"].values()) == 28709


def test_real_zip_folder_and_csvs_agree(real_zip, tmp_path):
    """The zip, its unpacked folder and both CSV formats made from it: same counts, same pixels."""
    folder = unpack(real_zip, tmp_path / "fer2013")
    src = open_source(real_zip)
    by_split = {s: src.load(s) for s in ("train", "public_test", "private_test")}
    fer_csv = csv_from(by_split, tmp_path / "fer2013.csv")
    icml_csv = csv_from(by_split, tmp_path / "icml_face_data.csv", icml=True)
    infos = [json.loads(cli("info", str(real_zip), "--json").stdout)]
    infos += [open_source(p).describe() for p in (folder, fer_csv, icml_csv)]
    for info in infos[1:]:
        assert info["splits"] == infos[0]["splits"] and info["classes"] == infos[0]["classes"]
    test_zip = src.load("test")
    assert test_zip.pixels.shape == (7178, 48, 48)
    test_folder = load_images(folder, "test")
    assert test_folder.ids == test_zip.ids and np.array_equal(test_folder.pixels, test_zip.pixels)
    csv_src = open_source(fer_csv)
    for split, faces in by_split.items():
        from_csv = csv_src.load(split)
        assert np.array_equal(from_csv.pixels, faces.pixels) and np.array_equal(from_csv.labels, faces.labels)
