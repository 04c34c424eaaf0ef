"""Canonical Model Saliency (CMS): per-group accumulation of canonical image saliency textures, on the host.

One image's canonical image saliency (CIS) arrives as a texture `value[T, T]` and a `weight[T, T]` in [0, 1]
(weight 0 = the texel was hidden or outside the crop: no data, never zero saliency). `CMSAccumulator` keeps,
per group (a class, a prediction, "all", ...), per-texel sums of `weight * normalised value`, of `weight`, and
the number of images that saw the texel, plus one record per image (normaliser, prediction, score, region
masses, or why it was skipped). `mean(group)` is the CMS: `value_sum / weight_sum`, NaN where no image saw the
texel.

Determinism. Images are keyed by their index in the dataset's file list, and the sums must not depend on the
order or the shards in which images arrive, nor on how a run was interrupted and resumed. Floating-point
addition is not associative, so instead of ordering the additions (which needs either every contribution kept
until its predecessors arrive, unbounded when shards are strided across hosts, or fixed index blocks whose
partial sums still depend on where shard boundaries cut them), the sums are exact:

* Each image's contribution `weight * value / normaliser` is computed elementwise in float64 (correctly rounded
  IEEE operations, so the same on every machine) and rounded once to a fixed-point grid of `2**-FRACTION_BITS`.
  That rounding depends on the image alone.
* The fixed-point integers are added exactly as multi-limb integers: `NUM_LIMBS` int64 limbs per texel, each
  lower limb holding 32 bits in [0, 2**32) and the top limb the signed rest, carries propagated after every
  addition. Integer addition is associative and commutative, so any arrival order, any sharding and any tree
  of `merge` calls give the same limbs, bit for bit; a checkpoint stores the limbs themselves.
* Floats are made from the canonical limbs by one fixed formula, so equal sums give equal floats.

With 64 fraction bits the grid step is 5.4e-20 (far below float32's resolution of any saliency worth showing),
one contribution may be up to `MAX_CONTRIBUTION` = 2**60 in magnitude, and a texel's sum may reach 2**94: over
10**10 images at the largest contributions. Memory is `(2 * NUM_LIMBS + 1) * 8 * T * T` bytes per group
(7.3 MB at T = 256).

Normalisations (`NORMALISATIONS`), applied per image before accumulation; the normaliser is kept in the record:

* "none": raw values. Right when every image's score is on one scale (e.g. a drop in the same logit) and
  confident images should count for more.
* "max_abs": divide by max |value| over texels with weight > 0, so each image's strongest texel is +-1. Every
  image counts equally however confident the model was; the usual normalisation of saliency maps for display.
* "sum_abs": divide by sum(|value| * weight), so each image brings a unit of saliency mass; its CMS reads as
  where the mass goes (matches region-mass statistics).
Not offered: z-scores and min-max, because they shift zero. Zero means "occluding here did not change the
score" and the sign says which way it moved; a shift also depends on which texels the pose made visible.
An image whose normaliser is 0 (all visible values zero) adds zeros: it still counts, as no saliency.

Bad input. Shapes that differ from the accumulator's are programming errors and always raise `ValueError`.
Non-finite values where weight > 0, non-finite weights, weights outside [0, 1] and contributions beyond
`MAX_CONTRIBUTION` follow the `on_invalid` setting: "raise" (`ValueError` naming the image) or "skip" (recorded
as skipped with the reason). Either way `add` checks everything before it changes any state, so nothing already
accumulated is lost. Values at weight-0 texels are ignored, NaN included.

Example:
  Lines marked +SKIP are not run as doctests: it writes /tmp/cms.npz.
  >>> import numpy as np
  >>> from canonsal_jax import cms
  >>> acc = cms.CMSAccumulator(cms.CMSSettings(texture_size=2, normalisation="none"))
  >>> w = np.array([[1, 1], [0.5, 0]], np.float32)
  >>> acc.add(0, "a.png", np.full((2, 2), 2, np.float32), w, group="female", record={"score": 0.9})
  True
  >>> acc.add(1, "b.png", np.full((2, 2), 4, np.float32), np.ones((2, 2), np.float32), group="female")
  True
  >>> cms_map, valid = acc.mean("female")
  >>> cms_map[1].tolist(), valid[1].tolist()
  ([3.3333333333333335, 4.0], [True, True])
  >>> acc.save("/tmp/cms.npz")  # doctest: +SKIP
  >>> acc = cms.CMSAccumulator.load("/tmp/cms.npz", settings=acc.settings)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from canonsal_jax import fileio

__all__ = [
  "FORMAT_KIND",
  "FORMAT_VERSION",
  "FRACTION_BITS",
  "MAP_KINDS",
  "MAX_CONTRIBUTION",
  "NORMALISATIONS",
  "NUM_LIMBS",
  "ON_INVALID",
  "CMSAccumulator",
  "CMSSettings",
  "GroupSums",
  "comparisons",
  "merge",
  "normaliser",
]

FORMAT_KIND = "canonsal_jax.cms"
MAP_KINDS = ("signed", "absolute")
FORMAT_VERSION = 2  # 2: absolute-value sums (absolute CMS); version 1 checkpoints lack them

Normalisation = Literal["none", "max_abs", "sum_abs"]
NORMALISATIONS: tuple[str, ...] = ("none", "max_abs", "sum_abs")
OnInvalid = Literal["raise", "skip"]
ON_INVALID: tuple[str, ...] = ("raise", "skip")

# Fixed-point layout of the exact sums (see the module docstring). Changing any of these changes the checkpoint
# format: bump FORMAT_VERSION.
FRACTION_BITS = 64
LIMB_BITS = 32
NUM_LIMBS = 4
MAX_CONTRIBUTION = 2.0**60
# The top limb is a signed int64; refusing sums past 2**62 in it keeps every carry far from int64 overflow.
_TOP_LIMB_LIMIT = 2**62
_LIMB_MASK = (1 << LIMB_BITS) - 1

# Record keys the accumulator writes itself; a caller's `record` may not set them.
_RESERVED_KEYS = frozenset(
  {"index", "name", "status", "reason", "groups", "normalisation", "normaliser", "visible_texels", "weight_total"}
)
_STATUS_OK = "ok"
_STATUS_SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True)
class CMSSettings:
  """What an accumulator's sums mean; accumulators merge and resume only with equal settings.

  Attributes:
    texture_size: T, the side of the square texture.
    normalisation: one of `NORMALISATIONS` (module docstring says what each means and why).
    on_invalid: one of `ON_INVALID`: what `add` does with non-finite or out-of-range input.
  """

  texture_size: int
  normalisation: Normalisation = "max_abs"
  on_invalid: OnInvalid = "raise"

  def __post_init__(self):
    if isinstance(self.texture_size, bool) or not isinstance(self.texture_size, int | np.integer):
      raise ValueError(f"CMSSettings: texture_size must be an int, got {self.texture_size!r}")
    if self.texture_size < 1:
      raise ValueError(f"CMSSettings: texture_size must be positive, got {self.texture_size}")
    object.__setattr__(self, "texture_size", int(self.texture_size))
    if self.normalisation not in NORMALISATIONS:
      raise ValueError(f"CMSSettings: unknown normalisation {self.normalisation!r}; known: {list(NORMALISATIONS)}")
    if self.on_invalid not in ON_INVALID:
      raise ValueError(f"CMSSettings: unknown on_invalid {self.on_invalid!r}; known: {list(ON_INVALID)}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class GroupSums(NamedTuple):
  """One group's sums, as float64 views of the exact accumulators.

  Attributes:
    value_sum: float64 [T, T], sum over images of weight * normalised value.
    abs_sum: float64 [T, T], sum over images of weight * |normalised value|.
    weight_sum: float64 [T, T], sum over images of weight.
    count: int64 [T, T], number of images with weight > 0 at the texel.
    num_images: images accumulated into the group (skipped ones excluded).
  """

  value_sum: np.ndarray
  weight_sum: np.ndarray
  count: np.ndarray
  num_images: int
  abs_sum: np.ndarray


# ------------------------------------------------------------------------------------------ exact sums


def _to_limbs(x: np.ndarray) -> np.ndarray:
  """float64 [...] with |x| <= MAX_CONTRIBUTION -> int64 [NUM_LIMBS, ...]: x rounded to the fixed-point grid.

  Every step is exact: scaling and dividing by powers of two, floor, and a subtraction whose exact result (an
  integer below 2**32) is representable. Only `rint` rounds, once, to nearest even.
  """
  r = np.rint(np.ldexp(x, FRACTION_BITS))
  base = float(1 << LIMB_BITS)
  limbs = np.empty((NUM_LIMBS, *x.shape), np.int64)
  for k in range(NUM_LIMBS - 1):
    q = np.floor(r / base)
    limbs[k] = (r - q * base).astype(np.int64)
    r = q
  limbs[-1] = r.astype(np.int64)
  return limbs


def _add_limbs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Exact sum of two canonical limb arrays, canonical again (lower limbs in [0, 2**32), top limb signed)."""
  out = a + b
  for k in range(NUM_LIMBS - 1):
    carry = out[k] >> LIMB_BITS  # arithmetic shift: floor division by 2**32
    out[k] &= _LIMB_MASK
    out[k + 1] += carry
  if out.size and int(np.abs(out[-1]).max()) >= _TOP_LIMB_LIMIT:
    raise OverflowError("CMS sum exceeds the exact accumulator's range (about 2**94 per texel)")
  return out


