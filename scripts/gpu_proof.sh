#!/usr/bin/env bash
# GPU proof: TVM CUDA artifacts built on a CPU-only machine run on a real GPU and match
# the x86 ONNX Runtime FP32 reference.
#
# 1. Here (no GPU needed; uses the project's venv):
#      bash scripts/gpu_proof.sh prepare          # writes .gpu_proof/ (about 40 MiB, git-ignored)
# 2. On a GPU machine (the session's `device` tool, when the task is lent one):
#      run(command="bash scripts/gpu_proof.sh run", carry=[".gpu_proof"], timeout_s=300)
#    It needs python3 with numpy and, for NVRTC, cuda-bindings (or nvcc on PATH); the
#    runtime-only TVM (no compiler library) and edgeml's runtime source travel in .gpu_proof/.
#    Budget: under 2 minutes of device time (load + NVRTC compile + 20 timed runs per model).
# Exit status: 0 when every model matched; 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:-}
shift || true
case "$step" in
  prepare)
    PY=${PYTHON:-}
    if [ -z "$PY" ]; then
      for p in .venv/bin/python /work/venv/bin/python python3; do
        if command -v "$p" >/dev/null 2>&1; then PY=$p; break; fi
      done
    fi
    grep -qxF '/.gpu_proof/' .git/info/exclude 2>/dev/null || echo '/.gpu_proof/' >> .git/info/exclude
    "$PY" scripts/gpu_proof.py prepare "$@"
    ;;
  run)
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    export PYTHONUNBUFFERED=1
    python3 scripts/gpu_proof.py run "$@"
    ;;
  *)
    echo "usage: bash scripts/gpu_proof.sh prepare|run [--models tiny,digits,mobilenetv2]" >&2
    exit 2
    ;;
esac
