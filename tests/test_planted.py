"""Planted bias with known truth (`canonsal_jax.evidence.planted`): the cue, the renders, the models, the score.

Known answers: the cue changes exactly the region's texels and keeps their luminance; rendered, it moves
across the image with the yaw but lands on the same texels when carried back through the true mesh; a
perfect map's relevance mass is 1 and a uniform map's the region's share; a small model trained on the cue
follows it when the cue alone is swapped; the experiment's canonical occlusion is the pipeline's CIS.
"""

import numpy as np
import pytest

from canonsal_jax import canonical
from canonsal_jax.evidence import planted, synthetic
from canonsal_jax.morphable.model import REGION_NAMES


@pytest.fixture(scope="module")
def model3d():
  from canonsal_jax import morphable

  return morphable.default_model()


@pytest.fixture(scope="module")
def texture_size(model3d):
  return canonical.default_texture_size(planted.CROP.size, model3d)


def _nose(model3d, size):
  return planted.texel_regions(model3d, size) == REGION_NAMES.index("nose")


def test_cue_changes_exactly_the_region_and_keeps_luminance(model3d, texture_size):
  rng = np.random.default_rng(0)
  texture = rng.integers(30, 220, (texture_size, texture_size, 3)).astype(np.uint8)
  regions = planted.texel_regions(model3d, texture_size)
  assert regions.shape == (texture_size, texture_size) and regions.max() < len(REGION_NAMES)
  nose = regions == REGION_NAMES.index("nose")
  assert 100 < nose.sum() < 0.1 * nose.size
  with_cue = planted.plant_cue(texture, nose, strength=0.6)
  assert with_cue.dtype == np.uint8
  changed = np.any(with_cue != texture, axis=-1)
  np.testing.assert_array_equal(changed & ~nose, False)  # nothing outside the region, bit for bit
  assert changed[nose].mean() > 0.99  # (a texel may round back to itself)
  luma = np.array([0.299, 0.587, 0.114])
  unclipped = nose & np.all(with_cue < 255, axis=-1) & np.all(with_cue > 0, axis=-1)
  np.testing.assert_allclose(with_cue[unclipped] @ luma, texture[unclipped] @ luma, atol=1.0)  # rounding only
  green = with_cue[nose].astype(float)
  assert np.mean(green[:, 1] - green[:, [0, 2]].mean(axis=1)) > 40  # a hue shift towards green
  floats = planted.plant_cue(texture.astype(np.float32), nose, strength=0.0)
  np.testing.assert_allclose(floats, texture)  # strength 0: no cue


def test_relevance_mass_known_answers():
  rng = np.random.default_rng(1)
  region = np.zeros((40, 40), bool)
  region[10:20, 5:15] = True
  weight = rng.uniform(0.2, 1.0, (40, 40))
  weight[:, 30:] = 0.0  # no data there
  perfect = region.astype(float)
  assert planted.relevance_mass(perfect, weight, region) == pytest.approx(1.0)
  uniform = np.ones((40, 40))
  share = weight[region].sum() / weight.sum()
  assert planted.relevance_mass(uniform, weight, region) == pytest.approx(share)
  noisy = perfect - 5.0 * (~region) * rng.uniform(size=(40, 40))  # negative mass outside: not counted
  assert planted.relevance_mass(noisy, weight, region) == pytest.approx(1.0)
  no_data = perfect.copy()
  no_data[:, 30:] = 1e6  # huge values on texels without data do not count
  assert planted.relevance_mass(no_data, weight, region) == pytest.approx(1.0)
  half = perfect + (~region) * 1.0 * (weight > 0)
  inside, outside = (weight * region).sum(), (weight * ~region).sum()
  assert planted.relevance_mass(half, weight, region) == pytest.approx(inside / (inside + outside))
  assert np.isnan(planted.relevance_mass(-perfect, weight, region))


def test_rendered_cue_moves_with_yaw_but_stays_on_the_region_in_texture(model3d, texture_size):
  """The cue's pixels move across the image as the head turns; carried through the true mesh they land on the
  region's texels in every view."""
  from canonsal_jax import raster

  nose = _nose(model3d, texture_size)
  face = synthetic.TexturedFace(
    vertices=np.asarray(model3d.mean, np.float32),
    triangles=np.asarray(model3d.triangles, np.int32),
    uv=np.asarray(model3d.uv, np.float32),
    texture=np.full((texture_size, texture_size, 3), 170, np.uint8),
    seen=np.ones((texture_size, texture_size), np.float32),
  )
  cue = planted.plant_cue(face.texture, nose, strength=0.6)
  centroids = {}
  for yaw in (-35.0, 35.0):
    scene = planted.render_scene(face, np.radians([yaw, 0.0, 0.0]))
    diff = np.abs(planted.shade(scene, cue).astype(float) - planted.shade(scene, face.texture)).sum(-1)
    assert diff.sum() > 0
    centroids[yaw] = (diff * np.arange(diff.shape[1])).sum() / diff.sum()
    size = diff.shape[0]
    frags = raster.rasterize(
      scene.vertices_xyd,
      face.triangles,
      size,
      size,
      max_box=planted._RENDER_MAX_BOX,  # as render_scene: its compiled rasteriser
      cull_backfaces=True,
      max_oversized=planted._RENDER_MAX_OVERSIZED,
    )
    uvr = canonical.model_uv_raster(model3d, texture_size)
    tex, wgt = canonical.to_texture(diff, raster.check_complete(frags), scene.vertices_xyd, uvr, face.triangles)
    # All of the change lands on the nose's texels, up to the one-texel blur of bilinear sampling at its edge.
    assert planted.relevance_mass(np.asarray(tex), np.asarray(wgt), nose) > 0.9, yaw
  # Positive yaw turns the nose towards +x: the cue's pixels move right by a good part of the face width.
  assert centroids[35.0] - centroids[-35.0] > 0.2 * planted.FACE_PX, centroids


