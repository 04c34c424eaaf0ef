r"""Planted bias with known truth: does canonical occlusion find the cue a model was trained on?

Small Flax CNNs learn a label carried by a green chroma cue planted in one 3DMM region of real fitted faces,
rendered at yaws up to +-45 deg (`canonsal_jax.evidence.planted`); canonical occlusion and the rival saliency methods
are scored by the share of their mass in the planted region, beside a null model trained on shuffled labels.
Writes `results.json`, `results.md` (the README's table), `examples.png` and `cms_<region>.png`.

python scripts/planted_bias.py --out_dir=outputs/planted                          # 3 regions x 5 seeds
python scripts/planted_bias.py --regions=nose --seeds=0 --num_faces=12 --steps=60 --out_dir=/tmp/planted
"""

from absl import flags, logging

from canonsal_jax import cli
from canonsal_jax.evidence import planted

# The experiment's defaults are `planted.Settings`'s: the flags only say what each setting means.
_SETTINGS = cli.define_settings(
  planted.Settings,
  {
    "regions": "3DMM regions to plant the cue in.",
    "seeds": "Seeds: one model and one null model each per region.",
    "num_faces": "Photos fitted and textured (a quarter held out for testing).",
    "steps": "Adam steps per model.",
    "num_explain": "Cue-bearing test images explained per model.",
    "poses_per_face": "Random poses rendered per face.",
    "morphable_model": '"default" or a Surrey Face Model folder.',
    "null_labels": 'Null model labels: "shuffled" (permuted) or "balanced" (random within each cue class).',
  },
)
_OUT_DIR = flags.DEFINE_string("out_dir", "outputs/planted", "Output folder.")


def main(argv):
  cli.start(argv, out_dirs=[_OUT_DIR])
  import jax

  with cli.user_errors() as failed:
    settings = cli.settings_from_flags(planted.Settings, _SETTINGS)
  if failed:
    return 1
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
  cli.run(main)
