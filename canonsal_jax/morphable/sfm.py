"""The Surrey Face Model (SFM) loader: eos's binary files read directly with numpy, no eos at run time.

The SFM (Huber et al., "A Multiresolution 3D Morphable Face Model and Fitting Framework", VISAPP 2016) ships
with eos as a folder of files; `load_sfm` takes that folder (or the model's ``.bin`` file inside it):

| file | what we take from it |
| --- | --- |
| ``sfm_shape_3448.bin`` | mean, PCA basis and eigenvalues, triangles, texture coordinates |
| ``expression_blendshapes_3448.bin`` | the 6 expression blendshapes (anger ... surprise) |
| ``ibug_to_sfm.txt`` | the 68 iBUG/dlib landmarks' vertices (TOML) |
| ``sfm_model_contours.json`` | the jaw-contour candidate vertices, right and left |
| ``sfm_3448_edge_topology.json`` | optional: edges' adjacent faces and vertices (`load_edge_topology`) |

**The binary format** is a cereal ``BinaryInputArchive`` (little-endian, no padding) of
``eos::morphablemodel::MorphableModel``:

- a ``uint32`` class version (1 to 4; the public SFM files are version 1), then, by version,
  1: shape model, colour model, texture coordinates;
  2: shape model, colour model, expression model, texture coordinates;
  3: as 2 with landmark definitions before the texture coordinates;
  4: as 3 with texture triangle indices at the end.
- a ``PcaModel`` (unversioned) is: mean, orthonormal basis, eigenvalues (Eigen matrices), triangle list.
  An Eigen matrix is ``int32 rows, int32 cols`` and ``rows * cols`` float32 in column-major order (the mean is
  ``[3V, 1]``, ``x y z x y z ...``; the basis ``[3V, S]``, one eigenvector per column). eos rebuilds the
  rescaled basis at load time as ``orthonormal * sqrt(eigenvalue)`` per column, in float32; so do we.
- ``std::vector<T>`` is a ``uint64`` count then the elements; a triangle (``std::array<int, 3>``) is 3 int32;
  a texture coordinate (``std::array<double, 2>``) is 2 float64; a string is a ``uint64`` length and bytes.
- an optional is a ``bool`` (1 byte, true = empty) then the value; a variant is an ``int32`` index
  (0 = PcaModel, 1 = blendshapes) then the value; a map is a ``uint64`` count then (key, value) pairs.
- the blendshapes file is a ``std::vector<Blendshape>``, each a name and a ``[3V, 1]`` Eigen matrix.

**Conventions.** The SFM's model space already matches ours (right-handed, y up, the face looking along
+z, millimetres; the subject's right side at -x) and its triangles are already counter-clockwise seen from
outside; the loader checks the winding on the mean and flips it if a file ever disagrees. eos's texture
coordinates have v pointing down (image style: eos's ``extract_texture`` maps v to image rows), so
``uv = (u, 1 - v_eos)``.

Example:
  Lines marked +SKIP are not run as doctests: it needs a copy of the Surrey Face Model.
  >>> model = load_sfm("path/to/sfm")  # doctest: +SKIP
  >>> model.mean.shape, model.shape_basis.shape, model.expression_basis.shape  # doctest: +SKIP
  ((3448, 3), (3448, 3, 63), (3448, 3, 6))
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import tomllib
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from canonsal_jax.morphable.model import NUM_LANDMARKS, REGION_NAMES, MorphableModel, edge_topology_from_triangles

__all__ = [
  "SFM_EXPRESSION_UPPER",
  "SFM_FILES",
  "EdgeTopology",
  "label_regions",
  "load_edge_topology",
  "load_sfm",
]

# The files `load_sfm` reads from the model folder (eos's share/ names for the 3448-vertex resolution).
SFM_FILES = {
  "shape": "sfm_shape_3448.bin",
  "expression": "expression_blendshapes_3448.bin",
  "landmarks": "ibug_to_sfm.txt",
  "contours": "sfm_model_contours.json",
  "edge_topology": "sfm_3448_edge_topology.json",
}

# Upper bound of the blendshape coefficients. eos fits them with non-negative least squares (lower bound 0,
# no upper bound). Each SFM blendshape is a full (apex) expression at 1, but some are subtle (anger moves no
# vertex more than ~6 mm) while surprise drops the jaw ~32 mm; 1.5 lets a fit exaggerate an apex by half
# for people who express more strongly than the model's data, without extrapolating the linear blendshapes
# into implausible geometry (surprise at 1.5 opens the mouth ~48 mm, about the physiological maximum).
SFM_EXPRESSION_UPPER = 1.5

# The MorphableModel class versions this reader understands (eos's CEREAL_CLASS_VERSION is 4).
_MODEL_VERSIONS = (1, 2, 3, 4)

_HINT = "pass --morphable_model=PATH (the folder holding the Surrey Face Model files from eos's share/ folder)"


class EdgeTopology(NamedTuple):
  """A mesh's edges with their neighbours, 0-based; an edge on the mesh border has -1 for one face (eos's first).

  Attributes:
    adjacent_faces: `[Ne, 2]` int32 the two triangles sharing each edge.
    adjacent_vertices: `[Ne, 2]` int32 the edge's two vertices.
  """

  adjacent_faces: np.ndarray
  adjacent_vertices: np.ndarray


class _Reader:
  """Reads a cereal binary archive from bytes, raising ValueError that names the file on any mismatch."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.data = path.read_bytes()
    self.pos = 0

  def fail(self, what: str) -> ValueError:
    return ValueError(
      f"{self.path}: not a valid eos file (corrupt or truncated?): {what} at byte {self.pos} of {len(self.data)}"
    )

  def take(self, n: int, what: str) -> bytes:
    if n < 0 or self.pos + n > len(self.data):
      raise self.fail(f"expected {n} bytes of {what}, {len(self.data) - self.pos} left")
    out = self.data[self.pos : self.pos + n]
    self.pos += n
    return out

  def scalar(self, fmt: str, what: str):
    return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

  def count(self, item_size: int, what: str) -> int:
    """A vector's uint64 element count, checked against the bytes left."""
    n = self.scalar("Q", f"{what} count")
    if n * item_size > len(self.data) - self.pos:
      raise self.fail(f"{what} claims {n} elements of {item_size} bytes, {len(self.data) - self.pos} bytes left")
    return n

  def array(self, dtype: str, n: int, what: str) -> np.ndarray:
    dt = np.dtype(dtype).newbyteorder("<")
    return np.frombuffer(self.take(n * dt.itemsize, what), dtype=dt).astype(dt.newbyteorder("="))

  def string(self, what: str) -> str:
    n = self.count(1, what)
    raw = self.take(n, what)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      raise self.fail(f"{what} is not UTF-8") from None

  def boolean(self, what: str) -> bool:
    b = self.scalar("B", what)
    if b > 1:
      raise self.fail(f"{what} is {b}, expected a bool (0 or 1)")
    return bool(b)

  def matrix(self, what: str) -> np.ndarray:
    """An Eigen float32 matrix: int32 rows, int32 cols, column-major data -> `[rows, cols]`."""
    rows, cols = self.scalar("i", f"{what} rows"), self.scalar("i", f"{what} cols")
    if rows < 0 or cols < 0:
      raise self.fail(f"{what} has shape ({rows}, {cols})")
    return self.array("f4", rows * cols, what).reshape(cols, rows).T

  def pca_model(self, what: str) -> dict[str, np.ndarray]:
    mean = self.matrix(f"{what} mean")
    basis = self.matrix(f"{what} orthonormal basis")
    eigenvalues = self.matrix(f"{what} eigenvalues")
    n = self.count(12, f"{what} triangles")
    triangles = self.array("i4", 3 * n, f"{what} triangles").reshape(n, 3)
    if mean.size and (mean.shape[1] != 1 or basis.shape[0] != mean.shape[0]):
      raise self.fail(f"{what}: mean {mean.shape} and basis {basis.shape} do not fit")
    if eigenvalues.size != basis.shape[1] or (eigenvalues.size and eigenvalues.shape[1] != 1):
      raise self.fail(f"{what}: {eigenvalues.shape} eigenvalues for a basis {basis.shape}")
    return {"mean": mean[:, 0], "basis": basis, "eigenvalues": eigenvalues[:, 0], "triangles": triangles}

  def blendshapes(self, what: str) -> tuple[list[str], np.ndarray]:
    n = self.count(24, what)
    names, deformations = [], []
    for i in range(n):
      names.append(self.string(f"{what} {i} name"))
      d = self.matrix(f"{what} {i} ({names[-1]}) deformation")
      if d.shape[1] != 1 or (deformations and d.shape[0] != deformations[0].size):
        raise self.fail(f"{what} {names[-1]} has shape {d.shape}, expected [3V, 1] like the first")
      deformations.append(d[:, 0])
    return names, np.stack(deformations) if deformations else np.zeros((0, 0), np.float32)

  def done(self):
    if self.pos != len(self.data):
      raise self.fail(f"{len(self.data) - self.pos} bytes left over after the end of the archive")


