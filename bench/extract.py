"""Stage-one speed and memory, measured side by side in one run (absolute times here are noisy).

    python bench/extract.py [--data ../shared/data/fer2013.zip] [--images 2048] [--device cpu]

Uses the real ViT-B/32 architecture with random weights (cost does not depend on the weight
values) saved to a temporary folder, and the same real FER2013 images for every contender:
1. the reference path: a plain script that decodes with PIL, runs `CLIPImageProcessor` and a
   float32 `CLIPVisionModel` (on the same device) in a loop; process start to exit;
2. `fercache extract` (dtype auto), process start to exit, and its throughput inside the model;
3. this machine's matmul peak (bf16 and fp32), so the model's achieved GFLOP/s has a yardstick;
4. peak RSS of `fercache extract` for a small and a large number of images (flat is the goal).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fer2013.zip"

REFERENCE = textwrap.dedent("""
    import sys, zipfile, io, torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel
    data, model_dir, n, bs, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    z = zipfile.ZipFile(data)
    names = sorted(i.filename for i in z.infolist() if i.filename.startswith("train/") and not i.is_dir())[:n]
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    model = CLIPVisionModel.from_pretrained(model_dir).eval().to(device)
    out = []
    with torch.inference_mode():
        for i in range(0, n, bs):
            images = [Image.open(io.BytesIO(z.read(m))).convert("RGB") for m in names[i:i + bs]]
            x = processor(images=images, return_tensors="pt")["pixel_values"]
            out.append(model(pixel_values=x.to(device)).pooler_output.cpu())
    print(torch.cat(out).shape)
""")


def vit_b32_flops(image_size: int = 224, patch: int = 32, d: int = 768, layers: int = 12, mlp: int = 3072) -> float:
    """Forward FLOPs per image (2 per multiply-add) of CLIP ViT-B/32's vision tower."""
    t = (image_size // patch) ** 2 + 1
    embed = 2 * (t - 1) * (3 * patch * patch) * d
    per_layer = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * mlp
    return embed + layers * per_layer


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (MiB) and output of one child process, from start to exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{output[-2000:]}")
    return seconds, usage.ru_maxrss // 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory", default="512,8192", help="image counts for the peak-RSS runs ('' skips)")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data}: FER2013 zip not found (pass --data)")

    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tmp = Path(tempfile.mkdtemp(prefix="fercache-bench-"))
    model_dir = tmp / "vit-b32-random"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig()).save_pretrained(model_dir)
    CLIPImageProcessor().save_pretrained(model_dir)
    flops = vit_b32_flops()

    rows = []
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"matmul peak on this machine ({torch.get_num_threads()} threads): bf16 {peak_bf16:.0f} GFLOP/s, "
          f"fp32 {peak_fp32:.0f} GFLOP/s (ratio {peak_bf16 / peak_fp32:.2f})")

    n = args.images
    if not args.skip_reference:
        ref_s, ref_rss, _ = timed([sys.executable, "-c", REFERENCE, str(args.data), str(model_dir), str(n),
                                   str(args.batch_size), args.device])
        rows.append(("reference (processor + fp32 model)", ref_s, n / ref_s, ref_rss))
        print(f"reference path: {ref_s:.1f} s", flush=True)

    def ours(limit: int, cache: Path, dtype: str = "auto") -> tuple[float, int, str]:
        return timed([sys.executable, "-m", "fercache", "extract", "--data", str(args.data), "--split", "train",
                      "--model", str(model_dir), "--device", args.device, "--dtype", dtype, "--limit", str(limit),
                      "--batch-size", str(args.batch_size), "--cache", str(cache)])

    our_s, our_rss, output = ours(n, tmp / "ours.h5")
    summary = [line for line in output.splitlines() if line.startswith("train:")][-1]
    inside = float(summary.split("(")[1].split(" img/s")[0])
    rows.append(("fercache extract (dtype auto)", our_s, n / our_s, our_rss))

    print(f"\n{n:,} real FER2013 images, ViT-B/32 architecture (random weights), batch {args.batch_size}, "
          f"device {args.device}; wall time from process start to exit:")
    print(f"{'path':<38}{'seconds':>9}{'img/s':>9}{'peak RSS MiB':>14}")
    for name, s, rate, rss in rows:
        print(f"{name:<38}{s:>9.1f}{rate:>9.1f}{rss:>14,}")
    if not args.skip_reference:
        print(f"speed-up end to end: {ref_s / our_s:.2f}x")
    achieved = inside * flops / 1e9
    print(f"inside fercache: {inside:.1f} img/s x {flops / 1e9:.2f} GFLOP/img = {achieved:.0f} GFLOP/s = "
          f"{achieved / peak_bf16:.0%} of the bf16 matmul peak, {achieved / peak_fp32:.0%} of the fp32 peak")

    counts = [int(c) for c in args.memory.split(",") if c]
    if counts:
        print("\npeak RSS of `fercache extract` by number of images (tiny random model, so it runs in minutes):")
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import save_tiny_clip
        tiny = save_tiny_clip(tmp / "tiny")
        for count in counts:
            s, rss, _ = timed([sys.executable, "-m", "fercache", "extract", "--data", str(args.data), "--split", "train",
                               "--model", str(tiny), "--device", args.device, "--limit", str(count),
                               "--cache", str(tmp / f"mem{count}.h5")])
            print(f"{count:>8,} images: {rss:>6,} MiB peak RSS ({s:.1f} s)")


if __name__ == "__main__":
    main()
