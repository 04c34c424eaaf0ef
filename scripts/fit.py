r"""Fits a 3D morphable model to the largest face of a photo: mesh (OBJ/PLY) and an overlay PNG.

python scripts/fit.py --out_dir=/tmp/fit                                   # astronaut, embedded default
python scripts/fit.py --image=face.jpg --morphable_model=../shared/assets/sfm --out_dir=out
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
_IMAGE = flags.DEFINE_string("image", None, "Photo to fit (default: scikit-image's astronaut).")
_MORPHABLE = flags.DEFINE_string(
  "morphable_model", None, '"default" or the folder of a Surrey Face Model copy (overrides config).'
)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the outputs.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from canonsal_jax import faces, io, pipeline

  config = _CONFIG.value
  if _MORPHABLE.value is not None:
    config.morphable_model = _MORPHABLE.value
  logging.info("config:\n%s", config)
  try:
    fit = pipeline.fit_image(config, _IMAGE.value)
  except (ValueError, FileNotFoundError, io.ImageError, faces.NoFaceError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = pipeline.write_fit(fit, _OUT_DIR.value)
  yaw, pitch, roll = summary["yaw_pitch_roll_deg"]
  print(
    f"{summary['name']}: {summary['morphable_model']} fitted, yaw {yaw:.1f} pitch {pitch:.1f} roll {roll:.1f} deg, "
    f"landmark RMS {summary['landmark_rms_px']:.2f} px; wrote {_OUT_DIR.value}/mesh.obj and overlay.png"
  )
  return 0


if __name__ == "__main__":
  app.run(main)