def _limbs_to_float(limbs: np.ndarray) -> np.ndarray:
  """Canonical int64 [NUM_LIMBS, ...] -> float64 [...], by one fixed sequence of operations (deterministic)."""
  base = float(1 << LIMB_BITS)
  acc = limbs[-1].astype(np.float64)
  for k in range(NUM_LIMBS - 2, -1, -1):
    acc = acc * base + limbs[k].astype(np.float64)
  return np.ldexp(acc, -FRACTION_BITS)


@dataclasses.dataclass
class _Group:
  value_limbs: np.ndarray  # int64 [NUM_LIMBS, T, T]
  weight_limbs: np.ndarray  # int64 [NUM_LIMBS, T, T]
  count: np.ndarray  # int64 [T, T]
  num_images: int
  abs_limbs: np.ndarray  # int64 [NUM_LIMBS, T, T]

  @classmethod
  def empty(cls, t: int) -> _Group:
    z = lambda: np.zeros((NUM_LIMBS, t, t), np.int64)
    return cls(z(), z(), np.zeros((t, t), np.int64), 0, z())

  def plus(self, other: _Group) -> _Group:
    return _Group(
      _add_limbs(self.value_limbs, other.value_limbs),
      _add_limbs(self.weight_limbs, other.weight_limbs),
      self.count + other.count,
      self.num_images + other.num_images,
      _add_limbs(self.abs_limbs, other.abs_limbs),
    )

  def copy(self) -> _Group:
    return _Group(
      self.value_limbs.copy(), self.weight_limbs.copy(), self.count.copy(), self.num_images, self.abs_limbs.copy()
    )


