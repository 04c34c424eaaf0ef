r"""Learns the fitter's per-landmark noise model on the development photos; reports held-out errors against eos.

python tools/fit_noise_model.py --morphable_model=path/to/sfm               # learn, print the table
python tools/fit_noise_model.py --morphable_model=path/to/sfm --photos=test  # judge: the 10 test photos

The learned values go into `fitting.LEARNED_LANDMARK_SIGMA_MODEL` by hand (reviewed, committed). --photos=dev
learns on the development set (`datasets.development_photos`) and reports its held-out errors leave-one-photo-out
(learned on the other photos); --photos=test reports the held-out protocol on the 10 test photos
(`datasets.fit_test_photos`) with the committed defaults, learning nothing.
"""

import dataclasses

import numpy as np
from absl import app, flags

from canonsal_jax import cli

_MODEL = cli.define_sfm(required=True)
_PHOTOS = flags.DEFINE_enum("photos", "dev", ["dev", "test"], "dev: learn and cross-validate; test: judge only.")
_ROUNDS = flags.DEFINE_integer("rounds", None, "Fit / re-estimate rounds (default: learn_landmark_sigma's).")
_FLOOR = flags.DEFINE_float("floor", None, "Smallest sigma, model units (default: learn_landmark_sigma's).")


def _learning_settings() -> dict:
  """The flags given, as `learn_landmark_sigma`'s keywords; the rest keep the library's defaults."""
  return {k: v for k, v in (("rounds", _ROUNDS.value), ("floor", _FLOOR.value)) if v is not None}


def main(argv):
  cli.start(argv)
  from canonsal_jax import datasets
  from canonsal_jax.evidence import fit_accuracy
  from canonsal_jax.morphable import fitting, sfm

  model = sfm.load_sfm(_MODEL.value)
  if _PHOTOS.value == "test":
    photos = datasets.fit_test_photos()
    rows = fit_accuracy.held_out_table(model, photos, _MODEL.value)
  else:
    photos = datasets.development_photos()
    sigma = fit_accuracy.learn_landmark_sigma(model, photos, **_learning_settings())
    print(f'LEARNED_LANDMARK_SIGMA_MODEL["{model.name}"] = (')
    for start in range(0, len(sigma), 10):
      print("  " + " ".join(f"{v:.2f}," for v in sigma[start : start + 10]))
    print(")")
    # Leave one photo out (a photo and its mirror image together): learn on the rest, judge on it.
    groups = sorted({p.name.removesuffix("_mirrored") for p in photos})
    rows = []
    for group in groups:
      train = [p for p in photos if p.name.removesuffix("_mirrored") != group]
      held = [p for p in photos if p.name.removesuffix("_mirrored") == group]
      learned = fit_accuracy.learn_landmark_sigma(model, train, **_learning_settings())
      config = dataclasses.replace(fitting.DEFAULT_FIT_CONFIG, landmark_noise=tuple(float(v) for v in learned))
      rows += fit_accuracy.held_out_table(model, held, _MODEL.value, config=config)
  for row in rows:
    print(f"{row.name:34s} ours {row.ours.mean():.4f}  eos {row.eos.mean():.4f}  ratio {row.ratio:.3f}")
  ours, theirs = np.array([r.ours for r in rows]), np.array([r.eos for r in rows])
  print("per held-out landmark (1-based iBUG", fit_accuracy.HELD_OUT_IBUG, ")")
  print("  ours", np.round(ours.mean(0), 3), "\n  eos ", np.round(theirs.mean(0), 3))
  print(f"mean ratio {np.mean([r.ratio for r in rows]):.3f}, ratio of means {ours.mean() / theirs.mean():.3f}")
  return 0


if __name__ == "__main__":
  app.run(main)
