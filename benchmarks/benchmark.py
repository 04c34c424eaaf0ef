r"""Benchmarks: ratios against baselines measured in the same run (see BENCHMARKS.md).

python -m benchmarks.benchmark --suite=sweep --json_out=/tmp/bench.json
python -m benchmarks.benchmark --suite=sweep --models=age --batch_sizes=16 --repeats=3
python -m benchmarks.benchmark --suite=fit --morphable_model=path/to/sfm --fit_batch_sizes=1,16,64,256
python -m benchmarks.benchmark --suite=fit_accuracy --morphable_model=path/to/sfm --fit_batch_size=64
python -m benchmarks.benchmark --suite=texture --morphable_model=path/to/sfm --texture_batch_sizes=1,16,64
python -m benchmarks.benchmark --suite=e2e --max_images=24 --e2e_devices=1,2,4 --e2e_face_batches=1,4,8
python -m benchmarks.benchmark --suite=forward --models=age --batch_sizes=8,16,32 --repeats=5
python -m benchmarks.benchmark --suite=torch --models=gender,age,expression,vgg16 --strides=1,4,8 --vgg_positions=32
python -m benchmarks.benchmark --suite=incremental --models=age,vgg16 --incremental_patches=5 --batch_sizes=16
python -m benchmarks.benchmark --suite=imported --imported_models=gender,age,onet,mobilefacenet,iresnet50
python -m benchmarks.benchmark --suite=drill_down --models=age,identity --drill_down_settings=2:0.3,3:0.2
python -m benchmarks.benchmark --suite=drill_down_cms --models=age --drill_down_settings=2:0.3
python -m benchmarks.benchmark --suite=end_to_end --host_images=101 --second_model=age
"""

import json
import pathlib

from absl import app, flags, logging

from canonsal_jax import cli

