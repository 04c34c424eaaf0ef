r"""Canonicalisation check (no labels needed): one face rendered at several yaws, CIS maps compared across views.

The astronaut's face is fitted with the 3DMM, textured from the photo and rendered at each yaw
(`canonsal_jax.synthetic`); the whole CIS pipeline runs on every render. Each view's map is compared with the
frontal one's, the 3-D way (CIS textures on texels both views see) and the 2-D way (heatmaps warped
piecewise-affinely onto the frontal render's landmark template, `canonsal_jax.warp2d`). Prints one line per
view: Pearson (Spearman) correlations and the shared shares.

python scripts/canonicalisation_check.py                                   # age and gender, embedded 3DMM
python scripts/canonicalisation_check.py --morphable_model=../shared/assets/sfm --models=age
"""

import pathlib
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"),
  "Configuration file.",
  lock_config=True,
)
_MODELS = flags.DEFINE_list("models", ["age", "gender"], "Face models to explain.")
_MORPHABLE = flags.DEFINE_string("morphable_model", None, '"default" or a Surrey Face Model folder.')
_YAWS = flags.DEFINE_list(
  "yaws", ["0", "-20", "20", "-40", "40"], "Yaws to render, degrees; the first is the reference."
)
_TEMPLATE_SIZE = flags.DEFINE_integer("template_size", 128, "Side of the 2-D landmark template, pixels.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "If given, the renders are written there as PNG.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  import numpy as np

  from canonsal_jax import faces, io, pipeline, synthetic, warp2d

  config = _CONFIG.value
  if _MORPHABLE.value is not None:
    config.morphable_model = _MORPHABLE.value
  logging.info("config:\n%s", config)
  yaws = [float(y) for y in _YAWS.value]
  fit = pipeline.fit_image(config)
  face = synthetic.textured_face(fit.model, fit.image, fit.fit)
  detector = faces.default_detector(config.detector)
  views = {}
  for yaw in yaws:
    view = synthetic.render(face, np.radians([yaw, 0.0, 0.0]), scale=float(fit.fit.scale) * synthetic.VIEW_ZOOM)
    found = detector.detect(view.image, upsample=config.upsample, adjust_threshold=config.detector_threshold)
    if not found:
      found = faces.default_detector("cnn").detect(view.image, upsample=config.upsample)
      print(f"yaw {yaw:+.0f}: {config.detector} found no face; cnn found {len(found)}")
    if found:
      views[yaw] = (view, found[0])
    if _OUT_DIR.value:
      io.save_png(pathlib.Path(_OUT_DIR.value) / f"render_{fit.model.name}_yaw{yaw:+.0f}.png", view.image)
  for model_name in _MODELS.value:
    config.model = model_name
    config.occlusion.target = -1
    start = time.perf_counter()
    results = {}
    for yaw, (view, found) in views.items():  # the reference first: its prediction is every view's target
      results[yaw] = pipeline.cis_face(config, view.image, found, f"yaw {yaw:+.0f}")
      if results[yaw].occlusion.target >= 0:
        config.occlusion.target = results[yaw].occlusion.target
    seconds = (time.perf_counter() - start) / max(len(results), 1)
    reference = results[yaws[0]]
    template = warp2d.make_template(reference.occlusion.face.landmarks_xy, _TEMPLATE_SIZE.value)
    print(f"{fit.model.name} 3DMM, {model_name} model ({seconds:.1f} s per view), vs yaw {yaws[0]:+.0f}:")

    def variants(result, yaw):
      crop = result.occlusion.crop
      grey, ones = synthetic.luminance(crop), np.ones(crop.shape[:2], bool)
      heat, valid = result.occlusion.heatmap, result.occlusion.count > 0
      truth = views[yaw][0].vertices_xyd
      return {
        "saliency": None,
        "saliency, true mesh": (heat, valid, *synthetic.crop_texture(result, heat, valid, vertices_xyd=truth)),
        "luminance": (grey, ones, *synthetic.crop_texture(result, grey, ones)),
        "luminance, true mesh": (grey, ones, *synthetic.crop_texture(result, grey, ones, vertices_xyd=truth)),
      }

    reference_maps = variants(reference, yaws[0])
    for yaw, result in results.items():
      if yaw == yaws[0]:
        continue
      fitted = np.degrees(result.fit.fit.yaw_pitch_roll[0])
      print(f"  yaw {yaw:+3.0f} (fitted {fitted:+5.1f}, label {result.occlusion.label}):")
      for what, maps in variants(result, yaw).items():
        pair = None if maps is None else (reference_maps[what], maps)
        a = synthetic.compare_views(reference, result, fit.model, template, maps=pair)
        print(
          f"    {what:20s} 3-D r {a.cis.pearson:.3f} (rho {a.cis.spearman:.3f}, n {a.cis.num_points}), face texels "
          f"r {a.cis_face.pearson:.3f}, in hull r {a.cis_hull.pearson:.3f} (rho {a.cis_hull.spearman:.3f}, n "
          f"{a.cis_hull.num_points}), both see {a.shared_share:.0%} | 2-D r "
          f"{a.warp.pearson:.3f} (rho {a.warp.spearman:.3f}, n {a.warp.num_points}), both cover {a.warp_share:.0%}"
        )
  return 0


if __name__ == "__main__":
  app.run(main)
