"""Figures: one colour scale per figure with a keyed colour bar, labelled panels, no-data marked (never zero
saliency), probe and reference on one scale, closed eyes on the canonical face, vector output on request.

The figures are checked on their matplotlib objects (colour bars, norms, titles, legends), built from synthetic
results on the embedded 3DMM, so no face model runs here.
"""

import dataclasses
import io
import types

import chex
import numpy as np
import pytest
from matplotlib import colors
from PIL import Image

from canonsal_jax import canonical, faces, fileio, outputs, pipeline, verification, viz
from canonsal_jax import config as config_lib

_RENDER = 128  # small renders keep these tests fast; the default size is checked on the config


# ------------------------------------------------------------------------------------------ colours


def test_colorize_marks_no_data_and_uses_shared_scale():
  values = np.array([[0.0, 0.5], [1.0, 7.0]])
  valid = np.array([[True, True], [True, False]])
  rgb = viz.colorize(values, valid=valid, vmax=1.0)
  assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
  np.testing.assert_array_equal(rgb[1, 1], viz.NO_DATA_RGB)
  assert rgb[0, 0].max() < 10  # zero saliency is black on the sequential scale, not the no-data grey
  assert rgb[1, 0].min() > 150  # the scale's end is its lightest colour
  # The colours are the colour bar's: the same colour map and norm as `make_scale`.
  scale = viz.make_scale([values], valid=[valid], unit="u", vmax=1.0)
  np.testing.assert_array_equal(rgb[0, 1], np.asarray(scale.cmap(scale.norm(0.5), bytes=True))[:3])


def test_signed_maps_diverge():
  rgb = viz.colorize(np.array([[-2.0, 0.0, 2.0]])).astype(int)
  assert rgb[0, 1].min() >= 240 and np.ptp(rgb[0, 1]) <= 2  # zero is near-white
  assert rgb[0, 0, 2] > rgb[0, 0, 0] and rgb[0, 2, 0] > rgb[0, 2, 2]  # blue for negative, red for positive


def test_scale_is_diverging_and_centred_for_signed_maps_and_sequential_otherwise():
  signed = viz.make_scale([np.array([-0.5, 2.0]), np.array([1.0, -3.0])], unit="u")
  assert signed.signed and isinstance(signed.norm, colors.TwoSlopeNorm)
  assert signed.norm.vcenter == 0 and (signed.norm.vmin, signed.norm.vmax) == (-3.0, 3.0)
  assert signed.cmap.name.startswith(viz.DIVERGING)
  unsigned = viz.make_scale([np.array([0.0, 2.0])], valid=[np.array([True, True])], unit="u")
  assert not unsigned.signed and (unsigned.norm.vmin, unsigned.norm.vmax) == (0.0, 2.0)
  assert unsigned.cmap.name.startswith(viz.SEQUENTIAL)
  # Values without data take no part in the scale.
  masked = viz.make_scale([np.array([-9.0, 1.0])], valid=[np.array([False, True])], unit="u")
  assert not masked.signed and masked.vmax == 1.0


def test_unit_labels_and_short_names():
  assert viz.unit_label("log-odds") == "drop in log-odds when hidden"
  assert viz.unit_label(["cosine", "cosine contrast", "cosine"]) == "drop in cosine / cosine contrast when hidden"
  assert "each image / its max |drop|" in viz.unit_label("log-odds", "max_abs")
  assert viz.unit_label("log-odds", absolute=True).startswith("|drop| in log-odds")
  with pytest.raises(ValueError, match=r"cms\.normalisation"):
    viz.unit_label("log-odds", "max")
  assert viz.short_name("/home/someone/.cache/canonsal_jax/photos/obama2.jpg") == "obama2"
  long = viz.short_name("/data/" + "x" * 50 + "_end.png", max_chars=20)
  assert len(long) == 20 and long.endswith("_end") and "…" in long


