"""A dataset run's host work on one photo: decode it, then its annotated face or its detections.

`run_cms` runs `load_and_detect` in worker processes (or threads) ahead of the device stages
(`datasets.prefetch`). This module imports no JAX, so a spawned worker loads only an interpreter, numpy,
Pillow, dlib and its landmark models (`start_host_worker`, once per worker).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import ml_collections
import numpy as np

from canonsal_jax import config as config_lib
from canonsal_jax import faces, fileio

__all__ = ["HostItem", "HostSettings", "find_detection", "load_and_detect", "start_host_worker"]


def find_detection(
  config,
  pixels: np.ndarray,
  name: str,
  detector: faces.FaceDetector | None,
  *,
  face: str | None = None,
  landmarks_xy: np.ndarray | None = None,
  cache: faces.DetectionCache | None = None,
) -> faces.Detection:
  """The photo's faces and the one explained: the annotated face when `landmarks_xy` (`[68, 2]` image xy) is
  given, else detection with the config's settings (`detector`, `upsample`, `detector_threshold`, `face`) through
  `cache` (None: none). `pipeline.detect_faces` adds the look-up of `config.landmarks` and the warning.

  Raises:
    faces.NoFaceError: no face was found (the message names `name`, the settings and the ones to try).
    faces.FaceChoiceError: `config.face` is an index or a box that matches none of the faces found.
  """
  if landmarks_xy is not None:
    return faces.annotated_detection(landmarks_xy, np.shape(pixels)[:2])
  detector = detector or faces.default_detector(config.detector)
  face = config.face if face is None else face
  try:
    return faces.find_faces(
      pixels,
      name,
      choice=config_lib.parse_face(face),
      choice_text=str(face).strip(),
      detector=detector,
      upsample=config.upsample,
      adjust_threshold=config.detector_threshold,
      cache=cache,
    )
  except faces.NoFaceError as e:
    raise faces.NoFaceError(f"{e}; {_no_face_hint(config)}") from None


def _no_face_hint(config: ml_collections.ConfigDict) -> str:
  """The settings that find harder faces, as command-line overrides."""
  tries = [f"--config.upsample={config.upsample + 1} (smaller faces)"]
  if config.detector != "cnn":
    tries.append("--config.detector=cnn (harder faces, slower)")
  lower = 0.0 if config.detector_threshold > 0 else config.detector_threshold - 0.5
  tries.append(f"a lower --config.detector_threshold (now {config.detector_threshold:g}; e.g. {lower:g})")
  return "try " + ", ".join(tries)


@dataclasses.dataclass(frozen=True)
class HostSettings:
  """What a host worker needs to decode and detect a dataset's photos (picklable: it goes to worker processes).

  Attributes:
    config: the run's config (detector settings, `face`).
    cache_dir: the detection cache's folder, or None without it (the parent's, since a spawned worker does not
      share its objects).
  """

  config: ml_collections.ConfigDict
  cache_dir: str | None


@dataclasses.dataclass(frozen=True)
class HostItem:
  """One photo's host work done: its pixels and its faces, or the photo's own failure (`error`: unreadable, no
  face, a face choice that matches none); the worker's seconds on it; whether its detections came from the
  detection cache (None: annotated, not decoded, or no cache; a photo without a face has a cached answer too)."""

  pixels: np.ndarray | None
  detection: faces.Detection | None
  seconds: float
  cache_hit: bool | None
  error: Exception | None = None


_HOST_WORKER = threading.local()  # per worker thread, or the one thread of a worker process


def start_host_worker(settings: HostSettings) -> None:
  """A host worker's start: its own detector (dlib's are not shared between threads; in a process this loads
  the landmark models once) and its own view of the detection cache (counters exact per worker)."""
  _HOST_WORKER.detector = faces.FaceDetector(settings.config.detector)
  _HOST_WORKER.cache = faces.DetectionCache(settings.cache_dir) if settings.cache_dir is not None else None


def load_and_detect(settings: HostSettings, task: tuple[str, np.ndarray | None]) -> HostItem:
  """A dataset run's host work on one photo, in a worker: decode it, then its annotated face (when `task`'s
  landmarks are given) or its detections (`find_detection`, through the cache). `task` is `(path, landmarks_xy
  or None)`.

  The photo's own failures (an unreadable file, no face, a face choice matching none) come back in the item's
  `error`, with the cache's answer counted; anything else is raised (the pool records it).
  """
  begin = time.perf_counter()
  if not hasattr(_HOST_WORKER, "detector"):
    start_host_worker(settings)
  path, landmarks_xy = task
  cache = _HOST_WORKER.cache
  hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
  pixels = detection = error = None
  try:
    pixels = fileio.load_image(path)
    detection = find_detection(
      settings.config, pixels, path, _HOST_WORKER.detector, landmarks_xy=landmarks_xy, cache=cache
    )
  except (fileio.ImageError, faces.NoFaceError, faces.FaceChoiceError) as e:
    error = e
  looked_up = cache is not None and (cache.hits, cache.misses) != (hits, misses)
  hit = cache.hits > hits if looked_up else None
  return HostItem(pixels, detection, time.perf_counter() - begin, hit, error)
