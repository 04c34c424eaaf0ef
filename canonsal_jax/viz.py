"""Figures of saliency maps: one colour scale per figure, labelled panels, a colour bar and a key (matplotlib).

Every figure a run writes (`overlay.png`, `cis.png`, `pair.png`, `cms_<group>.png`) is built here from the same
parts, so they read the same way:

* **One scale per figure** (`make_scale`): every map in a figure, the crop heatmap, the contours on the photo and
  the canonical face, is coloured on one norm, so equal colours mean equal values across panels. Signed maps
  use a diverging map (`DIVERGING`, red = the score drops when that area is hidden, blue = it rises) on a
  `TwoSlopeNorm` centred at 0 with symmetric ends; maps with no negative value a sequential one (`SEQUENTIAL`)
  from 0.
* **A colour bar** whose label states the unit: "drop in <score kind> when hidden" (`unit_label`).
* **Labelled panels** (photo, model crop, heatmap, canonical face; probe and reference in pair figures), and a
  title with the inputs' short names (`short_name`: the file stem, shortened in the middle), wrapped to the
  figure's width.
* **A key** for what is not a value: grey (hatched on the canonical face) is no data, pixels no patch covered or
  texels never seen, never zero saliency; the dashed line on the photo is the model crop's outline.
* **Visible on any skin tone**: on photos the map is drawn as contour lines outlined in black over a greyscale
  copy of the photo, not as a translucent colour wash.

Figures are `matplotlib.figure.Figure` objects on the Agg canvas, built without `pyplot` (no global state, no
window); `save_figure` writes one atomically in the format of `FigureSettings` (png, svg or pdf) at its dpi.
The settings come from `config.figures` (`FigureSettings.from_config`).

Example:
  >>> import numpy as np
  >>> from canonsal_jax import viz
  >>> heat = np.array([[-1.0, 0.5], [2.0, 0.0]])
  >>> scale = viz.make_scale([heat], unit=viz.unit_label("log-odds"))
  >>> scale.signed, scale.vmax, scale.label
  (True, 2.0, 'drop in log-odds when hidden')
  >>> fig, axes = viz.new_figure(1, settings=viz.FigureSettings(dpi=50))
  >>> image = viz.show_map(axes[0, 0], heat, np.ones_like(heat, bool), scale, "heatmap")
  >>> bar = viz.add_colorbar(fig, axes, scale)
  >>> bar.ax.get_ylabel()
  'drop in log-odds when hidden'
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import cm, colors, patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from PIL import Image, ImageDraw, ImageFont

from canonsal_jax import config as config_lib
from canonsal_jax import fileio

__all__ = [
  "DIVERGING",
  "FORMATS",
  "NO_DATA_RGB",
  "SEQUENTIAL",
  "FigureSettings",
  "Scale",
  "add_colorbar",
  "add_key",
  "colorize",
  "crop_outline_handle",
  "draw_contours",
  "draw_crop_outline",
  "draw_face_boxes",
  "make_scale",
  "new_figure",
  "no_data_handle",
  "panel",
  "save_figure",
  "set_title",
  "short_name",
  "show_map",
  "show_photo",
  "unit_label",
  "upscale",
]

# Colour maps (matplotlib's): perceptually uniform sequential for non-negative maps; ColorBrewer's RdBu reversed
# (negative blue, zero near-white, positive red) for signed maps.
SEQUENTIAL = "inferno"
DIVERGING = "RdBu_r"
NO_DATA_RGB = (128, 128, 128)  # no data: grey, never a colour of either scale
FORMATS = config_lib.FIGURE_FORMATS
# Panel side in inches: at the default 150 dpi a panel is ~510 px, so a 512 px canonical render is shown at about
# its own resolution and text at 9-11 pt reads on a laptop screen.
_PANEL_INCHES = 3.4
_TITLE_POINTS = 11
_CONTOUR_SHARES = (0.25, 0.5, 0.75)  # contour levels on photos, as shares of the scale's end (both signs)


@dataclasses.dataclass(frozen=True)
class FigureSettings:
  """How figures are written (`config.figures`).

  Attributes:
    dpi: dots per inch of raster output (png); also sets the pixel size of images embedded in svg/pdf.
    format: "png", "svg" or "pdf" (vector, with the maps embedded as images).
  """

  dpi: int = 150
  format: str = "png"

  def __post_init__(self):
    low, high = config_lib.FIGURE_DPI  # the range `config.validate` checks
    if not isinstance(self.dpi, int | np.integer) or not low <= int(self.dpi) <= high:
      raise ValueError(f"figures.dpi must be an integer in [{low}, {high}], got {self.dpi!r}")
    if self.format not in FORMATS:
      raise ValueError(f"figures.format must be one of {', '.join(FORMATS)}, got {self.format!r}")

  @classmethod
  def from_config(cls, config: Any) -> FigureSettings:
    """The settings of `config.figures` (raises ValueError naming the setting that is wrong)."""
    return cls(dpi=config.figures.dpi, format=config.figures.format)


@dataclasses.dataclass(frozen=True)
class Scale:
  """The one colour scale of a figure.

  Attributes:
    norm: `TwoSlopeNorm` centred at 0 with ends [-vmax, vmax] (signed), else `Normalize(0, vmax)`.
    cmap: `DIVERGING` or `SEQUENTIAL`, with no-data (masked) values drawn `NO_DATA_RGB`.
    signed: whether the scale diverges around 0.
    label: the colour bar's label (the unit).
  """

  norm: colors.Normalize
  cmap: colors.Colormap
  signed: bool
  label: str

  @property
  def vmax(self) -> float:
    return float(self.norm.vmax)


def unit_label(score_kind: str | Sequence[str], normalisation: str = "none", *, absolute: bool = False) -> str:
  """The colour bar's unit: what a map's value means.

  Args:
    score_kind: the score explained (`OcclusionResult.score_kind`, e.g. "log-odds"); several kinds (a pair
      figure whose sides differ) are joined with " / ".
    normalisation: a CMS's per-image normalisation ("none", "max_abs", "sum_abs"): said in the label.
    absolute: the map holds |drop| (a CMS's absolute view).
  """
  kinds = [score_kind] if isinstance(score_kind, str) else list(dict.fromkeys(score_kind))
  kind = " / ".join(k for k in kinds if k) or "score"
  label = f"{'|drop|' if absolute else 'drop'} in {kind} when hidden"
  per_image = {"none": "", "max_abs": " (each image / its max |drop|)", "sum_abs": " (each image / its total |drop|)"}
  if normalisation not in per_image:
    raise ValueError(f"cms.normalisation must be one of {', '.join(per_image)}, got {normalisation!r}")
  return label + per_image[normalisation]


def make_scale(
  maps: Sequence[np.ndarray],
  *,
  unit: str,
  valid: Sequence[np.ndarray | None] | None = None,
  signed: bool | None = None,
  vmax: float | None = None,
) -> Scale:
  """One scale for every map of a figure.

  Args:
    maps: the figure's maps (any shapes); non-finite values are ignored.
    unit: the colour bar's label (`unit_label`).
    valid: per map, a bool mask of its values with data (None: every finite value).
    signed: diverging around 0 (default: if any value with data is negative).
    vmax: the scale's end (default: the largest |value| with data; 1 when there is none).
  """
  valid = [None] * len(maps) if valid is None else list(valid)
  shown = []
  for values, mask in zip(maps, valid):
    values = np.asarray(values, np.float64)
    keep = np.isfinite(values) if mask is None else (np.asarray(mask, bool) & np.isfinite(values))
    shown.append(values[keep])
  data = np.concatenate(shown) if shown else np.zeros(0)
  if signed is None:
    signed = bool(data.size and data.min() < 0)
  if vmax is None:
    vmax = float(np.abs(data).max()) if data.size else 1.0
  vmax = float(vmax) if vmax > 0 else 1.0
  if signed:
    norm: colors.Normalize = colors.TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)
  else:
    norm = colors.Normalize(vmin=0.0, vmax=vmax)
  cmap = matplotlib.colormaps[DIVERGING if signed else SEQUENTIAL].with_extremes(bad=np.divide(NO_DATA_RGB, 255))
  return Scale(norm=norm, cmap=cmap, signed=signed, label=unit)


def colorize(
  values: np.ndarray, *, valid: np.ndarray | None = None, signed: bool | None = None, vmax: float | None = None
) -> np.ndarray:
  """Maps `[H, W]` values to uint8 RGB `[H, W, 3]` in the colours of `make_scale` (for renders and meshes).

  Args:
    values: the map.
    valid: `[H, W]` bool; invalid pixels ("no data", e.g. uncovered) are drawn `NO_DATA_RGB`, never as zero.
    signed: diverging colours centred on 0 (default: if any valid value is negative).
    vmax: the scale's end (default: the largest magnitude among valid values), so several maps can share one.
  """
  values = np.asarray(values, np.float64)
  valid = np.isfinite(values) if valid is None else (np.asarray(valid, bool) & np.isfinite(values))
  scale = make_scale([values], valid=[valid], unit="", signed=signed, vmax=vmax)
  rgba = scale.cmap(scale.norm(np.ma.masked_array(np.where(valid, values, 0.0), ~valid)), bytes=True)
  return np.ascontiguousarray(rgba[..., :3])


def short_name(name: str, max_chars: int = 32) -> str:
  """A title's name for an input: its file stem (no folders, no suffix), shortened in the middle to `max_chars`."""
  stem = pathlib.PurePath(str(name)).stem or str(name)
  if len(stem) <= max_chars:
    return stem
  head = (max_chars - 1) // 2
  return stem[:head] + "…" + stem[len(stem) - (max_chars - 1 - head) :]


def new_figure(
  num_cols: int, num_rows: int = 1, *, settings: FigureSettings, panel_inches: float = _PANEL_INCHES
) -> tuple[Figure, np.ndarray]:
  """A figure of `num_rows x num_cols` panels on the Agg canvas (no pyplot), with room for a title, bar and key.

  Returns:
    `(figure, axes [num_rows, num_cols])`.
  """
  fig = Figure(
    figsize=(num_cols * panel_inches + 1.4, num_rows * panel_inches + 1.3), dpi=settings.dpi, layout="constrained"
  )
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(num_rows, num_cols, squeeze=False))
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  return fig, axes


