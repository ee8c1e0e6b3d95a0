#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a lent GPU machine, from the repository root,
# with the runtime that benchmarks/gpu_bundle.py packed into .gpu_bundle/
# (carried by the device tool). Results go to $OUT (default /tmp/gpu_check_out).
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]
#   bash benchmarks/gpu_check.sh --rehearse     # CPU mode, on a machine without a GPU
#
# The GPU machine's own CUDA libraries (its PyTorch's nvidia wheels) and its
# cv2 (OpenCV's stable-ABI wheel) are used; CV2_SITE names another folder
# holding cv2 (for the rehearsal).
set -euo pipefail
repo=$(pwd)
out=${OUT:-/tmp/gpu_check_out}
runtime=${GPU_CHECK_RUNTIME:-/tmp/ctxpred_runtime}
mkdir -p "$out" "$runtime"
start=$(date +%s)
if [ ! -x "$runtime/python/bin/python3.11" ]; then
  if command -v xz >/dev/null; then
    xz -T0 -dc "$repo/.gpu_bundle/runtime.tar.xz" | tar -C "$runtime" -xf -
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$repo/.gpu_bundle/runtime.tar.xz" "$runtime"
  fi
  tar -C "$runtime" -xf "$repo/.gpu_bundle/photos.tar"
fi
echo "[gpu_check.sh] unpacked in $(( $(date +%s) - start )) s"

host_site=${CV2_SITE:-$(python3 -c 'import cv2, os; print(os.path.dirname(os.path.dirname(cv2.__file__)))')}
mkdir -p "$runtime/hostsite"
for entry in "$host_site"/cv2 "$host_site"/opencv_*.libs; do
  if [ -e "$entry" ]; then ln -sfn "$entry" "$runtime/hostsite/"; fi
done
cuda_dirs=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
  host_packages=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))')
  for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
    dir=$(find $host_packages /usr/local/cuda/lib64 -name "$lib" -printf '%h\n' 2>/dev/null | head -1 || true)
    if [ -n "$dir" ]; then cuda_dirs="$cuda_dirs:$dir"; fi
  done
fi
export PYTHONHOME="$runtime/python"
export PYTHONPATH="$runtime/site:$runtime/hostsite:$runtime/caffe/python:$repo"
export LD_LIBRARY_PATH="$runtime/python/lib:$runtime/caffe/lib:$runtime/deps$cuda_dirs"
export PATH="$runtime/caffe/bin:$runtime/python/bin:$PATH"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec "$runtime/python/bin/python3.11" "$repo/benchmarks/gpu_check.py" --out "$out" \
  --images "$runtime/photos/train" --heldout "$runtime/photos/heldout" \
  --caffe "$runtime/caffe/bin/caffe" "$@"
