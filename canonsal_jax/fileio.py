"""Image loading and validation, atomic file writes and versioned array files.

Below `pipeline`, file writes go through this module (docs/ARCHITECTURE.md). Everything it returns is a plain
NumPy array on the host.

Images are always `uint8 [H, W, 3]` RGB, row-major, y down. Conversions made on the way in:

* EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), so arrays are upright as a viewer shows them.
* Grey ("1", "L") is replicated to three channels; palette ("P") is expanded through its palette.
* Alpha ("RGBA", "LA", "PA", premultiplied "RGBa"/"La") is composited onto white, as a viewer shows a
  transparent image on a white page. Dropping alpha instead would expose whatever colour the encoder left in
  transparent pixels (often black or garbage), which a face model would then see.
* 16-bit grey ("I;16", "I;16B", "I;16L", "I" holding 0..65535) is scaled by its real range,
  `round(v * 255 / 65535)`, never clipped. Pillow itself reduces 48/64-bit RGB(A) PNGs to their high byte
  (`v // 256`), which differs from this by at most one grey level.
* 32-bit float ("F") must hold values in [0, 1]; they are scaled by 255 and rounded.
* CMYK, YCbCr, LAB and HSV go through Pillow's `convert("RGB")`; embedded ICC profiles are not applied.
* Multi-frame files (GIF, TIFF, APNG) give their first frame.

Pillow's decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`) stays in force: images over twice the limit
are refused with `ImageError` (Pillow warns between one and two times the limit).

Example:
  Lines marked +SKIP are not run as doctests: it writes /tmp/astronaut.png.
  >>> from canonsal_jax import fileio
  >>> rgb = fileio.default_image()  # the scikit-image astronaut, uint8 [512, 512, 3]
  >>> fileio.save_png("/tmp/astronaut.png", rgb)  # doctest: +SKIP
  >>> fileio.load_image("/tmp/astronaut.png").shape  # doctest: +SKIP
  (512, 512, 3)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io as _pyio
import json
import os
import pathlib
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

__all__ = [
  "FORMAT_VERSION",
  "FormatError",
  "ImageError",
  "default_image",
  "default_image_path",
  "load_image",
  "load_npz_versioned",
  "save_json",
  "save_npy",
  "save_npz_versioned",
  "save_png",
  "validate_image",
  "write_atomic",
]

PathLike = str | os.PathLike[str]

# Version of the envelope `save_npz_versioned` writes (which reserved keys hold the kind and version, and
# how). Stored in every file as `__envelope__`; bump it only if that layout changes. The version of each
# kind of content is the caller's `version` argument.
FORMAT_VERSION = 1

_KIND_KEY = "__format__"
_VERSION_KEY = "__version__"
_ENVELOPE_KEY = "__envelope__"

_UINT16_MAX = 65535
_UINT8_MAX = 255
# Float images may stray from [0, 1] by rounding in upstream arithmetic; beyond this they are rejected.
_FLOAT_RANGE_SLACK = 1e-6

# Errors Pillow and its codecs raise for files that are corrupt, truncated or not what they claim to be.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


class ImageError(ValueError):
  """An image file or array cannot be used; the message names the file (or array) and the reason."""


class FormatError(ValueError):
  """A versioned array file is missing, corrupt, or of another kind or version than expected."""


# ---------------------------------------------------------------------------------------------- images


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """`rgb` uint8 [H, W, 3] over white with `alpha` uint8 [H, W] -> uint8 [H, W, 3] (rounded)."""
  a = alpha.astype(np.uint32)[..., None]
  out = (rgb.astype(np.uint32) * a + _UINT8_MAX * (_UINT8_MAX - a) + _UINT8_MAX // 2) // _UINT8_MAX
  return out.astype(np.uint8)


def _scale_uint16(values: np.ndarray) -> np.ndarray:
  """Integer values in [0, 65535] -> uint8 by the full range, rounded half up (exact integer arithmetic)."""
  v = values.astype(np.uint64)
  return ((v * _UINT8_MAX + _UINT16_MAX // 2) // _UINT16_MAX).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))


def _pil_to_rgb(im: Image.Image, name: str) -> np.ndarray:
  """A loaded Pillow image of any mode -> uint8 [H, W, 3] RGB (see the module docstring for the rules)."""
  mode = im.mode
  if mode == "RGB":
    return np.asarray(im, dtype=np.uint8).copy()
  if mode in ("1", "L"):
    return _grey_to_rgb(np.asarray(im.convert("L"), dtype=np.uint8))
  if mode.startswith("I;16") or mode == "I":
    values = np.asarray(im)
    if values.size and (values.min() < 0 or values.max() > _UINT16_MAX):
      raise ImageError(
        f"{name}: {mode} image holds values in [{values.min()}, {values.max()}], outside the 16-bit range "
        f"[0, {_UINT16_MAX}]; cannot tell how to map it to 8 bits"
      )
    return _grey_to_rgb(_scale_uint16(values))
  if mode == "F":
    return validate_image(np.asarray(im, dtype=np.float32), name)
  if mode == "P":
    im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    return _pil_to_rgb(im, name)
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
    return _composite_on_white(rgba[..., :3], rgba[..., 3])
  try:
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
  except ValueError as e:
    raise ImageError(f"{name}: cannot convert Pillow mode {mode!r} to RGB: {e}") from e


def load_image(path: PathLike) -> np.ndarray:
  """Reads an image file as upright RGB.

  Args:
    path: any format Pillow reads (JPEG, PNG, TIFF, BMP, WebP, GIF, ...).

  Returns:
    `uint8 [H, W, 3]` RGB, EXIF orientation applied, alpha composited onto white, 16-bit scaled by 255/65535
    (module docstring gives every conversion).

  Raises:
    ImageError: the file is missing, empty, not an image, truncated, corrupt, over Pillow's decompression-bomb
      limit, or in a mode that has no sensible RGB reading. The message names the file and the reason.
  """
  name = os.fspath(path)
  try:
    size = os.path.getsize(name)
  except OSError as e:
    raise ImageError(f"{name}: cannot read image file: {e.strerror or e}") from e
  if os.path.isdir(name):
    raise ImageError(f"{name}: is a directory, not an image file")
  if size == 0:
    raise ImageError(f"{name}: image file is empty (0 bytes)")
  try:
    with Image.open(name) as im:
      im.load()  # decodes now, so truncation and corruption surface here, not later
      im = ImageOps.exif_transpose(im)
      return _pil_to_rgb(im, name)
  except Image.DecompressionBombError as e:
    raise ImageError(f"{name}: refused by Pillow's decompression-bomb guard (Image.MAX_IMAGE_PIXELS): {e}") from e
  except Image.UnidentifiedImageError as e:
    raise ImageError(f"{name}: not a recognised image format ({size} bytes)") from e
  except ImageError:
    raise
  except _DECODE_ERRORS as e:
    reason = str(e) or type(e).__name__
    raise ImageError(f"{name}: image file is truncated or corrupt: {reason}") from e


def validate_image(array: Any, name: str = "image") -> np.ndarray:
  """Checks an image array passed from code and converts it to RGB uint8.

  Args:
    array: `[H, W]` grey, `[H, W, 1]` grey, `[H, W, 3]` RGB or `[H, W, 4]` RGBA; dtype uint8, uint16 (scaled by
      255/65535) or floating point in [0, 1] (scaled by 255 and rounded). Anything `np.asarray` accepts,
      JAX arrays included. RGBA is composited onto white as `load_image` does.
    name: what to call the array in error messages (a file name, "image 3 of the batch").

  Returns:
    `uint8 [H, W, 3]` RGB, C-contiguous. A uint8 RGB input is returned without a copy when already contiguous.

  Raises:
    ImageError: wrong rank or channel count, an empty image, an unsupported dtype, NaN or infinite values, or
      float values outside [0, 1]. The message names `name`.
  """
  try:
    a = np.asarray(array)
  except (TypeError, ValueError) as e:
    raise ImageError(f"{name}: not convertible to an array: {e}") from e
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
    raise ImageError(f"{name}: expected an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {a.shape}")
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ImageError(f"{name}: image is empty, shape {a.shape}")
  if a.dtype == np.uint8:
    u8 = a
  elif a.dtype == np.uint16:
    u8 = _scale_uint16(a)
  elif np.issubdtype(a.dtype, np.floating):
    if not np.all(np.isfinite(a)):
      raise ImageError(f"{name}: image holds {np.count_nonzero(~np.isfinite(a))} NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -_FLOAT_RANGE_SLACK or hi > 1.0 + _FLOAT_RANGE_SLACK:
      raise ImageError(f"{name}: float image values must lie in [0, 1], got [{lo:g}, {hi:g}]")
    u8 = np.round(np.clip(a.astype(np.float64), 0.0, 1.0) * _UINT8_MAX).astype(np.uint8)
  else:
    raise ImageError(
      f"{name}: unsupported image dtype {a.dtype}; use uint8, uint16 or float in [0, 1] "
      "(e.g. convert 0..255 integers with .astype(np.uint8))"
    )
  if u8.ndim == 2:
    return _grey_to_rgb(u8)
  if u8.shape[-1] == 4:
    return _composite_on_white(u8[..., :3], u8[..., 3])
  return np.ascontiguousarray(u8)


def default_image_path() -> pathlib.Path:
  """Path of scikit-image's bundled astronaut photo (Eileen Collins, NASA, public domain), a 512x512 PNG.

  Found from the installed package's location without importing it: `import skimage.data` costs about half a
  second (it imports `skimage.io`), a share of every script's start-up on the default photo.
  """
  spec = importlib.util.find_spec("skimage")
  if spec is None or not spec.submodule_search_locations:
    raise ImageError("scikit-image is not installed, so its default photo is missing; pass an image")
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"


def default_image() -> np.ndarray:
  """The scikit-image astronaut, `uint8 [512, 512, 3]` RGB: the image used when none is given."""
  return load_image(default_image_path())


# ------------------------------------------------------------------------------------------ atomic writes


def _current_umask() -> int:
  # os.umask can only be read by setting it; /proc avoids that race on Linux.
  with contextlib.suppress(OSError, ValueError):
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def _atomic_file(path: PathLike) -> Iterator[BinaryIO]:
  """Yields a binary file in `path`'s directory that replaces `path` on success and vanishes on failure."""
  target = pathlib.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
      # mkstemp makes the file 0600; give it the mode an ordinary open() would have given it.
      try:
        mode = os.stat(target).st_mode & 0o777
      except FileNotFoundError:
        mode = 0o666 & ~_current_umask()
      os.chmod(tmp, mode)
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  # Make the rename itself durable; not every platform or file system lets a directory be fsync'ed.
  with contextlib.suppress(OSError):
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def write_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically: readers see the old file or the whole new one, never a part.

  The bytes go to a temporary file in the same directory (so the rename stays on one file system), are
  flushed to disk, and the file is renamed over `path` with `os.replace`. Parent directories are created.
  On any failure the temporary file is removed and `path` is left as it was.
  """
  with _atomic_file(path) as f:
    f.write(data)


def save_npy(path: PathLike, array: Any) -> None:
  """Saves one array as `.npy` atomically, at exactly `path` (no suffix is added). Object arrays are refused."""
  with _atomic_file(path) as f:
    np.save(f, np.asarray(array), allow_pickle=False)


def save_npz(path: PathLike, **arrays: Any) -> None:
  """Saves named arrays as an uncompressed `.npz` atomically, at exactly `path` (no suffix is added).

  For caches whose name already carries their version (converted weights, built models); files users keep
  go through `save_npz_versioned`. Object arrays are refused.
  """
  with _atomic_file(path) as f:
    np.savez(f, **{name: np.asarray(a) for name, a in arrays.items()}, allow_pickle=False)


def save_png(path: PathLike, image: Any) -> None:
  """Saves a `uint8` image atomically as PNG.

  Args:
    path: the file to write (no suffix is added).
    image: `uint8 [H, W, 3]` RGB; `[H, W]` grey and `[H, W, 4]` RGBA are written as such.

  Raises:
    ValueError: `image` is not a uint8 image of one of those shapes.
  """
  a = np.asarray(image)
  if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or 0 in a.shape:
    raise ValueError(
      f"save_png({os.fspath(path)}): expects uint8 [H, W], [H, W, 3] or [H, W, 4], got {a.dtype} {a.shape}"
    )
  buffer = _pyio.BytesIO()
  Image.fromarray(np.ascontiguousarray(a)).save(buffer, format="PNG")
  write_atomic(path, buffer.getvalue())


def _json_default(obj: Any) -> Any:
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
    return np.asarray(obj).tolist()
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def save_json(path: PathLike, obj: Any) -> None:
  """Saves `obj` as indented UTF-8 JSON atomically.

  NumPy scalars and arrays (and JAX arrays) become numbers and lists, paths become strings. NaN and infinity
  are written as Python's `json` writes them (`NaN`, `Infinity`): Python reads them back, strict JSON parsers
  do not.
  """
  text = json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False) + "\n"
  write_atomic(path, text.encode("utf-8"))


# -------------------------------------------------------------------------------- versioned array files


def save_npz_versioned(path: PathLike, kind: str, version: int, /, **arrays: Any) -> None:
  """Saves named arrays as an uncompressed `.npz`, tagged with what they are, atomically.

  Args:
    path: the file to write, at exactly this path (no suffix is added).
    kind: what the file holds, e.g. "morphable_model" or "cms"; checked by `load_npz_versioned`.
    version: the version of that kind's layout; bump it whenever the arrays' meaning or names change.
    **arrays: the arrays; names must not start with "__" (reserved for the tags). Object arrays are refused.

  Raises:
    ValueError: a reserved array name, an empty `kind`, or a negative `version`.
  """
  if not kind:
    raise ValueError("save_npz_versioned: kind must be a non-empty string")
  if int(version) != version or version < 0:
    raise ValueError(f"save_npz_versioned: version must be a non-negative integer, got {version!r}")
  if reserved := sorted(k for k in arrays if k.startswith("__")):
    raise ValueError(f"save_npz_versioned({os.fspath(path)}): array names starting with '__' are reserved: {reserved}")
  tags = {
    _KIND_KEY: np.asarray(kind),
    _VERSION_KEY: np.asarray(int(version), dtype=np.int64),
    _ENVELOPE_KEY: np.asarray(FORMAT_VERSION, dtype=np.int64),
  }
  with _atomic_file(path) as f:
    np.savez(f, allow_pickle=False, **tags, **{k: np.asarray(v) for k, v in arrays.items()})


def load_npz_versioned(path: PathLike, kind: str, version: int) -> dict[str, np.ndarray]:
  """Loads a file written by `save_npz_versioned`, checking its kind and version.

  Args:
    path: the file.
    kind: the kind the caller expects.
    version: the version the caller expects; any other version is refused (a cache should rebuild).

  Returns:
    The arrays by name, read into memory (the tags are not included).

  Raises:
    FormatError: the file is missing, corrupt, not a versioned file, or holds another kind or version. The
      message names the file, what it holds and what was expected.
  """
  name = os.fspath(path)
  try:
    # The file is opened here, not by np.load, which leaves its handle open when a truncated archive fails.
    with open(name, "rb") as f:
      npz = np.load(f, allow_pickle=False)
      if not isinstance(npz, np.lib.npyio.NpzFile):
        raise FormatError(f"{name}: not an .npz archive (expected {kind!r} version {version})")
      with npz:
        keys = set(npz.files)
        if not {_KIND_KEY, _VERSION_KEY, _ENVELOPE_KEY} <= keys:
          raise FormatError(
            f"{name}: not a versioned canonsal_jax file (no {_KIND_KEY}/{_VERSION_KEY} tags); "
            f"expected {kind!r} version {version}"
          )
        envelope = int(npz[_ENVELOPE_KEY])
        if envelope != FORMAT_VERSION:
          raise FormatError(f"{name}: envelope version {envelope}, this code reads {FORMAT_VERSION}")
        got_kind, got_version = str(npz[_KIND_KEY]), int(npz[_VERSION_KEY])
        if (got_kind, got_version) != (kind, version):
          raise FormatError(
            f"{name}: holds {got_kind!r} version {got_version}, expected {kind!r} version {version}; "
            "delete it to have it rebuilt, or use a matching release"
          )
        return {k: npz[k] for k in npz.files if k not in (_KIND_KEY, _VERSION_KEY, _ENVELOPE_KEY)}
  except FormatError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise FormatError(f"{name}: cannot read versioned array file (expected {kind!r} version {version}): {e}") from e
