"""The report people read: one static, offline HTML page about a CMS run, with its images and tables beside it.

`write_report(cms_dir, out_dir)` reads a run folder written by `runs.run_cms` (`cms.npz`, `summary.json`,
and, when the run kept them, the per-image textures `textures/<index>.npz`) and writes into `out_dir`:

* `index.html`: no external URLs, no JavaScript, all text escaped; images are files beside it. Laid out for a
  window 1280 px wide or more (the page never scrolls sideways; tables wrap their headers), every column header
  in words with its unit (`metric_header`).
* `images/*.png`: per group the CMS (signed mean) and the absolute CMS (mean |saliency|), each on one scale shared
  by all groups, and the coverage (images per texel) on the group's own scale, 0 to its image count, all on the
  canonical face with no-data texels hatched grey; difference maps of group pairs on a diverging scale; texel t
  maps and their significant clusters; example CIS per group; colour bars.
* `regions.csv`: per group and region, the CMS's region mass (`stats.region_mass` of the CMS, raw, share,
  area share, density, mean value) and the mean per-image share with its bootstrap interval.
* `tests.csv`: the per-region permutation tests of every group pair, with Holm-adjusted p-values.
* `meshes/cms_<group>.ply`: the canonical (mean) face, each vertex coloured by the CMS at its UV.
* `report.json`: every number shown, for scripts.

Statistics (all seeded by `seed`, so the report is the same file for the same inputs):

* Region bars: the per-image region shares kept in the records (share of |saliency| mass), their mean per group
  with a bootstrap interval over images (`stats.bootstrap_ci`), next to the group CMS's own share and the
  region's share of the UV layout (a region as salient as its size sits at its area share); in percent, on an
  axis that ends at a round number above every mark.
* The faithfulness tables of `scripts/faithfulness.py` (with `metrics`), in this order: the headline (a photo
  blurred in pixel space as substitute: no method's home ground), the paper's (with what the published 8-bit
  wrap-around changes), each figure with its bootstrap interval, the CMS's Holm-corrected paired tests against
  every other map, and the one sentence those tests allow (`claim_sentence`); then the extended table: its scores,
  then its tests against the controls. Units: Average Drop in % of each image's score; Increase in Confidence
  and Win in % of the images; AUCs in score units; "Area hidden" (the table's `mean_mass`) in pixels, what a
  map scaled to the setting `mass` (a share of the crop's pixels, 0.1 = 10%) hid per image.
* Group pairs (`comparisons`): per region, `stats.region_permutation_test` (difference of mean shares, label
  permutations), Holm-adjusted over the regions of the pair and, more strictly, over all pairs and regions.
* Texel level, where the run saved per-image textures: `stats.cluster_permutation_test` on the normalised
  textures (each divided by its record's normaliser, as the CMS accumulates them).

Example:
  Lines marked +SKIP are not run as doctests: it needs a CMS run.
  >>> path = write_report("/tmp/cms", "/tmp/cms_report", seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io as stdio
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from canonsal_jax import assets, canonical, cms, fileio, morphable, outputs, pipeline, viz
from canonsal_jax.evidence import stats

__all__ = [
  "METRIC_HEADERS",
  "REGION_COLUMNS",
  "ReportOptions",
  "claim_sentence",
  "comparisons",
  "load_metrics",
  "metric_header",
  "metrics_figures",
  "vertex_values",
  "write_report",
]

# Columns of regions.csv, in order.
REGION_COLUMNS = (
  "group",
  "region",
  "images",
  "cms_mass",
  "cms_share",
  "area_share",
  "cms_density",
  "cms_mean_value",
  "abs_cms_share",
  "image_share_mean",
  "image_share_low",
  "image_share_high",
)
_TEST_COLUMNS = (
  "group_a",
  "group_b",
  "region",
  "images_a",
  "images_b",
  "mean_share_a",
  "mean_share_b",
  "difference",
  "p_value",
  "p_holm_regions",
  "p_holm_all",
  "significant",
)
_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; padding: 0 1.5em; max-width: 1200px; color: #222;
  overflow-wrap: anywhere; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
.table { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: right; vertical-align: top; }
th { text-align: left; vertical-align: bottom; font-weight: 600; max-width: 11em; overflow-wrap: normal; }
th:first-child, td:first-child, td.text { text-align: left; } td.text { max-width: 32em; }
td.text:first-child { min-width: 6em; }
th .unit { display: block; font-weight: normal; font-size: .85em; color: #555; }
tr.control td { background: #f3f3f3; font-style: italic; } tr.significant td { background: #fff3c4; }
figure { display: inline-block; margin: .3em .6em .6em 0; vertical-align: top; }
figcaption { font-size: .85em; max-width: 260px; }
img, svg { max-width: 100%; height: auto; }
.note { background: #eef4fb; border-left: 4px solid #4a7ab5; padding: .4em .8em; }
.missing { background: #fdf0e6; border-left: 4px solid #c06a2b; padding: .4em .8em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .8em; max-height: 40em; }
.scale { font-size: .8em; } .scale img { vertical-align: middle; }
"""


