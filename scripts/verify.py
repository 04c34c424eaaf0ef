r"""Verification saliency: probe and reference side by side, each explained against the other, on the canonical face.

python scripts/verify.py --out_dir=/tmp/pair     # face_recognition's obama.jpg vs obama2.jpg, identity model
python scripts/verify.py --probe=a.jpg --reference=b.jpg --impostor=c.jpg --out_dir=/tmp/pair
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "identity.py"),
  "Configuration file (default: configs/identity.py).",
  lock_config=True,
)
_PROBE = flags.DEFINE_string("probe", None, "The photo whose identity is checked (default: a shipped test photo).")
_REFERENCE = flags.DEFINE_string("reference", None, "The reference photo (default: a second photo of that person).")
_IMPOSTOR = flags.DEFINE_string(
  "impostor", None, "Optionally a photo of someone else: the probe's map explains genuine minus impostor similarity."
)
_MODEL = flags.DEFINE_string("model", None, "Embedding model (overrides config.model; default identity).")
_MORPHABLE = flags.DEFINE_string("morphable_model", None, '"default" or a Surrey Face Model folder.')
_THRESHOLD = flags.DEFINE_float("threshold", 0.6, "Descriptor distance below which the model says 'same person'.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the outputs.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from canonsal_jax import faces, io, pipeline, verification

  config = _CONFIG.value
  if _MODEL.value is not None:
    config.model = _MODEL.value
  if _MORPHABLE.value is not None:
    config.morphable_model = _MORPHABLE.value
  probe, reference = _PROBE.value, _REFERENCE.value
  if (probe is None) != (reference is None):
    raise app.UsageError("give both --probe and --reference, or neither (the shipped example pair)")
  if probe is None:
    photos = {pathlib.Path(p).stem.rsplit("_", 1)[-1]: p for p in pipeline.builtin_dataset("photos")}
    probe, reference = photos["obama"], photos["obama2"]
  logging.info("config:\n%s", config)
  try:
    pair = verification.verify_pair(config, probe, reference, impostor=_IMPOSTOR.value, threshold=_THRESHOLD.value)
  except (ValueError, FileNotFoundError, io.ImageError, faces.NoFaceError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = verification.write_pair(pair, _OUT_DIR.value, render_size=config.cis.render_size)
  verdict = "same person" if summary["same_person"] else "different people"
  print(
    f"{verdict}: distance {summary['distance']:.3f} (threshold {summary['threshold']}), cosine "
    f"{summary['cosine']:.3f}; wrote {_OUT_DIR.value}/pair.png"
  )
  return 0


if __name__ == "__main__":
  app.run(main)
