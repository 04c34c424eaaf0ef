"""Tests for `canonsal_jax.fileio`: image loading and validation, atomic writes, versioned array files."""

import os

import numpy as np
import pytest
from PIL import Image

from canonsal_jax import fileio


def _gradient_rgb(h=6, w=8):
  """A small RGB image whose pixels all differ, so orientation and channel order are visible."""
  i, j = np.mgrid[0:h, 0:w]
  return np.stack([i * 30, j * 25, 255 - i * 10 - j * 5], axis=-1).astype(np.uint8)


def test_rgb_png_round_trip(tmp_path):
  rgb = _gradient_rgb()
  fileio.save_png(tmp_path / "a.png", rgb)
  got = fileio.load_image(tmp_path / "a.png")
  assert got.dtype == np.uint8 and got.shape == (6, 8, 3)
  np.testing.assert_array_equal(got, rgb)


def test_grey_png_becomes_three_equal_channels(tmp_path):
  grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
  Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
  np.testing.assert_array_equal(fileio.load_image(tmp_path / "g.png"), np.repeat(grey[..., None], 3, axis=-1))


def test_one_bit_png(tmp_path):
  bits = (np.arange(16).reshape(4, 4) % 2).astype(bool)
  Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
  np.testing.assert_array_equal(fileio.load_image(tmp_path / "b.png")[..., 0], bits * np.uint8(255))


