r"""A static, offline HTML report of a CMS run: maps per group, differences, regions, tests, metrics, settings.

python -c "from canonsal_jax import datasets; print(*datasets.builtin_dataset('lfw')[1:41], sep='\n')" >/tmp/lfw.txt
python scripts/cms.py --images=/tmp/lfw.txt --out_dir=/tmp/cms --config.cms.save_textures=True
python scripts/faithfulness.py --cms=/tmp/cms --images=builtin:photos --out_dir=/tmp/eval        # optional
python scripts/report.py --cms=/tmp/cms --metrics=/tmp/eval --out=/tmp/report             # open index.html

With true labels (`--config.cms.labels_csv=labels.csv`, rows `path_or_basename,label`) the CMS also has a group
per label and the groups "correct" and "misclassified", which the report shows and compares.

Writes `index.html` (no external URLs, no JavaScript; laid out for a window 1280 px wide or more, headers in words
with their units) with `images/`, `meshes/cms_<group>.ply`, `regions.csv`, `tests.csv` and `report.json` beside
it. The same inputs and --seed give the same files.
"""

from absl import flags

from canonsal_jax import cli

_CMS = flags.DEFINE_string("cms", None, "The CMS run folder (cms.npz, summary.json, textures/).", required=True)
_METRICS = flags.DEFINE_string(
  "metrics", None, "A metrics table of scripts/faithfulness.py: its folder, metrics.json or metrics.csv."
)
_OUT = flags.DEFINE_string("out", None, "Folder for the report.", required=True)
_MORPHABLE = flags.DEFINE_string(
  "morphable_model", None, '"default" or a Surrey Face Model folder (default: the one the run names).'
)
_MIN_COUNT = flags.DEFINE_integer("min_count", None, "Texels seen by fewer images are no data (default: the run's).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples for the region intervals.")
_PERMUTATIONS = flags.DEFINE_integer("permutations", 999, "Label permutations for the region and cluster tests.")
_EXAMPLES = flags.DEFINE_integer("max_examples", 4, "Example CIS shown per group (from the saved textures).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap, the permutations and the example images.")


def main(argv):
  cli.start(argv, out_dirs=[_OUT])
  from canonsal_jax.evidence import report

  with cli.user_errors() as failed:
    options = report.ReportOptions(
      min_count=_MIN_COUNT.value,
      num_bootstrap=_BOOTSTRAP.value,
      num_permutations=_PERMUTATIONS.value,
      seed=_SEED.value,
      max_examples=_EXAMPLES.value,
    )
    path = report.write_report(
      _CMS.value, _OUT.value, metrics=_METRICS.value, morphable_model=_MORPHABLE.value, options=options
    )
  if failed:
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  cli.run(main)