def test_figure_settings_are_checked_and_read_from_the_config():
  config = config_lib.default_config()
  assert viz.FigureSettings.from_config(config) == viz.FigureSettings(dpi=150, format="png")
  assert config.cis.render_size >= 512  # canonical renders that read on a laptop screen
  with pytest.raises(ValueError, match=r"^figures\.format must be one of png, svg, pdf, got 'jpg'$"):
    config.figures.format = "jpg"
    viz.FigureSettings.from_config(config)
  with pytest.raises(ValueError, match=r"figures\.dpi"):
    viz.FigureSettings(dpi=0)


def test_panel_and_upscale_shapes():
  img = np.zeros((10, 20, 3), np.uint8)
  out = viz.panel([img, viz.upscale(img, 3)], "title", height=40)
  assert out.dtype == np.uint8 and out.shape[0] == 40 + 24 + 16


# ------------------------------------------------------------------------------------------ figures


@pytest.fixture(scope="module")
def model3d():
  from canonsal_jax.morphable import default

  try:
    return default.default_model(fetch=False)
  except FileNotFoundError as e:
    pytest.skip(f"the embedded 3DMM is not built in this cache: {e}")


def _occlusion(name: str = "/a/long/cache/folder/photos/person_0001.jpg", scale: float = 1.0, uncovered: bool = True):
  """A synthetic occlusion result on the astronaut: a positive blob (eyes), a negative one (mouth), and the last
  two rows and columns uncovered (as a stride that does not divide the crop leaves them)."""
  image = fileio.default_image()
  s = 32
  rows, cols = np.indices((s, s))
  heat = np.exp(-((rows - 12) ** 2 + (cols - 16) ** 2) / 20.0) - 0.5 * np.exp(
    -((rows - 24) ** 2 + (cols - 16) ** 2) / 10
  )
  count = np.ones((s, s), np.int32)
  if uncovered:
    count[-2:, :] = count[:, -2:] = 0
  heat = (scale * np.where(count > 0, heat, 0.0)).astype(np.float32)
  heatmap_image = np.full(image.shape[:2], np.nan, np.float32)
  heatmap_image[100:228, 170:298] = np.kron(np.where(count > 0, heat, np.nan), np.ones((4, 4)))
  face = faces.Face(np.array([170.0, 100, 297, 227]), 1.0, np.zeros((68, 2)), np.zeros((5, 2)))
  return pipeline.OcclusionResult(
    name=name,
    model="gender",
    label="female",
    score_kind="log-odds",
    target=0,
    score=2.5,
    probabilities=np.array([0.9, 0.1]),
    image=image,
    face=face,
    crop=image[100:228:4, 170:298:4],
    crop_from_image=np.array([[0.25, 0, -42.5], [0, 0.25, -25]]),
    heatmap=heat,
    count=count,
    heatmap_image=heatmap_image,
    patch_size=3,
    stride=4,
    num_patches=64,
  )


def _cis(model3d, occ, scale: float = 1.0):
  size = 64
  layout = np.asarray(canonical.model_uv_raster(model3d, size).tri_id) >= 0
  rows, cols = np.indices((size, size))
  weight = (layout & (rows < 48)).astype(np.float32)  # some of the layout unseen
  texture = (scale * np.sin(rows / 7.0) * np.cos(cols / 9.0) * weight).astype(np.float32)
  fit = types.SimpleNamespace(
    alpha=np.zeros(model3d.num_shape), beta=np.zeros(model3d.num_expression), yaw_pitch_roll=np.zeros(3)
  )
  face_fit = pipeline.FaceFit(name=occ.name, image=occ.image, face=occ.face, model=model3d, fit=fit)
  return pipeline.CISResult(occ, face_fit, texture, weight, 0.1, {"eyes": 1.0}, 0)