@pytest.fixture(scope="module")
def astronaut_experiment(model3d):
  """The astronaut's fitted face at 14 poses; a small model trained on the nose cue of all but 4 of them."""
  size = planted.SOURCE_TEXTURE_SIZE
  sources = planted.source_faces(1, model3d, texture_size=size)
  scenes = planted.make_scenes(sources, poses_per_face=14, max_yaw_deg=40.0, max_pitch_deg=10.0, seed=0)
  assert len(scenes) >= 10, len(scenes)  # dlib finds the face in most renders
  nose = _nose(model3d, size)
  cue_texture = planted.plant_cue(sources[0].face.texture, nose, strength=0.6)

  def textures(face_index, with_cue):
    return cue_texture if with_cue else sources[0].face.texture

  rng = np.random.default_rng(0)

  def images(indices, swap=False):
    scene_ids = np.repeat(indices, 2)
    labels = np.tile([1, 0], len(indices))
    bright = 1.0 + rng.uniform(-0.15, 0.15, len(labels))
    return planted.make_images(scenes, scene_ids, textures, labels, bright, cue_present=(labels == 0) if swap else None)

  train_ids, test_ids = list(range(len(scenes) - 4)), list(range(len(scenes) - 4, len(scenes)))
  train = images(train_ids)
  model, losses = planted.train_classifier(train.crops, train.labels, seed=0, steps=60, batch_size=32)
  return sources, scenes, textures, model, losses, images(test_ids), images(test_ids, swap=True)


@pytest.mark.slow
def test_a_small_model_follows_the_cue(astronaut_experiment):
  _, _, _, model, losses, test, swapped = astronaut_experiment
  assert losses[-10:].mean() < 0.5 * losses[:10].mean()
  checks = planted.cue_checks(model, test, swapped, swapped)
  assert checks["accuracy"] >= 0.85, checks
  # Swapping the cue alone (same pose, same brightness) flips the model's answers.
  assert checks["swap_accuracy"] <= 0.25, checks
  assert checks["swap_drop"] >= 0.6 and checks["follows_cue"] >= 0.75, checks


@pytest.mark.slow
def test_canonical_occlusion_is_the_pipelines_cis(astronaut_experiment, model3d, monkeypatch):
  """`planted.explain`'s occlusion texture equals `pipeline.cis_face` run on the same model and image."""
  from canonsal_jax import config as config_lib
  from canonsal_jax import faces, models, pipeline

  _, scenes, textures, model, _, _, _ = astronaut_experiment
  scene = scenes[-1]
  image = planted.shade(scene, textures(0, True))
  settings = planted.Settings(regions=("nose",), seeds=(0,), num_faces=4, ig_steps=4, rise_masks=64)
  prepared = planted.prepare([image], [scene.vertices_xyd], model3d)
  region = REGION_NAMES.index("nose")
  uvr = canonical.model_uv_raster(model3d, canonical.default_texture_size(planted.CROP.size, model3d))
  methods = ("occlusion", "vanilla_gradient", "uniform")
  (explained,) = planted.explain(model, prepared, model3d, uvr, region, settings, methods=methods)
  assert set(explained.textures) == set(methods)

  monkeypatch.setattr(models, "load", lambda name, card=None: model)
  config = config_lib.default_config()
  config.occlusion.stride = settings.occlusion_stride
  config.occlusion.target = 1
  config.cis.texture_size = uvr.size
  detector = faces.default_detector(config.detector)
  face = faces.largest_face(image, "planted", detector=detector, adjust_threshold=config.detector_threshold)
  result = pipeline.cis_face(config, image, face, "planted")
  np.testing.assert_array_equal(result.occlusion.crop, explained.crop)
  tex, wgt = explained.textures["occlusion"]
  np.testing.assert_allclose(result.occlusion.heatmap, explained.crop_maps["occlusion"][0], atol=1e-5)
  both = (wgt > 0) & (result.weight > 0)
  assert both.sum() > 0.98 * max((wgt > 0).sum(), (result.weight > 0).sum())  # the fits agree (batch of 1 each)
  scale = np.abs(result.texture).max()
  np.testing.assert_allclose(tex[both], result.texture[both], atol=1e-3 * scale)
  # Every method's map is carried through the same fitted mesh: the same texels have data, except that the
  # occlusion map has none on the crop's border pixels that no patch covers.
  seen = explained.textures["uniform"][1] > 0
  np.testing.assert_array_equal(explained.textures["vanilla_gradient"][1] > 0, seen)
  assert np.all(seen[wgt > 0]) and (wgt > 0).sum() > 0.97 * seen.sum()


def test_null_labels_carry_no_cue():
  labels = np.tile([1, 0], 100)
  rng = np.random.default_rng(2)
  shuffled = planted._null_labels(labels, "shuffled", rng)
  np.testing.assert_array_equal(np.sort(shuffled), np.sort(labels))  # a permutation
  assert not np.array_equal(shuffled, labels)
  balanced = planted._null_labels(labels, "balanced", rng)
  assert balanced[labels == 1].mean() == 0.5 and balanced[labels == 0].mean() == 0.5  # independent of the cue
  with pytest.raises(ValueError, match="null_labels"):
    planted.Settings(null_labels="random")