# ------------------------------------------------------------------------------------------ validation


def _jsonable(obj: Any, where: str) -> Any:
  """A record value -> plain JSON types (NumPy scalars and arrays to numbers and lists, tuples to lists)."""
  if obj is None or isinstance(obj, bool | int | float | str):
    return obj
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
    return np.asarray(obj).tolist()
  if isinstance(obj, Mapping):
    out = {}
    for k, v in obj.items():
      if not isinstance(k, str):
        raise ValueError(f"{where}: record keys must be strings, got {k!r}")
      out[k] = _jsonable(v, where)
    return out
  if isinstance(obj, list | tuple):
    return [_jsonable(v, where) for v in obj]
  raise ValueError(f"{where}: record value of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def _check_index(index: Any) -> int:
  if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
    raise ValueError(f"image index must be a non-negative int (position in the file list), got {index!r}")
  return int(index)


def _check_groups(group: str | Sequence[str], where: str) -> list[str]:
  groups = [group] if isinstance(group, str) else list(group)
  for g in groups:
    if not isinstance(g, str) or not g:
      raise ValueError(f"{where}: group names must be non-empty strings, got {g!r}")
  if len(set(groups)) != len(groups):
    raise ValueError(f"{where}: group names repeat: {groups}")
  return sorted(groups)


def _check_min_count(min_count: Any) -> int:
  if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
    raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
  return int(min_count)


def normaliser(texture: np.ndarray, weight: np.ndarray, normalisation: str) -> float:
  """The number an image's texture is divided by under `normalisation` (1.0 for "none").

  Args:
    texture: float [T, T], finite wherever weight > 0.
    weight: float [T, T] in [0, 1].
    normalisation: one of `NORMALISATIONS`.

  Returns:
    max |value| over texels with weight > 0 ("max_abs"), or sum |value| * weight ("sum_abs", summed exactly by
    `math.fsum` over float64 products, which are exact for float32 inputs, so it is the same on every machine);
    0.0 when no visible texel has a nonzero value.
  """
  if normalisation not in NORMALISATIONS:
    raise ValueError(f"unknown normalisation {normalisation!r}; known: {list(NORMALISATIONS)}")
  if normalisation == "none":
    return 1.0
  visible = weight > 0
  values = np.abs(texture[visible].astype(np.float64))
  if values.size == 0:
    return 0.0
  if normalisation == "max_abs":
    return float(values.max())
  return math.fsum((values * weight[visible].astype(np.float64)).tolist())


# ------------------------------------------------------------------------------------------ accumulator


class CMSAccumulator:
  """Per-group CMS sums and per-image records; exact, so order-, shard- and resume-independent.

  Args:
    settings: a `CMSSettings` (or a texture size, taking the default normalisation and policy).

  Example: see the module docstring.
  """

  def __init__(self, settings: CMSSettings | int):
    self._settings = settings if isinstance(settings, CMSSettings) else CMSSettings(texture_size=settings)
    self._groups: dict[str, _Group] = {}
    self._records: dict[int, dict[str, Any]] = {}

  @property
  def settings(self) -> CMSSettings:
    return self._settings

  @property
  def texture_size(self) -> int:
    return self._settings.texture_size

  # ---------------------------------------------------------------------------------------- adding

  def _claim(self, index: Any, name: str) -> int:
    index = _check_index(index)
    if not isinstance(name, str):
      raise ValueError(f"image {index}: name must be a string, got {name!r}")
    if index in self._records:
      raise ValueError(
        f"image {index} ({name!r}) is already in the accumulator as {self._records[index]['name']!r} "
        f"({self._records[index]['status']}); skip done_indices() when resuming"
      )
    return index

  def _user_record(self, record: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    if record is None:
      return {}
    if not isinstance(record, Mapping):
      raise ValueError(f"{where}: record must be a mapping, got {type(record).__name__}")
    if clash := sorted(_RESERVED_KEYS & set(record)):
      raise ValueError(f"{where}: record keys {clash} are set by the accumulator; rename them")
    out = _jsonable(dict(record), where)
    masses = out.get("region_mass")
    if masses is not None and (
      not isinstance(masses, dict) or not all(isinstance(v, int | float) for v in masses.values())
    ):
      raise ValueError(f"{where}: region_mass must map region names to numbers, got {masses!r}")
    return out

  def _invalid_reason(self, texture: np.ndarray, weight: np.ndarray) -> str | None:
    if not np.all(np.isfinite(weight)):
      return f"weight holds {np.count_nonzero(~np.isfinite(weight))} NaN or infinite values"
    if weight.size and (weight.min() < 0 or weight.max() > 1):
      return f"weight must lie in [0, 1], got [{weight.min():g}, {weight.max():g}]"
    bad = (weight > 0) & ~np.isfinite(texture)
    if np.any(bad):
      return f"texture holds {np.count_nonzero(bad)} NaN or infinite values at texels with weight > 0"
    return None

  def add(
    self,
    index: int,
    name: str,
    texture: Any,
    weight: Any,
    *,
    group: str | Sequence[str] = "all",
    record: Mapping[str, Any] | None = None,
  ) -> bool:
    """Accumulates one image's CIS into its group(s) and records it.

    Args:
      index: the image's position in the dataset's file list; each index may be added or skipped once.
      name: the image's name (its file name) for records and messages.
      texture: float [T, T] saliency values on the texture (float32 from the sampler; float64 accepted).
      weight: float [T, T] in [0, 1]; 0 = no data (values there are ignored, NaN included).
      group: a group name, or several (the image counts in each, e.g. ("all", "female")).
      record: extra per-image facts to keep, JSON-serialisable: conventionally "prediction", "score" and
        "region_mass" (region name -> number). Keys the accumulator sets itself are refused.

    Returns:
      True if accumulated; False if skipped as invalid under `on_invalid="skip"` (the record says why).

    Raises:
      ValueError: a repeated index, a wrong shape, a bad record, or (with `on_invalid="raise"`) invalid values;
        the message names the image. The accumulator is unchanged when anything is raised.
    """
    index = self._claim(index, name)
    where = f"image {index} ({name!r})"
    groups = _check_groups(group, where)
    extra = self._user_record(record, where)
    t = self.texture_size
    texture = np.asarray(texture)
    weight = np.asarray(weight)
    for label, a in (("texture", texture), ("weight", weight)):
      if a.shape != (t, t) or not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{where}: {label} must be float [{t}, {t}], got {a.dtype} {a.shape}")

    reason = self._invalid_reason(texture, weight)
    if reason is None:
      visible = weight > 0
      w64 = weight.astype(np.float64)
      v64 = np.where(visible, texture, 0).astype(np.float64)
      norm = normaliser(v64, w64, self._settings.normalisation)
      scaled = v64 / norm if norm > 0 else np.zeros_like(v64)
      contribution = w64 * scaled
      peak = float(np.abs(contribution).max()) if contribution.size else 0.0
      if peak > MAX_CONTRIBUTION:
        reason = f"weight * normalised value reaches {peak:g}, over the accumulator's limit {MAX_CONTRIBUTION:g}"
    if reason is not None:
      if self._settings.on_invalid == "raise":
        raise ValueError(f"{where}: {reason}")
      self._put_skip(index, name, reason, groups, extra)
      return False

    limbs = _to_limbs(contribution)
    # |x| rounds to the grid exactly as x does (rint is odd-symmetric), so abs_sum >= |value_sum| holds exactly.
    one = _Group(limbs, _to_limbs(w64), visible.astype(np.int64), 1, _to_limbs(np.abs(contribution)))
    # Compute every new group total before storing any, so an error cannot leave a half-added image.
    updated = {g: self._groups.get(g, _Group.empty(t)).plus(one) for g in groups}
    self._groups.update(updated)
    self._records[index] = {
      "index": index,
      "name": name,
      "status": _STATUS_OK,
      "reason": None,
      "groups": groups,
      "normalisation": self._settings.normalisation,
      "normaliser": norm,
      "visible_texels": int(np.count_nonzero(visible)),
      "weight_total": math.fsum(w64[visible].tolist()),
      **extra,
    }
    return True

  def _put_skip(self, index: int, name: str, reason: str, groups: list[str], extra: dict[str, Any]) -> None:
    self._records[index] = {
      "index": index,
      "name": name,
      "status": _STATUS_SKIPPED,
      "reason": str(reason),
      "groups": groups,
      **extra,
    }

  def skip(
    self,
    index: int,
    name: str,
    reason: str,
    *,
    group: str | Sequence[str] = (),
    record: Mapping[str, Any] | None = None,
  ) -> None:
    """Records that image `index` was not accumulated (no face found, unreadable, ...); sums are untouched.

    Args:
      index: the image's position in the dataset's file list.
      name: the image's name.
      reason: why, for the records (an exception's message, say).
      group: the group(s) it would have joined, if known.
      record: extra facts, as for `add`.

    Raises:
      ValueError: a repeated index or a bad record.
    """
    index = self._claim(index, name)
    where = f"image {index} ({name!r})"
    self._put_skip(index, name, reason, _check_groups(group, where), self._user_record(record, where))

  # ---------------------------------------------------------------------------------------- reading

  def groups(self) -> list[str]:
    """Names of the groups holding at least one accumulated image, sorted."""
    return sorted(self._groups)

  def _group(self, group: str) -> _Group:
    try:
      return self._groups[group]
    except KeyError:
      raise ValueError(f"unknown CMS group {group!r}; known: {self.groups()}") from None

  def sums(self, group: str) -> GroupSums:
    """The group's sums as float64 (see `GroupSums`); fresh arrays, safe to modify."""
    g = self._group(group)
    return GroupSums(
      _limbs_to_float(g.value_limbs),
      _limbs_to_float(g.weight_limbs),
      g.count.copy(),
      g.num_images,
      _limbs_to_float(g.abs_limbs),
    )

  def mean(self, group: str, *, min_count: int = 1, kind: str = "signed") -> tuple[np.ndarray, np.ndarray]:
    """The group's CMS: the weighted mean of normalised saliency per texel over the images that saw it.

    Args:
      group: a name from `groups()`.
      min_count: texels seen by fewer images than this are reported as no data (a mean of one or two images
        is mostly noise; see `config.cms.min_count`).
      kind: "signed" (the mean value: where occluding lowers the score, and where it raises it) or "absolute"
        (the mean |value|: where occluding changes the score either way, so opposite signs do not cancel).

    Returns:
      `(cms, valid)`: float64 [T, T], `value_sum / weight_sum` (or `abs_sum / weight_sum`), NaN where not
      valid; bool [T, T], True where `weight_sum > 0` and `count >= min_count`.
    """
    if kind not in MAP_KINDS:
      raise ValueError(f"kind must be one of {MAP_KINDS}, got {kind!r}")
    _check_min_count(min_count)
    s = self.sums(group)
    valid = (s.weight_sum > 0) & (s.count >= min_count)
    cms = np.full(s.value_sum.shape, np.nan)
    np.divide(s.value_sum if kind == "signed" else s.abs_sum, s.weight_sum, out=cms, where=valid)
    return cms, valid

  def plain_sum(self, group: str, *, kind: str = "signed") -> tuple[np.ndarray, np.ndarray]:
    """The paper's CMS: the plain per-texel sum of the images' (weighted, normalised) CIS, not divided by how
    many images saw the texel, so texels that every pose shows weigh more than rarely seen ones.

    Returns:
      `(sum, valid)`: float64 [T, T] (NaN where no image saw the texel); bool [T, T], `weight_sum > 0`.
    """
    if kind not in MAP_KINDS:
      raise ValueError(f"kind must be one of {MAP_KINDS}, got {kind!r}")
    s = self.sums(group)
    valid = s.weight_sum > 0
    return np.where(valid, s.value_sum if kind == "signed" else s.abs_sum, np.nan), valid

  def difference(
    self, group_a: str, group_b: str, *, min_count: int = 1, kind: str = "signed"
  ) -> tuple[np.ndarray, np.ndarray]:
    """`mean(group_a) - mean(group_b)` where both groups have data (`min_count` applies to each); show it on a
    diverging scale. Whether a difference is real is for `canonsal_jax.evidence.stats`' permutation tests to say.

    Returns:
      `(difference, valid)`: float64 [T, T] (NaN where not valid); bool [T, T].
    """
    a, valid_a = self.mean(group_a, min_count=min_count, kind=kind)
    b, valid_b = self.mean(group_b, min_count=min_count, kind=kind)
    valid = valid_a & valid_b
    return np.where(valid, a - b, np.nan), valid

  def done_indices(self) -> frozenset[int]:
    """Indices already added or skipped: a resumed run passes over these."""
    return frozenset(self._records)

  def num_images(self, group: str | None = None) -> int:
    """Images accumulated into `group`, or over all groups (each image once) when None."""
    if group is None:
      return sum(r["status"] == _STATUS_OK for r in self._records.values())
    return self._group(group).num_images

  def records(self) -> list[dict[str, Any]]:
    """Per-image records sorted by index (copies): index, name, status ("ok"/"skipped"), reason, groups,
    normalisation, normaliser, visible_texels, weight_total (ok only), and the caller's keys."""
    return [copy.deepcopy(self._records[i]) for i in sorted(self._records)]

  def records_table(self, *, status: str | None = None) -> list[dict[str, Any]]:
    """Records as flat rows with the same columns, for statistics (e.g. `pandas.DataFrame(rows)`).

    Args:
      status: keep only "ok" or "skipped" rows; None keeps all.

    Returns:
      One dict per image sorted by index: `groups` joined with "|", each region mass as a column
      `region_mass/<region>`, other nested values kept as they are; a column missing in a row holds None.
    """
    if status not in (None, _STATUS_OK, _STATUS_SKIPPED):
      raise ValueError(f"status must be None, {_STATUS_OK!r} or {_STATUS_SKIPPED!r}, got {status!r}")
    rows = []
    for rec in self.records():
      if status is not None and rec["status"] != status:
        continue
      row = {k: v for k, v in rec.items() if k != "region_mass"}
      row["groups"] = "|".join(rec["groups"])
      for region, mass in (rec.get("region_mass") or {}).items():
        row[f"region_mass/{region}"] = mass
      rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [{c: row.get(c) for c in columns} for row in rows]

  # ---------------------------------------------------------------------------------------- merging

  def merge(self, other: CMSAccumulator) -> CMSAccumulator:
    """A new accumulator holding both; see the module-level `merge`."""
    return merge(self, other)

  # ---------------------------------------------------------------------------------------- files

  def save(self, path: fileio.PathLike) -> None:
    """Writes a checkpoint atomically: one versioned `.npz` ("canonsal_jax.cms" version 1) holding the exact
    limbs, counts and a UTF-8 JSON `meta` array (settings, layout, groups, image counts, records).

    A reader sees the previous checkpoint or this one, never a mixture.
    """
    names = self.groups()
    t = self.texture_size
    stack = lambda f, shape: np.stack([f(self._groups[g]) for g in names]) if names else np.zeros((0, *shape), np.int64)
    meta = {
      "settings": self._settings.to_dict(),
      "layout": {"fraction_bits": FRACTION_BITS, "limb_bits": LIMB_BITS, "num_limbs": NUM_LIMBS},
      "groups": names,
      "num_images": [self._groups[g].num_images for g in names],
      "records": self.records(),
    }
    fileio.save_npz_versioned(
      path,
      FORMAT_KIND,
      FORMAT_VERSION,
      value_limbs=stack(lambda g: g.value_limbs, (NUM_LIMBS, t, t)),
      abs_limbs=stack(lambda g: g.abs_limbs, (NUM_LIMBS, t, t)),
      weight_limbs=stack(lambda g: g.weight_limbs, (NUM_LIMBS, t, t)),
      count=stack(lambda g: g.count, (t, t)),
      meta=np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), np.uint8),
    )

  @classmethod
  def load(cls, path: fileio.PathLike, *, settings: CMSSettings | None = None) -> CMSAccumulator:
    """Reads a checkpoint written by `save`.

    Args:
      path: the file.
      settings: if given, the checkpoint's settings must equal these (resuming a run with other settings
        would mix incompatible sums).

    Raises:
      fileio.FormatError: the file is missing, corrupt, of another kind or version, or inconsistent; the message
        names the file.
      ValueError: its settings differ from `settings`; the message names the file and the differences.
    """
    name = os.fspath(path)
    arrays = fileio.load_npz_versioned(path, FORMAT_KIND, FORMAT_VERSION)

    def bad(what: str) -> fileio.FormatError:
      return fileio.FormatError(f"{name}: corrupt CMS checkpoint: {what}")

    if missing := sorted({"value_limbs", "abs_limbs", "weight_limbs", "count", "meta"} - set(arrays)):
      raise bad(f"missing arrays {missing}")
    try:
      meta = json.loads(arrays["meta"].astype(np.uint8).tobytes().decode("utf-8"))
      loaded = CMSSettings(**meta["settings"])
      layout, names, num_images, records = meta["layout"], meta["groups"], meta["num_images"], meta["records"]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
      raise bad(f"unreadable metadata ({type(e).__name__}: {e})") from e
    if layout != {"fraction_bits": FRACTION_BITS, "limb_bits": LIMB_BITS, "num_limbs": NUM_LIMBS}:
      raise bad(f"fixed-point layout {layout} differs from this code's")
    if settings is not None and loaded != settings:
      diff = {k: (v, getattr(settings, k)) for k, v in loaded.to_dict().items() if v != getattr(settings, k)}
      raise ValueError(f"{name}: checkpoint settings differ from this run's (checkpoint, run): {diff}")
    t, g = loaded.texture_size, len(names)
    limbs = (g, NUM_LIMBS, t, t)
    expect = {"value_limbs": limbs, "abs_limbs": limbs, "weight_limbs": limbs, "count": (g, t, t)}
    for key, shape in expect.items():
      a = arrays[key]
      if a.dtype != np.int64 or a.shape != shape:
        raise bad(f"{key} is {a.dtype} {a.shape}, expected int64 {shape}")
    for key in ("value_limbs", "abs_limbs", "weight_limbs"):
      low = arrays[key][:, : NUM_LIMBS - 1]
      if low.size and (low.min() < 0 or low.max() > _LIMB_MASK):
        raise bad(f"{key} holds limbs outside [0, 2**{LIMB_BITS})")
    if not isinstance(num_images, list) or len(num_images) != g or len(set(names)) != g:
      raise bad("group names and image counts do not match")

    acc = cls(loaded)
    try:
      for rec in records:
        index = _check_index(rec["index"])
        if index in acc._records or rec["status"] not in (_STATUS_OK, _STATUS_SKIPPED):
          raise ValueError(f"record {index} repeated or of unknown status {rec['status']!r}")
        acc._records[index] = rec
    except (ValueError, TypeError, KeyError) as e:
      raise bad(f"bad records ({type(e).__name__}: {e})") from e
    for i, group in enumerate(names):
      acc._groups[group] = _Group(
        arrays["value_limbs"][i].copy(),
        arrays["weight_limbs"][i].copy(),
        arrays["count"][i].copy(),
        num_images[i],
        arrays["abs_limbs"][i].copy(),
      )
      in_records = sum(r["status"] == _STATUS_OK and group in r["groups"] for r in records)
      if in_records != num_images[i]:
        raise bad(f"group {group!r} counts {num_images[i]} images but its records list {in_records}")
    return acc


