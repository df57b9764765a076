#!/usr/bin/env bash
# Stage one on a CUDA GPU, measured in one run: throughput of the ViT-B/32 architecture (CLIPVisionConfig
# defaults, random weights) in bf16 and fp32 at several batch sizes with commit timed apart, then
# bench/extract.py on all 35,887 FER2013 images (fercache against the reference path, GPU busy share,
# FLOP/s against the GPU's own matmul peak). Meant for the device machine (README: "On a GPU"), where
# only the checkout travels and nothing can be fetched:
#
#   bash bench/gpu.sh [--data ZIP] [-- ARGS for bench/extract.py]   # a CUDA GPU: about 4 minutes
#   bash bench/gpu.sh --check [--data ZIP]                           # anywhere: every check, then the
#                                                                    # same steps on the CPU, 64 images
#
# The data is a FER2013 zip inside the checkout, carried with it: --data, else $FERCACHE_BENCH_DATA,
# else the first of shared/data/fer2013.zip, .fer-data/fer2013.zip (and, on this side only,
# ../shared/data/fer2013.zip) that exists. The Python is $PYTHON, else python3: it must already hold
# torch (with CUDA) and fercache's dependencies; fercache itself is installed from this checkout
# without dependencies, index or build isolation (and is imported from it in any case). Everything is
# checked up front; what is missing is said in one line (exit 2) before any GPU time is spent.
set -euo pipefail
cd "$(dirname "$0")/.."
check=0 data=${FERCACHE_BENCH_DATA:-}
while (($#)); do
  case $1 in
    --check) check=1; shift ;;
    --data) data=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "bench/gpu.sh: unknown argument '$1' (--check, --data ZIP, -- ARGS for bench/extract.py)" >&2; exit 2 ;;
  esac
done
if [[ -z $data ]]; then
  for candidate in shared/data/fer2013.zip .fer-data/fer2013.zip ../shared/data/fer2013.zip; do
    [[ -f $candidate ]] && { data=$candidate; break; }
  done
  data=${data:-shared/data/fer2013.zip}
fi
py=${PYTHON:-python3}
start=$SECONDS
stage() { printf '\n[%3d s] %s\n' $((SECONDS - start)) "$*"; }

# --- 1. everything the run needs, checked before it starts ------------------------------------------
missing=()
[[ -f $data ]] || missing+=("the FER2013 zip '$data' (carry it: README, On a GPU; or --data ZIP)")
if ! command -v "$py" >/dev/null; then
  missing+=("a Python ('$py' not found; set PYTHON)")