def _read_model(path: pathlib.Path) -> dict:
  """Parses an eos ``MorphableModel`` file into numpy arrays (see the module docstring for the layout)."""
  r = _Reader(path)
  version = r.scalar("I", "class version")
  if version not in _MODEL_VERSIONS:
    raise r.fail(f"MorphableModel version {version}, expected one of {_MODEL_VERSIONS}")
  out = {"version": version, "shape": r.pca_model("shape model"), "color": r.pca_model("colour model")}
  out["expression"] = None
  if version >= 2 and not r.boolean("expression model nullopt"):
    index = r.scalar("i", "expression model variant index")
    if index == 0:
      out["expression"] = r.pca_model("expression model")
    elif index == 1:
      out["expression"] = r.blendshapes("expression blendshapes")
    else:
      raise r.fail(f"expression model variant index {index}, expected 0 (PcaModel) or 1 (Blendshapes)")
  if version >= 3 and not r.boolean("landmark definitions nullopt"):
    for i in range(r.count(12, "landmark definitions")):
      r.string(f"landmark definition {i} name")
      r.scalar("i", f"landmark definition {i} vertex")
  n = r.count(16, "texture coordinates")
  out["texture_coordinates"] = r.array("f8", 2 * n, "texture coordinates").reshape(n, 2)
  if version >= 4:
    n = r.count(12, "texture triangle indices")
    out["texture_triangles"] = r.array("i4", 3 * n, "texture triangle indices").reshape(n, 3)
  r.done()
  return out