def _colorbars(fig):
  return [ax._colorbar for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def _titles(fig):
  return [ax.get_title() for ax in fig.axes]


def _key(fig):
  return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def _map_images(fig):
  """The images drawn on the figure's scale (scalar maps with a norm), by their panel's title."""
  return {
    ax.get_title(): im
    for ax in fig.axes
    for im in ax.get_images()
    if im.get_array().ndim == 2 and im.get_cmap().name != "gray"
  }


def test_occlusion_figure_has_one_keyed_scale_labelled_panels_and_contours():
  occ = _occlusion()
  fig = outputs.occlusion_figure(occ)
  (bar,) = _colorbars(fig)
  assert bar.ax.get_ylabel() == "drop in log-odds when hidden"
  assert isinstance(bar.norm, colors.TwoSlopeNorm) and bar.norm.vcenter == 0  # the map is signed
  assert bar.norm.vmax == pytest.approx(float(np.abs(occ.heatmap).max())) == -bar.norm.vmin
  assert {"photo", "model crop (32 px)", "heatmap on the crop"} <= set(_titles(fig))
  heat = _map_images(fig)["heatmap on the crop"]
  assert heat.norm.vmin == bar.norm.vmin and heat.norm.vmax == bar.norm.vmax
  photo = next(ax for ax in fig.axes if ax.get_title() == "photo")
  assert photo.get_images()[0].get_cmap().name == "gray"  # the photo is greyscale under the map
  assert any(c.norm is heat.norm or c.norm.vmax == bar.norm.vmax for c in photo.collections)  # contours, same scale
  key = _key(fig)
  assert "model crop" in key and any(k.startswith("no data: 124 crop pixels no patch covered") for k in key)
  title = fig._suptitle.get_text()
  assert "person_0001" in title and "/a/long" not in title
  # Fully covered crops need no no-data entry.
  assert not any(k.startswith("no data") for k in _key(outputs.occlusion_figure(_occlusion(uncovered=False))))


def test_titles_wrap_inside_the_figure():
  occ = dataclasses.replace(_occlusion(), name="/x/" + "a_very_long_photo_name_" * 4 + ".jpg", model="m" * 80)
  fig = outputs.occlusion_figure(occ)
  fig.canvas.draw()
  box = fig._suptitle.get_window_extent()
  assert box.x0 >= 0 and box.x1 <= fig.bbox.width and "\n" in fig._suptitle.get_text()


def test_cis_figure_shares_one_scale_with_the_canonical_face(model3d):
  occ = _occlusion()
  cis = _cis(model3d, occ, scale=3.0)  # the canonical map is larger than the crop's: the one scale covers both
  fig = outputs.cis_figure(cis, render_size=_RENDER)
  (bar,) = _colorbars(fig)
  assert bar.ax.get_ylabel() == "drop in log-odds when hidden"
  assert bar.norm.vmax == pytest.approx(float(np.abs(cis.texture).max()))
  assert {"photo", "model crop (32 px)", "heatmap on the crop", "canonical face (CIS)"} <= set(_titles(fig))
  assert _map_images(fig)["heatmap on the crop"].norm.vmax == bar.norm.vmax
  face = next(ax for ax in fig.axes if ax.get_title() == "canonical face (CIS)")
  assert face.get_images()[0].get_array().shape == (_RENDER, _RENDER, 3)
  assert "no data: texels not seen in the photo" in _key(fig)


def test_pair_figure_labels_probe_and_reference_on_one_scale(model3d):
  probe = _cis(model3d, _occlusion("/cache/obama.jpg", scale=1.0))
  reference = _cis(model3d, dataclasses.replace(_occlusion("/cache/obama2.jpg", scale=4.0), score_kind="cosine"))
  pair = verification.PairResult(probe, reference, "", 0.9, 0.4, True, 0.6, float("nan"))
  fig = verification.pair_figure(pair, render_size=_RENDER)
  (bar,) = _colorbars(fig)  # one colour bar for both sides
  assert bar.ax.get_ylabel() == "drop in log-odds / cosine when hidden"
  images = _map_images(fig)
  a, b = images["probe: heatmap on the crop"], images["reference: heatmap on the crop"]
  assert (a.norm.vmin, a.norm.vmax) == (b.norm.vmin, b.norm.vmax) == (bar.norm.vmin, bar.norm.vmax)
  assert bar.norm.vmax == pytest.approx(4.0 * float(np.abs(probe.occlusion.heatmap).max()), rel=1e-6)
  assert verification.pair_scale(pair).vmax == bar.norm.vmax
  titles = set(_titles(fig))
  assert {"probe: photo", "probe: canonical face", "reference: photo", "reference: canonical face"} <= titles
  labels = [ax.get_ylabel() for ax in fig.axes]
  assert "probe\nobama" in labels and "reference\nobama2" in labels
  assert "/cache" not in fig._suptitle.get_text()
  # The canonical faces are drawn on that scale: the same texture renders alike on both sides.
  faces_rgb = [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_title().endswith("canonical face")]
  chex.assert_trees_all_equal(faces_rgb[0], faces_rgb[1])


def test_cms_figure_has_its_unit_and_no_data_key(model3d):
  size = 64
  layout = np.asarray(canonical.model_uv_raster(model3d, size).tri_id) >= 0
  values = np.where(layout, np.linspace(0, 1, size)[None], np.nan)
  scale = viz.make_scale([values], valid=[layout], unit=viz.unit_label("log-odds", "max_abs", absolute=True))
  fig = outputs.cms_figure(
    model3d, values, layout, scale, "CMS | group all", no_data="no data: texels no image saw", render_size=_RENDER
  )
  (bar,) = _colorbars(fig)
  assert bar.ax.get_ylabel() == "|drop| in log-odds when hidden (each image / its max |drop|)"
  assert not isinstance(bar.norm, colors.TwoSlopeNorm) and bar.norm.vmin == 0  # non-negative: sequential
  assert "canonical face" in _titles(fig) and "no data: texels no image saw" in _key(fig)


def test_cms_views_of_a_kind_share_one_scale_and_name_the_score(model3d, tmp_path, monkeypatch):
  from canonsal_jax import cms

  size = 64
  layout = (np.asarray(canonical.model_uv_raster(model3d, size).tri_id) >= 0).astype(np.float32)
  rng = np.random.default_rng(0)
  acc = cms.CMSAccumulator(cms.CMSSettings(texture_size=size))
  for i, group in enumerate(["pred_a", "pred_b", "pred_a"]):
    texture = (rng.normal(size=(size, size)) * layout).astype(np.float32)
    acc.add(i, f"/x/{i}.png", texture, layout, group=("all", group), record={"score_kind": "log-odds"})
  figures = {}
  monkeypatch.setattr(viz, "save_figure", lambda fig, out, stem, settings: figures.setdefault(stem, fig))
  outputs.write_cms(acc, tmp_path, model3d, render_size=_RENDER)
  assert {"cms_all", "cms_pred_a", "cms_pred_b", "cms_all_abs", "cms_diff_pred_a_vs_pred_b"} <= set(figures)
  bars = {stem: _colorbars(fig)[0] for stem, fig in figures.items()}
  signed = [bars[s].norm for s in ("cms_all", "cms_pred_a", "cms_pred_b")]
  assert len({(n.vmin, n.vmax) for n in signed}) == 1 and all(n.vcenter == 0 for n in signed)
  assert bars["cms_all"].ax.get_ylabel() == "drop in log-odds when hidden (each image / its max |drop|)"
  assert bars["cms_all_abs"].norm.vmin == 0 and bars["cms_all_abs"].ax.get_ylabel().startswith("|drop|")
  assert bars["cms_diff_pred_a_vs_pred_b"].ax.get_ylabel().startswith("A minus B: drop in log-odds")
  assert "2 images" in figures["cms_pred_a"]._suptitle.get_text()


def test_canonical_face_has_closed_eyes(model3d):
  """The embedded head's eye sockets are holes in its mesh: through them the render showed the inside of the back
  of the head, coloured with that part of the map. They are now capped and drawn as no data."""
  size = 256
  t = 64
  layout = (np.asarray(canonical.model_uv_raster(model3d, t).tri_id) >= 0).astype(np.float32)
  rgb = canonical.render_canonical(model3d, layout, layout, size, vmax=1.0, signed=False)  # all data, value 1
  # The eyes' landmarks in the render: the render's own frontal fit of the mean shape (x right, y down).
  mean = np.asarray(model3d.mean, np.float64)
  lo, hi = mean[:, :2].min(0), mean[:, :2].max(0)
  px = size * (1 - 2 * 0.05) / (hi - lo).max()
  centre = (lo + hi) / 2
  eyes = mean[np.asarray(model3d.landmark_ids)[36:48]]
  x = (eyes[:, 0] - centre[0]) * px + size / 2 - 0.5
  y = (centre[1] - eyes[:, 1]) * px + size / 2 - 0.5
  inside = np.zeros((size, size), bool)
  for xs, ys in ((x[:6], y[:6]), (x[6:], y[6:])):
    inside[int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1] = True
  region = rgb[inside].astype(int)
  grey = (region[:, 0] == region[:, 1]) & (region[:, 1] == region[:, 2])  # no data; every value here is yellow
  assert grey.mean() > 0.2, "the eye sockets show another part of the map instead of a cap"
  assert not (region == 255).all(-1).any()  # no holes to the white background either
  sample = canonical.sample_canonical(model3d, layout, layout, size)
  assert sample.cap[inside].sum() == grey.sum() and (sample.weight[sample.cap] == 0).all()


@pytest.mark.parametrize("fmt,magic", [("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_vector_figures_on_request(model3d, tmp_path, fmt, magic):
  settings = viz.FigureSettings(dpi=72, format=fmt)
  cis = _cis(model3d, _occlusion())
  outputs.write_cis(cis, tmp_path, render_size=_RENDER, settings=settings)
  for stem in ("overlay", "cis"):
    assert (tmp_path / f"{stem}.{fmt}").read_bytes().startswith(magic)
    assert not (tmp_path / f"{stem}.png").exists()


def test_png_figures_keep_their_names_and_dpi(tmp_path):
  path = viz.save_figure(outputs.occlusion_figure(_occlusion()), tmp_path, "overlay", viz.FigureSettings(dpi=80))
  assert path == tmp_path / "overlay.png"
  rgb = fileio.load_image(path)
  fig = outputs.occlusion_figure(_occlusion())
  chex.assert_shape(rgb, (round(fig.get_figheight() * 80), round(fig.get_figwidth() * 80), 3))
  # The pixels are matplotlib's own PNG of the figure on white, as RGB (drawn on the canvas, encoded once).
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=80, facecolor="white")
  np.testing.assert_array_equal(rgb, np.asarray(Image.open(buffer).convert("RGB")))


def test_figures_leave_no_pyplot_state():
  import sys

  outputs.occlusion_figure(_occlusion())
  assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()


# ------------------------------------------------------------------------------------------- faces and results


def _with_faces(occ):
  """The synthetic result as one of three faces found (its own box the middle one), chosen as the largest."""
  other_left = faces.Face(np.array([10.0, 10, 49, 49]), 0.5, np.zeros((68, 2)), np.zeros((5, 2)))
  other_right = faces.Face(np.array([400.0, 300, 459, 359]), 0.2, np.zeros((68, 2)), np.zeros((5, 2)))
  detection = faces.Detection((other_left, occ.face, other_right), 1, "largest", occ.image.shape[:2])
  return dataclasses.replace(occ, detection=detection)


def _rectangles(ax, label):
  from matplotlib.patches import Rectangle

  return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_label() == label]


def test_the_photo_panel_boxes_the_face_explained_and_mutes_the_others():
  occ = _with_faces(_occlusion())
  fig = outputs.occlusion_figure(occ)
  photo = fig.axes[0]
  assert photo.get_title() == "photo"
  (chosen,) = _rectangles(photo, viz.CHOSEN_FACE_LABEL)
  x0, y0, x1, y1 = occ.face.box_xyxy  # dlib's inclusive corners: the box covers half a pixel more each side
  assert chosen.get_xy() == (x0 - 0.5, y0 - 0.5)
  assert (chosen.get_width(), chosen.get_height()) == (x1 - x0 + 1, y1 - y0 + 1)
  others = _rectangles(photo, viz.OTHER_FACE_LABEL)
  assert sorted(r.get_xy() for r in others) == [(9.5, 9.5), (399.5, 299.5)]
  assert all(r.get_linewidth() < chosen.get_linewidth() for r in others)
  assert [t.get_text() for t in photo.texts] == ["0", "1", "2"]  # numbered as --face counts them
  labels = [t.get_text() for t in fig.legends[0].get_texts()]
  assert viz.CHOSEN_FACE_LABEL in labels and viz.OTHER_FACE_LABEL in labels
  for ax in fig.axes[1:]:
    assert not _rectangles(ax, viz.CHOSEN_FACE_LABEL)
  # Given the face alone (no detection), the face is still boxed, with nothing else.
  fig = outputs.occlusion_figure(_occlusion())
  assert len(_rectangles(fig.axes[0], viz.CHOSEN_FACE_LABEL)) == 1 and not _rectangles(fig.axes[0], "other faces found")


def test_result_json_records_every_face_and_the_choice_and_no_photo_sized_array(tmp_path):
  import json

  occ = _with_faces(_occlusion())
  summary = outputs.write_occlusion(occ, tmp_path)
  assert json.loads((tmp_path / "result.json").read_text()) == summary
  assert summary["num_faces"] == 3 and summary["face_index"] == 1 and summary["face_choice"] == "largest"
  assert summary["faces"][1] == {"index": 1, "box_xyxy": [170.0, 100.0, 297.0, 227.0], "score": 1.0}
  assert summary["face_box_xyxy"] == summary["faces"][1]["box_xyxy"]
  assert summary["label"] == "female" and summary["probabilities"] == [0.9, 0.1]
  assert not (tmp_path / "heatmap_image.npy").exists()  # photo-sized: only on request
  outputs.write_occlusion(occ, tmp_path / "with", heatmap_image=True)
  np.testing.assert_array_equal(np.load(tmp_path / "with" / "heatmap_image.npy"), occ.heatmap_image)


def test_an_embedding_result_has_a_similarity_and_distance_and_no_class_fields(tmp_path):
  import json

  occ = dataclasses.replace(
    _occlusion(), model="identity", label="", score_kind="cosine", target=-1, score=0.93,
    probabilities=np.zeros(0), distances=(0.41,),
  )  # fmt: skip
  summary = outputs.write_occlusion(occ, tmp_path)
  saved = json.loads((tmp_path / "result.json").read_text())
  assert saved == summary
  assert not {"label", "probabilities", "target"} & set(saved)
  assert saved["score_kind"] == "cosine" and saved["score"] == 0.93 and saved["distance"] == 0.41
  assert outputs.describe(saved) == "cosine similarity 0.930, distance 0.410"
  fig = outputs.occlusion_figure(occ)
  assert "cosine similarity 0.930, distance 0.410" in fig._suptitle.get_text()
  contrast = dataclasses.replace(occ, score_kind="cosine contrast", distances=(0.41, 0.72))
  saved = outputs.occlusion_summary(contrast)
  assert saved["distance"] == 0.41 and saved["impostor_distance"] == 0.72 and "label" not in saved
  classifier = outputs.occlusion_summary(_occlusion())
  assert outputs.describe(classifier) == "female (log-odds 2.500)"
