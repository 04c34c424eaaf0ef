r"""Verification saliency: probe and reference side by side, each explained against the other, on the canonical face.

python scripts/verify.py --out_dir=/tmp/pair     # face_recognition's obama.jpg vs obama2.jpg, identity model
python scripts/verify.py --probe=a.jpg --reference=b.jpg --impostor=c.jpg --out_dir=/tmp/pair
"""

import pathlib

from absl import app, flags

from canonsal_jax import cli

_CONFIG = cli.define_config("identity.py")
_OVERRIDES = cli.define_overrides()
_PROBE = flags.DEFINE_string("probe", None, "The photo whose identity is checked (default: a shipped test photo).")
_REFERENCE = flags.DEFINE_string("reference", None, "The reference photo (default: a second photo of that person).")
_IMPOSTOR = flags.DEFINE_string(
  "impostor", None, "Optionally a photo of someone else: the probe's map explains genuine minus impostor similarity."
)
_THRESHOLD = flags.DEFINE_float("threshold", 0.6, "Descriptor distance below which the model says 'same person'.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the outputs.", required=True)
_OVERWRITE = cli.define_overwrite()


def main(argv):
  config = cli.resolve(_CONFIG, _OVERRIDES)  # every value checked before anything loads
  cli.start(argv, out_dirs=[_OUT_DIR])
  from canonsal_jax import datasets, verification, viz

  probe, reference = _PROBE.value, _REFERENCE.value
  if (probe is None) != (reference is None):
    raise app.UsageError("give both --probe and --reference, or neither (the shipped example pair)")
  if probe is None:
    photos = {pathlib.Path(p).stem.rsplit("_", 1)[-1]: p for p in datasets.builtin_dataset("photos")}
    probe, reference = photos["obama"], photos["obama2"]
  inputs = cli.run_inputs(config, {"probe": probe, "reference_photo": reference, "impostor_photo": _IMPOSTOR.value})
  folder = cli.claim_out_dir(_OUT_DIR, _OVERWRITE, config, kind="verify", inputs=inputs)
  with cli.user_errors() as failed:
    figures = viz.FigureSettings.from_config(config)
    pair = verification.verify_pair(config, probe, reference, impostor=_IMPOSTOR.value, threshold=_THRESHOLD.value)
  if failed:
    return 1
  summary = verification.write_pair(pair, _OUT_DIR.value, render_size=config.cis.render_size, settings=figures)
  folder.finish()
  verdict = "same person" if summary["same_person"] else "different people"
  print(
    f"{verdict}: distance {summary['distance']:.3f} (threshold {summary['threshold']}), cosine "
    f"{summary['cosine']:.3f}; wrote {_OUT_DIR.value}/pair.{figures.format}"
  )
  return 0


if __name__ == "__main__":
  cli.run(main)