def show_photo(ax: Any, rgb: np.ndarray, title: str, *, grey: bool = True) -> None:
  """A photo or crop in a panel: greyscale (so a map drawn over it stays visible on any skin tone) or as is."""
  rgb = np.asarray(rgb)
  if grey:
    luma = rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma
    ax.imshow(luma, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
  else:
    ax.imshow(rgb, interpolation="nearest")
  ax.set_title(title, fontsize=10)


def show_map(ax: Any, values: np.ndarray, valid: np.ndarray, scale: Scale, title: str) -> Any:
  """A map on the figure's scale; pixels without data (`valid` False) in the no-data grey. Returns the image."""
  values = np.asarray(values, np.float64)
  masked = np.ma.masked_array(np.where(valid, values, 0.0), ~np.asarray(valid, bool))
  image = ax.imshow(masked, cmap=scale.cmap, norm=scale.norm, interpolation="nearest")
  ax.set_title(title, fontsize=10)
  return image


def draw_contours(ax: Any, values: np.ndarray, valid: np.ndarray, scale: Scale) -> Any:
  """The map as contour lines at 25/50/75% of the scale's end (both signs on a signed scale), coloured on the
  scale and outlined in black so they show on any photo. Returns the `ContourSet` (None: nothing to draw)."""
  values = np.asarray(values, np.float64)
  valid = np.asarray(valid, bool) & np.isfinite(values)
  if not valid.any() or min(values.shape) < 2:
    return None
  levels = [s * scale.vmax for s in _CONTOUR_SHARES]
  if scale.signed:
    levels = [-v for v in reversed(levels)] + levels
  data = values[valid]
  levels = [v for v in levels if data.min() <= v <= data.max()]
  if not levels:
    return None
  masked = np.ma.masked_array(np.where(valid, values, 0.0), ~valid)
  contours = ax.contour(masked, levels=levels, cmap=scale.cmap, norm=scale.norm, linewidths=1.6)
  contours.set(path_effects=[patheffects.withStroke(linewidth=3.2, foreground="black")])
  return contours


def no_data_handle(label: str, *, hatched: bool = False) -> Patch:
  """The key's entry for no data (grey; hatched as on the canonical face)."""
  edge, hatch = ("0.35", "////") if hatched else ("none", None)
  return Patch(facecolor=np.divide(NO_DATA_RGB, 255), edgecolor=edge, hatch=hatch, label=label)


def crop_outline_handle() -> Line2D:
  """The key's entry for the model crop's outline drawn on a photo."""
  return Line2D([], [], color="white", linestyle="--", linewidth=1.2, path_effects=_outline(), label="model crop")


def _outline() -> list[Any]:
  return [patheffects.withStroke(linewidth=2.6, foreground="black")]


def draw_crop_outline(ax: Any, inside: np.ndarray) -> None:
  """Outlines the model crop on a photo (`inside`: [H, W] bool, the photo pixels the crop covers)."""
  inside = np.asarray(inside, np.float64)
  if 0 < inside.sum() < inside.size:
    lines = ax.contour(inside, levels=[0.5], colors="white", linestyles="--", linewidths=1.2)
    lines.set(path_effects=_outline())


# The face explained: a solid box with a black edge (seen on any photo); the other faces found: thin grey dashes.
CHOSEN_FACE_STYLE = {"edgecolor": "#00e5ff", "linewidth": 1.6, "linestyle": "-"}
OTHER_FACE_STYLE = {"edgecolor": "0.75", "linewidth": 0.9, "linestyle": ":"}
CHOSEN_FACE_LABEL, OTHER_FACE_LABEL = "face explained", "other faces found"


def draw_face_boxes(ax: Any, boxes_xyxy: Sequence[Sequence[float]], chosen: int) -> list[Any]:
  """Draws the detector's face boxes on a photo, the chosen one bold, the others muted, each numbered as
  `config.face` counts them. Boxes are dlib's (inclusive pixel centres: a box covers half a pixel more each side).

  Returns:
    The key's entries: the chosen face's, and the others' when there are others.
  """
  for i, box in enumerate(boxes_xyxy):
    x0, y0, x1, y1 = (float(v) for v in box)
    style = CHOSEN_FACE_STYLE if i == chosen else OTHER_FACE_STYLE
    rect = Rectangle(
      (x0 - 0.5, y0 - 0.5),
      x1 - x0 + 1.0,
      y1 - y0 + 1.0,
      facecolor="none",
      label=CHOSEN_FACE_LABEL if i == chosen else OTHER_FACE_LABEL,
      path_effects=_outline() if i == chosen else None,
      **style,
    )
    ax.add_patch(rect)
    if len(boxes_xyxy) > 1:
      ax.text(x0 - 0.5, y0 - 1.5, str(i), color=style["edgecolor"], fontsize=7, va="bottom", path_effects=_outline())
  handles = [Line2D([], [], path_effects=_outline(), label=CHOSEN_FACE_LABEL, **_line(CHOSEN_FACE_STYLE))]
  if len(boxes_xyxy) > 1:
    handles.append(Line2D([], [], label=OTHER_FACE_LABEL, **_line(OTHER_FACE_STYLE)))
  return handles


def _line(style: dict[str, Any]) -> dict[str, Any]:
  return {"color": style["edgecolor"], "linewidth": style["linewidth"], "linestyle": style["linestyle"]}


def add_colorbar(fig: Figure, axes: Any, scale: Scale) -> Any:
  """The figure's one colour bar, beside `axes`, labelled with the scale's unit; says which way is which."""
  mappable = cm.ScalarMappable(norm=scale.norm, cmap=scale.cmap)
  bar = fig.colorbar(mappable, ax=list(np.ravel(axes)), shrink=0.85, aspect=25, pad=0.02)
  bar.set_label(scale.label, fontsize=10)
  bar.ax.tick_params(labelsize=9)
  if scale.signed:
    bar.ax.text(0.5, 1.01, "score drops", transform=bar.ax.transAxes, ha="center", va="bottom", fontsize=8)
    bar.ax.text(0.5, -0.01, "score rises", transform=bar.ax.transAxes, ha="center", va="top", fontsize=8)
  return bar


def add_key(fig: Figure, handles: Sequence[Any]) -> Any:
  """The figure's key (legend) under its panels; None when there is nothing to explain."""
  if not handles:
    return None
  return fig.legend(handles=list(handles), loc="outside lower center", ncols=min(len(handles), 3), fontsize=9)


def set_title(fig: Figure, text: str) -> None:
  """The figure's title, wrapped to its width so it never runs off (at most three lines, then shortened): wrapped
  at an estimate of the characters a line holds, then measured and rewrapped narrower until it fits."""
  chars = max(20, int(fig.get_figwidth() * 72 / (_TITLE_POINTS * 0.55)))
  renderer = fig.canvas.get_renderer()
  while True:
    lines = textwrap.wrap(text, chars)
    if len(lines) > 3:
      lines = [*lines[:2], textwrap.shorten(" ".join(lines[2:]), chars, placeholder=" …")]
    title = fig.suptitle("\n".join(lines), fontsize=_TITLE_POINTS)
    if chars <= 20 or title.get_window_extent(renderer).width <= 0.98 * fig.bbox.width:
      return
    chars = int(chars * 0.9)


def save_figure(fig: Figure, out_dir: str | pathlib.Path, stem: str, settings: FigureSettings) -> pathlib.Path:
  """Writes `fig` as `<out_dir>/<stem>.<settings.format>` atomically at `settings.dpi`; returns the path."""
  path = pathlib.Path(out_dir) / f"{stem}.{settings.format}"
  if settings.format == "png":
    # Drawn on the Agg canvas and written once as RGB, like every other PNG the package writes: savefig would
    # encode an RGBA PNG that then had to be decoded and encoded again (a second of a small script's run).
    if not isinstance(fig.canvas, FigureCanvasAgg):
      FigureCanvasAgg(fig)
    dpi, face = fig.get_dpi(), fig.get_facecolor()
    fig.set_dpi(settings.dpi)
    fig.set_facecolor("white")
    try:
      fig.canvas.draw()
      rgba = np.asarray(fig.canvas.buffer_rgba())
    finally:
      fig.set_dpi(dpi)
      fig.set_facecolor(face)
    fileio.save_png(path, np.ascontiguousarray(rgba[..., :3]))
  else:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=settings.format, dpi=settings.dpi, facecolor="white")
    fileio.write_atomic(path, buffer.getvalue())
  return path


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour enlargement, so small model crops (32 px) stay legible and pixel-true."""
  return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def panel(tiles: list[np.ndarray], title: str, *, height: int = 320, margin: int = 8) -> np.ndarray:
  """Lays tiles side by side at a common height under a one-line title; returns uint8 RGB (the experiments'
  quick composites; figures for users are built with `new_figure`)."""
  resized = []
  for tile in tiles:
    img = Image.fromarray(np.asarray(tile, np.uint8))
    width = max(1, round(img.width * height / img.height))
    resized.append(img.resize((width, height), Image.Resampling.NEAREST if img.height < height else Image.LANCZOS))
  title_h = 24
  total_w = sum(t.width for t in resized) + margin * (len(resized) + 1)
  canvas = Image.new("RGB", (total_w, height + title_h + 2 * margin), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  draw.text((margin, margin), title, fill=(0, 0, 0), font=ImageFont.load_default())
  x = margin
  for tile in resized:
    canvas.paste(tile, (x, title_h + margin))
    x += tile.width + margin
  return np.asarray(canvas)
