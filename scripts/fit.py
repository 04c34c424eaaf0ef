r"""Fits a 3D morphable model to a face of a photo (--face: which, default the largest): mesh and an overlay PNG.

python scripts/fit.py --out_dir=/tmp/fit                                   # astronaut, embedded default
python scripts/fit.py --image=face.jpg --morphable_model=path/to/sfm --out_dir=out
python scripts/fit.py --image=small_face.jpg --config.upsample=2 --out_dir=out     # a small face: upsample more
"""

from absl import flags

from canonsal_jax import cli

_CONFIG = cli.define_config()
_OVERRIDES = cli.define_overrides(model=False, face=True, landmarks=True)
_IMAGE = flags.DEFINE_string("image", None, "Photo to fit (default: scikit-image's astronaut).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the outputs.", required=True)
_OVERWRITE = cli.define_overwrite()


def main(argv):
  config = cli.resolve(_CONFIG, _OVERRIDES)  # every value checked before anything loads
  cli.start(argv, out_dirs=[_OUT_DIR])
  from canonsal_jax import fileio, outputs, pipeline, viz

  photo = _IMAGE.value or str(fileio.default_image_path())
  folder = cli.claim_out_dir(_OUT_DIR, _OVERWRITE, config, kind="fit", inputs=cli.run_inputs(config, {"photo": photo}))

  with cli.user_errors() as failed:
    figures = viz.FigureSettings.from_config(config)
    fit = pipeline.fit_image(config, _IMAGE.value)
  if failed:
    return 1
  summary = outputs.write_fit(fit, _OUT_DIR.value, settings=figures)
  folder.finish()
  yaw, pitch, roll = summary["yaw_pitch_roll_deg"]
  face = f"face {summary['face_index']} of {summary['num_faces']} ({summary['face_choice']})"
  print(
    f"{summary['name']}, {face}: {summary['morphable_model']} fitted, yaw {yaw:.1f} pitch {pitch:.1f} "
    f"roll {roll:.1f} deg, "
    f"landmark RMS {summary['landmark_rms_px']:.2f} px; wrote {_OUT_DIR.value}/mesh.obj and overlay.{figures.format}"
  )
  return 0


if __name__ == "__main__":
  cli.run(main)
