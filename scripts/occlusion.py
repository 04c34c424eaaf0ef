r"""Occlusion saliency of one face: writes the heatmap (.npy) and an overlay PNG with the prediction.

python scripts/occlusion.py --out_dir=/tmp/canonsal_out                      # astronaut, gender model
python scripts/occlusion.py --image=face.jpg --model=age --out_dir=out
python scripts/occlusion.py --config=configs/paper.py --config.occlusion.stride=2 --out_dir=out
"""

import pathlib
import sys
import time

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
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the outputs.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  import jax

  from canonsal_jax import faces, io, pipeline

  config = _CONFIG.value
  if _MODEL.value is not None:
    config.model = _MODEL.value
  logging.info("devices: %s", jax.devices())
  logging.info("config:\n%s", config)
  start = time.perf_counter()
  try:
    result = pipeline.explain_image(config, _IMAGE.value)
  except (ValueError, io.ImageError, faces.NoFaceError) as e:  # one clear line, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = pipeline.write_occlusion(result, _OUT_DIR.value)
  logging.info("%d patches in %.2f s (compile included)", summary["num_patches"], time.perf_counter() - start)
  what = f"{summary['label']} ({summary['score_kind']} {summary['score']:.3f})"
  print(f"{summary['name']}: {what}; wrote {_OUT_DIR.value}/overlay.png and heatmap.npy")
  return 0


if __name__ == "__main__":
  app.run(main)
