"""Coordinate conventions: keypoints -> sparse flow labels, the "unlabelled" rule, and bilinear
flow sampling (`linear_taps`, the one align_corners=False rule of PCK, matching and dense flow;
`sample_cells`, a flow read at continuous cells of its own grid).

A note on coordinates (the same text is in the README):

* Points are stored `(x, y)`, in pixels, with pixel *centres at integers*: pixel column `i`
  covers `[i - 0.5, i + 0.5)`. This is the reference's convention (it indexes flow maps with
  `int(x)` and resizes keypoints by a plain scale factor `x * 256 / w`).
* Normalised coordinates are in `[-1, 1]` with corners aligned (`-1` is the centre of the first
  cell, `+1` the centre of the last), as the soft-argmax coordinate vectors of the reference.
* Direction: a flow map `[.., h, w, 2]` gives, for every *target* cell `(x, y)`, the
  displacement to its match in the *source*: `source = (x + flow[..., 0], y + flow[..., 1])`,
  in cells of that same grid (on the 64x64 grid of a 256x256 image, one unit is 4 pixels).
  PCK transfers target keypoints to the source and compares with the source keypoints.
* Ragged keypoints are padded to a fixed count and carry an explicit boolean `valid` mask; the
  padded values are meaningless (the reference writes -1 there) and never used as sentinels.
* A ground-truth flow vector is "unlabelled" iff both of its components are exactly 0.0 (the
  reference's rule; a real pair with zero displacement is therefore unlabelled too).
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np

SizeLike = Union[int, Tuple[int, int], Sequence[int]]


def as_hw(size: SizeLike) -> Tuple[int, int]:
  """`int` or `(h, w)` -> `(h, w)`."""
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def linear_taps(
    points, n_in: int, n_out: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """1-D bilinear taps, align_corners=False, for positions on an `n_out`-sample axis that reads
  an `n_in`-sample axis (a flow grid's cells read from an image's pixels).

  Position `p` reads input coordinate `c = max((p + 0.5) * n_in / n_out - 0.5, 0)` (half-pixel
  centres, clamped below at 0), as PyTorch's `upsample_bilinear2d(align_corners=False)`; past
  the last input sample both taps are that sample (`i1 == i0`, the weights still sum to 1).
  Every flow resampling uses these taps: `evaluation.upsample_flow` and `transfer_keypoints`
  (PCK, `points = arange(n_out)`), and `predict.sample_flow` / `predict.dense_flow` (matching,
  continuous points).

  Args:
    points: [m] positions in output samples (pixels), integer or continuous.
    n_in, n_out: axis lengths (grid cells, image pixels).

  Returns:
    `(i0, i1, w0, w1)`, each [m]: int32 lower/upper input index and float64 weights
    `w1 = c - i0`, `w0 = 1 - w1`.
  """
  coord = np.maximum((np.asarray(points, np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(coord).astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1).astype(np.int32)
  w1 = coord - i0
  return i0, i1, 1.0 - w1, w1


def keypoints_to_flow(
    src_kps, trg_kps, valid, feature_size: int, receptive_field: int, img_size: int = 256, xp=jnp
):
  """Sparse ground-truth flow from keypoint pairs (the reference's `KeypointToFlow`).

  For every cell `(fy, fx)` of the `feature_size` grid (cell stride `jsz = img_size //
  feature_size` pixels) the receptive box is
  `x in [fx*jsz - rf//2 + jsz//2, fx*jsz + rf//2 + jsz//2]` (closed, integer bounds), the same
  for y. `K` is the set of valid keypoints whose *target* point lies in the box. An empty `K`
  leaves the cell unlabelled (flow `(0, 0)`); otherwise the flow is
  `(src_kps[i*] - mean(trg_kps[K])) / jsz` with `i*` the largest index in `K` (the reference
  scatters in increasing keypoint order and the last write wins).

  Args:
    src_kps: [n, 2] float, (x, y) source keypoints in pixels of the `img_size` image.
    trg_kps: [n, 2] float, (x, y) target keypoints in pixels of the `img_size` image.
    valid: [n] bool, which keypoint slots are real.
    feature_size: side of the flow grid (64 in training).
    receptive_field: receptive box side in pixels (11 in training).
    img_size: side of the (square) image in pixels.
    xp: the array module, `jax.numpy` (default; jittable) or `numpy` (the data workers, where
      a per-example jax call would cost a dispatch and a device transfer).

  Returns:
    [feature_size, feature_size, 2] float32 flow, (x, y) displacement target -> source in grid
    cells; exactly (0, 0) at unlabelled cells.
  """
  f32 = xp.float32
  src = xp.asarray(src_kps, f32)
  trg = xp.asarray(trg_kps, f32)
  valid = xp.asarray(valid, bool)
  fs = int(feature_size)
  jsz = int(img_size) // fs
  rf = int(receptive_field)
  cell = xp.arange(fs, dtype=f32) * jsz + (jsz // 2)
  lo = cell - (rf // 2)
  hi = cell + (rf // 2)
  # in_x[n, fx], in_y[n, fy]: is keypoint n's target inside the cell's box along that axis.
  in_x = (trg[:, 0:1] >= lo) & (trg[:, 0:1] <= hi)
  in_y = (trg[:, 1:2] >= lo) & (trg[:, 1:2] <= hi)
  inside = in_y[:, :, None] & in_x[:, None, :] & valid[:, None, None]  # [n, fy, fx]
  w = inside.astype(f32)
  count = w.sum(axis=0)
  mean_trg = xp.einsum("nyx,nc->yxc", w, trg) / xp.maximum(count, 1.0)[..., None]
  idx = xp.arange(inside.shape[0])
  last = xp.max(xp.where(inside, idx[:, None, None], -1), axis=0, initial=-1)  # [fy, fx]
  src_last = src[xp.maximum(last, 0)] if src.shape[0] else xp.zeros((fs, fs, 2), f32)
  flow = (src_last - mean_trg) / f32(jsz)
  return xp.where((count > 0)[..., None], flow, 0.0).astype(f32)


def sample_cells(grid, xy):
  """Bilinear sample of a grid at continuous cell coordinates (jax; one grid per batch row).

  Cell centres are at integers, as the flow's own coordinates: `(x, y)` reads between the four
  cells around it; points are clamped to `[0, w - 1] x [0, h - 1]` (the border cells extend).
  Following a flow to its match and reading a second flow there (the forward-backward check of
  `losses.cycle_consistent`) is `sample_cells(flow_2, cells + flow_1)`.

  Args:
    grid: [b, h, w, c] values per cell.
    xy: [b, ..., 2] (x, y) positions in cells of that grid.

  Returns:
    [b, ..., c], `grid`'s dtype.
  """
  b, h, w, c = grid.shape
  lead = xy.shape[1:-1]
  x = jnp.clip(xy[..., 0].reshape(b, -1), 0, w - 1).astype(grid.dtype)
  y = jnp.clip(xy[..., 1].reshape(b, -1), 0, h - 1).astype(grid.dtype)
  x0 = jnp.floor(x).astype(jnp.int32)
  y0 = jnp.floor(y).astype(jnp.int32)
  x1, y1 = jnp.minimum(x0 + 1, w - 1), jnp.minimum(y0 + 1, h - 1)
  fx, fy = (x - x0)[..., None], (y - y0)[..., None]
  flat = grid.reshape(b, h * w, c)

  def at(yi, xi):
    return jnp.take_along_axis(flat, (yi * w + xi)[..., None], axis=1)

  out = (1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x1)) + fy * (
      (1 - fx) * at(y1, x0) + fx * at(y1, x1)
  )
  return out.reshape((b,) + lead + (c,))


def unlabelled_mask(flow):
  """`[.., 2]` ground-truth flow -> `[..]` bool, True where the vector is exactly (0, 0)."""
  return (flow[..., 0] == 0) & (flow[..., 1] == 0)
