r"""Times the fit's occluding-edge jaw matching against fixed-candidate matching, interleaved, same faces.

python -m benchmarks.fit_silhouette --morphable_model=path/to/sfm --batch_size=64 --repeats=7

Prints ms/face for `contour_matching="occluding"` (the default) and `"candidates"` at one batch size and the
median of the per-round ratios (occluding / candidates): what the silhouette step costs.
"""

import dataclasses
import statistics

import numpy as np
from absl import app, flags

from canonsal_jax import cli

_MODEL = cli.define_sfm(required=True)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Faces per fit call.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed rounds (each runs both, alternating).")


def main(argv):
  cli.start(argv)
  from benchmarks import bench
  from canonsal_jax.evidence import fit_accuracy
  from canonsal_jax.morphable import fitting, sfm

  model = sfm.load_sfm(_MODEL.value)
  truth = fit_accuracy.synthetic_faces(model, np.random.default_rng(0), _BATCH.value)
  landmarks, size = truth["landmarks"], truth["image_size"]
  configs = {
    name: dataclasses.replace(fitting.DEFAULT_FIT_CONFIG, contour_matching=name) for name in fitting.CONTOUR_MATCHING
  }
  fns = {  # the warm-up round compiles both
    name: (lambda c=config: fitting.fit(model, landmarks, image_size=size, config=c))
    for name, config in configs.items()
  }
  times = bench.interleaved_seconds(fns, repeats=_REPEATS.value)
  for name, ts in times.items():
    print(f"{name:10s} {1e3 * statistics.median(ts) / _BATCH.value:.2f} ms/face (batch {_BATCH.value})")
  print(f"median ratio occluding / candidates {bench.median_ratio(times['occluding'], times['candidates']):.2f}")
  return 0


if __name__ == "__main__":
  app.run(main)