def test_rgba_png_is_composited_on_white(tmp_path):
  rgba = np.zeros((2, 3, 4), dtype=np.uint8)
  rgba[..., 0] = 200
  rgba[..., 3] = [[255, 0, 128], [255, 0, 128]]
  Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
  got = fileio.load_image(tmp_path / "t.png")
  # opaque: the colour; transparent: white; half: the rounded mix, (c * a + 255 * (255 - a)) / 255.
  np.testing.assert_array_equal(got[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(got[0, 1], [255, 255, 255])
  np.testing.assert_array_equal(got[0, 2], np.round(np.array([200, 0, 0]) * 128 / 255 + 127).astype(np.uint8))


def test_la_png_is_composited_on_white(tmp_path):
  la = np.stack([np.full((2, 2), 10, np.uint8), np.array([[255, 0], [255, 0]], np.uint8)], axis=-1)
  Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
  got = fileio.load_image(tmp_path / "la.png")
  np.testing.assert_array_equal(got[:, 0], 10)
  np.testing.assert_array_equal(got[:, 1], 255)


def test_sixteen_bit_png_is_scaled_by_its_full_range(tmp_path):
  values = np.array([[0, 257, 32896], [65535, 65280, 128]], dtype=np.uint16)
  Image.fromarray(values).save(tmp_path / "d.png")
  with Image.open(tmp_path / "d.png") as im:
    assert im.mode in ("I;16", "I")  # Pillow's reading of a 16-bit grey PNG
  got = fileio.load_image(tmp_path / "d.png")
  np.testing.assert_array_equal(got[..., 0], np.round(values / 65535 * 255).astype(np.uint8))
  assert got[1, 1, 0] == 254  # 65280 is 254.0 on the 8-bit scale; clipping would have given 255


def test_sixteen_bit_tiff_big_endian(tmp_path):
  values = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
  Image.frombytes("I;16B", (2, 2), values.astype(">u2").tobytes()).save(tmp_path / "d.tif")
  got = fileio.load_image(tmp_path / "d.tif")
  np.testing.assert_array_equal(got[..., 1], np.round(values / 65535 * 255).astype(np.uint8))


def test_palette_png_with_and_without_transparency(tmp_path):
  palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
  index = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
  im = Image.fromarray(index, mode="P")
  im.putpalette(palette)
  im.save(tmp_path / "p.png")
  colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
  np.testing.assert_array_equal(fileio.load_image(tmp_path / "p.png"), colours[index])
  im.save(tmp_path / "pt.png", transparency=1)  # index 1 transparent -> white
  expected = colours[index].copy()
  expected[index == 1] = 255
  np.testing.assert_array_equal(fileio.load_image(tmp_path / "pt.png"), expected)


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
  Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red
  got = fileio.load_image(tmp_path / "c.jpg").astype(int)
  assert got.shape == (8, 8, 3)
  assert np.all(got[..., 0] > 240) and np.all(got[..., 1:] < 15)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
  # A 16 x 32 (h x w) image, left half black, right half white; JPEG keeps flat halves exact enough.
  stored = np.zeros((16, 32, 3), dtype=np.uint8)
  stored[:, 16:] = 255
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
  got = fileio.load_image(tmp_path / "r.jpg")
  # EXIF orientation 6: the stored image must be turned 90 degrees clockwise to show upright; 8: anticlockwise.
  expected = {1: stored, 3: np.rot90(stored, 2), 6: np.rot90(stored, -1), 8: np.rot90(stored, 1)}[orientation]
  assert got.shape == expected.shape
  assert np.abs(got.astype(int) - expected).max() < 40  # JPEG ringing only at the edge between the halves
  assert np.abs(got.astype(int) - expected).mean() < 3


def test_truncated_png_raises_naming_the_file(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
  data = (tmp_path / "full.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
  with pytest.raises(fileio.ImageError, match=r"cut\.png.*(truncated|corrupt)"):
    fileio.load_image(tmp_path / "cut.png")


def test_text_file_raises_naming_the_file(tmp_path):
  (tmp_path / "notes.txt").write_text("not an image\n")
  with pytest.raises(fileio.ImageError, match=r"notes\.txt.*not a recognised image"):
    fileio.load_image(tmp_path / "notes.txt")


def test_empty_missing_and_directory_raise(tmp_path):
  (tmp_path / "empty.png").write_bytes(b"")
  with pytest.raises(fileio.ImageError, match=r"empty\.png.*empty"):
    fileio.load_image(tmp_path / "empty.png")
  with pytest.raises(fileio.ImageError, match=r"missing\.png"):
    fileio.load_image(tmp_path / "missing.png")
  with pytest.raises(fileio.ImageError, match="directory"):
    fileio.load_image(tmp_path)
  assert issubclass(fileio.ImageError, ValueError)


def test_corrupt_jpeg_raises(tmp_path):
  Image.fromarray(_gradient_rgb(32, 32)).save(tmp_path / "ok.jpg")
  data = bytearray((tmp_path / "ok.jpg").read_bytes())
  (tmp_path / "cut.jpg").write_bytes(bytes(data[: len(data) // 3]))
  with pytest.raises(fileio.ImageError, match=r"cut\.jpg"):
    fileio.load_image(tmp_path / "cut.jpg")


def test_decompression_bomb_guard_is_kept(tmp_path, monkeypatch):
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px is over twice the limit
  with pytest.raises(fileio.ImageError, match=r"big\.png.*decompression-bomb"):
    fileio.load_image(tmp_path / "big.png")


def test_validate_image_conversions():
  rgb = _gradient_rgb()
  assert fileio.validate_image(rgb) is rgb or np.shares_memory(fileio.validate_image(rgb), rgb)
  np.testing.assert_array_equal(fileio.validate_image(rgb.astype(np.float32) / 255), rgb)
  np.testing.assert_array_equal(fileio.validate_image(rgb.astype(np.uint16) * 257), rgb)
  grey = rgb[..., 0]
  np.testing.assert_array_equal(fileio.validate_image(grey), np.repeat(grey[..., None], 3, axis=-1))
  np.testing.assert_array_equal(fileio.validate_image(grey[..., None]), np.repeat(grey[..., None], 3, axis=-1))
  rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)
  np.testing.assert_array_equal(fileio.validate_image(rgba), rgb)
  out = fileio.validate_image(rgb[:, ::-1])
  assert out.flags.c_contiguous


@pytest.mark.parametrize(
  "array, pattern",
  [
    (np.zeros((4, 4, 3), np.float32) + np.nan, "NaN or infinite"),
    (np.full((4, 4, 3), np.inf), "NaN or infinite"),
    (np.zeros((4, 4, 3), np.float32) + 1.5, r"\[0, 1\]"),
    (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
    (np.zeros((4,), np.uint8), "shape"),
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.zeros((4, 4, 3), np.int64), "dtype"),
  ],
)
def test_validate_image_rejects_with_the_name(array, pattern):
  with pytest.raises(fileio.ImageError, match=f"photo 7.*{pattern}"):
    fileio.validate_image(array, "photo 7")


def test_default_image_is_the_astronaut():
  image = fileio.default_image()
  assert image.shape == (512, 512, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(fileio.load_image(fileio.default_image_path()), image)
  import skimage.data  # the independent reference: scikit-image's own loader

  np.testing.assert_array_equal(image, skimage.data.astronaut())


def _no_temp_files(directory):
  return [p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_atomic_writes_leave_no_temp_files_and_create_parents(tmp_path):
  out = tmp_path / "new" / "deeper"
  fileio.write_atomic(out / "b.bin", b"abc")
  fileio.save_npy(out / "a.npy", np.arange(5))
  fileio.save_png(out / "c.png", _gradient_rgb())
  fileio.save_json(out / "d.json", {"x": np.float32(1.5), "y": np.arange(3), "z": [np.int64(2)]})
  fileio.save_npz(out / "e.cache", w=np.eye(2, dtype=np.float32), b=np.arange(3))
  with np.load(out / "e.cache") as cached:  # exactly the given name, no ".npz" appended
    np.testing.assert_array_equal(cached["w"], np.eye(2))
    np.testing.assert_array_equal(cached["b"], np.arange(3))
  assert (out / "b.bin").read_bytes() == b"abc"
  np.testing.assert_array_equal(np.load(out / "a.npy"), np.arange(5))
  np.testing.assert_array_equal(fileio.load_image(out / "c.png"), _gradient_rgb())
  assert (
    out / "d.json"
  ).read_text() == '{\n  "x": 1.5,\n  "y": [\n    0,\n    1,\n    2\n  ],\n  "z": [\n    2\n  ]\n}\n'
  assert sorted(p.name for p in out.iterdir()) == ["a.npy", "b.bin", "c.png", "d.json", "e.cache"]
  umask = os.umask(0)
  os.umask(umask)
  assert (out / "b.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
  fileio.write_atomic(tmp_path / "f.json", b"old")
  with pytest.raises(TypeError):
    fileio.save_json(tmp_path / "f.json", {"bad": object()})  # fails before anything is written
  with pytest.raises(ValueError, match=r"allow_pickle|[Oo]bject"):
    fileio.save_npy(tmp_path / "f.json", np.array([object()]))  # fails while writing the temp file
  assert (tmp_path / "f.json").read_bytes() == b"old"
  assert _no_temp_files(tmp_path) == []


def test_save_png_rejects_non_uint8(tmp_path):
  with pytest.raises(ValueError, match="uint8"):
    fileio.save_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))


def test_versioned_npz_round_trip_and_mismatches(tmp_path):
  path = tmp_path / "cache" / "model.npz"
  fileio.save_npz_versioned(path, "morphable_model", 3, mean=np.ones((4, 3), np.float32), ids=np.arange(2))
  assert _no_temp_files(path.parent) == []
  got = fileio.load_npz_versioned(path, "morphable_model", 3)
  assert sorted(got) == ["ids", "mean"]
  np.testing.assert_array_equal(got["mean"], np.ones((4, 3), np.float32))
  with pytest.raises(
    fileio.FormatError, match=r"model\.npz.*'morphable_model' version 3, expected 'morphable_model' version 4"
  ):
    fileio.load_npz_versioned(path, "morphable_model", 4)
  with pytest.raises(fileio.FormatError, match="'morphable_model' version 3, expected 'cms' version 3"):
    fileio.load_npz_versioned(path, "cms", 3)
  np.savez(tmp_path / "plain.npz", a=np.zeros(2))
  with pytest.raises(fileio.FormatError, match="not a versioned"):
    fileio.load_npz_versioned(tmp_path / "plain.npz", "cms", 1)
  (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 junk")
  with pytest.raises(fileio.FormatError, match=r"junk\.npz"):
    fileio.load_npz_versioned(tmp_path / "junk.npz", "cms", 1)
  with pytest.raises(fileio.FormatError, match=r"absent\.npz"):
    fileio.load_npz_versioned(tmp_path / "absent.npz", "cms", 1)
  with pytest.raises(ValueError, match="reserved"):
    fileio.save_npz_versioned(path, "cms", 1, __version__=np.zeros(1))
