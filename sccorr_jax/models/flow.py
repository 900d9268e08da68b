"""From a 4D correlation to a dense flow: 4x upsampling and soft-argmax (paper Sec. 3.1).

Reference semantics (`SCorrSAN.forward`, `softmax_with_temperature`, `unnormalise_and_convert
_mapping_to_flow`):

* The filtered correlation `[b, hs, ws, ht, wt]` is resized to `[b, S, S, S, S]` with
  *align-corners* bilinear interpolation (output index `i` samples input `i * (n-1)/(S-1)`), first
  the source dims, then the target dims. The resize is separable and linear, so here it is four
  interpolation matrices contracted with `einsum` (target dims first: cheaper, same numbers). The
  model never materialises the whole volume: `upsampled_soft_argmax_flow` upsamples the source
  dims with 2-D matrix products per block of target cells, target-major, so the softmax reduces
  over the minor axis (see its docstring).
* Soft-argmax over the source positions with temperature beta = 0.02:
  `p = softmax((corr - max) / beta)`, expected normalised coordinates
  `grid_x = sum p * x_coords[xs]`, `grid_y = sum p * y_coords[ys]` with trainable coordinate
  vectors (initialised to `linspace(-1, 1, S)` in float32), then
  `flow = ((grid + 1) * (size_t - 1) / 2) - target cell`. The reference casts the grid to float32
  in that conversion even in a float64 model; this port does not (the fixtures' `flow` key).
* Optionally (off by default, as in the released code) SFNet's kernel soft-argmax: the correlation
  is multiplied by a Gaussian window of width `sigma` source cells around each target's arg-max
  before the softmax.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SOFTMAX_BETA = 0.02


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool = True) -> np.ndarray:
  """`[n_out, n_in]` float64 matrix of 1-D bilinear resizing.

  `align_corners=True`: output `i` samples input `i * (n_in - 1) / (n_out - 1)`.
  `align_corners=False`: half-pixel centres, input `(i + 0.5) * n_in / n_out - 0.5`, clamped below
  at 0 (PyTorch's `F.interpolate(mode='bilinear')` without antialiasing).
  """
  i = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(i)
  else:
    src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def _mat(n_in, n_out, dtype):
  return jnp.asarray(interpolation_matrix(n_in, n_out), dtype=dtype)


def upsample_target(corr, size: int, *, precision=None):
  """Resizes the target dims: `[b, hs, ws, ht, wt]` -> `[b, hs, ws, size, size]`."""
  _, _, _, ht, wt = corr.shape
  my, mx = _mat(ht, size, corr.dtype), _mat(wt, size, corr.dtype)
  return jnp.einsum("bijkl,Kk,Ll->bijKL", corr, my, mx, precision=precision)


def upsample_source(corr, size: int, *, precision=None):
  """Resizes the source dims: `[b, hs, ws, ht, wt]` -> `[b, size, size, ht, wt]`."""
  _, hs, ws, _, _ = corr.shape
  my, mx = _mat(hs, size, corr.dtype), _mat(ws, size, corr.dtype)
  return jnp.einsum("bijkl,Ii,Jj->bIJkl", corr, my, mx, precision=precision)


def upsample_correlation(corr, size: int, *, precision=None):
  """Align-corners bilinear resize of a 4D correlation to a square `size` grid on both sides.

  Args:
    corr: [b, hs, ws, ht, wt].
    size: output side for source and target (64 for 16x16 features: the paper's 4x).

  Returns:
    [b, size, size, size, size], indexed `[b, ys, xs, yt, xt]`. This materialises the full
    volume (size^4 values per pair); the model fuses it with the soft-argmax instead.
  """
  return upsample_source(
      upsample_target(corr, size, precision=precision), size, precision=precision
  )


def kernel_window(corr, sigma: float):
  """SFNet's Gaussian window around each target's arg-max source cell.

  Args:
    corr: [b, hs, ws, ht, wt].
    sigma: window width in source cells.

  Returns:
    [b, hs, ws, ht, wt] window values in (0, 1]; multiply the correlation by it.
  """
  b, hs, ws, ht, wt = corr.shape
  idx = jnp.argmax(corr.reshape(b, hs * ws, ht, wt), axis=1)  # [b, ht, wt]
  iy = (idx // ws).astype(corr.dtype)
  ix = (idx % ws).astype(corr.dtype)
  ys = jnp.arange(hs, dtype=corr.dtype)[None, :, None, None, None]
  xs = jnp.arange(ws, dtype=corr.dtype)[None, None, :, None, None]
  d2 = (xs - ix[:, None, None]) ** 2 + (ys - iy[:, None, None]) ** 2
  return jax.lax.stop_gradient(jnp.exp(-d2 / (2.0 * sigma**2)))


def soft_argmax(
    corr,
    x_coords,
    y_coords,
    beta: float = SOFTMAX_BETA,
    kernel_sigma: Optional[float] = None,
    *,
    precision=None,
):
  """Expected normalised source coordinates of every target cell.

  Args:
    corr: [b, hs, ws, ht, wt] correlation.
    x_coords: [ws] normalised x coordinate of each source column (trainable in the model).
    y_coords: [hs] normalised y coordinate of each source row.
    beta: softmax temperature.
    kernel_sigma: if set, SFNet's kernel soft-argmax with this Gaussian width (source cells).
    precision: optional `jax.lax.Precision` of the contractions.

  Returns:
    [b, ht, wt, 2] expected `(x, y)` in the coordinate vectors' units (normally [-1, 1]).
  """
  b, hs, ws, ht, wt = corr.shape
  if kernel_sigma is not None:
    corr = corr * kernel_window(corr, kernel_sigma)
  logits = corr.reshape(b, hs * ws, ht, wt)
  prob = jax.nn.softmax(
      (logits - jax.lax.stop_gradient(logits.max(axis=1, keepdims=True))) / beta, axis=1
  ).reshape(b, hs, ws, ht, wt)
  x_coords = jnp.asarray(x_coords, prob.dtype)
  y_coords = jnp.asarray(y_coords, prob.dtype)
  grid_x = jnp.einsum("bijkl,j->bkl", prob, x_coords, precision=precision)
  grid_y = jnp.einsum("bijkl,i->bkl", prob, y_coords, precision=precision)
  return jnp.stack([grid_x, grid_y], axis=-1)


def grid_to_flow(grid):
  """Normalised source coordinates -> flow in cells of the target grid.

  Args:
    grid: [b, ht, wt, 2] expected `(x, y)` in [-1, 1] (corners aligned).

  Returns:
    [b, ht, wt, 2] flow: `source - target` in cells, unnormalised with the target grid's size.
  """
  _, ht, wt, _ = grid.shape
  map_x = (grid[..., 0] + 1) * (wt - 1) / 2
  map_y = (grid[..., 1] + 1) * (ht - 1) / 2
  ys, xs = jnp.meshgrid(
      jnp.arange(ht, dtype=grid.dtype), jnp.arange(wt, dtype=grid.dtype), indexing="ij"
  )
  return jnp.stack([map_x - xs, map_y - ys], axis=-1)


def soft_argmax_flow(
    corr,
    x_coords,
    y_coords,
    beta: float = SOFTMAX_BETA,
    kernel_sigma: Optional[float] = None,
    *,
    precision=None,
):
  """Soft-argmax then flow conversion.

  Args:
    corr: [b, hs, ws, ht, wt] correlation (already upsampled in the model).
    x_coords: [ws] trainable normalised x coordinates of the source columns.
    y_coords: [hs] trainable normalised y coordinates of the source rows.
    beta: softmax temperature (0.02 in the paper).
    kernel_sigma: optional SFNet kernel soft-argmax width (None: plain soft-argmax).

  Returns:
    [b, ht, wt, 2] flow, (x, y) displacement from each target cell to its expected source match,
    in cells of the target grid.
  """
  return grid_to_flow(
      soft_argmax(corr, x_coords, y_coords, beta, kernel_sigma, precision=precision)
  )


# Rows (pair, target cell) of the fused upsampling + soft-argmax processed at once when the
# caller does not say: on CPU a block whose upsampled logits (rows x S^2 values) stay in cache is
# ~6x faster forward+backward than the whole volume (256 rows: 4 MiB at S = 64); accelerators
# prefer large blocks.
CPU_BLOCK_ROWS = 256
ACCELERATOR_BLOCK_ROWS = 16384


def default_block_rows() -> int:
  """`CPU_BLOCK_ROWS` when tracing for the CPU backend, else `ACCELERATOR_BLOCK_ROWS`."""
  return CPU_BLOCK_ROWS if jax.default_backend() == "cpu" else ACCELERATOR_BLOCK_ROWS


def _target_major_prob(corr_t, size, beta, precision):
  """Source upsampling + softmax of rows of target cells.

  Args:
    corr_t: [t, hs, ws], one 2-D source map per (pair, target cell).
    size: S.
    beta: softmax temperature.

  Returns:
    [t, S (xs), S (ys)] the softmax over the upsampled source cells, x-major.
  """
  t, hs, ws = corr_t.shape
  dtype = corr_t.dtype
  my, mx = _mat(hs, size, dtype), _mat(ws, size, dtype)
  # Two 2-D matrix products; the logits come out as [t, xs, ys] (the softmax runs over both, so
  # the order does not matter) with the source cells on the minor axis.
  a = jnp.matmul(corr_t.reshape(t * hs, ws), mx.T, precision=precision)
  a = a.reshape(t, hs, size).transpose(0, 2, 1).reshape(t * size, hs)
  logits = jnp.matmul(a, my.T, precision=precision).reshape(t, size * size)
  logits = logits - jax.lax.stop_gradient(logits.max(axis=1, keepdims=True))
  return jax.nn.softmax(logits / beta, axis=1).reshape(t, size, size)  # [t, xs, ys]


def _target_major_soft_argmax(corr_t, size, x_coords, y_coords, beta, precision):
  """Source upsampling + soft-argmax of rows of target cells.

  Args:
    corr_t: [t, hs, ws], one 2-D source map per (pair, target cell).
    size: S.
    x_coords, y_coords: [S].

  Returns:
    [t, 2] expected `(x, y)`.
  """
  dtype = corr_t.dtype
  prob = _target_major_prob(corr_t, size, beta, precision)  # [t, xs, ys]
  grid_x = jnp.einsum("tji,j->t", prob, jnp.asarray(x_coords, dtype), precision=precision)
  grid_y = jnp.einsum("tji,i->t", prob, jnp.asarray(y_coords, dtype), precision=precision)
  return jnp.stack([grid_x, grid_y], axis=-1)


def upsampled_soft_argmax_flow(
    corr,
    size: int,
    x_coords,
    y_coords,
    beta: float = SOFTMAX_BETA,
    kernel_sigma: Optional[float] = None,
    target_chunks: int = 1,
    *,
    precision=None,
    block_rows: Optional[int] = None,
):
  """`soft_argmax_flow(upsample_correlation(corr, size), ...)` with bounded memory.

  The target dims are upsampled first (`[b, S, S, hs, ws]`, small, target-major); then, for
  blocks of (pair, target cell) rows, the source dims are upsampled with two matrix products
  and the soft-argmax runs over the minor axis. Blocks after the first are mapped sequentially
  and rematerialised in the backward pass (`jax.checkpoint`), so at most
  `rows * S^2` values of the upsampled volume exist at once. The numbers equal the unchunked
  path up to float rounding (the contraction order differs from `upsample_correlation`).

  Args:
    corr: [b, hs, ws, ht, wt] filtered correlation.
    size: output grid side S.
    x_coords, y_coords: [S] trainable coordinate vectors.
    beta, kernel_sigma: as in `soft_argmax_flow`.
    target_chunks: at least this many chunks of target rows (must divide S); 1 = as few as
      `block_rows` allows.
    precision: optional `jax.lax.Precision` of the contractions.
    block_rows: most (pair, target cell) rows per block; None = `default_block_rows()`.

  Returns:
    [b, S, S, 2] flow in cells of the S grid.
  """
  if size % target_chunks:
    raise ValueError(f"target_chunks={target_chunks} must divide size={size}")
  if kernel_sigma is not None:
    return _upsampled_soft_argmax_flow_source_major(
        corr, size, x_coords, y_coords, beta, kernel_sigma, target_chunks, precision=precision
    )

  def one(rows):
    return _target_major_soft_argmax(rows, size, x_coords, y_coords, beta, precision)

  grid = _map_target_rows(
      corr, size, one, target_chunks, block_rows, remat=True, precision=precision
  )
  return grid_to_flow(grid)


def _map_target_rows(
    corr,
    size: int,
    fn,
    target_chunks: int = 1,
    block_rows: Optional[int] = None,
    remat: bool = True,
    *,
    precision=None,
):
  """`fn` over the (pair, target cell) rows of a correlation whose target dims are upsampled.

  The blocking of `upsampled_soft_argmax_flow`: the target dims are upsampled to S x S
  (`[b, S, S, hs, ws]`, target-major); blocks of rows go through `fn` one after the other
  (`jax.lax.map`, each rematerialised in the backward pass with `remat`).

  Args:
    corr: [b, hs, ws, ht, wt].
    size: S.
    fn: [t, hs, ws] -> [t, ...], one row per (pair, target cell).
    target_chunks, block_rows: as in `upsampled_soft_argmax_flow`.
    remat: `jax.checkpoint` each block after the first (no effect without a backward pass).
    precision: of the target upsampling.

  Returns:
    [b, S, S, ...], `fn`'s rows in target-cell order.
  """
  b, hs, ws, ht, wt = corr.shape
  dtype = corr.dtype
  corr_t = jnp.einsum(
      "bijkl,Kk,Ll->bKLij", corr, _mat(ht, size, dtype), _mat(wt, size, dtype), precision=precision
  )  # [b, S, S, hs, ws]
  total = b * size * size
  rows = -(-total // target_chunks)
  rows = min(rows, int(block_rows or default_block_rows()))
  n = -(-total // rows)
  corr_t = corr_t.reshape(total, hs, ws)
  if n == 1:
    out = fn(corr_t)
  else:
    # Zero rows pad the last block (a uniform softmax, discarded).
    corr_t = jnp.pad(corr_t, ((0, n * rows - total), (0, 0), (0, 0)))
    out = jax.lax.map(jax.checkpoint(fn) if remat else fn, corr_t.reshape(n, rows, hs, ws))
    out = out.reshape((n * rows,) + out.shape[2:])[:total]
  return out.reshape((b, size, size) + out.shape[1:])


def _mass_near_expectation(corr_t, size, x_coords, y_coords, beta, radius, precision):
  """[t] softmax mass within `radius` source cells of the expected match (rows of
  `_target_major_prob`; the expectation is the soft-argmax's, in cells of the S grid)."""
  dtype = corr_t.dtype
  prob = _target_major_prob(corr_t, size, beta, precision)  # [t, xs, ys]
  gx = jnp.einsum("tji,j->t", prob, jnp.asarray(x_coords, dtype), precision=precision)
  gy = jnp.einsum("tji,i->t", prob, jnp.asarray(y_coords, dtype), precision=precision)
  ex = (gx + 1) * (size - 1) / 2
  ey = (gy + 1) * (size - 1) / 2
  cells = jnp.arange(size, dtype=dtype)
  d2 = (cells[None, :, None] - ex[:, None, None]) ** 2 + (
      cells[None, None, :] - ey[:, None, None]
  ) ** 2  # [t, xs, ys]
  return jnp.sum(jnp.where(d2 <= radius * radius, prob, 0), axis=(1, 2))


def upsampled_peak_mass(
    corr,
    size: int,
    x_coords,
    y_coords,
    beta: float = SOFTMAX_BETA,
    radius: float = 2.0,
    *,
    precision=None,
    block_rows: Optional[int] = None,
):
  """How peaked each target cell's soft-argmax is: its probability mass near the expectation.

  The softmax of `upsampled_soft_argmax_flow` (the same upsampling and temperature, plain
  soft-argmax: SFNet's kernel window is not applied), for every target cell of the S grid; the
  mass within `radius` source cells of its expected source position: 1 when all of it sits at
  the match, about `pi radius^2 / S^2` for a flat distribution. What `predict`'s per-keypoint
  `mass` measures, for every cell. No gradient is meant to flow through it (the pseudo-label
  gate of `losses`); blocks are not rematerialised.

  Args:
    corr: [b, hs, ws, ht, wt] filtered correlation (the model's `aux['corr']`).
    size: S (for the correlation's own grid, S = hs = ws and the resizing is the identity).
    x_coords, y_coords: [S] the soft-argmax's coordinate vectors.
    beta: softmax temperature.
    radius: in source cells of the S grid.
    precision, block_rows: as in `upsampled_soft_argmax_flow`.

  Returns:
    [b, S, S] mass in [0, 1], the dtype of `corr`.
  """

  def one(rows):
    return _mass_near_expectation(rows, size, x_coords, y_coords, beta, radius, precision)

  return _map_target_rows(corr, size, one, 1, block_rows, remat=False, precision=precision)


def _upsampled_soft_argmax_flow_source_major(
    corr, size, x_coords, y_coords, beta, kernel_sigma, target_chunks, *, precision=None
):
  """The source-major fused path (kept for SFNet's kernel soft-argmax)."""
  corr_t = upsample_target(corr, size, precision=precision)  # [b, hs, ws, S, S]
  if target_chunks == 1:
    corr_up = upsample_source(corr_t, size, precision=precision)
    grid = soft_argmax(corr_up, x_coords, y_coords, beta, kernel_sigma, precision=precision)
    return grid_to_flow(grid)
  if size % target_chunks:
    raise ValueError(f"target_chunks={target_chunks} must divide size={size}")
  b, hs, ws = corr_t.shape[:3]
  rows = size // target_chunks
  chunks = corr_t.reshape(b, hs, ws, target_chunks, rows, size).transpose(3, 0, 1, 2, 4, 5)

  @jax.checkpoint
  def one(chunk):
    up = upsample_source(chunk, size, precision=precision)
    return soft_argmax(up, x_coords, y_coords, beta, kernel_sigma, precision=precision)

  grid = jax.lax.map(one, chunks)  # [chunks, b, rows, S, 2]
  grid = grid.transpose(1, 0, 2, 3, 4).reshape(b, size, size, 2)
  return grid_to_flow(grid)
