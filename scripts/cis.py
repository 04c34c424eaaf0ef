r"""Canonical Image Saliency of one face: occlusion heatmap, 3DMM fit, the map on the canonical face.

python scripts/cis.py --out_dir=/tmp/cis                               # astronaut, gender, embedded 3DMM
python scripts/cis.py --image=face.jpg --model=age --morphable_model=path/to/sfm --out_dir=out
python scripts/cis.py --config=configs/identity.py --config.occlusion.stride=8 --out_dir=/tmp/cis_identity
python scripts/cis.py --image=face.jpg --landmarks=face.pts --out_dir=out  # its annotated 68 points, no detection
python scripts/cis.py --list_models                                    # what --model accepts
python scripts/cis.py --list_config                                    # every --config.<key> and its value
"""

from absl import flags

from canonsal_jax import cli

_CONFIG = cli.define_config()
_OVERRIDES = cli.define_overrides(face=True, landmarks=True)
_IMAGE = flags.DEFINE_string("image", None, "Photo to explain (default: scikit-image's astronaut).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the outputs.", required=True)
_OVERWRITE = cli.define_overwrite()


def main(argv):
  config = cli.resolve(_CONFIG, _OVERRIDES)  # every value checked before anything loads
  cli.start(argv, out_dirs=[_OUT_DIR])
  from canonsal_jax import fileio, outputs, pipeline, viz

  photo = _IMAGE.value or str(fileio.default_image_path())
  folder = cli.claim_out_dir(_OUT_DIR, _OVERWRITE, config, kind="cis", inputs=cli.run_inputs(config, {"photo": photo}))

  with cli.user_errors() as failed:
    figures = viz.FigureSettings.from_config(config)
    result = pipeline.cis_image(config, _IMAGE.value)
  if failed:
    return 1
  summary = outputs.write_cis(
    result,
    _OUT_DIR.value,
    render_size=config.cis.render_size,
    settings=figures,
    heatmap_image=config.outputs.heatmap_image,
  )
  folder.finish()
  print(
    f"{summary['name']}: {outputs.describe(summary)}; "
    f"{summary['outside_mesh_share']:.0%} of the saliency off the mesh; wrote {_OUT_DIR.value}/cis.{figures.format}"
  )
  return 0


if __name__ == "__main__":
  cli.run(main)
