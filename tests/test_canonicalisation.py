"""Canonicalisation check: one face at several yaws, its CIS maps compared across views.

Unit tests pin the 2-D baseline (`evidence.warp2d`), the synthetic renders (`evidence.synthetic`) and the
summary of `evidence.canonicalisation`; the slow tests run the whole CIS pipeline on renders of the
astronaut's fitted, textured face and compare the 3-D path with the 2-D piecewise-affine warp.
"""

import numpy as np
import pytest
import scipy.ndimage
import scipy.spatial

from canonsal_jax.evidence import canonicalisation, synthetic, warp2d


def _landmarks(rng: np.random.Generator, n: int = 68) -> np.ndarray:
  """A jittered grid of `n` points in about [20, 100]^2 (no three collinear in practice)."""
  side = int(np.ceil(np.sqrt(n)))
  grid = np.stack(np.meshgrid(np.linspace(20, 100, side), np.linspace(25, 95, side)), -1).reshape(-1, 2)[:n]
  return grid + rng.uniform(-3, 3, grid.shape)


def _smooth_map(rng: np.random.Generator, size: int) -> np.ndarray:
  return scipy.ndimage.gaussian_filter(rng.standard_normal((size, size)), 3.0) * 10


def test_template_covers_the_hull():
  points = _landmarks(np.random.default_rng(0))
  template = warp2d.make_template(points, 96)
  inside = scipy.spatial.Delaunay(template.landmarks_xy).find_simplex(
    np.stack(np.meshgrid(np.arange(96), np.arange(96)), -1).reshape(-1, 2).astype(float)
  )
  agree = (inside >= 0).reshape(96, 96) == template.inside
  assert agree.mean() > 0.995  # pixel centres exactly on the hull's edge may go either way
  np.testing.assert_allclose(template.bary[template.inside].sum(-1), 1.0, atol=1e-9)
  assert template.landmarks_xy.min() >= 0 and template.landmarks_xy.max() <= 95


def test_warp_of_an_affine_image_of_the_template_is_the_affine_resampling():
  """Landmarks that are an affine image of the template: every triangle's affine is that one affine."""
  rng = np.random.default_rng(1)
  template = warp2d.make_template(_landmarks(rng), 96)
  linear = np.array([[0.55, -0.12], [0.08, 0.5]])
  offset = np.array([6.0, 4.0])
  face_landmarks = template.landmarks_xy @ linear.T + offset  # image xy
  crop_from_image = np.array([[1.1, 0.05, -2.0], [-0.04, 0.95, 1.5]])
  heatmap = _smooth_map(rng, 64)
  values, weight = warp2d.warp_to_template(heatmap, face_landmarks, template, crop_from_image=crop_from_image)

  rows, cols = np.indices((96, 96))
  image_xy = np.stack([cols, rows], -1) @ linear.T + offset
  crop_xy = image_xy @ crop_from_image[:, :2].T + crop_from_image[:, 2]
  expected = scipy.ndimage.map_coordinates(heatmap, [crop_xy[..., 1], crop_xy[..., 0]], order=1, mode="nearest")
  in_crop = np.all((crop_xy >= -0.5) & (crop_xy <= 63.5), axis=-1)
  check = template.inside & in_crop
  assert check.sum() > 2000
  np.testing.assert_allclose(values[check], expected[check], atol=1e-9 * np.abs(heatmap).max())
  np.testing.assert_allclose(weight[check], 1.0)
  assert np.all(weight[~template.inside] == 0) and np.all(values[~template.inside] == 0)
  assert np.all(weight[template.inside & ~in_crop] == 0)  # outside the crop: no data, never zero saliency


def test_warp_is_exact_on_linear_maps_under_a_piecewise_warp():
  """A linear function of crop xy is reproduced exactly through any piecewise-affine warp (bilinear is exact)."""
  rng = np.random.default_rng(2)
  template = warp2d.make_template(_landmarks(rng), 80)
  face_landmarks = template.landmarks_xy * 0.6 + rng.uniform(-1.5, 1.5, template.landmarks_xy.shape) + 5
  rows, cols = np.indices((64, 64))
  heatmap = 2.0 * cols - 0.5 * rows + 3.0
  values, weight = warp2d.warp_to_template(heatmap, face_landmarks, template)
  xy = warp2d.template_to_image(template, face_landmarks)
  ok = weight > 0
  np.testing.assert_allclose(values[ok], 2.0 * xy[ok][:, 0] - 0.5 * xy[ok][:, 1] + 3.0, atol=1e-9 * 200)


def test_warp_renormalises_over_valid_pixels():
  template = warp2d.make_template(_landmarks(np.random.default_rng(3)), 64)
  heatmap = np.full((64, 64), 5.0)
  valid = np.ones((64, 64), bool)
  valid[:, 32:] = False
  heatmap[:, 32:] = 1e6  # never read: invalid
  values, weight = warp2d.warp_to_template(heatmap, template.landmarks_xy, template, valid=valid)
  np.testing.assert_allclose(values[weight > 0], 5.0)
  assert np.all(weight[:, 33:] == 0) and np.all(weight[template.inside][:, None] >= 0)


