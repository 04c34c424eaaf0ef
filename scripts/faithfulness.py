r"""Faithfulness of the CMS against rival saliency methods and controls, on test images disjoint from the CMS's.

python -c "from canonsal_jax import datasets; print(*datasets.builtin_dataset('lfw')[1:41], sep='\n')" >/tmp/lfw.txt
python scripts/cms.py --images=/tmp/lfw.txt --out_dir=/tmp/cms           # a CMS of 40 LFW crops (not the astronaut)
python scripts/faithfulness.py --cms=/tmp/cms --images=builtin:photos --out_dir=/tmp/eval \
  --methods=cms,occlusion,grad_cam,grad_cam_plus_plus,vanilla_gradient,integrated_gradients
python scripts/faithfulness.py --cms=/tmp/cms --images=builtin:photos --out_dir=/tmp/paper --protocol=paper

`--protocol=all` (the default) runs the three protocols and writes three tables. `headline.csv`, the headline:
every map (methods and controls) hides 10% of the crop, and hidden pixels become a copy of the photo blurred in
pixel space (a Gaussian of 1/16 of the crop side: 2 px on the gender model's 32 px crop), which no method uses as
its own baseline; Average Drop %, % Increase in Confidence, Win % and deletion/insertion AUC on that blurred
photo, each with a bootstrap interval and the CMS's Holm-corrected paired test against every other map.
`metrics.csv` (`--protocol=mass`), the extended table: every map the same mass with a constant substitute (0 in
model input space), deletion/insertion AUC with a constant and a lightly blurred substrate, model-randomisation
rank correlation, p-values against the controls. `paper.csv` (`--protocol=paper`): the paper's table as its
released code computes it (the CMS against Grad-CAM, Grad-CAM++ and Score-CAM, whatever `--methods` says), each
figure with a bootstrap interval and each rival's Holm-corrected paired test against the CMS; the corrected
8-bit cast by default, the published wrap-around with `--paper_as_published` (`metrics.json` holds the other
variant too). `--protocol=blur|mass|paper|both|all` (both: mass and paper). `metrics.json` holds everything, per
image too. The score is the predicted class's probability, or for the identity model the cosine similarity to
the unaltered crop's own embedding.
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
_OUT_DIR = flags.DEFINE_string(
  "out_dir", None, "Folder for headline.csv, metrics.csv, paper.csv and metrics.json.", required=True
)
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Use at most this many test faces (0: all).")
_STEPS = flags.DEFINE_integer("steps", 64, "Deletion / insertion steps.")
_MASS = flags.DEFINE_float("mass", 0.1, "Mass of every map in the mass protocol, as a share of the crop.")
_PROTOCOL = flags.DEFINE_enum(
  "protocol",
  "all",
  ["blur", "mass", "paper", "both", "all"],
  "Drop protocols: the headline (blur: a blurred photo), ours with a constant (mass), the paper's (paper), "
  "mass and paper (both), or all three.",
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
  print(faithfulness.summary_text(table))
  print(f"{len(table['images'])} test faces ({len(table['skipped'])} skipped); wrote {', '.join(map(str, written))}")
  return 0


if __name__ == "__main__":
  cli.run(main)
