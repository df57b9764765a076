#!/usr/bin/env bash
# Stage one on a CUDA GPU: all 35,887 FER2013 images, ViT-B/32 architecture (random weights) in bf16,
# fercache against the reference path (PIL + CLIPImageProcessor + a bf16 CLIPVisionModel, plain loop)
# on the same images, from a fresh clone with ../shared/data/fer2013.zip beside it:
#
#   bash bench/gpu.sh            # a machine with a CUDA GPU: under 5 minutes, install included
#   bash bench/gpu.sh --check    # anywhere: the same steps on the CPU with 64 images (does it run?)
#
# Prints process time (start to exit) and images/s of both paths, the share of fercache's encode loop
# the GPU is busy (torch.profiler: kernels and copies from the first kernel to the last), and the loop's
# FLOP/s as a fraction of the GPU's bf16 matmul peak measured in the same run (see bench/extract.py).
# A Python that already has torch (with CUDA) and fercache's dependencies is used as it is (nothing is
# downloaded); otherwise .venv-gpu is made (seeing the system's packages, so a preinstalled torch counts)
# and gets torch from the default index (the CUDA build on Linux) and fercache. Extra arguments go to
# bench/extract.py (e.g. --batch-size 512, --reference-dtype float32, --skip-reference).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${FERCACHE_BENCH_DATA:-../shared/data/fer2013.zip}
check=0
if [[ "${1:-}" == --check ]]; then check=1; shift; fi
[[ -f "$data" ]] || { echo "bench/gpu.sh: $data not found (set FERCACHE_BENCH_DATA)" >&2; exit 2; }

py=${PYTHON:-python3}
deps='import torch, transformers, h5py, cv2, typer, tqdm, sklearn, safetensors, PIL, matplotlib, scipy
assert tuple(map(int, transformers.__version__.split(".")[:2])) >= (4, 56), "transformers < 4.56"'
ready=$deps
if [[ $check == 0 ]]; then ready="$deps; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'"; fi
if ! "$py" -c "$ready" 2>/dev/null; then
  [[ -x .venv-gpu/bin/python ]] || "$py" -m venv --system-site-packages .venv-gpu
  py=.venv-gpu/bin/python
  if ! "$py" -c "$deps" 2>/dev/null; then
    "$py" -m pip install -q --upgrade pip
    "$py" -c 'import torch' 2>/dev/null || "$py" -m pip install -q torch
    "$py" -m pip install -q -e .  # also upgrades a preinstalled transformers older than the floor
  fi
  "$py" -c "$ready"  # says why, if torch still sees no GPU
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # fercache from this checkout, installed or not
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # the model is made here: nothing to fetch

echo "CPU: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p') ($(nproc) cores)"
command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }
"$py" -c 'import torch, transformers; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")'
start=$SECONDS
if [[ $check == 1 ]]; then
  "$py" bench/extract.py --data "$data" --device cpu --images 64 --batch-size 32 --dtype bfloat16 \
      --reference-dtype bfloat16 --memory '' --profile "$@"
else
  "$py" bench/extract.py --data "$data" --device cuda --images all --dtype bfloat16 \
      --reference-dtype bfloat16 --memory '' "$@"
fi
echo "bench/gpu.sh: done in $((SECONDS - start)) s after setup"
