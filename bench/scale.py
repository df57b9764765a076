"""Stage one at AffectNet's scale: peak memory of indexing and of a limited extract, at two dataset sizes.

    python bench/scale.py [--faces 290000] [--extract 5000] [--folder /tmp/fercache-scale]

Writes a synthetic dataset in AffectNet's class-index layout (`train_set|val_set/<0..7>/<n>.png`)
as a zip of tiny distinct PNGs (16x16 colour: the layout and the count are what indexing sees;
decoding cost per image is not the point), once at `--faces` and once at a tenth of it. Then, each
in a fresh process, measures the peak RSS of indexing it (`datasets.open_dataset`) and of
`fercache extract --model pixels --limit N` on its train split (index, decode, encode, write the
part file, commit). What should hold: extracting N images costs the same memory whatever the
dataset's size beyond its index (decoding streams in bounded chunks, rows go to disk batch by
batch); the index itself grows with the number of faces, at a few hundred bytes each.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

AFFECTNET_VAL = 4000  # AffectNet's validation set: 500 per class


def make_dataset(path: Path, faces: int, seed: int = 0) -> Path:
    """`faces` tiny PNGs in AffectNet's class-index layout, in one zip (stored: PNG is compressed already)."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    val = min(AFFECTNET_VAL, faces // 10)
    tmp = path.with_suffix(".partial")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for i in range(faces):
            split = "val_set" if i < val else "train_set"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            z.writestr(f"{split}/{i % 8}/{i:07d}.png", buf.getvalue())
    tmp.rename(path)
    return path


PROBE = """
import json, resource, sys, time
start = time.perf_counter()
if sys.argv[1] == "index":
    from fercache.datasets import open_dataset
    source = open_dataset(sys.argv[2])
    done = {"faces": len(source.entries)}
else:
    from fercache.extract import extract
    s = extract(sys.argv[2], "train", "pixels", cache=sys.argv[3], limit=int(sys.argv[4]), progress=False, force=True)
    done = {"faces": s[0].count}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
print(json.dumps({**done, "peak_rss_mib": round(peak, 1), "seconds": round(time.perf_counter() - start, 2)}))
"""


def measure(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", type=int, default=290_000)
    parser.add_argument("--extract", type=int, default=5_000)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/fercache-scale"))
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    baseline = measure("index", str(make_dataset(args.folder / "tiny.zip", 80)))
    rows = []
    for faces in (args.faces // 10, args.faces):
        start = time.perf_counter()
        data = make_dataset(args.folder / f"affectnet-{faces}.zip", faces)
        made = time.perf_counter() - start
        index = measure("index", str(data))
        extract = measure("extract", str(data), str(args.folder / f"cache-{faces}.h5"), str(args.extract))
        rows.append({"faces": faces, "zip_mib": round(data.stat().st_size / 2**20, 1), "made_s": round(made, 1),
                     "index": index, "extract": extract})
        print(json.dumps(rows[-1]), flush=True)
    print(f"python + fercache imported, an 80-face index: {baseline['peak_rss_mib']} MiB peak RSS")
    for r in rows:
        print(f"{r['faces']:>9,} faces ({r['zip_mib']} MiB zip): index {r['index']['peak_rss_mib']} MiB in "
              f"{r['index']['seconds']} s; extract {r['extract']['faces']:,} -> {r['extract']['peak_rss_mib']} MiB "
              f"in {r['extract']['seconds']} s")


if __name__ == "__main__":
    main()
