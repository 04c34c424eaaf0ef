"""The paper's occlusion settings (John et al., T-BIOM 2021): a black square of ~7% of the face width
(15 px on a 224 px face), every position (stride 1), the drop averaged over the patches covering a pixel.

Run:
  python scripts/occlusion.py --config=configs/paper.py --config.model=age --out_dir=/tmp/canonsal_paper
"""

import ml_collections

from canonsal_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.occlusion.patch_size = 0.07
  config.occlusion.stride = 1
  config.occlusion.baseline = "black"
  config.occlusion.reduce = "mean"
  return config
