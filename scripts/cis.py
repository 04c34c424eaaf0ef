r"""Canonical Image Saliency of one face: occlusion heatmap, 3DMM fit, the map on the canonical face.

python scripts/cis.py --out_dir=/tmp/cis                               # astronaut, gender, embedded 3DMM
python scripts/cis.py --image=face.jpg --model=age --morphable_model=../shared/assets/sfm --out_dir=out
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"),
  "Configuration file.",
  lock_config=True,
)
_IMAGE = flags.DEFINE_string("image", None, "Photo to explain (default: scikit-image's astronaut).")
_MODEL = flags.DEFINE_string("model", None, "Face model to explain (overrides config.model).")
_MORPHABLE = flags.DEFINE_string("morphable_model", None, '"default" or a Surrey Face Model folder.')
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the outputs.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from canonsal_jax import faces, io, pipeline

  config = _CONFIG.value
  if _MODEL.value is not None:
    config.model = _MODEL.value
  if _MORPHABLE.value is not None:
    config.morphable_model = _MORPHABLE.value
  logging.info("config:\n%s", config)
  try:
    result = pipeline.cis_image(config, _IMAGE.value)
  except (ValueError, FileNotFoundError, io.ImageError, faces.NoFaceError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = pipeline.write_cis(result, _OUT_DIR.value, render_size=config.cis.render_size)
  print(
    f"{summary['name']}: {summary['label']} ({summary['score_kind']} {summary['score']:.3f}); "
    f"{summary['outside_mesh_share']:.0%} of the saliency off the mesh; wrote {_OUT_DIR.value}/cis.png"
  )
  return 0


if __name__ == "__main__":
  app.run(main)