def test_agreement():
  rng = np.random.default_rng(4)
  a = rng.standard_normal(500)
  valid = np.ones(500, bool)
  assert synthetic.agreement(a, 3 * a + 1, valid).pearson == pytest.approx(1.0)
  assert synthetic.agreement(a, -a, valid).spearman == pytest.approx(-1.0)
  valid[:498] = False
  assert np.isnan(synthetic.agreement(a, a, valid).pearson)


def _square_face(colour=(200.0, 100.0, 50.0), size=16) -> synthetic.TexturedFace:
  """A 100 x 100 square at z = 0 facing +z (two counter-clockwise triangles), one flat colour."""
  vertices = np.array([[-50, -50, 0], [50, -50, 0], [50, 50, 0], [-50, 50, 0]], np.float32)
  return synthetic.TexturedFace(
    vertices=vertices,
    triangles=np.array([[0, 1, 2], [0, 2, 3]], np.int32),
    uv=np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32),
    texture=np.broadcast_to(np.asarray(colour, np.float32), (size, size, 3)).copy(),
    seen=np.ones((size, size), np.float32),
  )


def test_summary_groups_faces_by_model_map_and_yaw():
  """`canonicalisation.summarise`: one entry per (model, map, yaw), sorted, the faces' r in their order."""

  def row(face, model, yaw, three_d, two_d):
    agree = synthetic.ViewAgreement(
      cis=synthetic.Agreement(three_d, three_d, 100),
      cis_face=None,
      cis_hull=None,
      shared_share=0.5,
      warp=synthetic.Agreement(two_d, two_d, 100),
      warp_share=0.5,
    )
    return canonicalisation.Row(face, model, "saliency", yaw, yaw, "female", agree)

  rows = [row("a", "gender", 20.0, 0.9, 0.8), row("b", "gender", 20.0, 0.6, 0.7), row("a", "age", -20.0, 0.5, 0.1)]
  got = canonicalisation.summarise(rows)
  assert [(s.model, s.yaw) for s in got] == [("age", -20.0), ("gender", 20.0)]
  assert got[1].three_d == (0.9, 0.6) and got[1].two_d == (0.8, 0.7) and got[1].wins == 1
  assert got[0].wins == 1 and canonicalisation.summarise([]) == []


def test_render_draws_the_textured_mesh_where_the_camera_projects_it():
  from canonsal_jax.morphable import fitting

  face = _square_face()
  view = synthetic.render(face, np.radians([0.0, 0.0, 0.0]), scale=1.0, image_size=(128, 160), background=(0, 0, 0))
  assert view.image.shape == (128, 160, 3)
  np.testing.assert_array_equal(view.image[64, 80], [200, 100, 50])
  np.testing.assert_array_equal(view.image[5, 5], [0, 0, 0])
  covered = np.all(view.image == [200, 100, 50], axis=-1)
  assert covered.sum() == pytest.approx(100 * 100, rel=0.03)
  expected = fitting.project(face.vertices, np.eye(3), 1.0, np.array([79.5, 63.5]))
  np.testing.assert_allclose(view.vertices_xyd, expected, atol=1e-4)

  turned = synthetic.render(face, np.radians([60.0, 0.0, 0.0]), scale=1.0, image_size=(128, 160))
  covered = np.all(turned.image == [200, 100, 50], axis=-1)
  assert covered.sum() == pytest.approx(100 * 50, rel=0.05)  # cos 60 = 0.5
  back = synthetic.render(face, np.radians([180.0, 0.0, 0.0]), scale=1.0, image_size=(128, 160))
  assert np.all(back.image == 128)  # back faces are culled: only the background


def test_render_fills_holes_with_the_cavity_colour():
  face = _square_face()
  inner = np.array([[-10, -10, 0], [10, -10, 0], [10, 10, 0], [-10, 10, 0]], np.float32)
  vertices = np.concatenate([face.vertices, inner])
  # A frame around a 20 x 20 hole: eight counter-clockwise triangles between the outer and inner squares.
  triangles = []
  for k in range(4):
    o0, o1, i0, i1 = k, (k + 1) % 4, 4 + k, 4 + (k + 1) % 4
    triangles += [[o0, o1, i1], [o0, i1, i0]]
  uv = (vertices[:, :2] + 50) / 100
  face = face._replace(vertices=vertices, triangles=np.array(triangles, np.int32), uv=uv)
  view = synthetic.render(face, np.zeros(3), scale=1.0, image_size=(128, 128), cavity=(1, 2, 3))
  np.testing.assert_array_equal(view.image[64, 64], [1, 2, 3])
  np.testing.assert_array_equal(view.image[64, 30], [200, 100, 50])
  np.testing.assert_array_equal(view.image[2, 2], [128, 128, 128])


# --------------------------------------------------------------------------------- the whole pipeline, per yaw

_YAWS_DEG = (0, -20, 20, -40, 40)


