r"""Benchmarks: ratios against baselines measured in the same run (see BENCHMARKS.md).

python scripts/benchmark.py --suite=sweep --json_out=/tmp/bench.json
python scripts/benchmark.py --suite=sweep --models=age --batch_sizes=16 --repeats=3
"""

import json
import pathlib

from absl import app, flags, logging

_SUITE = flags.DEFINE_enum("suite", "sweep", ["sweep"], "sweep: occlusion sweep vs plain batched forward.")
_MODELS = flags.DEFINE_list("models", ["gender", "age", "expression"], "Face models to time.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["8", "16", "32"], "Batch sizes to try for both sides.")
_PATCH = flags.DEFINE_float("patch_size", 0.07, "Patch size as a fraction of the face width.")
_STRIDE = flags.DEFINE_integer("stride", 1, "Patch stride in crop pixels.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (the median is reported).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write all results here as JSON.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from canonsal_jax import bench, models

  env = bench.environment()
  logging.info("environment: %s", env)
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
  if _JSON_OUT.value:
    path = pathlib.Path(_JSON_OUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"suite": _SUITE.value, "environment": env, "results": results}, indent=2))


if __name__ == "__main__":
  app.run(main)
