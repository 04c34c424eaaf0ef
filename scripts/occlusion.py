r"""Occlusion saliency of one face: writes the heatmap (.npy) and an overlay PNG with the prediction.

python scripts/occlusion.py --out_dir=/tmp/canonsal_out                      # astronaut, gender model
python scripts/occlusion.py --image=face.jpg --model=age --out_dir=out
python scripts/occlusion.py --image=group.jpg --face=central --out_dir=out      # which face: result.json lists them
python scripts/occlusion.py --config=configs/paper.py --config.occlusion.stride=2 --out_dir=out
python scripts/occlusion.py --list_models                                    # what --model accepts
python scripts/occlusion.py --list_config                                    # every --config.<key> and its value
"""

import time

from absl import flags, logging

from canonsal_jax import cli

_CONFIG = cli.define_config()
_OVERRIDES = cli.define_overrides(morphable_model=False, face=True, landmarks=True)
_IMAGE = flags.DEFINE_string("image", None, "Photo to explain (default: scikit-image's astronaut).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the outputs.", required=True)
_OVERWRITE = cli.define_overwrite()


def main(argv):
  config = cli.resolve(_CONFIG, _OVERRIDES)  # every value checked before anything loads
  cli.start(argv, out_dirs=[_OUT_DIR])
  import jax

  from canonsal_jax import fileio, outputs, pipeline, viz

  photo = _IMAGE.value or str(fileio.default_image_path())
  folder = cli.claim_out_dir(
    _OUT_DIR, _OVERWRITE, config, kind="occlusion", inputs=cli.run_inputs(config, {"photo": photo})
  )

  logging.vlog(1, "devices: %s", jax.devices())
  start = time.perf_counter()
  with cli.user_errors() as failed:
    figures = viz.FigureSettings.from_config(config)
    result = pipeline.explain_image(config, _IMAGE.value)
  if failed:
    return 1
  summary = outputs.write_occlusion(
    result, _OUT_DIR.value, settings=figures, heatmap_image=config.outputs.heatmap_image
  )
  folder.finish()
  logging.info("%d patches in %.2f s (compile included)", summary["num_patches"], time.perf_counter() - start)
  wrote = f"wrote {_OUT_DIR.value}/overlay.{figures.format} and heatmap.npy"
  print(f"{summary['name']}: {outputs.describe(summary)}; {wrote}")
  return 0


if __name__ == "__main__":
  cli.run(main)