@pytest.fixture(scope="module")
def sfm_views(shared_dir):
  """The astronaut fitted with the Surrey model, textured, rendered at each yaw; CIS (gender) of each render."""
  from canonsal_jax import config as config_lib
  from canonsal_jax import faces, pipeline

  config = config_lib.default_config()
  config.morphable_model = str(shared_dir / "assets" / "sfm")
  config.model = "gender"  # 32 px crops: ~2 s per view on a CPU; scripts/canonicalisation_check.py reports "age"
  fit = pipeline.fit_image(config)
  face = synthetic.textured_face(fit.model, fit.image, fit.fit)
  detector = faces.default_detector(config.detector)
  out = {}
  for yaw in _YAWS_DEG:
    view = synthetic.render(face, np.radians([yaw, 0.0, 0.0]), scale=float(fit.fit.scale) * synthetic.VIEW_ZOOM)
    found = detector.detect(view.image, upsample=1, adjust_threshold=config.detector_threshold)
    assert found, f"dlib's HOG detector finds no face in the render at yaw {yaw}"
    result = pipeline.cis_face(config, view.image, found[0], f"yaw {yaw}")
    config.occlusion.target = result.occlusion.target  # every view explains the frontal view's prediction
    out[yaw] = (view, result)
  reference = out[0][1]
  template = warp2d.make_template(reference.occlusion.face.landmarks_xy, 128)
  return fit.model, template, out


@pytest.mark.slow
def test_renders_are_detected_and_fitted_at_their_yaw(sfm_views):
  _, _, views = sfm_views
  for yaw, (_, result) in views.items():
    fitted = np.degrees(result.fit.fit.yaw_pitch_roll[0])
    # Measured: -14.9, +14.8, -28.7, +30.6 at -20, 20, -40, 40: landmark fits under-estimate yaw by about a
    # quarter (the main error of the 3-D path here, see the luminance test).
    assert abs(fitted - yaw) <= 2.0 + 0.4 * abs(yaw), (yaw, fitted)


@pytest.mark.slow
def test_cis_maps_agree_across_yaws(sfm_views):
  model, template, views = sfm_views
  reference = views[0][1]
  three_d, two_d = {}, {}
  for yaw in _YAWS_DEG[1:]:
    a = synthetic.compare_views(reference, views[yaw][1], model, template)
    three_d[yaw], two_d[yaw] = a.cis.pearson, a.warp.pearson
    assert a.shared_share > 0.5, (yaw, a.shared_share)  # measured 0.64-0.83
  # Measured (CPU): 3-D 0.757 / 0.786 at -20 / +20, 0.519 / 0.566 at -40 / +40.
  assert min(three_d[-20], three_d[20]) > 0.65, three_d
  assert min(three_d[-40], three_d[40]) > 0.4, three_d
  # The 2-D warp: 0.757 / 0.765 at +-20, 0.497 / 0.486 at +-40. At +-20 the two paths tie (3-D ahead by 0.01
  # on average, not a robust margin); at +-40 the 3-D path is ahead by 0.05.
  assert (three_d[-20] + three_d[20]) / 2 > (two_d[-20] + two_d[20]) / 2 - 0.02, (three_d, two_d)
  assert (three_d[-40] + three_d[40]) / 2 > (two_d[-40] + two_d[40]) / 2 + 0.02, (three_d, two_d)


@pytest.mark.slow
def test_true_geometry_registers_better_than_the_2d_warp(sfm_views):
  """Canonicalising the crops' own luminance isolates registration from the model's view-dependent saliency.

  With the render's true mesh the 3-D path lines the views up almost perfectly (r >= 0.95 where both see the
  face) and beats the piecewise-affine warp at every yaw; with the fitted mesh it is held back by the fit's
  under-estimated yaw (measured 0.93 / 0.93 / 0.85 / 0.83 vs the warp's 0.97 / 0.96 / 0.89 / 0.83).
  """
  model, template, views = sfm_views
  reference_view, reference = views[0]

  def luminance_maps(view, result, truth):
    grey = synthetic.luminance(result.occlusion.crop)
    ones = np.ones(grey.shape, bool)
    return grey, ones, *synthetic.crop_texture(result, grey, ones, vertices_xyd=view.vertices_xyd if truth else None)

  for yaw in _YAWS_DEG[1:]:
    view, result = views[yaw]
    true = synthetic.compare_views(
      reference, result, model, template,
      maps=(luminance_maps(reference_view, reference, True), luminance_maps(view, result, True)),
    )  # fmt: skip
    fitted = synthetic.compare_views(
      reference, result, model, template,
      maps=(luminance_maps(reference_view, reference, False), luminance_maps(view, result, False)),
    )  # fmt: skip
    assert true.cis.pearson > 0.93, (yaw, true)  # measured 0.952-0.985
    assert true.cis.pearson > true.warp.pearson, (yaw, true)
    assert fitted.cis.pearson > 0.75, (yaw, fitted)  # measured 0.825-0.955
