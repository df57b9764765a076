"""Commit's peak memory against the split's size: it must stay flat, not grow with the rows.

Builds one finished part file per size (float32 embeddings, 768-d, and ViT-B/32-shaped float16
tokens, 50 x 768: 80 KB a face), then commits it into a cache that already holds another split
(so the carry-over is measured too) and prints the resident memory commit added at its peak
(Linux: VmHWM after resetting it through /proc/self/clear_refs) and Python's own peak
allocations (tracemalloc).

    python bench/commit.py [--rows 2000,8000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from fercache.cache import PartFile, cache_meta, commit, part_path, shard_digest, write_split
from fercache.identity import Identity
from fercache.names import feature_name

TOKENS, DIM = (50, 768), 768
BATCH = 256


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def build_part(cache: Path, meta: dict, rows: int) -> Path:
    """A finished part of `rows` faces, written batch by batch as extract writes it."""
    ids = [f"train/{i}" for i in range(rows)]
    shapes = {feature_name(): (DIM,), feature_name(tokens=True): TOKENS}
    part = PartFile(part_path(cache, "train"), meta, shard_digest(ids), rows, shapes, BATCH)
    rng = np.random.default_rng(0)
    for lo in range(0, rows, BATCH):
        n = min(BATCH, rows - lo)
        part.append(ids[lo:lo + n], np.zeros(n, np.int64), ["train"] * n, lo + n,
                    {feature_name(): rng.standard_normal((n, DIM), np.float32),
                     feature_name(tokens=True): rng.standard_normal((n, *TOKENS), np.float32).astype(np.float16)})
    part.flush(done=True)
    part.close()
    return part.path


def measure(folder: Path, rows: int) -> tuple[float, float, float, float]:
    """(split MB, peak RSS added MB, tracemalloc peak MB, seconds) of one commit."""
    cache = folder / f"c{rows}.h5"
    identity = Identity(model="bench", preprocess="clip", feature="pooler_output", dtype="float32", image_size=224,
                        tokens=1)
    meta = cache_meta(identity, DIM)
    small = 64  # another complete split already in the cache, carried over by the commit
    write_split(cache, "test", meta, [f"test/{i}" for i in range(small)], np.zeros(small, np.int64),
                ["public_test"] * small, {feature_name(): np.zeros((small, DIM), np.float32),
                                          feature_name(tokens=True): np.zeros((small, *TOKENS), np.float16)})
    part = build_part(cache, meta, rows)
    split_mb = part.stat().st_size / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    base = rss_kib("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    commit(cache, "train", [part], meta, {"split": "train", "limit": None, "count": rows})
    seconds = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return split_mb, (rss_kib("VmHWM") - base) / 1024, traced, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2000,8000", help="split sizes, comma-separated")
    args = parser.parse_args()
    print("| rows | split on disk (MB) | commit's peak RSS added (MB) | Python peak, tracemalloc (MB) | seconds |")
    print("|---:|---:|---:|---:|---:|")
    for rows in map(int, args.rows.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            split_mb, rss, traced, seconds = measure(Path(tmp), rows)
        print(f"| {rows:,} | {split_mb:,.0f} | {rss:,.0f} | {traced:,.1f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
