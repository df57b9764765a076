"""Stage-one speed and memory, measured side by side in one run (absolute times here are noisy).

    python bench/extract.py [--data ../shared/data/fer2013.zip] [--images 2048|all] [--device cpu|cuda]
                            [--dtype float32,int8] [--simulate-avx2]

Uses the real ViT-B/32 architecture with random weights (cost does not depend on the weight
values) saved to a temporary folder, and the same real FER2013 images for every contender (the
first N train images in fercache's order, or with `--images all` all 35,887 of train and test):
1. the reference path: a plain script that decodes with PIL, runs `CLIPImageProcessor` and a
   `CLIPVisionModel` (float32, or `--reference-dtype`, on the same device) in a loop; process
   start to exit;
2. `fercache extract`, each of `--dtype`'s contenders one after another (`DTYPE` or
   `DTYPE@RUNTIME`; default `auto,int8,float32@torch`: the default path, int8 and torch's eager
   float32), process start to exit, its throughput inside the model and the int8 fidelity it
   measured. An ONNX Runtime graph is built once per model (`fercache.onnxrt`): a first untimed
   run of one image builds it, and its build time is printed apart;
3. the device's own matmul peak (bf16 and fp32: the CPU's, or on CUDA the GPU's), so the
   model's achieved FLOP/s has a yardstick;
4. on CUDA (or with `--profile`): `fercache.extract.extract` once more in this process under
   torch.profiler, for the share of the encode loop the GPU is busy (kernels and copies, from the
   first kernel to the last event) and the loop's FLOP/s against the bf16 peak;
5. peak RSS of `fercache extract` for a small and a large number of images (flat is the goal).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import SIMULATED_AVX2, cpu_name, mlas_peak  # noqa: E402  (bench/cpu.py, beside this file)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fer2013.zip"

REFERENCE = textwrap.dedent("""
    import sys, zipfile, io, torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel
    data, model_dir, names, bs, device, dtype = sys.argv[1:7]
    z = zipfile.ZipFile(data)
    names, bs, dtype = open(names).read().split("\\n"), int(bs), getattr(torch, dtype)
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    model = CLIPVisionModel.from_pretrained(model_dir, dtype=dtype).eval().to(device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(names), bs):
            images = [Image.open(io.BytesIO(z.read(m))).convert("RGB") for m in names[i:i + bs]]
            x = processor(images=images, return_tensors="pt")["pixel_values"]
            out.append(model(pixel_values=x.to(device, dtype)).pooler_output.float().cpu())
    print(torch.cat(out).shape)
