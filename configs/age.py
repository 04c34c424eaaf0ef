"""Occlusion saliency of the `age` model; everything else as configs/default.py.

Run:
  python scripts/occlusion.py --config=configs/age.py --out_dir=/tmp/canonsal_age
"""

import ml_collections

from canonsal_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.model = "age"
  # With --config.occlusion.drill_down.enabled=True (3 px patches at stride 1, 3,844 of them): every 3rd position
  # (484 patches), then 4 rounds of 192 (whole batches of 16, 32 or 64), each picking on the map with the rounds
  # before it: 33% of the patches. On 9 photos it keeps the top-10% overlap >= 0.95 (worst 0.954) and the CMS's r
  # with the exact CMS at 0.99; 4x over the full sweep with both at --config.occlusion.batch_size=64
  # (BENCHMARKS.md, "Fine rounds: age at 4x").
  config.occlusion.drill_down.coarse_every = 3
  config.occlusion.drill_down.fine_fraction = 0.1997  # ceil(0.1997 * 3844 / 4) = 192
  config.occlusion.drill_down.fine_rounds = 4
  return config
