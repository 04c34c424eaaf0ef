"""Occlusion saliency of the `age` model; everything else as configs/default.py.

Run:
  python scripts/occlusion.py --config=configs/age.py --out_dir=/tmp/canonsal_age
"""

import ml_collections

from canonsal_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.model = "age"
  return config