_SUITE = flags.DEFINE_enum(
  "suite",
  "sweep",
  [
    "sweep",
    "fit",
    "fit_accuracy",
    "torch",
    "texture",
    "e2e",
    "forward",
    "incremental",
    "precision",
    "startup",
    "imported",
    "drill_down",
    "drill_down_cms",
    "end_to_end",
  ],
  "sweep: occlusion sweep vs plain batched forward; fit: batched 3DMM fitting vs eos's full fit per face at "
  "several batch sizes, with held-out landmark errors; fit_accuracy: one batch, pose and dense errors against "
  "the synthetic truth; torch: our sweep vs the paper's PyTorch procedure and Captum's Occlusion (needs the "
  "baseline extra); texture: our texture extraction vs eos's extract_texture on fitted photos; e2e: the CMS "
  "pipeline's images/s and stages with 1, 2, 4 forced CPU devices and several face batches; forward: plain "
  "forward passes in JAX and PyTorch per batch size, per-op profiles, and XLA:CPU flag variants; incremental: "
  "incremental occlusion (windows of changed activations) vs the full-forward sweep and PyTorch; precision: the "
  "sweep at XLA's lower matmul precisions (TF32 on a GPU) against float32, speed and drop error; startup: "
  "per-image scripts run as a user starts them: a first run (nothing compiled or detected yet), a second, and "
  "one with the compilation cache off; "
  "imported: ONNX and PyTorch networks through models.from_onnx / from_torch, import time and full and "
  "incremental sweeps, against the hand ports where there are some; drill_down: the drill-down sweep (coarse "
  "lattice, then a budget of fine patches where the coarse map is salient) against the exact sweep on real "
  "faces, speed, fidelity and compiled temporaries; drill_down_cms: the CMS over builtin:photos with drill-down "
  "against the exact sweep's, wall time and fidelity; end_to_end: the host side of the main job, detection "
  "alone in 1 and 2 worker "
  "processes and 2 threads, then whole CMS runs cold and warm (detection cache), 1 and 2 workers, and a second "
  "model: images/s and the share of wall time the device waited on the host.",
)
_MODELS = flags.DEFINE_list("models", ["gender", "age", "expression"], "Face models to time.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["8", "16", "32"], "Batch sizes to try for both sides.")
_PATCH = flags.DEFINE_float("patch_size", 0.07, "Patch size as a fraction of the face width.")
_STRIDE = flags.DEFINE_integer("stride", 1, "Patch stride in crop pixels.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (the median is reported).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write all results here as JSON.")
_MORPHABLE_MODEL = cli.define_sfm()  # the fit, fit_accuracy and texture suites
_FIT_BATCH = flags.DEFINE_integer("fit_batch_size", 64, "fit_accuracy suite: faces per batch.")
_FIT_BATCHES = flags.DEFINE_list("fit_batch_sizes", ["1", "16", "64", "256"], "fit suite: batch sizes of ours.")
_EOS_FACES = flags.DEFINE_integer("eos_faces", 16, "fit suite: faces eos fits one by one (time and held-out error).")
_FIT_PHOTOS = flags.DEFINE_bool("fit_photos", True, "fit suite: held-out errors on the 10 evaluation photos too.")
_PHOTO_SETS = flags.DEFINE_list(
  "photo_sets", None, "fit and texture suites: sets of datasets.fit_test_photos (default: all of them)."
)
_TEXTURE_CROP = flags.DEFINE_integer("texture_crop_size", 128, "texture suite: crop side in pixels.")
_TEXTURE_SIZE = flags.DEFINE_integer("texture_size", 0, "texture suite: texture side (0: what the crop resolves).")
_TEXTURE_BATCHES = flags.DEFINE_list("texture_batch_sizes", ["1", "16", "64"], "texture suite: batch sizes of ours.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 24, "e2e suite: the first N images of the default dataset.")
_E2E_DEVICES = flags.DEFINE_list("e2e_devices", ["1", "2", "4"], "e2e suite: forced CPU device counts.")
_E2E_FACE_BATCHES = flags.DEFINE_list("e2e_face_batches", ["1", "4", "8"], "e2e suite: cms.face_batch values.")
_E2E_MODEL = flags.DEFINE_string("e2e_model", "gender", "e2e suite: the face model explained.")
_XLA_VARIANTS = flags.DEFINE_multi_string(
  "xla_flags_variant",
  ["", "--xla_cpu_use_onednn=true"],
  "forward suite: XLA_FLAGS values, each timed in its own subprocess against PyTorch there.",
)
_E2E_OUT = flags.DEFINE_string("e2e_out_dir", "/tmp/canonsal_bench_e2e", "e2e suite: scratch folder for the runs.")
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
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "torch, incremental suites: where PyTorch runs (cpu, cuda).")
_VGG_BATCH = flags.DEFINE_integer(
  "vgg_batch_size", 0, "torch, incremental suites: vgg16's batch (0: --batch_sizes' first)."
)
_VGG_CENTRES = flags.DEFINE_string(
  "vgg_centres_file", None, "torch suite: a .npy of [N, 2] (row, col) vgg16 positions, instead of --vgg_patches."
)
_EOS_REPEATS = flags.DEFINE_integer("eos_repeats", 3, "fit_accuracy suite: timed repeats of eos's loop over the batch.")


def _sweep_suite() -> list[dict]:
  from benchmarks import bench
  from canonsal_jax import models

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


def _sfm_dir() -> str:
  if not _MORPHABLE_MODEL.value:
    raise app.UsageError(f"--suite={_SUITE.value} needs --morphable_model=PATH (the Surrey Face Model folder)")
  return _MORPHABLE_MODEL.value


def _fit_suite() -> list[dict]:
  from benchmarks import bench
  from canonsal_jax import datasets

  res = bench.fit_scaling_vs_eos(
    _sfm_dir(),
    batch_sizes=[int(b) for b in _FIT_BATCHES.value],
    repeats=_REPEATS.value,
    eos_faces=_EOS_FACES.value,
    photos=datasets.fit_test_photos(_PHOTO_SETS.value or datasets.TEST_PHOTO_SETS) if _FIT_PHOTOS.value else (),
  )
  print(
    f"eos: {res['eos_ms_per_face']:.1f} ms/face over {res['eos_faces']} faces, held-out error "
    f"{res['held_out_eos_on_eos_faces']:.4f} (ours on the same faces {res['held_out_ours_on_eos_faces']:.4f})"
  )
  for row in res["rows"]:
    print(
      f"ours batch {row['batch_size']:4d}: {row['ours_ms_per_face']:8.3f} ms/face, "
      f"eos/ours {row['eos_over_ours']:7.1f}x "
      f"(ratio ours/eos {1 / row['eos_over_ours']:.4f}, target <= 0.2), held-out error {row['held_out_ours']:.4f}; "
      f"compile {row['compile_s']:.1f} s"
    )
  if res["photos"]:
    print(
      f"photos: held-out ours {res['photos_ours_mean']:.4f}, eos {res['photos_eos_mean']:.4f}, "
      f"mean ratio {res['photos_mean_ratio']:.3f}"
    )
  return [res]


def _texture_suite() -> list[dict]:
  from benchmarks import bench
  from canonsal_jax import datasets

  res = bench.texture_vs_eos(
    _sfm_dir(),
    crop_size=_TEXTURE_CROP.value,
    texture_size=_TEXTURE_SIZE.value,
    batch_sizes=[int(b) for b in _TEXTURE_BATCHES.value],
    repeats=_REPEATS.value,
    photos=datasets.fit_test_photos(_PHOTO_SETS.value or datasets.TEST_PHOTO_SETS),
  )
  for b, ms in res["ours_ms_per_face"].items():
    print(
      f"texture {res['texture_size']}^2 from a {res['crop_size']} px crop, batch {b:3d}: ours {ms:.2f} ms/face, "
      f"eos {res['eos_ms_per_face']:.2f} ms/face, eos/ours {res['eos_over_ours'][b]:.1f}x"
    )
  print(
    f"agreement over {res['num_photos']} photos: visibility {res['visibility_agreement']:.4f} of the union, "
    f"values {res['value_agreement']:.5f} within 1/255; batched vs single max diff {res['batched_vs_single_max_diff']}"
  )
  return [res]


def _e2e_suite() -> list[dict]:
  from benchmarks import bench

  res = bench.cms_e2e(
    devices=[int(d) for d in _E2E_DEVICES.value],
    face_batches=[int(b) for b in _E2E_FACE_BATCHES.value],
    max_images=_MAX_IMAGES.value,
    model=_E2E_MODEL.value,
    morphable_model=_MORPHABLE_MODEL.value or "default",
    out_dir=_E2E_OUT.value,
  )
  for r in res["runs"]:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["stage_seconds"].items()))
    print(
      f"devices {r['devices']} face_batch {r['face_batch']:2d}: {r['images_per_s']:.2f} img/s over {r['images']} "
      f"images ({r['seconds_this_run']:.1f} s; stages s: {stages}; unattributed {r['unattributed_s']:.1f}); "
      f"peak RSS {r['max_rss_mib']:.0f} MiB"
    )
  return [res]