else
  # one line per missing piece, from a Python that reads each module, the data and the GPU
  while IFS= read -r line; do [[ -n $line ]] && missing+=("$line"); done < <(
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" - "$data" "$check" <<'PY' 2>&1
import importlib, os, shutil, sys, tempfile
data, check = sys.argv[1], sys.argv[2] == "1"
modules = ["torch", "transformers", "huggingface_hub", "numpy", "h5py", "sklearn", "scipy", "typer", "joblib",
           "PIL", "safetensors", "matplotlib", "tqdm", "cv2"]
absent = [m for m in modules if importlib.util.find_spec(m) is None]
if absent:
    print(f"Python packages {', '.join(absent)} (carry them as wheels: README, On a GPU)")
if "transformers" not in absent:
    import transformers
    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (4, 56):
        print(f"transformers >= 4.56 (this Python has {transformers.__version__})")
if not absent:
    try:
        import fercache.extract  # noqa: F401  (from this checkout)
    except Exception as exc:
        print(f"fercache importable from this checkout ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    if os.path.isfile(data):
        try:
            from fercache.data import open_source
            source = open_source(data)
            counts = {s: len(source.select(s)) for s in ("train", "test")}
            if sum(counts.values()) < 64:
                print(f"a full FER2013 zip ('{data}' holds {counts})")
        except Exception as exc:
            print(f"a readable FER2013 zip ('{data}': {str(exc).splitlines()[0]})")
    import torch
    if not check and not torch.cuda.is_available():
        print(f"a CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda})")
free = shutil.disk_usage(tempfile.gettempdir()).free
if free < 2 << 30:
    print(f"2 GiB free in {tempfile.gettempdir()} for the caches ({free / 2**30:.1f} GiB)")
PY
  )
fi
if [[ $check == 1 ]] && command -v git >/dev/null && git rev-parse --git-dir >/dev/null 2>&1; then
  # what a device call would send: the tree git does not ignore, plus the carried zip (64 MiB at most)
  tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -L -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
  zip=$( [[ -f $data ]] && stat -L -c %s -- "$data" || echo 0)
  travel=$(( (tree + zip) / 1048576 ))
  echo "a device call would send about $travel MiB of 64 (the tree $((tree / 1048576)) MiB, the zip $((zip / 1048576)) MiB)"
  ((tree + zip <= 64 * 1048576)) || missing+=("room to carry the zip: the tree and it come to $travel MiB, over 64")
fi
if ((${#missing[@]})); then
  (IFS=';'; echo "bench/gpu.sh: missing:${missing[*]/#/ }" >&2)
  exit 2
fi

# --- 2. fercache installed from this checkout (nothing fetched), the machine described ---------------
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # fercache from this checkout, installed or not
# the model is made here; no progress bars of model loading between the figures
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
install=(-m pip install -q --no-deps --no-build-isolation --no-index)
if [[ $check == 1 ]]; then  # build it the same way, into a scratch folder: the venv here stays as it is
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  "$py" "${install[@]}" --target "$scratch" . && echo "pip install --no-deps --no-build-isolation: builds"
elif ! "$py" "${install[@]}" -e . 2>/tmp/fercache-pip.log; then
  echo "pip install -e . failed ($(tail -n 1 /tmp/fercache-pip.log)); fercache is imported from the checkout"
fi
echo "CPU: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p') ($(nproc) cores)"
command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }
"$py" -c 'import torch, transformers, fercache; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"transformers {transformers.__version__}, fercache from {fercache.__file__}")'
echo "data: $data ($(stat -L -c %s -- "$data") bytes)"

# --- 3. throughput by dtype and batch size, commit apart ---------------------------------------------
if [[ $check == 1 ]]; then device=cpu split=train limit=64 batches=16,32; else device=cuda split=all limit= batches=64,256,1024; fi
stage "stage one by dtype and batch size ($device)"
"$py" - "$data" "$device" "$split" "$limit" "$batches" <<'PY'
import sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
from distributed import save_vit_b32  # bench/distributed.py
from extract import matmul_peak, vit_b32_flops  # bench/extract.py

import fercache.extract as fx

data, device, split, limit, batches = sys.argv[1:]
limit, batches, cuda = int(limit) if limit else None, [int(b) for b in batches.split(",")], device == "cuda"
commits: list[float] = []
commit = fx.commit
def timed_commit(*args, **kwargs):
    began = time.perf_counter()
    try:
        return commit(*args, **kwargs)
    finally:
        commits.append(time.perf_counter() - began)
fx.commit = timed_commit

tmp = Path(tempfile.mkdtemp(prefix="fercache-gpu-"))
torch.manual_seed(0)
model = str(save_vit_b32(tmp / "vit-b32"))
peaks = {dtype: matmul_peak(getattr(torch, dtype), device) for dtype in ("bfloat16", "float32")}
print("matmul peak: " + ", ".join(f"{d} {p:,.0f} GFLOP/s" for d, p in peaks.items()), flush=True)
# warm-up: CUDA context, kernels and library handles, the zip in the page cache
fx.extract(data, "test", model, device=device, dtype="bfloat16", batch_size=64, limit=256, cache=tmp / "warm.h5",
           progress=False)
flops = vit_b32_flops()
header = f"{'dtype':<9}{'batch':>6}{'images':>8}{'wall s':>8}{'img/s':>9}{'commit s':>9}{'img/s w/o commit':>17}" \
         f"{'% of peak':>10}{'GPU GiB':>9}"
print(header, flush=True)
for dtype in ("bfloat16", "float32"):
    for batch in batches:
        commits.clear()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        cache = tmp / f"{dtype}-{batch}.h5"
        began = time.perf_counter()
        summaries = fx.extract(data, split, model, device=device, dtype=dtype, batch_size=batch, limit=limit,
                               cache=cache, progress=False)
        wall = time.perf_counter() - began
        n, seconds, committing = sum(s.count for s in summaries), sum(s.seconds for s in summaries), sum(commits)
        rate = n / (seconds - committing)
        memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        print(f"{dtype:<9}{batch:>6}{n:>8,}{wall:>8.1f}{n / wall:>9,.1f}{committing:>9.2f}{rate:>17,.1f}"
              f"{rate * flops / 1e9 / peaks[dtype]:>10.1%}{memory:>9.2f}", flush=True)
        cache.unlink()
print(f"(wall: extract() called to returned, model load included; img/s w/o commit: decode and encode of the "
      f"splits; % of peak: that rate x {flops / 1e9:.2f} GFLOP/img against the matmul peak of its dtype)")
PY

# --- 4. fercache against the reference path, GPU busy share (bench/extract.py) -----------------------
stage "fercache against the reference path (bench/extract.py, $device)"
if [[ $check == 1 ]]; then
  "$py" bench/extract.py --data "$data" --device cpu --images 64 --batch-size 32 --dtype bfloat16 \
      --reference-dtype bfloat16 --memory '' --profile "$@"
else
  "$py" bench/extract.py --data "$data" --device cuda --images all --dtype bfloat16 \
      --reference-dtype bfloat16 --reference-batch-size 256 --memory '' "$@"
fi
stage "bench/gpu.sh: done"
