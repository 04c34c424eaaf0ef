"""Identity saliency with dlib's ResNet face descriptor (150 px chips): the paper's ~7% patch (7 px here), every
4th position (1,296 occluded chips per face, ~20 s per face on a 2-core CPU with the full sweep (1,296 x ~16 ms);
stride 1 takes 16x longer).

Run:
  python scripts/cis.py --config=configs/identity.py --out_dir=/tmp/canonsal_identity
  python scripts/verify.py --probe=a.jpg --reference=b.jpg --out_dir=/tmp/pair
  python scripts/cms.py --config=configs/identity.py --out_dir=/tmp/cms_identity
"""

import ml_collections

from canonsal_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.model = "identity"
  config.occlusion.stride = 4
  return config
