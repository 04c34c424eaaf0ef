r"""Times the fit's occluding-edge jaw matching against fixed-candidate matching, interleaved, same faces.

python scripts/bench_fit_silhouette.py --morphable_model=../shared/assets/sfm --batch_size=64 --repeats=7

Prints ms/face for `contour_matching="occluding"` (the default) and `"candidates"` at one batch size and the
median of the per-round ratios (occluding / candidates): what the silhouette step costs.
"""

import dataclasses
import time

import jax
import numpy as np
from absl import app, flags

_MODEL = flags.DEFINE_string("morphable_model", None, "The Surrey Face Model folder.", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Faces per fit call.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed rounds (each runs both, alternating).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from canonsal_jax.morphable import evaluate, fitting, sfm

  model = sfm.load_sfm(_MODEL.value)
  truth = evaluate.synthetic_faces(model, np.random.default_rng(0), _BATCH.value)
  landmarks, size = truth["landmarks"], truth["image_size"]
  configs = {
    name: dataclasses.replace(fitting.DEFAULT_FIT_CONFIG, contour_matching=name) for name in fitting.CONTOUR_MATCHING
  }
  for config in configs.values():  # compile outside the timing
    jax.block_until_ready(fitting.fit(model, landmarks, image_size=size, config=config))
  times = {name: [] for name in configs}
  for _ in range(_REPEATS.value):
    for name, config in configs.items():
      start = time.perf_counter()
      jax.block_until_ready(fitting.fit(model, landmarks, image_size=size, config=config))
      times[name].append(time.perf_counter() - start)
  for name, ts in times.items():
    print(f"{name:10s} {1e3 * np.median(ts) / _BATCH.value:.2f} ms/face (batch {_BATCH.value})")
  ratio = np.median(np.array(times["occluding"]) / np.array(times["candidates"]))
  print(f"median ratio occluding / candidates {ratio:.2f}")
  return 0


if __name__ == "__main__":
  app.run(main)