_HOST_IMAGES = flags.DEFINE_integer("host_images", 101, "end_to_end suite: the first N photos of the main job.")
_HOST_OUT = flags.DEFINE_string("host_out_dir", "/tmp/canonsal_bench_host", "end_to_end suite: scratch folder.")
_SECOND_MODEL = flags.DEFINE_string("second_model", "age", "end_to_end suite: the second model's run (warm cache).")
_HOST_DATASET = flags.DEFINE_string(
  "host_dataset", "", "end_to_end suite: the photos (a folder, list or glob; default: the main job, builtin:lfw)."
)


def _end_to_end_suite() -> list[dict]:
  from benchmarks import bench

  res = bench.host_pipeline(
    max_images=_HOST_IMAGES.value,
    second_model=_SECOND_MODEL.value,
    out_dir=_HOST_OUT.value,
    dataset=_HOST_DATASET.value or None,
  )
  for r in res["detection"]:
    print(
      f"detection alone, {r['workers']} {r['pool']}: {r['images_per_s']:.2f} img/s ({r['seconds']:.1f} s for "
      f"{r['images']} photos; workers ready after {r['startup_s']:.1f} s)"
    )
  for r in res["runs"]:
    cache = r["detection_cache"] or {}
    print(
      f"{r['label']}: {r['images_per_s']:.2f} img/s ({r['seconds_this_run']:.1f} s); device waited on the host "
      f"{r['host_wait_s']:.1f} s = {r['host_share_of_wall']:.1%} of wall; host worker-seconds "
      f"{r['stage_seconds'].get('host_load_detect', 0.0):.1f}; detections cached {cache.get('hits')}, "
      f"computed {cache.get('misses')}"
    )
  print(
    f"ratios: detection 2 processes / 1 {res['detect_2_over_1_processes']:.2f}x, 2 threads / 1 "
    f"{res['detect_2_over_1_threads']:.2f}x (target >= 1.7x); 2 processes / 2 threads "
    f"{res['detect_processes_over_threads']:.2f}x; warm / cold images/s {res['warm_over_cold']:.2f}x (target >= 1.5x)"
  )
  return [res]


