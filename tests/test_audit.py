"""`fercache audit`: the shift test, duplicate groups and counts, label issues, the CLI."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from conftest import cli, write_fer_csv
from fercache import audit as A
from fercache.errors import UserError
from fercache.names import CLASSES


@pytest.fixture(scope="session")
def real(real_zip):
    """The real zip read once per session: faces, statistics and duplicate groups (~10-20 s)."""
    faces = A.read_faces(real_zip)
    stats = A.face_stats(faces.pixels)
    report, _ = A.duplicate_groups(faces, stats)
    return faces, stats, report


def _png(pixels: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _write_zip(path: Path, faces: list[tuple[str, int, np.ndarray]], train_format: dict | None = None,
               test_format: dict | None = None) -> Path:
    """(split prefix, label, pixels) -> a Kaggle-layout zip (PNG, or `{"format": "JPEG", "quality": q}`)."""
    with zipfile.ZipFile(path, "w") as z:
        for n, (prefix, label, pixels) in enumerate(faces):
            top = "train" if prefix == "Training" else "test"
            how = (train_format if top == "train" else test_format) or {"format": "PNG"}
            ext = "jpg" if how["format"] == "JPEG" else "png"
            z.writestr(f"{top}/{CLASSES[label]}/{prefix}_{1000 + n}.{ext}", _png(pixels, how["format"],
                                                                                  **{k: v for k, v in how.items() if k != "format"}))
    return path


def _subset(faces, n_train: int = 1500, n_test: int = 600) -> list[tuple[str, int, np.ndarray]]:
    train = np.flatnonzero(faces.usage == "train")[:n_train]
    test = np.flatnonzero(faces.usage != "train")[:n_test]
    prefix = {"train": "Training", "public_test": "PublicTest", "private_test": "PrivateTest"}
    return [(prefix[faces.usage[i]], int(faces.labels[i]), faces.pixels[i]) for i in np.r_[train, test]]


def _tampered(faces, how) -> list[tuple[str, int, np.ndarray]]:
    return [(p, y, np.asarray(how(Image.fromarray(x))) if p == "Training" else x) for p, y, x in faces]


def test_shift_flags_tampered_train_faces_and_passes_the_genuine_copy(real, tmp_path):
    faces = _subset(real[0])
    genuine = A.read_faces(_write_zip(tmp_path / "genuine.zip", faces))
    result = A.shift_test(genuine, A.face_stats(genuine.pixels))
    assert not result["flagged"], result["verdict"]
    assert result["verdict"].startswith("no shift")
    tampering = {
        "sharpness": lambda im: im.filter(ImageFilter.GaussianBlur(1.0)),
        "contrast": ImageOps.equalize,
        "resized": lambda im: im.resize((24, 24), Image.Resampling.BILINEAR).resize((48, 48), Image.Resampling.BILINEAR),
    }
    for what, how in tampering.items():
        copy = A.read_faces(_write_zip(tmp_path / f"{what}.zip", _tampered(faces, how)))
        result = A.shift_test(copy, A.face_stats(copy.pixels))
        assert result["flagged"], what
        assert result["verdict"].startswith("SHIFT"), what
        train_test = next(c for c in result["comparisons"] if (c["a"], c["b"]) == ("train", "test"))
        if what != "resized":
            assert train_test["stats"][what]["flagged"], (what, train_test)
        else:
            assert train_test["stats"]["sharpness"]["cliffs_delta"] <= -A.MEDIUM
    # Train recompressed as JPEG at another quality than test's: the files say so
    recompressed = A.read_faces(_write_zip(tmp_path / "jpeg.zip", faces, {"format": "JPEG", "quality": 30},
                                           {"format": "JPEG", "quality": 90}))
    result = A.shift_test(recompressed, A.face_stats(recompressed.pixels))
    assert result["flagged"] and any("JPEG quality of the files 30 vs 90" in r for r in result["reasons"])


def test_duplicate_counts_on_the_real_zip_match_an_independent_count(real):
    faces, _, report = real
    groups = defaultdict(list)  # sha1 of decoded pixels -> (usage, label) of each non-blank face
    for pixels, usage, label in zip(faces.pixels, faces.usage, faces.labels):
        if pixels.std() >= A.BLANK_STD:
            groups[hashlib.sha1(pixels.tobytes()).hexdigest()].append((usage, int(label)))
    expected = dict.fromkeys(("within_train", "within_test", "across", "conflicting_labels",
                              "test_with_train_copy"), 0)
    for members in (m for m in groups.values() if len(m) > 1):
        in_train = sum(u == "train" for u, _ in members)
        where = "within_train" if in_train == len(members) else "within_test" if in_train == 0 else "across"
        expected[where] += 1
        expected["conflicting_labels"] += len({y for _, y in members}) > 1
        if where == "across":
            expected["test_with_train_copy"] += len(members) - in_train
    got = report["exact"]["counts"]
    assert {k: got[k] for k in expected} == expected
    assert expected["across"] > 0 and expected["conflicting_labels"] > 0  # FER2013 has both
    near = report["near"]["counts"]
    assert near["test_with_train_copy"] >= got["test_with_train_copy"] and near["faces"] >= got["faces"]
    assert report["blank"]["train"] == int((faces.pixels[faces.usage == "train"].std((1, 2)) < A.BLANK_STD).sum())


def _smooth(rng, n: int) -> np.ndarray:
    """Face-like smooth images (random 6x6 fields, bicubically enlarged): pHash is meaningful on them."""
    small = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((48, 48), Image.Resampling.BICUBIC)) for s in small])


@pytest.fixture
def planted(tmp_path):
    """30 train and 12 test faces with planted duplicates (see the test) and three blank faces."""
    rng = np.random.default_rng(0)
    train, test = _smooth(rng, 30), _smooth(rng, 12)
    y_train, y_test = np.arange(30) % 7, np.arange(12) % 7
    test[0], y_test[0] = train[0], y_train[0]  # exact, across
    test[1], y_test[1] = train[1], (y_train[1] + 1) % 7  # exact, across, labels conflict
    train[5], y_train[5] = train[4], y_train[4]  # exact, within train
    test[2] = np.clip(train[6].astype(int) + rng.integers(-2, 3, (48, 48)), 0, 255).astype(np.uint8)
    y_test[2] = y_train[6]  # near, across
    train[7], test[3], test[4] = 0, 40, 40  # blank faces: identical, left out of the groups
    faces = ([("Training", int(y), x) for y, x in zip(y_train, train)]
             + [("PublicTest" if i % 2 else "PrivateTest", int(y), x) for i, (y, x) in enumerate(zip(y_test, test))])
    return _write_zip(tmp_path / "planted.zip", faces)


def test_planted_duplicates_are_found_and_counted(planted, tmp_path):
    faces = A.read_faces(planted)
    report, _ = A.duplicate_groups(faces)
    exact, near = report["exact"]["counts"], report["near"]["counts"]
    assert (exact["groups"], exact["across"], exact["within_train"], exact["within_test"]) == (3, 2, 1, 0)
    assert (exact["conflicting_labels"], exact["test_with_train_copy"]) == (1, 2)
    assert (near["groups"], near["across"], near["conflicting_labels"], near["test_with_train_copy"]) == (4, 3, 1, 3)
    assert report["blank"] == {"train": 1, "test": 2, "public_test": 1, "private_test": 1}
    conflict = next(g for g in report["exact"]["groups"] if g["conflict"])
    assert sorted(conflict["splits"]) == ["public_test", "train"]

    store = tmp_path / "dups.json"
    found = A.test_duplicates(planted, "near", store=store)
    ids = faces.ids
    test_ids = [i for i, u in zip(ids, faces.usage) if u != "train"]
    assert found == {test_ids[0]: [ids[0]], test_ids[1]: [ids[1]], test_ids[2]: [ids[6]]}
    assert A.test_duplicates(planted, "exact", store=store) == {test_ids[0]: [ids[0]], test_ids[1]: [ids[1]]}
    assert json.loads(store.read_text())["fingerprint"].startswith("sha256:")


def test_near_pairs_agrees_with_brute_force():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64)
    for k, flips in enumerate(([0], [1, 30], [2, 40, 63], [5, 6, 7, 8], [9, 10, 11, 12, 13])):
        hashes[2 * k + 1] = hashes[2 * k] ^ np.uint64(sum(1 << b for b in flips))
    bits = np.unpackbits(hashes.view(np.uint8).reshape(-1, 8), axis=1).astype(int)
    distance = (bits[:, None, :] != bits[None, :, :]).sum(2)
    brute = np.argwhere(np.triu(distance <= A.HASH_BITS, 1))
    assert np.array_equal(A.near_pairs(hashes), brute)
    assert len(brute) >= 4 and [8, 9] not in brute.tolist()  # 5 bits apart: not near


def test_jpeg_quality_is_read_from_the_quantisation_table():
    for quality in (30, 75, 95):
        with Image.open(io.BytesIO(_png(np.full((48, 48), 128, np.uint8), "JPEG", quality=quality))) as im:
            assert A.jpeg_quality(np.asarray(im.quantization[0])) == quality


def test_label_issues_rank_planted_mislabels_and_compare_with_ferplus(tmp_path):
    rng = np.random.default_rng(0)
    n = 700
    y = np.arange(n) % 7
    pixels = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    source = write_fer_csv(tmp_path / "fer2013.csv", pixels, y, ["Training"] * n)
    features = np.eye(7)[y] * 4 + rng.normal(0, 1, (n, 7))  # separable: the head learns the true classes
    wrong = rng.choice(n, 20, replace=False)
    given = y.copy()
    given[wrong] = (y[wrong] + 3) % 7
    write_fer_csv(source, pixels, given, ["Training"] * n)
    votes = tmp_path / "fer2013new.csv"  # FER+ majority: the true class
    order = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear"]
    with open(votes, "w") as f:
        f.write("Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n")
        for i, c in enumerate(y):
            v = [0] * 10
            v[order.index({0: "anger", 1: "disgust", 2: "fear", 3: "happiness", 4: "sadness", 5: "surprise",
                           6: "neutral"}[int(c)])] = 10
            f.write(f"Training,fer{i:07d}.png,{','.join(map(str, v))}\n")
    faces = A.read_faces(source)
    result = A.label_issues(faces, features, ferplus=votes)
    rows = [int(r["id"].rsplit(":", 1)[1]) - 2 for r in result["ranked"]]
    assert len(set(rows[:20]) & set(wrong.tolist())) >= 16  # the planted mislabels rank first
    assert len(set(rows) & set(wrong.tolist())) >= 18
    fp = result["ferplus"]  # FER+ relabelled exactly the planted faces
    assert fp["flagged"] == len(rows) and fp["relabelled_among_flagged"] > 10 * fp["relabelled_among_rest"]


def test_missing_extra_is_one_line_naming_it(planted, monkeypatch):
    monkeypatch.setitem(sys.modules, "imagehash", None)
    with pytest.raises(UserError, match=r"fercache\[audit\]"):
        A.audit(planted)


def test_cli_json_and_html(planted, tmp_path):
    done = cli("audit", "--data", planted, "--out", tmp_path / "audit", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) >= {"splits", "shift", "duplicates"} and isinstance(report["shift"]["flagged"], bool)
    assert report["duplicates"]["exact"]["counts"]["across"] == 2
    assert set(report["duplicates"]["near"]["counts"]) >= {"within_train", "within_test", "across", "conflicting_labels"}
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and "http" not in page.replace("http-equiv", "")
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["splits"]["train"]["count"] == 30


def test_cli_missing_file_is_exit_2(tmp_path):
    done = cli("audit", "--data", tmp_path / "nowhere.zip")
    assert done.returncode == 2 and done.stderr.startswith("fercache: error:") and "Traceback" not in done.stderr


def _in_process(*args: object):
    """The CLI in this process (a subprocess would import torch again): its exit code and output."""
    from typer.testing import CliRunner

    from fercache.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _zip_of(path: Path, members: dict[str, np.ndarray]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, pixels in members.items():
            z.writestr(name, _png(pixels))
    return path


def test_audit_of_a_generic_folder_takes_its_classes_and_colour_files(tmp_path):
    """`audit --classes` on a `<split>/<class>/` folder of colour images (not 48x48): read as the user
    named its classes, the files described as stored, the copy across train and test found, and the
    faces shown in colour."""
    rng = np.random.default_rng(5)
    colour = [np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (40, 56), Image.Resampling.BICUBIC)) for _ in range(16)]
    members = {f"{split}/{'ab'[k % 2]}/{k}.png": colour[k] for k in range(15)
               for split in ["train" if k < 10 else "test"]}
    members["train/b/copy.png"] = members["test/b/11.png"]
    path = _zip_of(tmp_path / "mine.zip", members)
    done = _in_process("audit", "--data", path, "--classes", "b,a", "--out", tmp_path / "audit", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.output[done.output.index("{"):])
    assert report["source"]["dataset"] == "folders" and report["source"]["classes"] == ["b", "a"]
    assert report["splits"]["train"]["files"]["modes"] == {"RGB": 11}
    assert report["splits"]["test"]["files"]["sizes"] == {"40x56": 5}
    exact = report["duplicates"]["exact"]
    assert (exact["counts"]["across"], exact["counts"]["test_with_train_copy"]) == (1, 1)
    assert sorted(exact["groups"][0]["ids"]) == ["test/b/11.png", "train/b/copy.png"]
    assert exact["groups"][0]["labels"] == ["b", "b"]
    page = (tmp_path / "audit" / "audit.html").read_text()
    for id_ in exact["groups"][0]["ids"]:  # shown as stored: in colour, 40x56
        png = re.search(rf'alt="{id_}" src="data:image/png;base64,([^"]+)"', page)[1]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))), members[id_])
    missing = _in_process("audit", "--data", path, "--out", tmp_path / "none")  # (`main` makes a UserError exit 2)
    assert isinstance(missing.exception, UserError) and "--classes a,b,c" in str(missing.exception)


def _ckplus_like(tmp_path: Path, subjects: int = 6) -> tuple[Path, str, str]:
    """CK+48's layout (no split; subject in the name): per subject and class two frames a pixel apart;
    one subject's anger frame copied as another's. Returns the zip and the two copied ids."""
    rng = np.random.default_rng(7)
    members = {}
    for s in range(subjects):
        for cls in ("anger", "happy", "surprise"):
            frame = _smooth(rng, 1)[0]
            near = frame.copy()
            near[24, 24] ^= 1
            members[f"CK+48/{cls}/S{100 + s:03d}_001_00000011.png"] = frame
            members[f"CK+48/{cls}/S{100 + s:03d}_001_00000012.png"] = near
    members["CK+48/anger/S103_002_00000009.png"] = members["CK+48/anger/S100_001_00000011.png"]
    return _zip_of(tmp_path / "ck.zip", members), "anger/S100_001_00000011.png", "anger/S103_002_00000009.png"


def test_audit_without_a_split_says_so_and_counts_groups_across_subjects(tmp_path):
    from fercache.extract import extract

    path, original, copy = _ckplus_like(tmp_path)
    report = A.audit(path, out=tmp_path / "audit", dataset="ckplus48")
    assert not report["shift"]["flagged"] and report["shift"]["comparisons"] == []
    assert report["shift"]["verdict"].startswith("no shift test: ckplus48 has no train/test split")
    exact, near = report["duplicates"]["exact"], report["duplicates"]["near"]
    assert exact["counts"] == {"groups": 1, "within": 1, "across_subjects": 1, "conflicting_labels": 0, "faces": 2}
    assert exact["groups"][0]["subjects"] == ["S100", "S103"] and sorted(exact["groups"][0]["ids"]) == [original, copy]
    # each subject's frame pairs (18), the copied frame joining S100's anger pair
    assert (near["counts"]["groups"], near["counts"]["across_subjects"], near["counts"]["faces"]) == (18, 1, 37)
    assert "across" not in near["counts"] and "test_with_train_copy" not in near["counts"]
    lines = "\n".join(A.summary_lines(report))
    assert "no copies across splits" in lines and "across_subjects" in lines and "within_test" not in lines
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert "Near duplicates across subjects: 1 groups" in page and "<th>comparison</th>" not in page

    # with a cache of it, and no --dataset: read as the cache was made; label errors among all faces,
    # folds keeping each subject's faces together
    cache = tmp_path / "ck.h5"
    extract(path, "all", "pixels", cache=cache, dataset="ckplus48", progress=False)
    done = _in_process("audit", "--cache", cache, "--out", tmp_path / "cached")
    assert done.exit_code == 0, done.output
    assert "of 37 all faces" in done.output and "folds by subject" in done.output
    report = json.loads((tmp_path / "cached" / "audit.json").read_text())
    assert report["source"]["dataset"] == "ckplus48" and report["source"]["path"] == str(path)
    assert report["label_issues"]["among"] == "all" and report["label_issues"]["by_subject"]


@pytest.mark.parametrize("name, dataset, files", [("ckplus48.zip", "ckplus48", {"PNG": 981}),
                                                  ("jaffe.zip", "jaffe", {"TIFF": 213})])
def test_audit_of_the_real_unsplit_datasets(name, dataset, files, tmp_path):
    from conftest import REAL_ZIP

    path = REAL_ZIP.parent / name
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    report = A.audit(path, out=tmp_path, dataset=dataset)
    assert report["source"]["dataset"] == dataset and list(report["splits"]) == ["all"]
    assert report["splits"]["all"]["files"]["formats"] == files
    assert report["shift"]["verdict"].startswith(f"no shift test: {dataset} has no train/test split")
    counts = report["duplicates"]["near"]["counts"]
    assert set(counts) == {"groups", "within", "across_subjects", "conflicting_labels", "faces"}
    assert counts["groups"] == counts["within"] > counts["across_subjects"] > 0
    page = (tmp_path / "audit.html").read_text()
    assert ("<img class=smooth" in page) == (dataset == "jaffe")  # 256x256 TIFFs shrunk smoothly; CK+48 is 48x48