@dataclasses.dataclass(frozen=True)
class ReportOptions:
  """What the report computes; the same options and inputs give the same files.

  Attributes:
    min_count: texels seen by fewer images are no data (None: the run's `config.cms.min_count`, else 1).
    num_bootstrap: bootstrap resamples for the region intervals.
    num_permutations: label permutations for the region and cluster tests.
    seed: seeds the bootstrap, the permutations and the choice of example images.
    confidence: coverage of the bootstrap intervals.
    alpha: family-wise level for "significant".
    render_size: side in pixels of the canonical-face renders.
    max_examples: example CIS shown per group.
  """

  min_count: int | None = None
  num_bootstrap: int = 2000
  num_permutations: int = 999
  seed: int = 0
  confidence: float = 0.95
  alpha: float = 0.05
  render_size: int = 256
  max_examples: int = 4

  def __post_init__(self):
    for name in ("num_bootstrap", "num_permutations", "render_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"ReportOptions.{name} must be >= 1, got {getattr(self, name)}")
    if self.min_count is not None and self.min_count < 1:
      raise ValueError(f"ReportOptions.min_count must be >= 1, got {self.min_count}")
    if self.max_examples < 0 or self.seed < 0:
      raise ValueError(f"ReportOptions: max_examples and seed must be >= 0, got {self.max_examples}, {self.seed}")
    if not (0 < self.confidence < 1 and 0 < self.alpha < 1):
      raise ValueError(f"ReportOptions: confidence and alpha must be in (0, 1), got {self.confidence}, {self.alpha}")


# ------------------------------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class _Run:
  folder: pathlib.Path
  acc: cms.CMSAccumulator
  summary: dict[str, Any] | None
  model3d: morphable.MorphableModel
  morphable_spec: str
  ok: list[dict[str, Any]]  # records with status "ok", by index
  textures_saved: bool


def _run_config(summary: Mapping[str, Any] | None) -> dict[str, Any]:
  return ((summary or {}).get("reproducibility") or {}).get("config") or {}


def _load_run(cms_dir: str | pathlib.Path, morphable_model: str | None) -> _Run:
  folder = pathlib.Path(cms_dir)
  checkpoint = folder / "cms.npz"
  if not checkpoint.is_file():
    raise FileNotFoundError(f"{checkpoint}: no CMS checkpoint; --cms must be a run folder of scripts/cms.py")
  acc = cms.CMSAccumulator.load(checkpoint)
  summary_path = folder / "summary.json"
  summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
  spec = morphable_model or _run_config(summary).get("morphable_model") or "default"
  model3d = pipeline.load_morphable(spec)
  made_with = ((summary or {}).get("reproducibility") or {}).get("morphable_model")
  if made_with is not None and made_with != model3d.name:
    raise ValueError(f"{folder}: the CMS was made with the 3DMM {made_with!r}, but {spec!r} is {model3d.name!r}")
  ok = [r for r in acc.records() if r["status"] == "ok"]
  saved = bool(ok) and all(outputs.texture_path(folder, r["index"]).is_file() for r in ok)
  return _Run(folder, acc, summary, model3d, spec, ok, saved)


def load_metrics(path: str | pathlib.Path) -> dict[str, Any]:
  """A metrics table written by `scripts/faithfulness.py`: its folder, its `metrics.json`, or its `metrics.csv`.

  Returns:
    `{"rows": [...], "settings": {...}, ...}` as `faithfulness.run_protocol` returns it (from a CSV: rows only, the
    numbers as floats where they parse).

  Raises:
    FileNotFoundError: neither file is there.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "metrics.json" if (path / "metrics.json").is_file() else path / "metrics.csv"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no metrics table (write one with scripts/faithfulness.py)")
  if path.suffix == ".json":
    table = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
      raise ValueError(f"{path}: not a metrics table (no 'rows' list)")
    return table

  def number(text: str) -> Any:
    try:
      return float(text)
    except ValueError:
      return text

  with path.open(newline="", encoding="utf-8") as f:
    rows = [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]
  return {"rows": rows, "settings": {}}


comparisons = cms.comparisons  # the group pairs the run's difference maps and the report compare


# ------------------------------------------------------------------------------------------ pictures


def vertex_values(model3d: morphable.MorphableModel, texture: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, ...]:
  """A texture sampled at each vertex's UV (the texel holding it, as `outputs._write_saliency_mesh` does).

  Args:
    model3d: the morphable model (its `uv` [V, 2], u right, v up).
    texture: [T, T] values.
    valid: [T, T] bool, False = no data.

  Returns:
    `(values [V] float64, seen [V] bool)`.
  """
  size = texture.shape[0]
  uv = np.asarray(model3d.uv)
  col = np.clip(np.floor(uv[:, 0] * size), 0, size - 1).astype(int)
  row = np.clip(np.floor((1.0 - uv[:, 1]) * size), 0, size - 1).astype(int)
  return np.asarray(texture, np.float64)[row, col], np.asarray(valid, bool)[row, col]


def _write_ply(path: pathlib.Path, model3d, texture, valid, *, vmax: float, signed: bool) -> None:
  import trimesh

  values, seen = vertex_values(model3d, texture, valid)
  colours = viz.colorize(values[None], valid=seen[None], signed=signed, vmax=vmax)[0]
  mesh = trimesh.Trimesh(np.asarray(model3d.mean), np.asarray(model3d.triangles), vertex_colors=colours, process=False)
  fileio.write_atomic(path, mesh.export(file_type="ply"))


def _vmax(maps: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
  shown = [np.abs(m[v]).max() for m, v in maps if v.any()]
  return float(max(shown)) if shown and max(shown) > 0 else 1.0


def _colorbar(signed: bool, width: int = 200, height: int = 12) -> np.ndarray:
  ramp = np.linspace(-1.0 if signed else 0.0, 1.0, width)
  return np.repeat(viz.colorize(ramp[None], signed=signed, vmax=1.0), height, axis=0)


def _safe(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


class _Files:
  """Unique, filesystem-safe names for the report's images (group names may hold any character)."""

  def __init__(self, out: pathlib.Path):
    self.out = out
    self.used: set[str] = set()

  def name(self, stem: str, suffix: str) -> str:
    base, k = _safe(stem), 1
    name = base + suffix
    while name.casefold() in self.used:
      k += 1
      name = f"{base}_{k}{suffix}"
    self.used.add(name.casefold())
    return name

  def png(self, stem: str, rgb: np.ndarray) -> str:
    rel = "images/" + self.name(stem, ".png")
    fileio.save_png(self.out / rel, rgb)
    return rel


def _render(run: _Run, texture, valid, size: int, *, vmax: float, signed: bool) -> np.ndarray:
  texture = np.where(valid, texture, 0.0)
  return canonical.render_canonical(run.model3d, texture, valid.astype(np.float32), size, vmax=vmax, signed=signed)


# ------------------------------------------------------------------------------------------ html helpers


def _e(value: Any) -> str:
  return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
  if value is None:
    return "–"
  if isinstance(value, bool | np.bool_):
    return "yes" if value else "no"
  if isinstance(value, int | np.integer):
    return str(int(value))
  if isinstance(value, float | np.floating):
    return "–" if not math.isfinite(value) else f"{value:.{digits}g}"
  return str(value)


def _th(header: str | tuple[str, str]) -> str:
  """A header cell: a title, or (title, unit) with the unit on its own line."""
  if isinstance(header, tuple):
    title, unit = header
    return f'<th scope="col">{_e(title)}<span class="unit">{_e(unit)}</span></th>'
  return f'<th scope="col">{_e(header)}</th>'


def _table(
  header: Sequence[str | tuple[str, str]], rows: Sequence[Sequence[Any]], classes: Sequence[str] | None = None
) -> str:
  """A table in a box of the page's width (it scrolls inside the box, never the page, if it cannot fit)."""
  head = "".join(_th(h) for h in header)
  body = []
  for i, row in enumerate(rows):
    cls = f' class="{_e(classes[i])}"' if classes and classes[i] else ""
    cells = "".join(f'<td class="text">{_e(v)}</td>' if isinstance(v, str) else f"<td>{_e(_fmt(v))}</td>" for v in row)
    body.append(f"<tr{cls}>{cells}</tr>")
  return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _link(rel: str) -> str:
  """A link to a file beside the page (a relative path the report wrote)."""
  return f'<a href="{_e(rel)}">{_e(rel)}</a>'


def _figure(src: str, caption: str, alt: str, size: tuple[int, int]) -> str:
  return (
    f'<figure><img src="{_e(src)}" alt="{_e(alt)}" width="{size[1]}" height="{size[0]}">'
    f"<figcaption>{_e(caption)}</figcaption></figure>"
  )


def _scale(bar: str, low: str, high: str, what: str) -> str:
  return (
    f'<p class="scale">{_e(what)}: {_e(low)} <img src="{_e(bar)}" alt="colour scale" width="200" height="12"> '
    f"{_e(high)}; hatched grey = no data</p>"
  )


def _nice_ceiling(value: float) -> float:
  """The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of 10) at or above `value` > 0."""
  power = 10.0 ** math.floor(math.log10(value))
  for step in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
    if step * power >= value * (1 - 1e-9):
      return step * power
  return 10.0 * power


def _pct(share: float) -> str:
  """A share in [0, 1] as a percentage with two significant digits ("–" when not finite)."""
  if not np.isfinite(share):
    return "–"
  percent = 100.0 * float(share)
  return f"{percent:.0f}%" if abs(percent) >= 9.95 else f"{percent:.2g}%"


def _region_svg(names: Sequence[str], est, low, high, cms_share, area_share, title: str) -> str:
  """Horizontal bars (mean per-image share) with interval whiskers, the CMS share (black diamond) and the area
  share (grey tick), one row per region, as inline SVG.

  The axis runs from 0 to a round number at or above every value drawn, so every mark lies on it; its ticks are
  labelled in percent, and the number column (the bar's value) has its own header.
  """
  label_w, bar_w, row_h, top, value_w = 80, 440, 18, 40, 96
  finite = [float(v) for v in (*high, *est, *cms_share, *area_share) if np.isfinite(v)]
  top_value = _nice_ceiling(max(max(finite, default=0.0), 1e-6))
  x0, x1 = label_w, label_w + bar_w
  x = lambda v: x0 + bar_w * float(v) / top_value
  axis_y = top + row_h * len(names) + 4
  height = axis_y + 52
  width = x1 + value_w
  parts = [
    f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
    f'<text x="0" y="14" font-size="12">{_e(title)}</text>',
    f'<text class="column-header" x="0" y="{top - 6}" font-size="10" font-weight="bold">region</text>',
    f'<text class="column-header" x="{x0}" y="{top - 6}" font-size="10" font-weight="bold">'
    "share of the |saliency| mass</text>",
    f'<text class="value-header" x="{width - 2}" y="{top - 6}" font-size="10" font-weight="bold" '
    'text-anchor="end">mean per image</text>',
  ]
  for k in range(5):  # vertical grid lines and ticks at quarters of the axis
    tx = x0 + bar_w * k / 4
    parts.append(f'<line class="grid" x1="{tx:.1f}" x2="{tx:.1f}" y1="{top}" y2="{axis_y}" stroke="#eee"/>')
    parts.append(f'<line class="tick" x1="{tx:.1f}" x2="{tx:.1f}" y1="{axis_y}" y2="{axis_y + 4}" stroke="#444"/>')
    anchor = "start" if k == 0 else "end" if k == 4 else "middle"
    parts.append(
      f'<text class="tick-label" x="{tx:.1f}" y="{axis_y + 15}" font-size="10" text-anchor="{anchor}">'
      f"{_e(_pct(top_value * k / 4))}</text>"
    )
  parts.append(f'<line class="axis" x1="{x0}" x2="{x1}" y1="{axis_y}" y2="{axis_y}" stroke="#444"/>')
  for i, name in enumerate(names):
    y = top + i * row_h
    parts.append(f'<text x="0" y="{y + 12}" font-size="11">{_e(name)}</text>')
    if np.isfinite(est[i]):
      parts.append(
        f'<rect class="bar" x="{x0}" y="{y + 3}" width="{x(est[i]) - x0:.1f}" height="{row_h - 6}" fill="#7fa7d6"/>'
      )
    if np.isfinite(low[i]) and np.isfinite(high[i]):
      parts.append(
        f'<line class="interval" x1="{x(low[i]):.1f}" x2="{x(high[i]):.1f}" y1="{y + row_h / 2}" '
        f'y2="{y + row_h / 2}" stroke="#1f3f66" stroke-width="1.5"/>'
      )
    if np.isfinite(area_share[i]):
      parts.append(
        f'<line class="area" x1="{x(area_share[i]):.1f}" x2="{x(area_share[i]):.1f}" y1="{y + 1}" '
        f'y2="{y + row_h - 1}" stroke="#999" stroke-width="2"/>'
      )
    if np.isfinite(cms_share[i]):
      cx, cy = x(cms_share[i]), y + row_h / 2
      parts.append(
        f'<polygon class="cms" points="{cx:.1f},{cy - 5} {cx + 4:.1f},{cy} {cx:.1f},{cy + 5} {cx - 4:.1f},{cy}"/>'
      )
    parts.append(
      f'<text class="value" x="{width - 2}" y="{y + 12}" font-size="10" text-anchor="end">{_e(_pct(est[i]))}</text>'
    )
  # The key: what each mark is.
  key_y = axis_y + 36
  parts += [
    f'<rect x="{x0}" y="{key_y - 8}" width="14" height="8" fill="#7fa7d6"/>',
    f'<text x="{x0 + 18}" y="{key_y}" font-size="10">mean per image</text>',
    f'<line x1="{x0 + 110}" x2="{x0 + 130}" y1="{key_y - 4}" y2="{key_y - 4}" stroke="#1f3f66" stroke-width="1.5"/>',
    f'<text x="{x0 + 134}" y="{key_y}" font-size="10">interval</text>',
    f'<polygon points="{x0 + 190},{key_y - 9} {x0 + 194},{key_y - 4} {x0 + 190},{key_y + 1} {x0 + 186},{key_y - 4}"/>',
    f'<text x="{x0 + 198}" y="{key_y}" font-size="10">group CMS</text>',
    f'<line x1="{x0 + 270}" x2="{x0 + 270}" y1="{key_y - 10}" y2="{key_y + 2}" stroke="#999" stroke-width="2"/>',
    f'<text x="{x0 + 276}" y="{key_y}" font-size="10">share of the face area</text>',
    "</svg>",
  ]
  return "".join(parts)


def _histogram_svg(values: np.ndarray, bins: int = 10) -> str:
  """Counts of `values` in `bins` equal bins over [0, 1], as inline SVG bars labelled with their counts."""
  counts, _ = np.histogram(values, bins=bins, range=(0.0, 1.0))
  peak = max(int(counts.max()), 1)
  w, h, bw, top = 420, 120, 40, 14  # top: room for the tallest bar's count
  parts = [
    f'<svg width="{w}" height="{top + h + 30}" viewBox="0 0 {w} {top + h + 30}" role="img" aria-label="histogram">'
  ]
  for k, c in enumerate(counts):
    bar = h * int(c) / peak
    y = top + h - bar
    parts.append(f'<rect x="{10 + k * bw}" y="{y:.1f}" width="{bw - 4}" height="{bar:.1f}" fill="#7fa7d6"/>')
    parts.append(f'<text x="{10 + k * bw + 8}" y="{y - 2:.1f}" font-size="10">{int(c)}</text>')
  for k in range(0, bins + 1, 2):
    parts.append(f'<text x="{6 + k * bw}" y="{top + h + 14}" font-size="10">{k / bins:.1f}</text>')
  label = "share of the saliency off the mesh, per image"
  parts.append(f'<text x="10" y="{top + h + 28}" font-size="10">{label}</text></svg>')
  return "".join(parts)


# ------------------------------------------------------------------------------------------ sections


@dataclasses.dataclass
class _Report:
  """What the sections produce: HTML parts, CSV rows and the numbers for report.json."""

  run: _Run
  options: ReportOptions
  files: _Files
  min_count: int
  regions: np.ndarray  # [T, T] region index per texel, -1 outside the layout
  sections: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (id, title, html)
  region_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  test_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  numbers: dict[str, Any] = dataclasses.field(default_factory=dict)

  def shares(self) -> np.ndarray | None:
    """[N, R] per-image region shares of the accumulated images (records order); None if records lack them."""
    if not all(("region_mass" in r or "region_masses" in r) for r in self.run.ok):
      return None
    return stats.records_region_masses(self.run.ok)[1]

  def members(self, group: str) -> np.ndarray:
    return stats.records_in_group(self.run.ok, group)


def _cms_section(rep: _Report) -> str:
  run, size = rep.run, rep.options.render_size
  groups = run.acc.groups()
  if not groups:
    return '<p class="missing">No image was accumulated: there is no CMS to show.</p>'
  signed = {g: run.acc.mean(g, min_count=rep.min_count) for g in groups}
  absolute = {g: run.acc.mean(g, min_count=rep.min_count, kind="absolute") for g in groups}
  counts = {g: run.acc.sums(g).count for g in groups}
  vmax_s, vmax_a = _vmax(list(signed.values())), _vmax(list(absolute.values()))
  is_signed = any(np.any(m[v] < 0) for m, v in signed.values())
  bars = {k: rep.files.png(f"scale_{k}", _colorbar(k == "signed")) for k in ("signed", "sequential")}
  unseen = "no image saw" if rep.min_count == 1 else f"seen by fewer than {rep.min_count} images"
  out = [
    f"<p>Each group's CMS is the weighted mean of its images' normalised CIS ({_e(run.acc.settings.normalisation)}) "
    f"over the images that saw each texel; texels {unseen} are no data "
    "(hatched grey), never zero saliency. The CMS and the absolute CMS of all groups share one colour scale "
    "each (below), so groups compare by colour. Coverage counts the images that saw each texel; each group's "
    "coverage has its own scale, from 0 to the group's image count (under its heading), so a small group's "
    "coverage is as readable as a large one's. A per-vertex PLY of each CMS (the canonical face, coloured) is in "
    "meshes/.</p>",
    _scale(bars["signed" if is_signed else "sequential"], _fmt(-vmax_s if is_signed else 0.0), _fmt(vmax_s), "CMS"),
    _scale(bars["sequential"], "0", _fmt(vmax_a), "absolute CMS"),
  ]
  coverage_scales = {}
  rep.numbers["groups"] = {}
  for g in groups:
    (mean, valid), (mean_abs, valid_abs), count = signed[g], absolute[g], counts[g]
    n = run.acc.num_images(g)
    shown = int(valid.sum())
    vmax_c = coverage_scales[g] = max(n, 1)  # the group's own images: a texel every one of them saw is the top
    imgs = [
      (_render(run, mean, valid, size, vmax=vmax_s, signed=is_signed), f"cms_{g}", "CMS", "shared scale"),
      (
        _render(run, mean_abs, valid_abs, size, vmax=vmax_a, signed=False),
        f"cms_{g}_abs",
        "absolute CMS",
        "shared scale",
      ),
      (
        _render(run, count.astype(np.float64), count > 0, size, vmax=vmax_c, signed=False),
        f"cov_{g}",
        "coverage",
        f"0 to {vmax_c} images",
      ),
    ]
    figures = [
      _figure(rep.files.png(stem, rgb), f"{what}: {g} ({scale})", f"{what} of group {g}", rgb.shape[:2])
      for rgb, stem, what, scale in imgs
    ]
    ply = "meshes/" + rep.files.name(f"cms_{g}", ".ply")
    _write_ply(rep.files.out / ply, run.model3d, mean, valid, vmax=vmax_s, signed=is_signed)
    out.append(
      f"<h3>{_e(g)}</h3><p>{n} image(s); {shown} texels with data (of {int((count > 0).sum())} seen by any image; "
      f"at most {int(count.max())} images per texel). Mesh: {_link(ply)}</p>"
      + _scale(bars["sequential"], "0", str(vmax_c), f"coverage of {g} (images of its {n})")
      + "".join(figures)
    )
    rep.numbers["groups"][g] = {
      "images": n,
      "texels_with_data": shown,
      "max_coverage": int(count.max()),
      "coverage_scale": vmax_c,
      "ply": ply,
    }
  rep.numbers["colour_scales"] = {"cms": vmax_s, "absolute_cms": vmax_a, "coverage": coverage_scales}
  return "".join(out)


def _difference_section(rep: _Report, pairs: Sequence[tuple[str, str]]) -> str:
  run, size = rep.run, rep.options.render_size
  if not pairs:
    return (
      '<p class="missing">No group pairs to compare: the run has fewer than two predicted classes or true labels '
      "(give a labels CSV with --config.cms.labels_csv).</p>"
    )
  diffs = {p: run.acc.difference(*p, min_count=rep.min_count) for p in pairs}
  vmax = _vmax(list(diffs.values()))
  out = [
    "<p>Difference of the two groups' CMS, A − B, where both have data; red: more saliency in A, blue: more in B. "
    "Whether a difference is real is for the tests below to say.</p>",
    _scale(rep.files.png("scale_diff", _colorbar(True)), _fmt(-vmax), _fmt(vmax), "A − B"),
  ]
  for a, b in pairs:
    rgb = _render(run, *diffs[(a, b)], size, vmax=vmax, signed=True)
    out.append(
      _figure(rep.files.png(f"diff_{a}_vs_{b}", rgb), f"{a} − {b}", f"difference {a} minus {b}", rgb.shape[:2])
    )
  rep.numbers["difference_scale"] = vmax
  return "".join(out)


def _region_section(rep: _Report) -> str:
  run, opt = rep.run, rep.options
  if not run.ok:
    return '<p class="missing">No accumulated images: no region statistics.</p>'
  names = list(morphable.REGION_NAMES)
  shares = rep.shares()
  if shares is None:
    return '<p class="missing">The records hold no per-image region masses.</p>'
  out = [
    f"<p>Bars: the mean over a group's images of each region's share of the image's |saliency| mass, with a "
    f"{opt.confidence:.0%} bootstrap interval over images ({opt.num_bootstrap} resamples, seed {opt.seed}). "
    "Black diamond: the group CMS's own share (of its |mean| mass). Grey tick: the region's share of the face's "
    "UV layout (a region as salient as its size sits there). Shares are in percent of the mass; the column on the "
    "right gives each bar's value; every number is in regions.csv.</p>"
  ]
  for g in run.acc.groups():
    member = rep.members(g)
    x = shares[member]
    mean, valid = run.acc.mean(g, min_count=rep.min_count)
    mass = stats.region_mass(mean, valid.astype(np.float64), rep.regions, num_regions=len(names))
    mean_abs, valid_abs = run.acc.mean(g, min_count=rep.min_count, kind="absolute")
    mass_abs = stats.region_mass(mean_abs, valid_abs.astype(np.float64), rep.regions, num_regions=len(names))
    if x.shape[0] >= 2:
      est, low, high = stats.bootstrap_ci(x, num_resamples=opt.num_bootstrap, confidence=opt.confidence, seed=opt.seed)
      note = ""
    else:
      est = x[0] if x.shape[0] == 1 else np.full(len(names), np.nan)
      low, high = np.full(len(names), np.nan), np.full(len(names), np.nan)
      note = f'<p class="missing">{_e(g)}: {x.shape[0]} image(s), too few for an interval.</p>'
    for r, region in enumerate(names):
      rep.region_rows.append(
        {
          "group": g,
          "region": region,
          "images": int(x.shape[0]),
          "cms_mass": mass.mass[r],
          "cms_share": mass.share[r],
          "area_share": mass.area_share[r],
          "cms_density": mass.density[r],
          "cms_mean_value": mass.mean_value[r],
          "abs_cms_share": mass_abs.share[r],
          "image_share_mean": est[r],
          "image_share_low": low[r],
          "image_share_high": high[r],
        }
      )
    title = f"{g} ({x.shape[0]} images)"
    out.append(f"<h3>{_e(g)}</h3>{note}" + _region_svg(names, est, low, high, mass.share, mass.area_share, title))
  return "".join(out)


def _pair_members(rep: _Report, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
  """Images in exactly one of the groups (positions in `run.ok`), and whether each is in A."""
  in_a, in_b = rep.members(a), rep.members(b)
  keep = in_a ^ in_b
  return np.flatnonzero(keep), in_a[keep]


def _tests_section(rep: _Report, pairs: Sequence[tuple[str, str]]) -> str:
  opt = rep.options
  if not pairs:
    return '<p class="missing">No group pairs: no tests.</p>'
  names = list(morphable.REGION_NAMES)
  shares = rep.shares()
  if shares is None:
    return '<p class="missing">The records hold no per-image region masses.</p>'
  results, notes = {}, []
  for a, b in pairs:
    idx, in_a = _pair_members(rep, a, b)
    if in_a.all() or not in_a.any():
      notes.append(f"{a} vs {b}: a group has no images of its own; not tested.")
      continue
    results[(a, b)] = (
      stats.region_permutation_test(
        shares[idx], in_a, num_permutations=opt.num_permutations, alpha=opt.alpha, seed=opt.seed
      ),
      int(in_a.sum()),
      int((~in_a).sum()),
      shares[idx],
      in_a,
    )
  p_all = stats.holm(np.concatenate([r[0].p_value for r in results.values()])) if results else np.zeros(0)
  out = [
    f"<p>Per region, the difference of the groups' mean image shares (A − B), with a two-sided permutation p-value "
    f"({opt.num_permutations} label permutations, seed {opt.seed}), Holm-adjusted over the regions of the pair and "
    f"over all pairs and regions together. Highlighted: adjusted (over all) p ≤ {opt.alpha}. Also in tests.csv.</p>"
  ]
  out += [f'<p class="missing">{_e(n)}</p>' for n in notes]
  for k, ((a, b), (test, n_a, n_b, x, in_a)) in enumerate(results.items()):
    rows, classes = [], []
    with np.errstate(invalid="ignore"):
      mean_a, mean_b = np.nanmean(x[in_a], axis=0), np.nanmean(x[~in_a], axis=0)
    for r, region in enumerate(names):
      p_over_all = p_all[k * len(names) + r]
      significant = bool(np.isfinite(p_over_all) and p_over_all <= opt.alpha)
      row = {
        "group_a": a,
        "group_b": b,
        "region": region,
        "images_a": n_a,
        "images_b": n_b,
        "mean_share_a": mean_a[r],
        "mean_share_b": mean_b[r],
        "difference": test.difference[r],
        "p_value": test.p_value[r],
        "p_holm_regions": test.p_holm[r],
        "p_holm_all": p_over_all,
        "significant": significant,
      }
      rep.test_rows.append(row)
      rows.append([region] + [row[c] for c in _TEST_COLUMNS[5:]])
      classes.append("significant" if significant else "")
    header = [
      "region",
      f"mean share {a}",
      f"mean share {b}",
      "A − B",
      "p",
      "p Holm (regions)",
      "p Holm (all)",
      "significant",
    ]
    out.append(f"<h3>{_e(a)} ({n_a}) vs {_e(b)} ({n_b})</h3>" + _table(header, rows, classes))
  return "".join(out)


def _normalised_textures(run: _Run, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The saved CIS of `run.ok[positions]`, each divided by its record's normaliser (as the CMS adds them)."""
  records = [run.ok[i] for i in positions]
  textures, weights = outputs.load_textures(run.folder, [r["index"] for r in records])
  norms = np.array([r.get("normaliser", 1.0) for r in records], np.float64)[:, None, None]
  values = np.where(weights > 0, textures, 0.0).astype(np.float64)
  scaled = np.divide(values, norms, out=np.zeros_like(values), where=norms > 0)
  return scaled, weights.astype(np.float64)


_NO_TEXTURES = (
  "This run did not save per-image CIS textures (run scripts/cms.py with --config.cms.save_textures=True), so {}."
)


def _cluster_section(rep: _Report, pairs: Sequence[tuple[str, str]]) -> str:
  run, opt, size = rep.run, rep.options, rep.options.render_size
  if not run.textures_saved:
    return f'<p class="missing">{_e(_NO_TEXTURES.format("the texel-level cluster test was not run"))}</p>'
  if not pairs:
    return '<p class="missing">No group pairs: no cluster test.</p>'
  out = [
    "<p>Texel-level cluster permutation test (Maris &amp; Oostenveld 2007) on the per-image normalised CIS: a "
    "weighted Welch t map of A vs B, texels beyond the two-sided 5% t threshold joined into 4-connected clusters "
    f"of one sign, each cluster's mass (sum |t|) against the largest cluster mass of {opt.num_permutations} label "
    f"permutations (seed {opt.seed}): family-wise error controlled over all texels. Left: t (red: A &gt; B); right: "
    f"the clusters with p ≤ {opt.alpha} (elsewhere white = nothing significant; hatched grey = t undefined, "
    "e.g. fewer than two images per group saw the texel).</p>"
  ]
  rep.numbers["clusters"] = {}
  for a, b in pairs:
    idx, in_a = _pair_members(rep, a, b)
    if in_a.sum() < 2 or (~in_a).sum() < 2:
      out.append(f'<p class="missing">{_e(a)} vs {_e(b)}: each group needs at least 2 images; not tested.</p>')
      continue
    textures, weights = _normalised_textures(run, idx)
    result = stats.cluster_permutation_test(
      textures, weights, in_a, num_permutations=opt.num_permutations, alpha=opt.alpha, seed=opt.seed
    )
    defined = np.isfinite(result.t)
    vmax = _vmax([(result.t, defined)])
    sig = np.where(result.significant, result.t, 0.0)
    figs = [
      _render(run, result.t, defined, size, vmax=vmax, signed=True),
      _render(run, sig, defined, size, vmax=vmax, signed=True),
    ]
    stems = [f"t_{a}_vs_{b}", f"clusters_{a}_vs_{b}"]
    captions = [f"t, {a} vs {b} (|t| ≤ {_fmt(vmax)})", f"significant clusters, {a} vs {b}"]
    out.append(f"<h3>{_e(a)} ({int(in_a.sum())}) vs {_e(b)} ({int((~in_a).sum())})</h3>")
    out += [_figure(rep.files.png(s, rgb), c, c, rgb.shape[:2]) for rgb, s, c in zip(figs, stems, captions)]
    ranked = sorted(result.clusters, key=lambda c: (c["p_value"], -c["mass"]))
    rows = [["A > B" if c["sign"] > 0 else "A < B", c["size"], c["mass"], c["p_value"]] for c in ranked[:10]]
    more = f"<p>… and {len(ranked) - 10} more clusters.</p>" if len(ranked) > 10 else ""
    out.append(
      f"<p>threshold |t| &gt; {_e(_fmt(result.threshold))}; {len(ranked)} cluster(s), "
      f"{int(result.significant.sum())} texels in significant ones.</p>"
      + (_table(["direction", "texels", "mass (sum |t|)", "p"], rows) if rows else "")
      + more
    )
    rep.numbers["clusters"][f"{a} vs {b}"] = {"threshold": result.threshold, "clusters": ranked}
  return "".join(out)


def _examples_section(rep: _Report) -> str:
  run, opt = rep.run, rep.options
  if not run.textures_saved:
    return f'<p class="missing">{_e(_NO_TEXTURES.format("no example CIS can be shown"))}</p>'
  rng = np.random.default_rng(opt.seed)
  out = [
    f"<p>Up to {opt.max_examples} images per group, drawn with seed {opt.seed}: each image's own CIS on the "
    "canonical face (its own colour scale, hatched grey where the pose hid the face).</p>"
  ]
  for g in run.acc.groups():
    members = np.flatnonzero(rep.members(g))
    chosen = np.sort(rng.choice(members, size=min(opt.max_examples, members.size), replace=False))
    figures = []
    for pos in chosen:
      rec = run.ok[pos]
      (texture,), (weight,) = outputs.load_textures(run.folder, [rec["index"]])
      valid = weight > 0
      vmax = _vmax([(texture, valid)])
      signed = bool(np.any(texture[valid] < 0))
      rgb = canonical.render_canonical(run.model3d, texture, weight, opt.render_size, vmax=vmax, signed=signed)
      name = pathlib.PurePath(str(rec["name"])).name
      caption = (
        f"{name}: {rec.get('prediction') or '–'} ({rec.get('score_kind', 'score')} {_fmt(rec.get('score'))}), "
        f"{_fmt(rec.get('outside_mesh_share'), 2)} off the mesh"
      )
      src = rep.files.png(f"cis_{g}_{rec['index']}", rgb)
      figures.append(_figure(src, caption, f"CIS of {name}", rgb.shape[:2]))
    out.append(f"<h3>{_e(g)}</h3>" + "".join(figures))
  return "".join(out)


# Readable headers of the metric table's columns (`faithfulness.run_protocol`'s rows): identifier -> (title, unit
# and direction). The units follow `evidence.metrics`: Average Drop is a percentage of each image's unoccluded
# score; Increase in Confidence and Win are percentages of the images; an AUC is the mean score over the
# deletion or insertion curve (score units); "mean_mass" is the sum of a scaled map, the pixels it hid.
METRIC_HEADERS: dict[str, tuple[str, str]] = {
  "method": ("Method", "italic: control"),
  "average_drop_pct": ("Average Drop", "% of the score; higher = more faithful"),
  "increase_in_confidence_pct": ("Increase in Confidence", "% of images; lower = more faithful"),
  "win_pct": ("Win", "% of images with the largest drop; higher = better"),
  "deletion_auc_constant": ("Deletion AUC, constant substitute", "score units; lower = more faithful"),
  "insertion_auc_constant": ("Insertion AUC, constant substitute", "score units; higher = more faithful"),
  "deletion_auc_blur": ("Deletion AUC, blurred substitute", "score units; lower = more faithful"),
  "insertion_auc_blur": ("Insertion AUC, blurred substitute", "score units; higher = more faithful"),
  "mean_mass": ("Area hidden", "pixels per image (mean)"),
  "randomisation_spearman": ("Rank correlation with a randomised model", "Spearman ρ; near 1 = ignores the weights"),
  "beats_controls": ("Beats every control", "on Average Drop, p ≤ 0.05 each"),
  "num_images": ("Images", "scored"),
  "num_excluded": ("Excluded", "images with a score ≤ 0"),
}
# The tests against controls, `<test>_p_vs_<control>` columns: test -> what it compares.
_P_TESTS = {"drop": "Average Drop", "deletion_blur": "Deletion AUC (blurred)"}
# Methods and controls of `faithfulness` by their usual names.
_METHOD_NAMES = {
  "cms": "CMS",
  "occlusion": "occlusion",
  "vanilla_gradient": "vanilla gradient",
  "integrated_gradients": "Integrated Gradients",
  "grad_cam": "Grad-CAM",
  "grad_cam_plus_plus": "Grad-CAM++",
  "score_cam": "Score-CAM",
  "rise": "RISE",
  "face_mask": "face mask",
  "gaussian": "centred Gaussian",
  "cms_random": "CMS of a randomised model",
}
# Settings of a metrics table shown in the report, with their readable names.
_METRIC_SETTINGS = {
  "cms": "CMS run",
  "cms_group": "CMS group mapped back",
  "cms_images": "images in that group",
  "cms_random": "CMS of the randomised model",
  "model": "face model",
  "score": "score",
  "protocol_baseline": "what a hidden pixel becomes (model input units)",
  "deletion_steps": "deletion and insertion steps",
  "seed": "seed",
}


def _human(identifier: str) -> str:
  """A column identifier as words ("foo_bar_pct" -> "Foo bar %"), for columns the report does not know."""
  words = [("%" if w == "pct" else w) for w in str(identifier).split("_") if w]
  text = " ".join(words)
  return text[:1].upper() + text[1:] if text else str(identifier)


def _method_name(method: Any) -> str:
  return _METHOD_NAMES.get(str(method), _human(str(method)).lower())


def metric_header(column: str) -> tuple[str, str]:
  """The (title, unit) the report shows for a metric table's column.

  Args:
    column: an identifier of `faithfulness.run_protocol`'s rows ("deletion_auc_blur", "drop_p_vs_gaussian").

  Returns:
    (title, unit and direction); columns the report does not know get their identifier in words and no unit.

  >>> metric_header("deletion_auc_blur")
  ('Deletion AUC, blurred substitute', 'score units; lower = more faithful')
  >>> metric_header("drop_p_vs_face_mask")
  ('Average Drop vs face mask', 'one-sided p; small = beats it')
  """
  if column in METRIC_HEADERS:
    return METRIC_HEADERS[column]
  test, sep, control = column.partition("_p_vs_")
  if sep:
    return f"{_P_TESTS.get(test, _human(test))} vs {_method_name(control)}", "one-sided p; small = beats it"
  return _human(column), ""


# Headers of the tested tables' figures (`metrics.comparison_table`): the headline's and the paper's.
_TESTED_HEADERS: dict[str, tuple[str, str]] = {
  "average_drop_pct": METRIC_HEADERS["average_drop_pct"],
  "increase_in_confidence_pct": METRIC_HEADERS["increase_in_confidence_pct"],
  "win_pct": ("Win", "% of images; higher = better"),
  "deletion_auc": ("Deletion AUC", "score units; lower = more faithful"),
  "insertion_auc": ("Insertion AUC", "score units; higher = more faithful"),
}


def _with_interval(value: Any, interval: Sequence[Any]) -> str:
  lo, hi = (_as_float(v) for v in interval)
  if not (math.isfinite(lo) and math.isfinite(hi)):
    return _fmt(value)
  return f"{_fmt(value)} [{_fmt(lo)}, {_fmt(hi)}]"


def claim_sentence(tested: Mapping[str, Any]) -> str:
  """One plain sentence of what a tested table (`metrics.comparison_table`) supports about its reference.

  It claims that the reference beats the others on a figure only where the Holm-corrected tests found it better
  than every other map there, names any map found better than the reference, and otherwise says that the tests
  do not show a difference.

  >>> table = {"reference": "cms", "num_images": 4, "figures": ["win_pct"],
  ...          "claims": {"win_pct": {"supported": False}}, "comparisons": []}
  >>> claim_sentence(table)[:60]
  'On these 4 faces the tests do not show the CMS better than e'
  """
  reference = _method_name(tested.get("reference", "cms"))
  figures = list(tested.get("figures") or tested.get("claims") or [])
  title = lambda f: _TESTED_HEADERS.get(f, (_human(f), ""))[0]
  won = [f for f in figures if (tested.get("claims") or {}).get(f, {}).get("supported")]
  lost = sorted(
    {(c["rival"], c["figure"]) for c in tested.get("comparisons") or [] if c.get("finding") == f"{c['rival']} better"},
    key=lambda rc: (figures.index(rc[1]) if rc[1] in figures else 0, rc[0]),
  )
  n = tested.get("num_images")
  head = f"On these {n} faces" if n is not None else "Here"
  if won:
    text = f"{head} the tests support that the {reference} beats every other map on {', '.join(map(title, won))}"
    rest = [f for f in figures if f not in won]
    text += f", and do not show it on {', '.join(map(title, rest))}" if rest else ""
  else:
    text = (
      f"{head} the tests do not show the {reference} better than every other map on any figure: the table does "
      "not support a claim that it outperforms them"
    )
  if lost:
    text += (
      "; found better than the " + reference + ": " + ", ".join(f"{_method_name(r)} ({title(f)})" for r, f in lost)
    )
  return text + "."


def _tested_section(tested: Mapping[str, Any], numbers_key: str, rep: _Report) -> str:
  """A tested table: each figure with its interval, the reference's corrected tests, and the sentence they allow."""
  figures = list(tested.get("figures") or [])
  rows = tested.get("rows") or []
  names = [_method_name(r.get("method")) for r in rows]
  body = [
    [name] + [_with_interval(r.get(f), r.get(f"{f}_ci") or ()) for f in figures] + [r.get("mean_mass")]
    for name, r in zip(names, rows)
  ]
  header = [
    METRIC_HEADERS["method"],
    *(_TESTED_HEADERS.get(f, (_human(f), "")) for f in figures),
    ("Area hidden", "pixels per image (mean)"),
  ]
  header = [header[0], *((t, f"{u}; mean [interval]") for t, u in header[1:-1]), header[-1]]
  classes = ["control" if r.get("kind") == "control" else "" for r in rows]
  reference = _method_name(tested.get("reference", "cms"))
  ref_id = str(tested.get("reference", "cms"))
  found = {(c["rival"], c["figure"]): c for c in tested.get("comparisons") or []}
  others = list(dict.fromkeys(c["rival"] for c in tested.get("comparisons") or []))

  def cell(c: Mapping[str, Any] | None) -> str:
    if c is None:
      return "–"
    text = f"{_fmt(c.get('difference'))}; p {_fmt(c.get('p_holm'), 2)}"
    if c["finding"] == f"{ref_id} better":
      return f"{text}: {reference} better"
    if c["finding"] != "no difference shown":
      return f"{text}: {_method_name(c['rival'])} better"
    return text

  tests = [[_method_name(o)] + [cell(found.get((o, f))) for f in figures] for o in others]
  none = "no difference shown"
  shown = lambda o: any(found.get((o, f), {}).get("finding", none) != none for f in figures)
  classes_tests = ["significant" if shown(o) else "" for o in others]
  sentence = claim_sentence(tested)
  rep.numbers[numbers_key] = {"claims": tested.get("claims"), "sentence": sentence}
  facts = " ".join(
    x
    for x in (
      f"Intervals: {tested['intervals']}." if tested.get("intervals") else "",
      f"Win: {tested['win']}." if tested.get("win") else "",
      f"Below, each cell: the {reference}'s mean minus the other map's, and the corrected p-value of "
      f"{tested['test']}; a finding is named where that p-value is at most the level (highlighted rows)."
      if tested.get("test")
      else "",
    )
    if x
  )
  return (
    f'<p class="note">{_e(sentence)}</p>'
    + _table(header, body, classes)
    + f"<p>{_e(facts)}</p>"
    + _table(
      [
        (f"{reference} against", ""),
        *((_TESTED_HEADERS.get(f, (_human(f), ""))[0], "difference; Holm p") for f in figures),
      ],
      tests,
      classes_tests,
    )
  )


def _missing_protocol(metrics: Mapping[str, Any] | None, key: str, what: str, protocol: str) -> str | None:
  """The "missing" paragraph when `metrics` has no `key` table (`what`, made by `--protocol=<protocol>`), else None."""
  if metrics is None:
    return '<p class="missing">No metrics table was given.</p>'
  if metrics.get(key):
    return None
  return (
    f'<p class="missing">The metrics table has no {what} (run scripts/faithfulness.py with '
    f"--protocol={protocol} or all).</p>"
  )


def _headline_section(rep: _Report, metrics: Mapping[str, Any] | None) -> str:
  if (missing := _missing_protocol(metrics, "headline", "headline protocol", "blur")) is not None:
    return missing
  headline = metrics["headline"]
  intro = (
    f"No method's home ground: every map (methods and, in italics, controls that know nothing about the model) "
    f"hides {_fmt(100 * _as_float(headline.get('mass')))}% of the face crop, and the hidden pixels become "
    f"{headline.get('substitute')}: none of the methods uses that as its own baseline (the occlusion sweep "
    "behind the CMS, Integrated Gradients, Score-CAM and RISE all fill with black, and the paper's protocol and "
    "the extended one below substitute black or 0). Deletion and insertion curves run on the same blurred photo. "
    f"Score: {headline.get('score')}. Direction: {headline.get('direction')}."
  )
  return f"<p>{_e(intro)}</p>" + _tested_section(headline, "headline", rep)


def _paper_section(rep: _Report, metrics: Mapping[str, Any] | None) -> str:
  if (missing := _missing_protocol(metrics, "paper", "paper's protocol", "paper")) is not None:
    return missing
  paper = metrics["paper"]
  published = bool(paper.get("paper_as_published"))
  intro = (
    "As the paper's released code computes it: every map clipped at 0 and min-max scaled to [0, 1], the CMS "
    "carried onto each face, Grad-CAM, Grad-CAM++ and Score-CAM rescaled to the CMS's sum on that face (so every "
    "map hides the CMS's own mass, and a rescaled map can exceed 1), the crop's pixels times 1 − map written as "
    "an 8-bit image and read back through the model's preprocessing (hidden pixels become black, the CMS's own "
    f"occlusion baseline). Score: {paper.get('score')}. "
    + (
      "This table keeps the published defect: where a map exceeds 1 the negative pixels wrap around in the 8-bit cast."
      if published
      else "This table clips before the 8-bit cast (the published code wraps negative pixels around instead)."
    )
  )
  out = f"<p>{_e(intro)}</p>" + _tested_section(paper, "paper", rep)
  other = metrics.get("paper_other_variant")
  if other:
    mine = {r["method"]: r for r in paper["rows"]}
    rows = []
    for r in other.get("rows") or []:
      m = mine.get(r["method"])
      if m is None:
        continue
      for f in metrics_figures(paper):
        a, b = _as_float(m.get(f)), _as_float(r.get(f))
        corrected, as_published = (b, a) if published else (a, b)
        name, title = _method_name(r["method"]), _TESTED_HEADERS[f][0]
        rows.append([name, title, corrected, as_published, as_published - corrected])
    rep.numbers["paper_defect"] = rows
    out += "<h4>What the published wrap-around changes</h4>" + _table(
      [("Method", ""), ("Figure", ""), ("Corrected", "clipped"), ("As published", "wrapped"), ("Change", "")], rows
    )
    out += f"<p>{_e('As published: ' + claim_sentence(other if not published else paper))}</p>"
  return out


def metrics_figures(tested: Mapping[str, Any]) -> list[str]:
  """The figures of a tested table, in order (`metrics.comparison_table`'s "figures")."""
  return [f for f in tested.get("figures") or [] if f in _TESTED_HEADERS]


def _metrics_section(rep: _Report, metrics: Mapping[str, Any] | None) -> str:
  if metrics is None:
    return (
      '<p class="missing">No metrics table was given (make one with scripts/faithfulness.py, then pass --metrics).</p>'
    )
  rows = metrics.get("rows") or []
  if not rows:
    return '<p class="missing">The metrics table has no extended table (--protocol=mass or all).</p>'
  alpha = rep.options.alpha
  columns = list(dict.fromkeys(k for row in rows for k in row))
  # Tests against controls that were run (a CSV keeps empty columns for controls that were not given).
  p_columns = [c for c in columns if "_p_vs_" in c and any(math.isfinite(_as_float(r.get(c))) for r in rows)]
  is_control = [row.get("kind") == "control" for row in rows]
  verdicts, shown = [], []  # report.json's verdicts (identifiers) and the page's (words)
  for row, control in zip(rows, is_control):
    if control:
      verdicts.append("control")
      shown.append("control")
      continue
    lost = [c for c in p_columns if not (_as_float(row.get(c)) <= alpha)]
    if not p_columns:
      verdicts.append("no tests against controls in the table")
      shown.append(verdicts[-1])
    elif lost:
      verdicts.append("does not beat: " + ", ".join(c.replace("_p_vs_", " vs ") for c in lost))
      shown.append(f"beats {len(p_columns) - len(lost)} of {len(p_columns)} tests")
    else:
      verdicts.append("beats every control")
      shown.append("beats every control")
  names = [_method_name(row.get("method")) for row in rows]

  # The scores: one column per number the protocol measured.
  scores = [c for c in columns if c not in ("method", "kind", "beats_controls") and c not in p_columns]
  scores = [c for c in scores if "_p_vs_" not in c]  # tests against controls that were not run
  out = [
    "<h3>Scores</h3>",
    _table(
      [METRIC_HEADERS["method"], *(metric_header(c) for c in scores)],
      [[name] + [row.get(c) for c in scores] for name, row in zip(names, rows)],
      ["control" if c else "" for c in is_control],
    ),
  ]
  # The tests against the controls, for the methods.
  if p_columns:
    tested = [(name, row, v) for name, row, v, c in zip(names, rows, shown, is_control) if not c]
    extra = ["beats_controls"] if "beats_controls" in columns else []
    out += [
      "<h3>Tests against the controls</h3>",
      _table(
        [("Method", ""), *(metric_header(c) for c in [*p_columns, *extra]), ("Verdict", f"tests with p ≤ {alpha}")],
        [[name] + [row.get(c) for c in [*p_columns, *extra]] + [v] for name, row, v in tested],
      ),
    ]

  settings = metrics.get("settings") or {}
  facts = []
  if settings.get("direction"):
    facts.append(f"Direction: {settings['direction']}.")
  mass = _as_float(settings.get("mass"))
  if math.isfinite(mass):
    rule = settings.get("mass_rule")
    facts.append(
      f"Mass: every map was scaled to hide {mass:.0%} of the face crop's pixels (mass {_fmt(mass)}, a share of the "
      f"crop{'; ' + str(rule) if rule else ''}). “Area hidden” is what that hid, in pixels, per image on average: "
      f"{_fmt(mass)} × the crop's pixel count for a map that reaches the target, less for a map with fewer positive "
      "pixels than that (it hides only its support)."
    )
  elif "mean_mass" in columns:
    facts.append("“Area hidden”: the sum of each scaled map, in pixels, per image on average.")
  facts.append(
    "Deletion and insertion AUCs are the score averaged over the curve (pixels removed or restored in "
    "the map's order), in the unit of the score."
  )
  facts.append(
    f"Tests: one-sided p-values that a method beats a control on the same images (paired sign-flip permutations); "
    f"a method beats a control when p ≤ {alpha}. Italic rows are controls (maps that know nothing about the model)."
  )
  if "images" in metrics:
    facts.append(f"{len(metrics['images'])} test faces, {len(metrics.get('skipped') or [])} skipped.")
  rows_settings = [
    [label, _fmt(settings[key])] for key, label in _METRIC_SETTINGS.items() if settings.get(key) is not None
  ]
  rep.numbers["metrics_verdicts"] = {str(r.get("method")): v for r, v in zip(rows, verdicts)}
  head = "".join(f"<p>{_e(f)}</p>" for f in facts)
  tail = ["<h3>Settings of the metrics</h3>", _table(["setting", "value"], rows_settings)] if rows_settings else []
  return head + "".join(out + tail)


def _as_float(value: Any) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return float("nan")


_OFF_MESH_HEADERS = {
  "images": "images",
  "mean": ("mean", "share"),
  "min": ("smallest", "share"),
  "p10": ("10th percentile", "share"),
  "median": ("median", "share"),
  "p90": ("90th percentile", "share"),
  "max": ("largest", "share"),
}


def _off_mesh_section(rep: _Report) -> str:
  values = np.array([_as_float(r.get("outside_mesh_share")) for r in rep.run.ok], np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return '<p class="missing">The records hold no off-mesh shares.</p>'
  q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])
  summary = {
    "images": int(values.size),
    "mean": float(values.mean()),
    **dict(zip(("min", "p10", "median", "p90", "max"), q.tolist())),
  }
  rep.numbers["off_mesh_share"] = summary
  per_group = []
  for g in rep.run.acc.groups():
    v = np.array([_as_float(r.get("outside_mesh_share")) for r, m in zip(rep.run.ok, rep.members(g)) if m])
    v = v[np.isfinite(v)]
    per_group.append(
      [g, int(v.size), float(v.mean()) if v.size else float("nan"), float(np.median(v)) if v.size else float("nan")]
    )
  return (
    "<p>The share of each image's saliency that fell on the crop outside the fitted mesh (hair, background): "
    "it is not in the CIS, so a large share means the canonical maps miss part of what the model used.</p>"
    + _table([_OFF_MESH_HEADERS[k] for k in summary], [list(summary.values())])
    + _histogram_svg(values)
    + _table(["group", "images", ("mean", "share"), ("median", "share")], per_group)
  )


def _settings_section(rep: _Report) -> str:
  run, opt = rep.run, rep.options
  report_settings = {
    "cms checkpoint sha256": assets.sha256_of(run.folder / "cms.npz"),
    "texture size": run.acc.texture_size,
    "normalisation": run.acc.settings.normalisation,
    "3DMM": f"{run.model3d.name} ({run.morphable_spec})",
    "min_count": rep.min_count,
    "bootstrap resamples": opt.num_bootstrap,
    "permutations": opt.num_permutations,
    "seed": opt.seed,
    "confidence": opt.confidence,
    "alpha": opt.alpha,
    "per-image textures saved": run.textures_saved,
  }
  labels = {"min_count": "min count (texels seen by fewer images are no data)", "alpha": "alpha (family-wise level)"}
  rows = [[labels.get(k, k), _fmt(v)] for k, v in report_settings.items()]
  out = ["<h3>This report</h3>", _table(["setting", "value"], rows)]
  rep.numbers["report_settings"] = report_settings
  summary = run.summary
  if summary is None:
    return "".join(out) + '<p class="missing">The run folder has no summary.json: the run\'s settings are unknown.</p>'
  counts = [
    [k.replace("_", " "), summary.get(k)]
    for k in ("images_listed", "images_seen", "images_accumulated", "images_skipped", "texture_size")
  ]
  counts += [[f"group {g}", n] for g, n in (summary.get("groups") or {}).items()]
  out += ["<h3>The run</h3>", _table(["count", "value"], counts)]
  skipped = summary.get("skipped") or []
  if skipped:
    rows = [[str(s.get("index")), str(s.get("name")), str(s.get("reason"))] for s in skipped[:50]]
    out += [f"<h3>Skipped inputs ({len(skipped)})</h3>", _table(["index", "name", "reason"], rows)]
    if len(skipped) > 50:
      out.append(f"<p>… and {len(skipped) - 50} more (all in summary.json).</p>")
  timings = summary.get("stage_seconds_this_run") or {}
  if timings:
    out += [
      "<h3>Seconds per stage (last run)</h3>",
      _table(["stage", "seconds"], [[k, float(v)] for k, v in timings.items()]),
    ]
  repro = summary.get("reproducibility") or {}
  hashes = repro.get("asset_sha256") or {}
  if hashes:
    out += ["<h3>Asset hashes (sha256)</h3>", _table(["asset", "sha256"], [[k, str(v)] for k, v in hashes.items()])]
  versions = repro.get("versions") or {}
  facts = {"face model": repro.get("face_model"), "3DMM": repro.get("morphable_model"), **versions}
  out += ["<h3>Versions</h3>", _table(["", "value"], [[k, str(v)] for k, v in facts.items() if v is not None])]
  config = repro.get("config")
  if config is not None:
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    out += ["<h3>Configuration</h3>", f"<pre>{_e(text)}</pre>"]
  return "".join(out)


# ------------------------------------------------------------------------------------------ the report


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> bytes:
  buffer = stdio.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (repr(float(v)) if isinstance(v, float | np.floating) else v) for k, v in row.items()})
  return buffer.getvalue().encode("utf-8")