def _forward_suite() -> list[dict]:
  from benchmarks import bench
  from canonsal_jax import models

  batch_sizes = [int(b) for b in _BATCH_SIZES.value]
  results = []
  for name in _MODELS.value:
    res = bench.forward_vs_torch(models.load(name), batch_sizes=batch_sizes, repeats=_REPEATS.value)
    res["xla_variants"] = bench.forward_xla_flags(
      name, _XLA_VARIANTS.value, batch_sizes=batch_sizes, repeats=_REPEATS.value
    )
    results.append(res)
    for variant in [res, *res["xla_variants"]]:
      for r in variant["rows"]:
        print(
          f"{name:10s} XLA_FLAGS={variant['xla_flags']!r:36s} batch {r['batch_size']:3d}: "
          f"jax {r['jax_ms_per_image']:.3f} ms/img, torch {r['torch_ms_per_image']:.3f} ms/img, "
          f"torch/jax {r['torch_over_jax']:.3f}"
        )
    for op in res["jax_ops"][:8]:
      print(f"  jax   {op['ms']:8.3f} ms  {op['op']}  {'; '.join(op['convolutions'])}")
    for op in res["torch_ops"][:8]:
      print(f"  torch {op['ms']:8.3f} ms  {op['op']}  {op['input_shapes'][:90]}")
  return results


