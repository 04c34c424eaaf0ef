r"""Canonical Model Saliency over a dataset: resumable, bad images skipped and recorded.

python scripts/cms.py --out_dir=/tmp/cms                                  # default photos, gender model
python scripts/cms.py --dataset=photos/ --model=age --out_dir=out         # rerun the same command to resume
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
_IMAGES = flags.DEFINE_string(
  "images", None, 'Folder, .txt list, glob, or "builtin:lfw" / "builtin:photos" (overrides config.cms.dataset).'
)
_MODEL = flags.DEFINE_string("model", None, "Face model to explain (overrides config.model).")
_MORPHABLE = flags.DEFINE_string("morphable_model", None, '"default" or a Surrey Face Model folder.')
_OUT_DIR = flags.DEFINE_string("out_dir", "outputs", "Folder for the outputs and the checkpoint.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from canonsal_jax import io, pipeline

  config = _CONFIG.value
  if _MODEL.value is not None:
    config.model = _MODEL.value
  if _MORPHABLE.value is not None:
    config.morphable_model = _MORPHABLE.value
  if _IMAGES.value is not None:
    config.cms.dataset = _IMAGES.value
  logging.info("config:\n%s", config)
  start = time.perf_counter()

  def progress(done, total, name):
    rate = done / max(time.perf_counter() - start, 1e-9)
    logging.info("%d/%d images (%.2f img/s, ETA %.0f s): %s", done, total, rate, (total - done) / rate, name)

  try:
    acc = pipeline.run_cms(config, _OUT_DIR.value, progress=progress)
  except (ValueError, FileNotFoundError, io.ImageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  skipped = [r for r in acc.records() if r["status"] != "ok"]
  print(
    f"CMS of {acc.num_images('all') if 'all' in acc.groups() else 0} images ({len(skipped)} skipped), "
    f"groups {', '.join(acc.groups()) or 'none'}; wrote {_OUT_DIR.value}"
  )
  for record in skipped:
    print(f"  skipped {record['name']}: {record['reason']}")
  return 0


if __name__ == "__main__":
  app.run(main)
