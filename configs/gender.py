"""Occlusion saliency of the `gender` model; everything else as configs/default.py.

Run:
  python scripts/occlusion.py --config=configs/gender.py --out_dir=/tmp/canonsal_gender
"""

import ml_collections

from canonsal_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.model = "gender"
  return config
