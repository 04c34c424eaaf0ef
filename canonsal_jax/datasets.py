"""Image lists for dataset runs, and host-side prefetching so decoding and detection overlap device work.

Example:
  >>> from canonsal_jax import datasets
  >>> files = datasets.list_images("photos/")  # doctest: +SKIP
  >>> for item in datasets.prefetch(files, load_fn, num_threads=2):  # doctest: +SKIP
  ...   item.index, item.name, item.value, item.error
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["IMAGE_SUFFIXES", "Prefetched", "list_images", "prefetch"]

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


def prefetch(
  items: Sequence[Any],
  fn: Callable[[Any], Any],
  *,
  num_threads: int = 2,
  depth: int = 8,
  skip: frozenset[int] | set[int] = frozenset(),
  name_fn: Callable[[Any], str] = str,
) -> Iterator[Prefetched]:
  """Runs `fn` on items in background threads, yielding results in item order.

  Image decoding (Pillow) and dlib's detector release the GIL for most of their work, so up to `depth`
  items are prepared while the caller's device work runs. Exceptions from `fn` are returned in the item's
  `error`, so a dataset run can record and skip a bad input without losing the rest.

  Args:
    items: the dataset (e.g. file paths); item i gets index i.
    fn: host work per item.
    num_threads: worker threads.
    depth: items in flight at most (bounds memory).
    skip: indices not to process (already done in a resumed run).
    name_fn: the item's name in records.
  """
  if num_threads < 1 or depth < 1:
    raise ValueError(f"num_threads and depth must be positive, got {num_threads} and {depth}")
  todo = [i for i in range(len(items)) if i not in skip]
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
    pending: collections.deque = collections.deque()
    position = 0
    while position < len(todo) or pending:
      while position < len(todo) and len(pending) < depth:
        index = todo[position]
        pending.append((index, pool.submit(fn, items[index])))
        position += 1
      index, future = pending.popleft()
      try:
        value, error = future.result(), None
      except Exception as e:  # recorded by the caller, never lost silently
        value, error = None, e
      yield Prefetched(index=index, name=name_fn(items[index]), value=value, error=error)
