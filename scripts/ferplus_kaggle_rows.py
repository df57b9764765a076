"""Derive the table that joins FER+ votes to FER2013's Kaggle JPEG layout: Kaggle file -> fer2013.csv row.

The Kaggle layout (`train/<class>/Training_<n>.jpg`, ...) names faces by numbers that are not row
numbers, so the join is made by pixels: FER+'s `images.zip` holds each named row of `fer2013.csv`
as a lossless PNG (`fer2013new.csv` says which row each PNG name is), and each Kaggle JPEG is one of
those faces after lossy compression (1-2 gray levels apart). Each JPEG is matched, within its usage,
to the PNG nearest in pixels; a match is kept when it is close (mean absolute difference under
MATCH) and unique: no other distinct face within MARGIN of it. FER2013 holds many faces twice (or
more) with the same pixels: k Kaggle files matching k identical rows are paired in name order. Any
pairing gives the same faces, not necessarily the same votes: identical rows are separate fer2013.csv rows,
each with FER+ votes of its own, so where they differ a file gets one of its copies' votes, chosen by
name order, not by what its annotators saw. The script counts those faces: none with the real data,
whose identical rows all carry identical votes except two rows that share one FER+ file name (left
out below). If the counts differ (one of the copies is a row FER+ gave no image), none is kept.
Rows without a PNG (FER+ found no face there) cannot be matched by pixels. Kaggle numbers do not
follow row order (Spearman ~0), so order cannot break ties.

    python scripts/ferplus_kaggle_rows.py ../shared/data/fer2013.zip ../shared/data/ferplus [--out fercache/ferplus_kaggle_rows.csv.xz]

Writes `<split>/<class>/<file stem>,row` lines (xz; the stem alone is not unique: two Kaggle names
occur in two class folders) and prints how many faces matched, which were ambiguous and why.
"""

from __future__ import annotations

import argparse
import lzma
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
from sklearn.neighbors import NearestNeighbors

from fercache.data import USAGES, open_source
from fercache.datasets import read_ferplus_votes

DIFFERING = "of the matched, in a group of identical faces whose rows' FER+ votes differ (paired by name order)"
MATCH = 4.0  # mean absolute gray-level difference under which a JPEG is that PNG's face
MARGIN = 0.5  # the nearest face must be this much nearer than the next distinct one
BLOCK = 6  # 48x48 -> 8x8 block means for the nearest-neighbour search


def png_faces(ferplus: Path) -> tuple[dict[int, np.ndarray], dict[int, str], dict[int, tuple[int, ...]]]:
    """fer2013.csv row -> its FER+ PNG pixels, row -> usage and row -> FER+ votes, from images.zip and
    fer2013new.csv."""
    rows = read_ferplus_votes(ferplus / "fer2013new.csv")
    usage = {i: USAGES[u] for i, (u, _, _) in enumerate(rows)}
    votes = {i: v for i, (_, _, v) in enumerate(rows)}
    by_name = defaultdict(list)
    for i, (_, name, _) in enumerate(rows):
        if name:
            by_name[name].append(i)
    faces = {}
    with zipfile.ZipFile(ferplus / "images.zip") as z:
        for member in z.namelist():
            name = member.rsplit("/", 1)[-1]
            for i in by_name.get(name, []):  # a name given to two rows: both rows get its pixels (ambiguous)
                faces[i] = cv2.imdecode(np.frombuffer(z.read(member), np.uint8), cv2.IMREAD_GRAYSCALE)
    return faces, usage, votes


def blocks(pixels: np.ndarray) -> np.ndarray:
    n = len(pixels)
    return pixels.reshape(n, 48 // BLOCK, BLOCK, 48 // BLOCK, BLOCK).mean(axis=(2, 4)).reshape(n, -1)


def match(kaggle_zip: Path, ferplus: Path) -> tuple[dict[str, int], Counter, list[str]]:
    """Kaggle file name -> row, the counts of faces left out by reason, and one note per face left out."""
    faces, usage, votes = png_faces(ferplus)
    source = open_source(kaggle_zip)
    table, why, notes = {}, Counter({DIFFERING: 0}), []  # DIFFERING said even when none
    for split in ("train", "public_test", "private_test"):
        jpegs = source.load(split)
        groups = defaultdict(list)  # rows holding the same pixels (FER2013 has many duplicate faces)
        for i in sorted(i for i in faces if usage[i] == split):
            groups[faces[i].tobytes()].append(i)
        keys = list(groups)
        pngs = np.stack([np.frombuffer(k, np.uint8).reshape(48, 48) for k in keys])
        nn = NearestNeighbors(n_neighbors=min(3, len(keys))).fit(blocks(pngs))
        _, near = nn.kneighbors(blocks(jpegs.pixels))
        claims = defaultdict(list)
        for j, cand in enumerate(near):
            mad = np.abs(pngs[cand].astype(np.int16) - jpegs.pixels[j].astype(np.int16)).mean(axis=(1, 2))
            order = np.argsort(mad)
            if mad[order[0]] >= MATCH:
                why["unmatched: no FER+ face within MATCH (the row has no FER+ image: not a face)"] += 1
                notes.append(f"unmatched {jpegs.ids[j]} (nearest MAD {mad[order[0]]:.1f})")
            elif len(order) > 1 and mad[order[1]] < mad[order[0]] + MARGIN:
                why["ambiguous: near-duplicate faces in fer2013.csv that the JPEG cannot tell apart"] += 1
                rows = [r for c in cand[order] if mad[list(cand).index(c)] < MATCH for r in groups[keys[c]]]
                notes.append(f"ambiguous {jpegs.ids[j]}: rows {', '.join(map(str, rows))}")
            else:
                claims[keys[cand[order[0]]]].append(jpegs.ids[j].rsplit(".", 1)[0])
        for key, names in claims.items():
            rows = groups[key]
            if len(names) == len(rows):  # k identical faces, k rows: any pairing gives the same faces
                table.update(zip(sorted(names), rows))
                if len(rows) > 1:
                    why[f"matched as a group of identical faces ({len(rows)} files, {len(rows)} rows)"] += len(rows)
                if len({votes[r] for r in rows}) > 1:  # but not the same votes: name order picks whose
                    why[DIFFERING] += len(rows)
            else:
                why["ambiguous: k identical faces in Kaggle, m != k rows in FER+ (two rows share one FER+ name)"] += len(names)
                notes.append(f"ambiguous {', '.join(names)}: {len(names)} files, rows {', '.join(map(str, rows))}")
    return table, why, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kaggle_zip", type=Path)
    parser.add_argument("ferplus", type=Path, help="folder with fer2013new.csv and images.zip")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "fercache" / "ferplus_kaggle_rows.csv.xz")
    args = parser.parse_args()
    table, why, notes = match(args.kaggle_zip, args.ferplus)
    text = "kaggle,row\n" + "".join(f"{name},{row}\n" for name, row in sorted(table.items()))
    args.out.write_bytes(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME))  # sorted by name: smallest
    print(f"matched {len(table)} Kaggle faces to fer2013.csv rows; wrote {args.out} ({args.out.stat().st_size} bytes)")
    for reason, n in why.most_common():
        print(f"  {n:5d} {reason}")
    for line in notes:
        print("   ", line)


if __name__ == "__main__":
    main()