""")


def vit_b32_flops(image_size: int = 224, patch: int = 32, d: int = 768, layers: int = 12, mlp: int = 3072) -> float:
    """Forward FLOPs per image (2 per multiply-add) of CLIP ViT-B/32's vision tower."""
    t = (image_size // patch) ** 2 + 1
    embed = 2 * (t - 1) * (3 * patch * patch) * d
    per_layer = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * mlp
    return embed + layers * per_layer


def matmul_peak(dtype: torch.dtype, device: str = "cpu") -> float:
    """GFLOP/s of a large square matmul on `device` (the best of a few timed runs)."""
    cuda = device.startswith("cuda")
    n, reps = (8192, 20) if cuda else (2048, 5)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    for _ in range(3):
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def gpu_busy(prof) -> tuple[float, float]:
    """(seconds the GPU was busy, seconds of the encode loop on the GPU) in a profile.

    The loop starts at the first kernel: before it the GPU only receives copies (the weights,
    the resize matrices); it ends with the last event (the last batch's features copied back).
    Busy is the union of kernel and copy intervals within it, so overlapping streams count once.
    """
    from torch.autograd import DeviceType

    events = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
              if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    kernels = [start for start, _, name in events if not name.startswith(("Memcpy", "Memset"))]
    if not kernels:
        return 0.0, 0.0
    first = min(kernels)
    spans = sorted((max(start, first), end) for start, end, _ in events if end > first)
    busy, (lo, hi) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > hi:
            busy, lo = busy + hi - lo, start
        hi = max(hi, end)
    return (busy + hi - lo) / 1e6, (hi - first) / 1e6


def profiled(data: Path, model_dir: Path, split: str, limit: int | None, device: str, dtype: str,
             batch_size: int | None, cache: Path) -> tuple[float, float, float]:
    """`fercache.extract.extract` in this process under torch.profiler: (busy s, loop s, encode s).

    The loop's span is the GPU's (see `gpu_busy`: preprocessing, model, copies); `encode s`
    is the rate fercache itself reports (decode, encode and commit of the splits).
    """
    from torch.profiler import ProfilerActivity, profile

    from fercache.extract import extract

    activities = [ProfilerActivity.CUDA] if device.startswith("cuda") else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        summaries = extract(data, split, str(model_dir), device=device, dtype=dtype, batch_size=batch_size,
                            limit=limit, cache=cache, progress=False)
    busy, span = gpu_busy(prof)
    return busy, span, sum(s.seconds for s in summaries)


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
    parser.add_argument("--images", default="2048", help="N (the first N train images) or all (train and test)")
    parser.add_argument("--batch-size", type=int, default=None, help="fercache's [default: its own per device]")
    parser.add_argument("--reference-batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto,int8,float32@torch",
                        help="fercache's contenders, one by one: DTYPE or DTYPE@RUNTIME (auto, torch, onnxruntime)")
    parser.add_argument("--simulate-avx2", action="store_true",
                        help="run everything as on an AVX2-only CPU (see bench/cpu.py for what honours it)")
    parser.add_argument("--reference-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--memory", default="512,8192", help="image counts for the peak-RSS runs ('' skips)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="the profiled run for GPU busy share [default: on for CUDA]")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    if args.simulate_avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":  # before torch picks its kernels
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **SIMULATED_AVX2})
    if not args.data.exists():
        sys.exit(f"{args.data}: FER2013 zip not found (pass --data)")

    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from fercache.data import open_source

    tmp = Path(tempfile.mkdtemp(prefix="fercache-bench-"))
    os.environ["FERCACHE_GRAPHS"] = str(tmp / "graphs")  # the children's graphs, built here, not in ~/.cache
    model_dir = tmp / "vit-b32-random"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig()).save_pretrained(model_dir)
    CLIPImageProcessor().save_pretrained(model_dir)
    flops = vit_b32_flops()
    split, limit = ("all", None) if args.images == "all" else ("train", int(args.images))
    entries = open_source(args.data).select(split)[:limit]
    n = len(entries)
    names = tmp / "names.txt"  # the reference reads exactly the images fercache encodes
    names.write_text("\n".join(str(e.ref) for e in entries))
    ours_batch = ["--batch-size", str(args.batch_size)] if args.batch_size else []

    rows = []
    # emulated bf16 under a simulated AVX2 CPU runs ATen's scalar fallback: minutes for a yardstick nobody uses
    peak_bf16 = float("nan") if args.simulate_avx2 else matmul_peak(torch.bfloat16, args.device)
    peak_fp32 = matmul_peak(torch.float32, args.device)
    mlas = 0.0 if args.device.startswith("cuda") else mlas_peak()  # MKL, behind torch's matmul, lags on AMD chips
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"this CPU, {torch.get_num_threads()} threads"
    print(f"matmul peak on {where}: bf16 {peak_bf16:,.0f} GFLOP/s, fp32 {peak_fp32:,.0f} GFLOP/s "
          f"(ratio {peak_bf16 / peak_fp32:.2f})" + (f"; ONNX Runtime's fp32 MatMul {mlas:,.0f} GFLOP/s (not capped by "
                                                     "--simulate-avx2)" if mlas else ""), flush=True)
    peak_fp32 = max(peak_fp32, mlas)

    if not args.skip_reference:
        ref_s, ref_rss, _ = timed([sys.executable, "-c", REFERENCE, str(args.data), str(model_dir), str(names),
                                   str(args.reference_batch_size), args.device, args.reference_dtype])
        rows.append((f"reference (processor + {args.reference_dtype} model)", ref_s, n / ref_s, ref_rss))
        print(f"reference path: {ref_s:.1f} s", flush=True)

    dtypes = args.dtype.split(",")

    def ours(count: int | None, cache: Path, model: Path = model_dir, dtype: str = dtypes[0]
             ) -> tuple[float, int, str]:
        dtype, _, runtime = dtype.partition("@")
        return timed([sys.executable, "-m", "fercache", "extract", "--data", str(args.data), "--split", split,
                      "--model", str(model), "--device", args.device, "--dtype", dtype, *ours_batch,
                      *(["--runtime", runtime] if runtime else []),
                      *(["--limit", str(count)] if count else []), "--cache", str(cache)])

    inside = {}  # contender -> (img/s inside fercache, what `info` says it ran, its int8 fidelity line if any)
    for dtype in dtypes:
        build_s, _, output = ours(1, tmp / f"warm-{dtype}.h5", dtype=dtype)  # builds its graph, if it has one
        if "building the ONNX Runtime graph" in output:
            print(f"{dtype}: ONNX Runtime graph built once for this model in {build_s:.1f} s (process start to exit, "
                  "one image)", flush=True)
        our_s, our_rss, output = ours(limit, tmp / f"ours-{dtype}.h5", dtype=dtype)
        # each split's summary: "<split>: N images -> D-d in S s (R img/s) -> cache"
        encode_s = sum(int(count.replace(",", "")) / float(rate)
                       for count, rate in re.findall(r"^\w+: ([\d,]+) images.*\(([\d.]+) img/s\)", output, re.M))
        rows.append((f"fercache extract (--dtype {dtype})", our_s, n / our_s, our_rss))
        info = timed([sys.executable, "-m", "fercache", "info", str(tmp / f"ours-{dtype}.h5")])[2]
        ran = re.search(r"preprocessing, ([^,]+),", info)
        inside[dtype] = (n / encode_s, ran.group(1) if ran else "?",
                         next((line for line in info.splitlines() if "fidelity" in line), ""))

    simulated = " (SIMULATED AVX2-only CPU: " + " ".join(f"{k}={v}" for k, v in SIMULATED_AVX2.items()) + ")"
    print(f"\n{n:,} real FER2013 images, ViT-B/32 architecture (random weights), device {args.device} on "
          f"{cpu_name()}{simulated if args.simulate_avx2 else ''}; wall time from process start to exit:")
    print(f"{'path':<48}{'seconds':>9}{'img/s':>9}{'peak RSS MiB':>14}")
    for name, s, rate, rss in rows:
        print(f"{name:<48}{s:>9.1f}{rate:>9.1f}{rss:>14,}")
    for (name, s, _, _), (dtype, (rate, ran, fidelity)) in zip(rows[-len(dtypes):], inside.items()):
        if not args.skip_reference:
            print(f"speed-up end to end, --dtype {dtype} (ran as {ran}): {ref_s / s:.2f}x")
        achieved = rate * flops / 1e9
        bf16 = "" if math.isnan(peak_bf16) else f"{achieved / peak_bf16:.1%} of the bf16 matmul peak, "
        print(f"inside fercache --dtype {dtype} (decode, encode, commit): {rate:,.1f} img/s x {flops / 1e9:.2f} "
              f"GFLOP/img = {achieved:,.0f} GFLOP/s = {bf16}{achieved / peak_fp32:.1%} of the fp32 peak"
              + (f"; {fidelity}" if fidelity else ""))

    if args.profile if args.profile is not None else args.device.startswith("cuda"):
        busy, span, _ = profiled(args.data, model_dir, split, limit, args.device, dtypes[0], args.batch_size,
                                 tmp / "profiled.h5")
        if span:
            loop = n * flops / span / 1e9
            print(f"encode loop under the profiler: {span:.2f} s on the GPU, first kernel to last; GPU busy "
                  f"{busy / span:.0%} of it; {loop:,.0f} GFLOP/s = {loop / peak_bf16:.1%} of the bf16 matmul peak")
        else:
            print("profiled run: no GPU kernels recorded (not a CUDA device)")

    counts = [int(c) for c in args.memory.split(",") if c]
    if counts:
        print("\npeak RSS of `fercache extract` by number of images (tiny random model, so it runs in minutes):")
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import save_tiny_clip
        tiny = save_tiny_clip(tmp / "tiny")
        split = "train"
        for count in counts:
            s, rss, _ = ours(count, tmp / f"mem{count}.h5", tiny)
            print(f"{count:>8,} images: {rss:>6,} MiB peak RSS ({s:.1f} s)")


if __name__ == "__main__":
    main()
