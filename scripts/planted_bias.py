r"""Planted bias with known truth: does canonical occlusion find the cue a model was trained on?

Small Flax CNNs learn a label carried by a green chroma cue planted in one 3DMM region of real fitted faces,
rendered at yaws up to +-45 deg (`canonsal_jax.evidence.planted`); canonical occlusion and the rival saliency methods
are scored by the share of their mass in the planted region, beside a null model trained on shuffled labels.
Writes `results.json`, `results.md` (the README's table), `examples.png` and `cms_<region>.png`.

python scripts/planted_bias.py --out_dir=outputs/planted                          # 3 regions x 5 seeds
python scripts/planted_bias.py --regions=nose --seeds=0 --num_faces=12 --steps=60 --out_dir=/tmp/planted
"""

from absl import app, flags, logging

_REGIONS = flags.DEFINE_list("regions", ["forehead", "nose", "chin"], "3DMM regions to plant the cue in.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds: one model and one null model each per region.")
_NUM_FACES = flags.DEFINE_integer("num_faces", 48, "Photos fitted and textured (a quarter held out for testing).")
_STEPS = flags.DEFINE_integer("steps", 200, "Adam steps per model.")
_NUM_EXPLAIN = flags.DEFINE_integer("num_explain", 12, "Cue-bearing test images explained per model.")
_POSES = flags.DEFINE_integer("poses_per_face", 6, "Random poses rendered per face.")
_MORPHABLE = flags.DEFINE_string("morphable_model", "default", '"default" or a Surrey Face Model folder.')
_NULL_LABELS = flags.DEFINE_enum(
  "null_labels", "shuffled", ["shuffled", "balanced"], "Null model labels: permuted, or random within each cue class."
)
_OUT_DIR = flags.DEFINE_string("out_dir", "outputs/planted", "Output folder.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  import jax

  from canonsal_jax import assets
  from canonsal_jax.evidence import planted

  # Compiled programs persist between runs, as the tests' do (tests/conftest.py).
  jax.config.update("jax_compilation_cache_dir", str(assets.cache_dir() / "jax_compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  settings = planted.Settings(
    regions=tuple(_REGIONS.value),
    seeds=tuple(int(s) for s in _SEEDS.value),
    num_faces=_NUM_FACES.value,
    steps=_STEPS.value,
    num_explain=_NUM_EXPLAIN.value,
    poses_per_face=_POSES.value,
    morphable_model=_MORPHABLE.value,
    null_labels=_NULL_LABELS.value,
  )
  logging.info("devices: %s", jax.devices())
  logging.info("settings: %s", settings)

  def progress(run):
    logging.info(
      "%s seed %d: accuracy %.3f, with the cue swapped %.3f; relevance mass: occlusion %.3f",
      run["region"],
      run["seed"],
      run["model"]["accuracy"],
      run["model"]["swap_accuracy"],
      run["scores"]["occlusion"]["mean"],
    )

  results = planted.run(settings, progress=progress)
  print(planted.write_report(results, _OUT_DIR.value))
  return 0


if __name__ == "__main__":
  app.run(main)