def _fit_accuracy_suite() -> list[dict]:
  from benchmarks import bench

  res = bench.fit_vs_eos(
    _sfm_dir(), batch_size=_FIT_BATCH.value, repeats=_REPEATS.value, eos_repeats=_EOS_REPEATS.value
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


def _batch_size(is_vgg: bool) -> int:
  """The torch and incremental suites' batch: --vgg_batch_size for vgg16 where set, else --batch_sizes' first."""
  return (_VGG_BATCH.value if is_vgg else 0) or int(_BATCH_SIZES.value[0])


def _torch_suite() -> list[dict]:
  from benchmarks import bench
  from benchmarks.baselines import vgg
  from canonsal_jax import models

  results = []
  for name in _MODELS.value:
    is_vgg = name == "vgg16"
    positions = None
    if is_vgg and _VGG_CENTRES.value:
      import numpy as np

      positions = np.load(_VGG_CENTRES.value)
      logging.info("vgg16: %d positions from %s", len(positions), _VGG_CENTRES.value)
    elif is_vgg and _VGG_PATCHES.value == "vertices":
      from canonsal_jax import pipeline

      positions = bench.vertex_centres(pipeline.load_morphable(_MORPHABLE_MODEL.value or "default"), vgg.INPUT_SIZE)
      logging.info("vgg16: %d vertex-centred positions, %d timed", len(positions), _VGG_POSITIONS.value)
    res = bench.sweep_vs_torch(
      vgg.load_vgg16() if is_vgg else models.load(name),
      patch_size=_PATCH.value,
      strides=[_VGG_STRIDE.value] if is_vgg else [int(s) for s in _STRIDES.value],
      num_positions=_VGG_POSITIONS.value if is_vgg else None,
      batch_size=_batch_size(is_vgg),
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
        + (
          f"ours full {n / r['ours_full_s']:.1f} (full/best fwd {r['full_vs_best_forward']:.3f}, paper/full "
          f"{r['paper_over_full']:.3f}); "
          if "ours_full_s" in r
          else ""
        )
        + f"ours/best fwd {r['ours_vs_best_forward']:.3f}, paper/ours {r['paper_over_ours']:.3f}, "
        f"captum best/ours {r['captum_over_ours'] or float('nan'):.3f} (medians of per-round ratios); "
        f"torch threads {res['torch_threads']}"
      )
  return results


_INC_PATCHES = flags.DEFINE_list(
  "incremental_patches",
  ["5"],
  "incremental suite: patch sides in pixels, for every model (N) or one (name@N, e.g. gender@1); vgg16 gets 15 "
  "unless listed as vgg16@N.",
)
_INC_POSITIONS = flags.DEFINE_integer(
  "incremental_positions",
  0,
  "incremental and precision suites: random positions of the grid per model (0: all; incremental vgg16: 32).",
)
_INC_APPROX = flags.DEFINE_list("approx_thresholds", [], "incremental suite: projective-field thresholds to time.")
_INC_TORCH = flags.DEFINE_bool("incremental_torch", True, "incremental suite: the PyTorch baselines too.")
_INC_BATCHES = flags.DEFINE_list(
  "incremental_batch_sizes",
  [],
  "incremental suite: more batches for the full and incremental sweeps; each is also compared at its fastest.",
)
_INC_WINDOW_BATCH = flags.DEFINE_integer(
  "incremental_window_batch",
  0,
  "incremental suite: make_sweep's window_batch_size for the incremental sweeps (0: None).",
)


def _incremental_patches(name: str) -> list[int]:
  """--incremental_patches for one model: its `name@N` entries where it has any, else the bare `N` ones (vgg16: 15)."""
  own = [int(p.split("@")[1]) for p in _INC_PATCHES.value if p.split("@")[0] == name and "@" in p]
  bare = [int(p) for p in _INC_PATCHES.value if "@" not in p]
  return own or ([15] if name == "vgg16" else bare)


def _incremental_suite() -> list[dict]:
  from benchmarks import bench
  from benchmarks.baselines import vgg
  from canonsal_jax import models

  results = []
  for name in _MODELS.value:
    is_vgg = name == "vgg16"
    model = vgg.load_vgg16() if is_vgg else models.load(name)
    for patch in _incremental_patches(name):
      positions = _INC_POSITIONS.value or (32 if is_vgg else None)
      res = bench.incremental_vs_full(
        model,
        patch_size=patch,
        stride=_STRIDE.value,
        num_positions=positions,
        batch_size=_batch_size(is_vgg),
        approx_thresholds=[float(t) for t in _INC_APPROX.value],
        repeats=_REPEATS.value,
        with_torch=_INC_TORCH.value,
        device=_TORCH_DEVICE.value,
        more_batch_sizes=[int(b) for b in _INC_BATCHES.value],
        window_batch_size=_INC_WINDOW_BATCH.value or None,
      )
      results.append(res)
      sec, up, err = res["seconds"], res["speedup"], res["drop_error"]
      line = ", ".join(f"{k} {res['num_patches'] / v:.1f}" for k, v in sec.items())
      print(f"{name:10s} {res['num_patches']} patches of {patch} px (img/s): {line}")
      print(
        "  speed-up over full: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in up.items())
        + "; drop error / max drop: "
        + ", ".join(f"{k} {v:.1e}" for k, v in err.items())
        + "; compile s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in res["compile_s"].items())
      )
      print("  windows: " + "; ".join(res["windows"]))
      best = res["best"]
      print(
        f"  each at its fastest batch: full {res['num_patches'] / best['full']['seconds']:.1f} img/s (batch "
        f"{best['full']['batch_size']}), incremental {res['num_patches'] / best['incremental']['seconds']:.1f} "
        f"(batch {best['incremental']['batch_size']}): {best['speedup']:.2f}x"
      )
  return results


_PRECISIONS = flags.DEFINE_list("precisions", ["default", "high"], "precision suite: matmul precisions vs highest.")


def _precision_suite() -> list[dict]:
  from benchmarks import bench
  from benchmarks.baselines import vgg
  from canonsal_jax import models

  results = []
  for name in _MODELS.value:
    is_vgg = name == "vgg16"
    for method in ("full", "incremental"):
      res = bench.precision_vs_highest(
        vgg.load_vgg16() if is_vgg else models.load(name),
        patch_size=_PATCH.value,
        stride=_VGG_STRIDE.value if is_vgg else _STRIDE.value,
        num_positions=_INC_POSITIONS.value or None,
        batch_size=_batch_size(is_vgg),
        precisions=_PRECISIONS.value,
        method=method,
        repeats=_REPEATS.value,
      )
      results.append(res)
      print(
        f"{name:10s} {method:11s} {res['num_patches']} patches of {res['patch_size_px']} px: "
        + "; ".join(
          f"{p} {res['num_patches'] / res['seconds'][p]:.0f} img/s ({res['speedup'][p]:.2f}x), "
          f"error {res['drop_error'][p]:.1e} (mean {res['drop_mean_error'][p]:.1e}, r {res['drop_correlation'][p]:.4f})"
          for p in res["seconds"]
        )
      )
  return results


_STARTUP_SCRIPTS = flags.DEFINE_list("startup_scripts", ["cis", "occlusion", "fit"], "startup suite: scripts to run.")
_STARTUP_OUT = flags.DEFINE_string("startup_out_dir", "/tmp/canonsal_bench_startup", "startup suite: scratch folder.")


def _startup_suite() -> list[dict]:
  from benchmarks import bench

  results = bench.script_restarts(_STARTUP_SCRIPTS.value, out_dir=_STARTUP_OUT.value, repeats=_REPEATS.value)
  for res in results:
    s = res["seconds"]
    print(
      f"{res['script']:10s} cold {s['cold']:.1f} s, warm {s['warm']:.1f} s, cache off {s['off']:.1f} s: "
      f"warm/cold {res['warm_over_cold']:.2f} (target <= 0.6)"
    )
  return results


_IMPORTED = flags.DEFINE_list(
  "imported_models",
  ["gender", "age", "onet", "mobilefacenet", "iresnet50"],
  "imported suite: gender and age (their ONNX files, against the hand ports), onet (MTCNN's O-Net, real "
  "weights), mobilefacenet and iresnet50 (random weights), the last three through from_torch.",
)


def _imported_suite() -> list[dict]:
  from benchmarks import bench
  from benchmarks.baselines import face_nets
  from canonsal_jax import assets, models

  # name -> (build, patch px, stride, random positions or None, the hand port's name or None)
  subjects = {
    "gender": (
      lambda: models.from_onnx(assets.path("gender-v1.onnx"), face_nets.dlib_onnx_card("gender")),
      3,
      1,
      None,
      "gender",
    ),
    "age": (lambda: models.from_onnx(assets.path("age-v1.onnx"), face_nets.dlib_onnx_card("age")), 5, 1, None, "age"),
    "onet": (lambda: models.from_torch(face_nets.load_onet(), face_nets.mtcnn_card(48, 2)), 5, 1, None, None),
    "mobilefacenet": (
      lambda: models.from_torch(face_nets.MobileFaceNet(), face_nets.MOBILEFACENET_CARD),
      9,
      4,
      None,
      None,
    ),
    "iresnet50": (lambda: models.from_torch(face_nets.IResNet(), face_nets.IRESNET_CARD), 9, 4, 32, None),
  }
  results = []
  for name in _IMPORTED.value:
    if name not in subjects:
      raise app.UsageError(f"--imported_models: unknown {name!r}; known: {', '.join(subjects)}")
    build, patch, stride, positions, port = subjects[name]
    res = bench.imported_vs_port(
      name,
      build,
      patch_size=patch,
      stride=stride,
      num_positions=positions,
      port=models.load(port) if port else None,
      repeats=_REPEATS.value,
    )
    results.append(res)
    sec = res["seconds"]
    line = ", ".join(f"{k} {res['num_patches'] / v:.0f} img/s" for k, v in sec.items())
    print(f"{name:14s} {res['num_patches']} patches of {res['patch_size']} px: {line}")
    print(
      f"  import {res['import_s']:.2f} s, file to first sweep {res['first_sweep_s']:.2f} s; speed-up of incremental "
      + ", ".join(f"{k} {v:.2f}x" for k, v in res["speedup"].items())
      + (
        f"; imported full sweep at {res['import_over_port']:.2f}x the port's speed" if "import_over_port" in res else ""
      )
      + "; drop errors "
      + ", ".join(f"{k} {v:.1e}" for k, v in res["drop_error"].items())
      + (f"; no layer graph: {res['layer_graph_reason']}" if not res["layer_graph"] else "")
    )
  return results


_DD_SETTINGS = flags.DEFINE_list(
  "drill_down_settings",
  ["2:0.3"],
  "drill_down and drill_down_cms suites: drill-down settings to measure, each coarse_every:fine_fraction, or "
  "coarse_every:middle_every@middle_fraction:fine_fraction with a middle stage (e.g. 4:2@0.04:0.01); "
  "fine_fraction/R runs the fine budget in R rounds (e.g. 3:0.1997/4).",
)
_DD_PHOTOS = flags.DEFINE_integer("drill_down_photos", 3, "drill_down suite: the first N built-in photos.")
_DD_FULL_PHOTOS = flags.DEFINE_integer(
  "drill_down_full_photos", 1, "drill_down suite: time the full-forward fine sweep on the first N photos only."
)
_DD_FULL_SAMPLE = flags.DEFINE_integer(
  "drill_down_full_sample",
  1,
  "drill_down suite: time the full sweep (against the exact one) on every Nth patch of the fine grid, for a grid "
  "whose full sweep takes hours; its whole-grid time is reported scaled.",
)
_DD_SAVE = flags.DEFINE_string(
  "drill_down_save", None, "drill_down suite: a folder to keep each photo's exact sweep in (drops per patch)."
)
_DD_REFERENCE = flags.DEFINE_string(
  "drill_down_reference",
  None,
  "drill_down suite: judge fidelity against the exact sweeps a --drill_down_save run kept in this folder; the exact "
  "sweep is then timed only on --drill_down_full_sample's patches, scaled.",
)
_DD_WARMUP = flags.DEFINE_bool(
  "drill_down_warmup",
  True,
  "drill_down suite: call each drill-down once before timing it; --nodrill_down_warmup times the first call, "
  "compiling included, for runs too long to make twice.",
)
_DD_STRIDES = flags.DEFINE_list(
  "drill_down_strides",
  [],
  "drill_down suite: the fine grid's stride per model as name@stride (e.g. vgg16@8); the others get --stride.",
)


def _drill_settings() -> list[tuple[int, float, int, float, int]]:
  """`drill_down.Settings` fields `(coarse_every, fine_fraction, middle_every, middle_fraction, fine_rounds)` per
  --drill_down_settings item."""
  settings = []
  try:
    for item in _DD_SETTINGS.value:
      parts = item.split(":")
      middle, middle_fraction = parts[1].split("@") if len(parts) == 3 else (0, 0.0)
      if len(parts) not in (2, 3):
        raise ValueError(item)
      fraction, rounds = parts[-1].split("/") if "/" in parts[-1] else (parts[-1], 1)
      if int(rounds) < 1:
        raise ValueError(item)
      settings.append((int(parts[0]), float(fraction), int(middle), float(middle_fraction), int(rounds)))
  except ValueError:
    given = ",".join(_DD_SETTINGS.value)
    raise app.UsageError(
      f"--drill_down_settings={given}: give coarse_every:fine_fraction or "
      "coarse_every:middle_every@middle_fraction:fine_fraction, each fine_fraction optionally /rounds, ..."
    ) from None
  return settings


def _drill_down_suite() -> list[dict]:
  from benchmarks import bench
  from benchmarks.baselines import vgg
  from canonsal_jax import datasets, models

  photos = datasets.files_of("builtin:photos")[: _DD_PHOTOS.value]
  strides = {k: int(v) for k, v in (item.split("@") for item in _DD_STRIDES.value)}
  results = []
  for name in _MODELS.value:
    res = bench.drill_down_vs_fine(
      vgg.load_vgg16() if name == "vgg16" else models.load(name),
      patch_size=_PATCH.value,
      settings=_drill_settings(),
      photos=photos,
      stride=strides.get(name, _STRIDE.value),
      batch_size=_batch_size(name == "vgg16"),
      repeats=_REPEATS.value,
      full_photos=_DD_FULL_PHOTOS.value,
      full_sample=_DD_FULL_SAMPLE.value,
      save_dir=_DD_SAVE.value,
      reference_dir=_DD_REFERENCE.value,
      warmup=_DD_WARMUP.value,
    )
    results.append(res)
    mib = lambda b: b / 2**20
    sec, mem = res["seconds"], res["temp_bytes"]
    print(
      f"{name:10s} {res['num_patches']} patches of {res['patch_size']} px at stride {res['stride']}: exact "
      f"{sec['exact']:.2f} s ({mib(mem['exact']):.0f} MiB temporaries), full {sec['full']:.2f} s "
      f"({mib(mem['full']):.0f} MiB), full/exact {res['full_over_exact']:.2f}x"
      + (f" (timed on {res['full_sample']} patches, scaled)" if res["full_sample"] < res["num_patches"] else "")
      + (f"; exact maps from {res['exact_from']}" if _DD_REFERENCE.value else "")
    )
    for key, r in res["settings"].items():
      w = r["worst"]
      print(
        f"  {key:14s} {r['seconds']:.2f} s ({mib(r['temp_bytes']):.0f} MiB), {r['patches_run']:.0f} patches: "
        f"{r['speedup_over_exact']:.2f}x over exact, {r['speedup_over_full']:.2f}x over full; worst top-10% "
        f"overlap {w['top10_overlap']:.3f}, r {w['pearson_r']:.4f}, max error {w['max_error']:.3f}, exact pixels "
        f"{w['exact_share']:.0%}"
      )
  return results


_DD_CMS_OUT = flags.DEFINE_string("drill_down_cms_out", "/tmp/canonsal_drill_down_cms", "drill_down_cms: run folders.")


def _drill_down_cms_suite() -> list[dict]:
  from benchmarks import bench
  from canonsal_jax import config as config_lib

  results = []
  for name in _MODELS.value:
    config = config_lib.default_config()
    config.model = name
    config.occlusion.stride = _STRIDE.value
    config.occlusion.patch_size = _PATCH.value
    res = bench.drill_down_cms(config, _drill_settings(), dataset="builtin:photos", out_dir=_DD_CMS_OUT.value)
    results.append(res)
    print(f"{name:10s} stride {_STRIDE.value}: exact CMS {res['exact']['seconds']:.1f} s")
    for key, r in res.items():
      if isinstance(r, dict) and key != "exact":
        print(
          f"  {key:14s} {r['seconds']:.1f} s ({r['speedup_over_exact']:.2f}x), {r['images']} images: CMS top-10% "
          f"overlap {r['top10_overlap']:.3f}, r {r['pearson_r']:.4f}, max error {r['max_error']:.3f}; mean exact "
          f"pixels {r['exact_share']:.0%}"
        )
  return results


def main(argv):
  cli.start(argv)
  from benchmarks import bench

  env = bench.environment()
  logging.info("environment: %s", env)
  suites = {
    "sweep": _sweep_suite,
    "fit": _fit_suite,
    "fit_accuracy": _fit_accuracy_suite,
    "torch": _torch_suite,
    "texture": _texture_suite,
    "e2e": _e2e_suite,
    "forward": _forward_suite,
    "incremental": _incremental_suite,
    "precision": _precision_suite,
    "startup": _startup_suite,
    "imported": _imported_suite,
    "drill_down": _drill_down_suite,
    "drill_down_cms": _drill_down_cms_suite,
    "end_to_end": _end_to_end_suite,
  }
  results = suites[_SUITE.value]()
  if _JSON_OUT.value:
    path = pathlib.Path(_JSON_OUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"suite": _SUITE.value, "environment": env, "results": results}, indent=2))


if __name__ == "__main__":
  app.run(main)
