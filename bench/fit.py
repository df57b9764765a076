"""Stage two's speed on a full-size cache: loading, the linear head, logreg's C search, `fercache fit`.

    python bench/fit.py                 # a synthetic cache shaped like CLIP ViT-B/32 on FER2013
    python bench/fit.py --cache PATH    # an extracted cache (train and test)

The synthetic cache has FER2013's shape and class proportions (28,709 train and 7,178 test rows of
768 float32 features, class centres plus noise) and is written through fercache's own cache code.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fercache.cache import cache_meta, load_embeddings, write_split
from fercache.heads import fit_linear
from fercache.identity import Identity
from fercache.logreg import fit_logreg
from fercache.names import CLASSES
from fercache.report import format_table

TRAIN = (3995, 436, 4097, 7215, 4830, 3171, 4965)  # FER2013's per-class counts
TEST = (958, 111, 1024, 1774, 1247, 831, 1233)


def synthetic_cache(path: Path, dim: int = 768) -> Path:
    meta = cache_meta(Identity("synthetic", "none", "synthetic", "float32", image_size=48, source="bench"), dim)
    centres = np.random.default_rng(0).normal(size=(len(CLASSES), dim)).astype(np.float32)
    for seed, (split, counts) in enumerate((("train", TRAIN), ("test", TEST)), 1):
        rng = np.random.default_rng(seed)
        y = rng.permutation(np.repeat(np.arange(len(CLASSES)), counts))
        X = centres[y] * 0.08 + rng.normal(size=(len(y), dim)).astype(np.float32)  # learnable, not trivial
        usage = ["train"] * len(y) if split == "train" else ["public_test", "private_test"] * (len(y) // 2)
        write_split(path, split, meta, [f"{split}/{i}" for i in range(len(y))], y, usage, {"embeddings": X})
    return path


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="an extracted cache [default: a synthetic one]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or synthetic_cache(Path(tmp) / "synthetic.h5")
        t_load, (train, test) = timed(lambda: (load_embeddings(cache, "train"), load_embeddings(cache, "test")))
        t_torch, _ = timed(lambda: importlib.import_module("torch"))  # once per process; not training time
        t_linear, (head, history) = timed(lambda: fit_linear(train.X, train.y, test.X, test.y))
        t_logreg, (lr_head, search) = timed(lambda: fit_logreg(train.X, train.y))
        t_cli, done = timed(lambda: subprocess.run([sys.executable, "-m", "fercache", "fit", "--cache", str(cache),
                                                     "--out", str(Path(tmp) / "run")], capture_output=True))
        if done.returncode:
            sys.exit(done.stderr.decode())
    n, d = train.X.shape
    rows = [
        ["load_embeddings train + test", f"{n:,} + {len(test.y):,} x {d}", t_load, "< 1 s"],
        ["import torch (once per process)", "", t_torch, ""],
        ["linear, 20 epochs", f"test acc {history[-1]['test_acc']:.4f}", t_linear, "< 2 s"],
        ["logreg + C search (one-SE rule)",
         f"C={search['C']:g} ({len(search['validation'])} fits + refit, "
         f"{sum(r['n_iter'] for r in search['validation']) + search['n_iter']} L-BFGS iterations, "
         f"{'all' if search['converged'] and all(r['converged'] for r in search['validation']) else 'NOT all'} "
         f"converged), test acc {lr_head.score(test.X, test.y)[1]:.4f}", t_logreg, "< 60 s"],
        ["`fercache fit` (process start to exit)", "linear, plots and head", t_cli, ""],
    ]
    print(f"cache: {'synthetic' if args.cache is None else cache}")
    print(format_table(["step", "what", "seconds", "target"], rows))


if __name__ == "__main__":
    main()
