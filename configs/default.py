"""Default settings for occlusion saliency of one face (every key lives here; variants override a few).

Run:
  python scripts/occlusion.py --out_dir=/tmp/canonsal_out
  python scripts/occlusion.py --config=configs/default.py --config.model=age --image=face.jpg --out_dir=out

Expect `heatmap.npy` (the model-crop heatmap), `count.npy`, `result.json` (with every face found), `manifest.json` and
`overlay.png` (the photo and the model's crop in grey with the heatmap's contours, the heatmap on the crop, one
colour bar in "drop in <score> when hidden", the predicted label in the title) in the output folder;
`--config.figures.format=svg` writes `overlay.svg` instead; `--config.outputs.heatmap_image=True` adds
`heatmap_image.npy` (the heatmap at the photo's size).
"""

import ml_collections

from canonsal_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  return config_lib.default_config()
