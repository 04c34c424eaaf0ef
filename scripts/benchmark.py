r"""Benchmarks: ratios against baselines measured in the same run (see BENCHMARKS.md).

python scripts/benchmark.py --suite=sweep --json_out=/tmp/bench.json
python scripts/benchmark.py --suite=sweep --models=age --batch_sizes=16 --repeats=3
python scripts/benchmark.py --suite=fit --morphable_model=../shared/assets/sfm --fit_batch_size=64
python scripts/benchmark.py --suite=torch --models=gender,age,expression,vgg16 --strides=1,4,8 --vgg_positions=32
"""

import json
import pathlib

from absl import app, flags, logging

_SUITE = flags.DEFINE_enum(
  "suite",
  "sweep",
  ["sweep", "fit", "torch"],
  "sweep: occlusion sweep vs plain batched forward; fit: batched 3DMM fitting vs eos's full fit per face; "
  "torch: our sweep vs the paper's PyTorch procedure and Captum's Occlusion (needs the baseline extra).",
)
_MODELS = flags.DEFINE_list("models", ["gender", "age", "expression"], "Face models to time.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["8", "16", "32"], "Batch sizes to try for both sides.")
_PATCH = flags.DEFINE_float("patch_size", 0.07, "Patch size as a fraction of the face width.")
_STRIDE = flags.DEFINE_integer("stride", 1, "Patch stride in crop pixels.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (the median is reported).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write all results here as JSON.")
_MORPHABLE_MODEL = flags.DEFINE_string(
  "morphable_model", None, "fit suite: the Surrey Face Model folder (eos's share/ files)."
)
_FIT_BATCH = flags.DEFINE_integer("fit_batch_size", 64, "fit suite: faces per batch.")
_STRIDES = flags.DEFINE_list("strides", ["1", "4", "8"], "torch suite: patch strides on the face models.")
_PPE = flags.DEFINE_list("perturbations_per_eval", ["16", "64", "256"], "torch suite: Captum batch sizes to try.")
_VGG_POSITIONS = flags.DEFINE_integer(
  "vgg_positions", 32, "torch suite: random patch positions on vgg16 (15 px patches, from the --vgg_stride grid)."
)
_VGG_STRIDE = flags.DEFINE_integer("vgg_stride", 15, "torch suite: stride of the vgg16 grid the positions come from.")
_VGG_PATCHES = flags.DEFINE_enum(
  "vgg_patches",
  "grid",
  ["grid", "vertices"],
  "torch suite: vgg16's positions from the --vgg_stride grid, or from the visible vertices of the frontal mean "
  "face of --morphable_model (default: the embedded model; about 1,800 on 224 px, the paper's setting).",
)
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "torch suite: where PyTorch runs (cpu, cuda).")
_EOS_REPEATS = flags.DEFINE_integer("eos_repeats", 3, "fit suite: timed repeats of eos's loop over the batch.")


def _sweep_suite() -> list[dict]:
  from canonsal_jax import bench, models

  results = []
  for name in _MODELS.value:
    model = models.load(name)
    res = bench.sweep_vs_forward(
      model,
      patch_size=_PATCH.value,
      stride=_STRIDE.value,
      batch_sizes=[int(b) for b in _BATCH_SIZES.value],
      repeats=_REPEATS.value,
    )
    results.append(res)
    for row in res["rows"]:
      print(
        f"{name:10s} bs={row['batch_size']:3d}  sweep {row['sweep_images_per_s']:8.0f} img/s"
        f"  forward {row['forward_images_per_s']:8.0f} img/s"
      )
    print(
      f"{name:10s} {res['num_patches']} patches of {res['patch_size_px']} px: "
      f"sweep/forward throughput ratio {res['ratio']:.3f} (target >= 0.95)"
    )
  return results


def _fit_suite() -> list[dict]:
  from canonsal_jax import bench

  if not _MORPHABLE_MODEL.value:
    raise app.UsageError("--suite=fit needs --morphable_model=PATH (the Surrey Face Model folder)")
  res = bench.fit_vs_eos(
    _MORPHABLE_MODEL.value, batch_size=_FIT_BATCH.value, repeats=_REPEATS.value, eos_repeats=_EOS_REPEATS.value
  )
  print(
    f"fit batch of {res['batch_size']}: ours {res['ours_ms_per_face']:.3f} ms/face, "
    f"eos {res['eos_ms_per_face']:.2f} ms/face, ratio {res['ratio']:.4f} (target <= 0.2); "
    f"compile {res['compile_s']:.1f} s"
  )
  for side in ("ours", "eos"):
    e = res[f"{side}_errors"]
    print(
      f"  {side:4s} mean |yaw, pitch, roll| error {[round(v, 2) for v in e['pose_deg_mean']]} deg, "
      f"dense {e['dense_mm_mean']:.2f} mm ({e['dense_fraction_mean']:.3f} of eye-corner distance); "
      f"mean face {res['mean_face_mm']:.2f} mm"
    )
  return [res]


def _torch_suite() -> list[dict]:
  from canonsal_jax import bench, models
  from canonsal_jax.baselines import vgg

  results = []
  for name in _MODELS.value:
    is_vgg = name == "vgg16"
    positions = None
    if is_vgg and _VGG_PATCHES.value == "vertices":
      from canonsal_jax import pipeline

      positions = bench.vertex_centres(pipeline.load_morphable(_MORPHABLE_MODEL.value or "default"), vgg.INPUT_SIZE)
      logging.info("vgg16: %d vertex-centred positions, %d timed", len(positions), _VGG_POSITIONS.value)
    res = bench.sweep_vs_torch(
      vgg.load_vgg16() if is_vgg else models.load(name),
      patch_size=_PATCH.value,
      strides=[_VGG_STRIDE.value] if is_vgg else [int(s) for s in _STRIDES.value],
      num_positions=_VGG_POSITIONS.value if is_vgg else None,
      batch_size=int(_BATCH_SIZES.value[0]),
      perturbations_per_eval=[int(p) for p in _PPE.value],
      repeats=_REPEATS.value,
      device=_TORCH_DEVICE.value,
      positions=positions,
    )
    results.append(res)
    for r in res["rows"]:
      n = r["num_patches"]
      captum = ", ".join(f"ppe {k}: {n / v['s']:.0f}" for k, v in r["captum"].items()) or "n/a"
      print(
        f"{name:10s} stride {r['stride']:2d} {n:5d} patches of {res['patch_size_px']} px (img/s): "
        f"ours {n / r['ours_s']:.1f}, paper {n / r['paper_s']:.1f}, captum [{captum}], "
        f"jax fwd {n / r['jax_forward_s']:.1f}, torch fwd {n / r['torch_forward_s']:.1f}; "
        f"ours/best fwd {r['ours_vs_best_forward']:.3f}, paper/ours {r['paper_over_ours']:.3f}, "
        f"captum best/ours {r['captum_over_ours'] or float('nan'):.3f} (medians of per-round ratios); "
        f"torch threads {res['torch_threads']}"
      )
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from canonsal_jax import bench

  env = bench.environment()
  logging.info("environment: %s", env)
  results = {"sweep": _sweep_suite, "fit": _fit_suite, "torch": _torch_suite}[_SUITE.value]()
  if _JSON_OUT.value:
    path = pathlib.Path(_JSON_OUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"suite": _SUITE.value, "environment": env, "results": results}, indent=2))


if __name__ == "__main__":
  app.run(main)