def _read_blendshapes(path: pathlib.Path) -> tuple[list[str], np.ndarray]:
  """Parses an eos blendshapes file: names and deformations `[E, 3V]`."""
  r = _Reader(path)
  out = r.blendshapes("blendshapes")
  r.done()
  return out


def _read_landmark_ids(path: pathlib.Path, num_vertices: int) -> np.ndarray:
  """The `[68]` vertex per iBUG landmark from eos's TOML mapping (1-based iBUG numbers), -1 where not mapped."""
  try:
    mappings = tomllib.loads(path.read_text())["landmark_mappings"]
  except (tomllib.TOMLDecodeError, KeyError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: expected a TOML file with a [landmark_mappings] table ({e})") from None
  ids = np.full(NUM_LANDMARKS, -1, np.int32)
  for key, vertex in mappings.items():
    if not (key.isdigit() and 1 <= int(key) <= NUM_LANDMARKS and isinstance(vertex, int)):
      raise ValueError(f"{path}: landmark mapping {key} = {vertex!r}, expected iBUG 1..68 = vertex id")
    if not 0 <= vertex < num_vertices:
      raise ValueError(f"{path}: landmark {key} maps to vertex {vertex}, the model has {num_vertices}")
    ids[int(key) - 1] = vertex
  return ids


def _read_contours(path: pathlib.Path, num_vertices: int) -> tuple[np.ndarray, np.ndarray]:
  """The right and left jaw-contour candidate vertices from eos's ``sfm_model_contours.json``."""
  try:
    contour = json.loads(path.read_text())["model_contour"]
    right, left = (np.asarray(contour[k], np.int64) for k in ("right_contour", "left_contour"))
  except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
    raise ValueError(
      f"{path}: expected {{'model_contour': {{'right_contour': [...], 'left_contour': [...]}}}} ({e})"
    ) from None
  for name, ids in (("right_contour", right), ("left_contour", left)):
    if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= num_vertices:
      raise ValueError(f"{path}: {name} must be a non-empty list of vertex ids below {num_vertices}")
  return right.astype(np.int32), left.astype(np.int32)


def load_edge_topology(path: str | os.PathLike) -> EdgeTopology:
  """Loads eos's edge topology JSON (the model folder or the file), converted to 0-based ids, -1 for none.

  eos stores 1-based ids with 0 meaning "no face" (an edge on the mesh border).

  Args:
    path: the model folder (holding ``sfm_3448_edge_topology.json``) or the JSON file.

  Returns:
    The `EdgeTopology`: `adjacent_faces [Ne, 2]`, `adjacent_vertices [Ne, 2]`, int32.

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: the file is not an edge topology.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / SFM_FILES["edge_topology"]
  if not path.is_file():
    raise FileNotFoundError(f"edge topology not found at {path}; {_HINT}")
  try:
    topo = json.loads(path.read_text())["edge_topology"]
    arrays = [np.array([[e["value0"], e["value1"]] for e in topo[k]], np.int64) for k in EdgeTopology._fields]
  except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: expected eos's edge topology JSON ({e})") from None
  for name, a in zip(EdgeTopology._fields, arrays, strict=True):
    if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] != arrays[0].shape[0] or (a.size and a.min() < 0):
      raise ValueError(f"{path}: {name} must be a list of non-negative pairs, one per edge")
  return EdgeTopology(*(a.astype(np.int32) - 1 for a in arrays))


def _is_ccw_outside(mean: np.ndarray, triangles: np.ndarray) -> bool:
  """Whether the triangles face +z on the whole (the face mask's outside looks along +z)."""
  v = mean[triangles]
  area_normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
  return bool(area_normals[:, 2].sum() > 0)


def _polyline_y(points: np.ndarray, x: np.ndarray) -> np.ndarray:
  """The y of the polyline through `points [P, 2]` (x, y) at `x`, held flat beyond its ends."""
  order = np.argsort(points[:, 0])
  return np.interp(x, points[order, 0], points[order, 1])


def label_regions(mean: np.ndarray, landmark_ids: np.ndarray) -> np.ndarray:
  """Semantic region per vertex, from the frontal (x, y) projection of the mean face and its landmarks.

  The face is made left-right symmetric first: every landmark position used is the average of the landmark
  and its mirrored counterpart (x negated), and rules use |x|, so the labels are symmetric up to the mean's
  own asymmetry. Lengths are in units of the inter-ocular distance `iod` (between the eye centres). The first
  rule that holds labels a vertex:

  1. ears: none on the SFM (a face mask); kept for other models' sake, never assigned here;
  2. eyes: inside an ellipse around each eye's 6 landmarks, semi-axes 0.65 x and 0.45 x the eye's width;
  3. brows: within 0.12 iod above or below the brow's polyline (landmarks 18-22, 23-27), within its x-range
     widened by 0.1 iod;
  4. nose: between the nose bridge's top (landmark 28) and 0.06 iod below the subnasale (34), |x| less than a
     half-width growing linearly from 0.12 iod at the top to 1.4 x the nostrils' half-width (32, 36) at the
     bottom;
  5. mouth: inside an ellipse around the lip landmarks (49-68), its semi-axes 1.2 x the lips' half-extents;
  6. chin: below the mouth's centre, |x| within 1.1 x the mouth's half-width;
  7. jaw: below the mouth corners (49, 55);
  8. forehead: above the brows' polyline;
  9. nose: above the eye centres and below the brows, medial to the inner eye corners (the bridge);
  10. eyes: above the eye centres and below the brows, from there to 0.1 iod past the outer eye corner (the
      orbit, upper lids);
  11. cheeks: the rest of the face between the eyes and the mouth corners, up to |x| of 1.4 iod;
  12. other: whatever is left (the far sides of the head; none on the SFM).

  Args:
    mean: `[V, 3]` the mean face, model space (y up, the face looking along +z).
    landmark_ids: `[68]` int32 vertex per iBUG landmark (-1 for unmapped; the eyes, brows, nose and lips
      must be mapped, except landmarks 61 and 65).

  Returns:
    `[V]` int32 index into `REGION_NAMES`.
  """
  mean = np.asarray(mean, np.float64)
  ids = np.asarray(landmark_ids)
  region = {name: i for i, name in enumerate(REGION_NAMES)}

  def lm(numbers) -> np.ndarray:  # (x, y) of 1-based iBUG landmarks
    return mean[ids[np.asarray(numbers) - 1], :2]

  # iBUG's mirror pairs (1-based) among the landmarks we use.
  mirror = {**{18 + i: 27 - i for i in range(10)}, **{28 + i: 28 + i for i in range(4)}, 32: 36, 33: 35, 34: 34}
  mirror.update({37: 46, 38: 45, 39: 44, 40: 43, 41: 48, 42: 47})
  mirror.update({49: 55, 50: 54, 51: 53, 52: 52, 56: 60, 57: 59, 58: 58, 61: 65, 62: 64, 63: 63, 66: 68, 67: 67})
  mirror.update({v: k for k, v in list(mirror.items())})

  def sym(numbers) -> np.ndarray:  # positions of `numbers`, each averaged with its mirror image
    numbers = [n for n in numbers if ids[n - 1] >= 0 and ids[mirror[n] - 1] >= 0]
    p, q = lm(numbers), lm([mirror[n] for n in numbers])
    return np.stack([(p[:, 0] - q[:, 0]) / 2, (p[:, 1] + q[:, 1]) / 2], axis=1)

  x, y = np.abs(mean[:, 0]), mean[:, 1]
  eye = sym(range(43, 49))  # the left eye (x > 0); rules use |x|
  eye_centre = eye.mean(0)
  iod = 2 * eye_centre[0]
  labels = np.full(mean.shape[0], region["other"], np.int32)
  free = np.ones(mean.shape[0], bool)

  def assign(name: str, mask: np.ndarray):
    nonlocal free
    labels[free & mask] = region[name]
    free &= ~mask

  eye_width = np.ptp(eye[:, 0])
  assign("eyes", ((x - eye_centre[0]) / (0.65 * eye_width)) ** 2 + ((y - eye_centre[1]) / (0.45 * eye_width)) ** 2 < 1)

  brow = sym(range(23, 28))
  brow_y = _polyline_y(brow, x)
  in_brow_x = (x > brow[:, 0].min() - 0.1 * iod) & (x < brow[:, 0].max() + 0.1 * iod)
  assign("brows", in_brow_x & (np.abs(y - brow_y) < 0.12 * iod))

  top, bottom = sym([28])[0, 1], sym([34])[0, 1] - 0.06 * iod
  t = np.clip((top - y) / (top - bottom), 0, 1)
  half_width = (1 - t) * 0.12 * iod + t * 1.4 * sym([36])[0, 0]
  assign("nose", (y <= top) & (y >= bottom) & (x < half_width))

  lips = sym(range(49, 69))
  mouth_centre = np.array([0.0, (lips[:, 1].max() + lips[:, 1].min()) / 2])
  mouth_half = 1.2 * np.array([lips[:, 0].max(), (lips[:, 1].max() - lips[:, 1].min()) / 2])
  assign("mouth", (x / mouth_half[0]) ** 2 + ((y - mouth_centre[1]) / mouth_half[1]) ** 2 < 1)

  assign("chin", (y < mouth_centre[1]) & (x < 1.1 * lips[:, 0].max()))
  assign("jaw", y < sym([55])[0, 1])
  assign("forehead", y > brow_y)
  # Between the eyes and the brows: the orbit (upper lid) is "eyes", medial to the inner eye corners "nose".
  orbit = (y > eye_centre[1]) & (y <= brow_y)
  assign("nose", orbit & (x < eye[:, 0].min()))
  assign("eyes", orbit & (x < eye[:, 0].max() + 0.1 * iod))
  assign("cheeks", x < 1.4 * iod)
  return labels


def _need(folder: pathlib.Path, name: str) -> pathlib.Path:
  path = folder / name
  if not path.is_file():
    needed = ", ".join(SFM_FILES[k] for k in SFM_FILES if k != "edge_topology")
    raise FileNotFoundError(
      f"Surrey Face Model not found at {folder}: expected {needed} there, {name} is missing; {_HINT}"
    )
  return path


def load_sfm(path: str | os.PathLike, *, expression_upper: float = SFM_EXPRESSION_UPPER) -> MorphableModel:
  """Loads the Surrey Face Model (3448 vertices, 63 shape PCs, 6 expression blendshapes) as a `MorphableModel`.

  Args:
    path: the folder holding the SFM files (see `SFM_FILES`), or the model's ``.bin`` file in that folder.
    expression_upper: upper bound of the blendshape coefficients (the lower bound is 0, as in eos's
      non-negative fit); see `SFM_EXPRESSION_UPPER`.

  Returns:
    The model: `mean [V, 3]`; `shape_basis [V, 3, 63]` the rescaled basis (eigenvector x sqrt(eigenvalue)) so
    that alpha ~ N(0, I), unbounded; `expression_basis [V, 3, 6]` the blendshapes, bounded to
    [0, expression_upper]; `triangles [F, 3]` counter-clockwise seen from outside; `uv [V, 2]` with v up;
    `landmark_ids [68]` (-1 for the jaw points 1-8, 10-17 and the inner mouth corners 61, 65); the jaw
    contours; `regions [V]` from `label_regions`; the edges (`edge_topology_from_triangles`, the same as
    eos's edge topology file). Float32 and int32 arrays.

  Raises:
    FileNotFoundError: the folder or one of its files is missing.
    ValueError: a file is corrupt, truncated or does not fit the others.

  Example:
    Lines marked +SKIP are not run as doctests: it needs a copy of the Surrey Face Model.
    >>> model = load_sfm("path/to/sfm")  # doctest: +SKIP
    >>> model.landmark_ids[30]  # doctest: +SKIP
    Array(114, dtype=int32)
  """
  path = pathlib.Path(path)
  folder, model_path = (path.parent, path) if path.suffix == ".bin" else (path, path / SFM_FILES["shape"])
  if not folder.is_dir():
    raise FileNotFoundError(f"Surrey Face Model not found: {folder} is not a folder; {_HINT}")
  if not model_path.is_file():
    model_path = _need(folder, model_path.name)
  raw = _read_model(model_path)
  shape = raw["shape"]
  num_vertices, num_shape = shape["mean"].size // 3, shape["basis"].shape[1]
  if shape["mean"].size == 0 or shape["mean"].size % 3:
    raise ValueError(f"{model_path}: the shape mean has {shape['mean'].size} values, expected 3 per vertex")
  if shape["triangles"].size == 0 or shape["triangles"].min() < 0 or shape["triangles"].max() >= num_vertices:
    raise ValueError(f"{model_path}: triangles must index the {num_vertices} vertices")
  if raw["texture_coordinates"].shape != (num_vertices, 2):
    raise ValueError(
      f"{model_path}: {raw['texture_coordinates'].shape[0]} texture coordinates, expected one per vertex "
      f"({num_vertices})"
    )
  if (shape["eigenvalues"] < 0).any():
    raise ValueError(f"{model_path}: negative PCA eigenvalues")

  mean = shape["mean"].reshape(num_vertices, 3)
  # As eos: each orthonormal column times the float32 square root of its eigenvalue.
  rescaled = shape["basis"] * np.sqrt(shape["eigenvalues"].astype(np.float32))
  triangles = shape["triangles"].astype(np.int32)
  if not _is_ccw_outside(mean, triangles):
    triangles = triangles[:, ::-1].copy()
  uv = raw["texture_coordinates"].astype(np.float32) * np.float32([1, -1]) + np.float32([0, 1])

  blendshapes_path = folder / SFM_FILES["expression"]
  if blendshapes_path.is_file() or not isinstance(raw["expression"], tuple):
    expression_names, deformations = _read_blendshapes(_need(folder, SFM_FILES["expression"]))
  else:  # A version >= 2 model file with its blendshapes inside.
    expression_names, deformations = raw["expression"]
  if deformations.shape[1:] != (3 * num_vertices,):
    raise ValueError(
      f"{blendshapes_path}: blendshapes of {deformations.shape[1:]} values, expected {3 * num_vertices} "
      f"(3 per vertex of {model_path.name})"
    )
  num_expression = deformations.shape[0]

  landmark_ids = _read_landmark_ids(_need(folder, SFM_FILES["landmarks"]), num_vertices)
  contour_right, contour_left = _read_contours(_need(folder, SFM_FILES["contours"]), num_vertices)
  regions = label_regions(mean, landmark_ids)
  edge_vertex_ids, edge_face_ids = edge_topology_from_triangles(triangles)  # as eos's edge topology file

  return MorphableModel(
    mean=jnp.asarray(mean, jnp.float32),
    shape_basis=jnp.asarray(rescaled.reshape(num_vertices, 3, num_shape), jnp.float32),
    shape_lower=jnp.full((num_shape,), -jnp.inf, jnp.float32),
    shape_upper=jnp.full((num_shape,), jnp.inf, jnp.float32),
    expression_basis=jnp.asarray(deformations.T.reshape(num_vertices, 3, num_expression), jnp.float32),
    expression_lower=jnp.zeros((num_expression,), jnp.float32),
    expression_upper=jnp.full((num_expression,), expression_upper, jnp.float32),
    triangles=jnp.asarray(triangles, jnp.int32),
    uv=jnp.asarray(uv, jnp.float32),
    landmark_ids=jnp.asarray(landmark_ids, jnp.int32),
    contour_right_ids=jnp.asarray(contour_right, jnp.int32),
    contour_left_ids=jnp.asarray(contour_left, jnp.int32),
    regions=jnp.asarray(regions, jnp.int32),
    edge_vertex_ids=jnp.asarray(edge_vertex_ids),
    edge_face_ids=jnp.asarray(edge_face_ids),
    name=f"sfm_{num_vertices}",
    shape_names=tuple(f"pc{i}" for i in range(num_shape)),
    expression_names=tuple(expression_names),
  ).check()
