"""Colour maps: no-data is grey (never zero saliency), shared scales, signed maps diverge around white."""

import numpy as np

from canonsal_jax import viz


def test_colorize_marks_no_data_and_uses_shared_scale():
  values = np.array([[0.0, 0.5], [1.0, 7.0]])
  valid = np.array([[True, True], [True, False]])
  rgb = viz.colorize(values, valid=valid, vmax=1.0)
  assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
  np.testing.assert_array_equal(rgb[1, 1], viz._NO_DATA_RGB)
  np.testing.assert_array_equal(rgb[0, 0], viz._INFERNO[0])  # zero saliency is black, not the no-data grey
  np.testing.assert_array_equal(rgb[1, 0], viz._INFERNO[-1])
  assert not np.array_equal(rgb[0, 0], rgb[1, 1])


def test_signed_maps_diverge():
  rgb = viz.colorize(np.array([[-2.0, 0.0, 2.0]]))
  np.testing.assert_array_equal(rgb[0, 1], [247, 247, 247])
  assert rgb[0, 0, 2] > rgb[0, 0, 0] and rgb[0, 2, 0] > rgb[0, 2, 2]  # blue for negative, red for positive


def test_panel_and_overlay_shapes():
  img = np.zeros((10, 20, 3), np.uint8)
  heat = np.full((10, 20, 3), 200, np.uint8)
  np.testing.assert_array_equal(viz.overlay(img, heat, alpha=np.zeros((10, 20))), img)
  out = viz.panel([img, viz.upscale(img, 3)], "title", height=40)
  assert out.dtype == np.uint8 and out.shape[0] == 40 + 24 + 16
