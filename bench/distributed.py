"""Stage one under torchrun on one CPU machine: 2 ranks x 1 thread against 1 process x 2 threads.

    python bench/distributed.py [--data ../shared/data/fer2013.zip] [--images 512] [--repeats 2]

The same cores either way; what differs is how they are used: one process with two intra-op
threads, or two processes (gloo) each encoding half the batches with one thread. Uses the real
ViT-B/32 architecture with random weights (cost does not depend on the weight values) saved to a
temporary folder, float32, the first `--images` test images of the real FER2013. Reports process
start to exit (what a user waits for: for torchrun, the launcher, rendezvous and two Python starts
included) and the throughput fercache reports inside (decoding and encoding of the split). Each
contender runs `--repeats` times, alternating; the best time counts (others share this machine).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fer2013.zip"


def save_vit_b32(folder: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig()).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


def run(launcher: list[str], threads: int, args: list[str]) -> tuple[float, float]:
    """Seconds from process start to exit, and the img/s fercache reports."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "fercache", "extract", *args, "--force"], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed: {' '.join(launcher)}\n{done.stderr[-2000:]}")
    return seconds, float(re.search(r"\(([\d.]+) img/s\)", done.stdout)[1])


def main() -> None:
    from fercache.report import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    if not opts.data.exists():
        sys.exit(f"{opts.data}: no FER2013 zip here; pass --data")

    contenders = {
        "1 process x 2 threads": ([sys.executable], 2),
        "torchrun: 2 ranks x 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc-per-node", "2"], 1),
    }
    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_vit_b32(Path(tmp) / "vit-b32")
        for r in range(opts.repeats):
            for name, (launcher, threads) in contenders.items():
                args = ["--data", str(opts.data), "--split", "test", "--limit", str(opts.images),
                        "--model", str(model), "--dtype", "float32", "--device", "cpu",
                        "--batch-size", str(opts.batch_size), "--cache", str(Path(tmp) / f"{r}-{threads}.h5")]
                seconds, rate = run(launcher, threads, args)
                print(f"  {name}: {seconds:.1f} s end to end, {rate:.1f} img/s inside", flush=True)
                best[name] = min(best.get(name, (seconds, rate)), (seconds, rate), key=lambda t: t[0])
    base_s, base_rate = best["1 process x 2 threads"]
    rows = [[name, f"{s:.1f}", f"{rate:.1f}", f"{base_s / s:.2f}x", f"{rate / base_rate:.2f}x"]
            for name, (s, rate) in best.items()]
    print(f"\n{opts.images} test images, ViT-B/32 (random weights) float32 on CPU, batch {opts.batch_size}, "
          f"{os.cpu_count()} cores, best of {opts.repeats}:")
    print(format_table(["contender", "end to end s", "img/s inside", "speed-up (end to end)",
                        "speed-up (inside)"], rows))


if __name__ == "__main__":
    main()
