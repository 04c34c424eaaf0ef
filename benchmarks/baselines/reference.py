"""Occlusion in PyTorch as others run it: the paper's procedure, and Captum's `Occlusion`.

Both return the same heatmap as `canonsal_jax.occlusion.make_sweep` with ``reduce="mean"`` on the same patches
and the same constant baseline: per pixel, the mean of ``score(original) - score(occluded)`` over the patches
covering it, 0 where none does.

* `paper_occlusion` follows the published description of John et al. (2021): for every patch a clone of the
  image with the patch painted over, served by a `Dataset` and batched 16 at a time by a `DataLoader`; each
  batch goes through the network; each drop is added into a heatmap and a count map in a Python loop; the
  heatmap is divided by the count at the end. Patches may sit anywhere (the paper centres them on projected
  mesh vertices); those near the border are clipped, as ours are.
* `captum_occlusion` is Captum's `Occlusion` with a window of ``(C, p, p)`` and strides ``(1, s, s)``. Its
  windows start at 0, s, 2s, ... and number ``ceil((H - p) / s) + 1`` per axis (Captum 0.9,
  `Occlusion.attribute`): where ``(H - p) % s != 0`` the last one starts past ``H - p`` and is cropped at the
  border. `captum_centres` gives that patch set as centres (ours clips such patches the same way); it equals
  `occlusion.grid_centres(..., stride=s)` only where ``(H - p) % s == 0``. Captum divides each pixel's summed
  drops by the number of windows covering it; pixels no window covers would be 0 / 0 and are set to 0 here, as
  ours are. Captum refuses a stride larger than the window.

Example:
  >>> heat = paper_occlusion(net, image_chw, centres_rc, patch_size=3, score_fn=torch_score("logit"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["PAPER_BATCH_SIZE", "captum_centres", "captum_occlusion", "paper_occlusion", "torch_score"]

# "batched 16 at a time" in the paper's description of its occlusion runs.
PAPER_BATCH_SIZE = 16

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # outputs [B, K] -> scores [B]


def torch_score(kind: str, *, target: int | None = None, values: Sequence[float] | None = None) -> ScoreFn:
  """The `canonsal_jax.occlusion.Score` kinds in PyTorch, for a fixed target.

  Args:
    kind: "logit", "log_softmax", "log_odds", "probability" (need `target`) or "expected_value" (needs
      `values`).
    target: the class index.
    values: per-output values of "expected_value".

  Returns:
    `outputs[B, K] -> [B]`.

  Raises:
    ValueError: an unsupported kind (cosine and contrasts are not needed by the baselines) or a missing target.
  """
  if kind == "expected_value":
    if values is None:
      raise ValueError("expected_value needs values")
    v = torch.tensor(values, dtype=torch.float32)
    return lambda out: torch.softmax(out, dim=-1) @ v.to(out.device)
  if kind not in ("logit", "log_softmax", "log_odds", "probability"):
    raise ValueError(f"no PyTorch score for {kind!r}")
  if target is None:
    raise ValueError(f"a {kind} score needs a target class")
  t = int(target)

  def score(out: torch.Tensor) -> torch.Tensor:
    logit = out[:, t]
    if kind == "logit":
      return logit
    if kind == "log_softmax":
      return logit - torch.logsumexp(out, dim=-1)
    if kind == "probability":
      return torch.exp(logit - torch.logsumexp(out, dim=-1))
    others = out.clone()
    others[:, t] = -torch.inf
    return logit - torch.logsumexp(others, dim=-1)

  return score


def captum_centres(height: int, width: int, *, patch_size: int, stride: int) -> np.ndarray:
  """The centres `[N, 2]` int32 (row, col) of Captum's occlusion windows, row-major.

  Windows start at ``k * stride`` for ``k = 0 .. ceil((size - patch_size) / stride)`` on each axis; a last
  window that overruns the border is cropped, as `make_sweep` and `paper_occlusion` crop a patch centred there.
  """
  half = patch_size // 2

  def axis(size: int) -> np.ndarray:
    return half + stride * np.arange(-(-(size - patch_size) // stride) + 1)

  rr, cc = np.meshgrid(axis(height), axis(width), indexing="ij")
  return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int32)


def _patch_bounds(centre: Sequence[int], half: int, height: int, width: int) -> tuple[int, int, int, int]:
  r, c = int(centre[0]), int(centre[1])
  return max(r - half, 0), min(r + half + 1, height), max(c - half, 0), min(c + half + 1, width)


class _OccludedImages(Dataset):
  """One cloned, occluded image per patch centre (the paper's data set of perturbed inputs)."""

  def __init__(self, image: torch.Tensor, centres_rc: np.ndarray, half: int, baseline: float):
    self.image, self.centres, self.half, self.baseline = image, centres_rc, half, baseline

  def __len__(self) -> int:
    return len(self.centres)

  def __getitem__(self, i: int) -> torch.Tensor:
    r0, r1, c0, c1 = _patch_bounds(self.centres[i], self.half, *self.image.shape[1:])
    occluded = self.image.clone()
    occluded[:, r0:r1, c0:c1] = self.baseline
    return occluded


def paper_occlusion(
  net: nn.Module,
  image: torch.Tensor,
  centres_rc: np.ndarray,
  *,
  patch_size: int,
  score_fn: ScoreFn,
  baseline: float = 0.0,
  batch_size: int = PAPER_BATCH_SIZE,
  device: str | torch.device = "cpu",
) -> torch.Tensor:
  """The paper's occlusion procedure: cloned images through a DataLoader, drops painted in a Python loop.

  Args:
    net: `[B, C, H, W] -> [B, K]`, in eval mode.
    image: `[C, H, W]` float32 model input.
    centres_rc: `[N, 2]` int (row, col) patch centres.
    patch_size: odd patch side in pixels.
    score_fn: `[B, K] -> [B]` (see `torch_score`).
    baseline: the constant painted into each patch, in model input space.
    batch_size: images per forward pass (the paper's 16).
    device: where `net` runs; the DataLoader builds batches on the host and each is copied there.

  Returns:
    `[H, W]` float32 heatmap: mean drop of the patches covering each pixel, 0 where none does.
  """
  centres_rc = np.asarray(centres_rc)
  half = patch_size // 2
  height, width = image.shape[1:]
  heatmap = torch.zeros(height, width)
  count = torch.zeros(height, width)
  loader = DataLoader(_OccludedImages(image, centres_rc, half, baseline), batch_size=batch_size, shuffle=False)
  with torch.inference_mode():
    original = score_fn(net(image[None].to(device)))[0]
    i = 0
    for batch in loader:
      drops = (original - score_fn(net(batch.to(device)))).tolist()
      for drop in drops:
        r0, r1, c0, c1 = _patch_bounds(centres_rc[i], half, height, width)
        heatmap[r0:r1, c0:c1] += drop
        count[r0:r1, c0:c1] += 1
        i += 1
  return torch.where(count > 0, heatmap / count.clamp(min=1), 0.0)


def captum_occlusion(
  net: nn.Module,
  image: torch.Tensor,
  *,
  patch_size: int,
  stride: int,
  score_fn: ScoreFn,
  baseline: float = 0.0,
  perturbations_per_eval: int = 16,
) -> torch.Tensor:
  """Captum's `Occlusion` on one image, reduced to an `[H, W]` heatmap.

  Args:
    net: `[B, C, H, W] -> [B, K]`, in eval mode.
    image: `[C, H, W]` float32 model input.
    patch_size: odd window side in pixels.
    stride: window stride in pixels (windows start at 0 and lie inside the image).
    score_fn: `[B, K] -> [B]`; Captum's forward function is `score_fn(net(x))`, so no Captum target.
    baseline: the constant occluder, in model input space.
    perturbations_per_eval: occluded images per forward pass.

  Returns:
    `[H, W]` float32: Captum's per-pixel attribution (all channels equal), NaN (uncovered) set to 0.
  """
  from captum.attr import Occlusion

  channels = image.shape[0]
  occlusion = Occlusion(lambda x: score_fn(net(x)))
  with torch.no_grad():
    attribution = occlusion.attribute(
      image[None],
      sliding_window_shapes=(channels, patch_size, patch_size),
      strides=(1, stride, stride),
      baselines=baseline,
      perturbations_per_eval=perturbations_per_eval,
    )
  return torch.nan_to_num(attribution[0, 0], nan=0.0)