def write_report(
  cms_dir: str | pathlib.Path,
  out_dir: str | pathlib.Path,
  *,
  metrics: str | pathlib.Path | Mapping[str, Any] | None = None,
  morphable_model: str | None = None,
  options: ReportOptions | None = None,
) -> pathlib.Path:
  """Writes the HTML report of a CMS run and the files beside it (see the module docstring).

  Args:
    cms_dir: the run folder of `scripts/cms.py` / `runs.run_cms` (cms.npz, summary.json, textures/).
    out_dir: the report's folder (created; files of an earlier report there are overwritten).
    metrics: a metrics table of `scripts/faithfulness.py` (its folder, metrics.json or metrics.csv, or the dict).
    morphable_model: "default" or a Surrey Face Model folder (default: the run's `config.morphable_model`).
    options: what to compute (`ReportOptions`).

  Returns:
    The path of `index.html`.

  Raises:
    FileNotFoundError: no cms.npz (or metrics table) where given, or the 3DMM is missing.
    fileio.FormatError: a corrupt checkpoint.
    ValueError: the 3DMM is not the one the CMS was made with.
  """
  options = options or ReportOptions()
  run = _load_run(cms_dir, morphable_model)
  table = load_metrics(metrics) if isinstance(metrics, str | pathlib.Path) else metrics
  out = pathlib.Path(out_dir)
  (out / "images").mkdir(parents=True, exist_ok=True)
  (out / "meshes").mkdir(parents=True, exist_ok=True)
  min_count = options.min_count or int((_run_config(run.summary).get("cms") or {}).get("min_count") or 1)
  regions = canonical.region_labels(run.model3d, run.acc.texture_size)
  rep = _Report(run, options, _Files(out), min_count, regions)
  pairs = comparisons(run.acc.groups())
  sections = [
    ("cms", "CMS per group, with coverage", _cms_section(rep)),
    ("differences", "Difference maps", _difference_section(rep, pairs)),
    ("regions", "Regions", _region_section(rep)),
    ("tests", "Region permutation tests", _tests_section(rep, pairs)),
    ("clusters", "Texel cluster test", _cluster_section(rep, pairs)),
    ("headline", "Faithfulness: a blurred photo, no method's home ground", _headline_section(rep, table)),
    ("paper", "Faithfulness: the paper's protocol and table", _paper_section(rep, table)),
    ("metrics", "Faithfulness: the extended table, controls and randomisation", _metrics_section(rep, table)),
    ("examples", "Example CIS per group", _examples_section(rep)),
    ("off-mesh", "Saliency off the mesh", _off_mesh_section(rep)),
    ("settings", "Settings and hashes", _settings_section(rep)),
  ]
  fileio.write_atomic(out / "regions.csv", _csv(rep.region_rows, REGION_COLUMNS))
  fileio.write_atomic(out / "tests.csv", _csv(rep.test_rows, _TEST_COLUMNS))
  rep.numbers.update(regions=rep.region_rows, tests=rep.test_rows, pairs=[list(p) for p in pairs])
  fileio.save_json(out / "report.json", {"format": "canonsal_jax.report", "version": 1, **rep.numbers})
  summary = run.summary or {}
  model = ((summary.get("reproducibility") or {}).get("face_model")) or "unknown model"
  lead = (
    f"CMS run {run.folder}: {run.acc.num_images()} image(s) accumulated, "
    f"{sum(r['status'] != 'ok' for r in run.acc.records())} skipped; groups {', '.join(run.acc.groups()) or 'none'}; "
    f"3DMM {run.model3d.name}; face model {model}."
  )
  beside = ", ".join(_link(name) for name in ("regions.csv", "tests.csv", "report.json"))
  lead = f"{_e(lead)} Files beside this page: {beside}, images/, meshes/."
  nav = " · ".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
  body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections)
  page = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Canonical saliency report</title>'
    f"<style>{_STYLE}</style></head><body><h1>Canonical saliency report</h1><p>{lead}</p>"
    f"<nav>{nav}</nav>{body}</body></html>\n"
  )
  fileio.write_atomic(out / "index.html", page.encode("utf-8"))
  return out / "index.html"
