#!/usr/bin/env bash
# The accelerator figures of docs/BENCHMARKS.md (issue 10) on one GPU, in under 8 minutes:
#   benchmarks/gpu_check.sh [--dry_run] [--out=DIR]      (default DIR: runs/gpu_check)
# 1. installs the `cuda` extra of setup.cfg into .venv when JAX sees no GPU (not in a dry run);
# 2. benchmarks/gpu_check.py: default and cin256-sized stage-2 train steps in bf16 (MFU from
#    XLA's FLOP count), the sampler's images/s, the SD-size guided step;
# 3. benchmarks/input_pipeline.py: grain threads / worker processes on the host's cores
#    against the images/s that the cin256-sized step consumes;
# 4. benchmarks/vs_diffusers.py --quick --device=cuda, when torch sees a CUDA device.
# --dry_run shrinks every shape and runs all of it on the CPU (a check of the code path).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DRY=""
OUT="runs/gpu_check"
for arg in "$@"; do
  case "$arg" in
    --dry_run) DRY="--dry_run" ;;
    --out=*) OUT="${arg#--out=}" ;;
    *) echo "error: unknown argument $arg (--dry_run, --out=DIR)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
start=$(date +%s)

has_gpu() { "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; }
if [ -z "$DRY" ] && ! has_gpu; then
  echo "JAX sees no GPU: installing the cuda extra (pip install -e .[cuda])"
  "$PY" -m pip install -q -e ".[cuda]" || {
    echo "error: could not install the cuda extra of setup.cfg (no network or no wheel?)" >&2
    exit 1; }
  has_gpu || { echo "error: JAX still sees no GPU after installing the cuda extra" >&2; exit 1; }
fi
if [ -z "$DRY" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
fi

# 6 minutes on a GPU; a dry run compiles everything on a CPU (minutes on 2 shared cores).
timeout "$([ -n "$DRY" ] && echo 1200 || echo 360)" "$PY" -m benchmarks.gpu_check $DRY \
  --out="$OUT" | tee "$OUT/gpu_check.log"

# 3. the input pipeline on this host's cores against what the cin256-sized step consumes
#    (its batch / step time: 256x256 images, encoded inside the step).
consumes=$("$PY" -c "import json; r = json.load(open('$OUT/gpu_check.json')).get('train_cin256')
print(r['batch'] / r['sec'] if r else 0)" 2>/dev/null || echo 0)
timeout 180 "$PY" -m benchmarks.input_pipeline --consumes="$consumes" --threads=4 \
  $([ -n "$DRY" ] && echo "--images=200 --batches=2 --workers=0,1" \
                  || echo "--images=1500 --batches=8 --workers=0,2,4") \
  --out="$OUT/input_pipeline" | tee "$OUT/input_pipeline.log" \
  || echo "input_pipeline.py stopped (time limit or error)"

if [ -z "$DRY" ]; then
  if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    left=$(( 470 - ($(date +%s) - start) ))
    if [ "$left" -gt 60 ]; then
      timeout "$left" "$PY" -m benchmarks.vs_diffusers --quick --device=cuda --out="$OUT" \
        | tee "$OUT/vs_diffusers.log" || echo "vs_diffusers.py stopped (time limit or error)"
    else
      echo "vs_diffusers.py skipped: ${left}s left of the 8-minute budget"
    fi
  else
    echo "vs_diffusers.py skipped: torch with CUDA is not installed (pip install torch diffusers)"
  fi
else
  timeout 900 "$PY" -m benchmarks.vs_diffusers --dry_run --out="$OUT" | tee "$OUT/vs_diffusers.log"
fi
echo "gpu_check.sh: done in $(( $(date +%s) - start )) s; figures in $OUT"
