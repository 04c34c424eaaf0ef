r"""Faithfulness of the CMS against rival saliency methods and controls, on test images disjoint from the CMS's.

python -c "from canonsal_jax import datasets; print(*datasets.builtin_dataset('lfw')[1:41], sep='\n')" >/tmp/lfw.txt
python scripts/cms.py --images=/tmp/lfw.txt --out_dir=/tmp/cms           # a CMS of 40 LFW crops (not the astronaut)
python scripts/faithfulness.py --cms=/tmp/cms --images=builtin:photos --out_dir=/tmp/eval \
  --methods=cms,occlusion,grad_cam,grad_cam_plus_plus,vanilla_gradient,integrated_gradients
python scripts/faithfulness.py --cms=/tmp/cms --images=builtin:photos --out_dir=/tmp/paper --protocol=paper

`--protocol=mass` (the default) writes `metrics.csv` (one row per method and control: Average Drop %, % Increase
in Confidence, Win % with every map hiding the same mass, deletion/insertion AUC with a constant and a blurred
substrate, model-randomisation rank correlation, p-values against the controls). `--protocol=paper` writes
`paper.csv`: the paper's table as its released code computes it (the CMS against Grad-CAM, Grad-CAM++ and
Score-CAM, whatever `--methods` says), each figure with a bootstrap interval, and each rival's Holm-corrected
paired test against the CMS; `--paper_as_published` keeps the published 8-bit wrap-around.
`--protocol=both` writes both. `metrics.json` holds everything, per image too. The mass protocol stays the
default: it controls what the paper's leaves free (every method hides the same share of the crop, not the
CMS's own mass) and adds the controls and deletion/insertion; the paper's is there to check its claim.
Test images the CMS was built from are refused (by path or file name): `builtin:photos` holds the astronaut,
which `builtin:lfw`, the CMS's default photo set, holds too, hence the list above.
"""

import sys

from absl import flags, logging

from canonsal_jax import cli

_CONFIG = cli.define_config()  # the one the CMS was made with
_OVERRIDES = cli.define_overrides()  # --model, --morphable_model: the CMS's
_IMAGES = flags.DEFINE_string(
  "images", None, "Test photos: a folder, .txt list, glob or builtin:<name>.", required=True
)
_CMS = flags.DEFINE_string("cms", None, "The CMS run folder or its cms.npz.", required=True)
_CMS_RANDOM = flags.DEFINE_string("cms_random", None, "The CMS of the same model with re-initialised weights.")
_GROUP = flags.DEFINE_string("group", "all", "The CMS group to map back onto the test faces.")
_METHODS = flags.DEFINE_list("methods", ["cms", "occlusion", "grad_cam", "vanilla_gradient"], "Methods to score.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for metrics.csv and metrics.json.", required=True)
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Use at most this many test faces (0: all).")
_STEPS = flags.DEFINE_integer("steps", 64, "Deletion / insertion steps.")
_MASS = flags.DEFINE_float("mass", 0.1, "Mass of every map in the mass protocol, as a share of the crop.")
_PROTOCOL = flags.DEFINE_enum(
  "protocol", "mass", ["mass", "paper", "both"], "Drop protocol: ours (mass), the paper's (paper), or both."
)
_AS_PUBLISHED = flags.DEFINE_bool(
  "paper_as_published", False, "The paper's protocol keeps its published 8-bit wrap-around (default: clipped)."
)


def main(argv):
  config = cli.resolve(_CONFIG, _OVERRIDES)  # every value checked before anything loads
  cli.start(argv, out_dirs=[_OUT_DIR])
  from canonsal_jax import fileio
  from canonsal_jax.evidence import faithfulness

  try:
    table = faithfulness.run_protocol(
      config,
      cms_path=_CMS.value,
      images=_IMAGES.value,
      methods=_METHODS.value,
      max_images=_MAX_IMAGES.value,
      group=_GROUP.value,
      cms_random_path=_CMS_RANDOM.value,
      mass=_MASS.value,
      steps=_STEPS.value,
      protocol=_PROTOCOL.value,
      paper_as_published=_AS_PUBLISHED.value,
      progress=lambda done, total, name: logging.info("%d/%d %s", done, total, name),
    )
  except (ValueError, FileNotFoundError, fileio.FormatError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  written = faithfulness.write_evaluation(table, _OUT_DIR.value)
  for row in table["rows"]:
    print(
      f"{row['method']:>22} ({row['kind']}): drop {row['average_drop_pct']:6.2f}%  increase "
      f"{row['increase_in_confidence_pct']:5.1f}%  win {row['win_pct']:5.1f}%  deletion(blur) "
      f"{row['deletion_auc_blur']:.3f}  insertion(blur) {row['insertion_auc_blur']:.3f}"
    )
  if "paper" in table:
    print("the paper's protocol" + (", as published (8-bit wrap-around):" if _AS_PUBLISHED.value else ":"))
    for row in table["paper"]["rows"]:
      print(
        f"{row['method']:>22}: "
        + "  ".join(
          f"{k} {row[k]:6.2f} [{row[k + '_ci'][0]:.2f}, {row[k + '_ci'][1]:.2f}]"
          for k in ("average_drop_pct", "increase_in_confidence_pct", "win_pct")
        )
      )
    for figure, claim in table["paper"]["claims"].items():
      print(f"  {figure}: {claim['statement']}")
  print(f"{len(table['images'])} test faces ({len(table['skipped'])} skipped); wrote {', '.join(map(str, written))}")
  return 0


if __name__ == "__main__":
  cli.run(main)