def comparisons(groups: Sequence[str]) -> list[tuple[str, str]]:
  """The group pairs worth a difference map, in a fixed order: every pair of predicted classes ("pred_*"), every
  pair of true labels ("label_*"), and "correct" vs "misclassified"."""
  pairs = []
  for prefix in ("pred_", "label_"):
    named = sorted(g for g in groups if g.startswith(prefix))
    pairs += [(a, b) for i, a in enumerate(named) for b in named[i + 1 :]]
  if "correct" in groups and "misclassified" in groups:
    pairs.append(("correct", "misclassified"))
  return pairs


def merge(first: CMSAccumulator, *others: CMSAccumulator) -> CMSAccumulator:
  """Combines accumulators of disjoint images (shards of devices, processes, hosts or runs) into a new one.

  The sums are exact, so the result is the same, bit for bit, for any order and grouping of the inputs, and
  equals one accumulator fed every image.

  Raises:
    ValueError: settings differ (named), or an image index is in more than one input.
  """
  out = CMSAccumulator(first.settings)
  for i, acc in enumerate((first, *others)):
    if acc.settings != first.settings:
      diff = {
        k: (v, getattr(acc.settings, k)) for k, v in first.settings.to_dict().items() if v != getattr(acc.settings, k)
      }
      raise ValueError(f"merge: accumulator {i} has other settings (first, this): {diff}")
    if dup := sorted(out._records.keys() & acc._records.keys()):
      examples = [(k, out._records[k]["name"], acc._records[k]["name"]) for k in dup[:5]]
      raise ValueError(f"merge: {len(dup)} image indices are in more than one accumulator, e.g. {examples}")
    for group, g in acc._groups.items():
      out._groups[group] = out._groups[group].plus(g) if group in out._groups else g.copy()
    out._records.update(copy.deepcopy(acc._records))
  return out
