"""Training objectives of SCorrSAN (Huang et al., ECCV 2022, Sec. 3.3-3.4).

* Sparse end-point error on the keypoint-derived flow labels (the supervised term; the
  reference's `EPE`).
* Pseudo-label EPE against a teacher's flow, restricted to a dilation of the labelled positions
  (the reference's `EPE_pseudo_filtered_by_dilation`).
* Small-loss selection with exchange (co-teaching; the reference's `loss_dynamic_selection`).
* `pseudo_label_objective`: one network's supervised + selected pseudo-label loss against a
  peer's or a fixed teacher's flow; the 'st' and 'mt' training steps are built on it.

Everything works on fixed-shape `[b, h, w]` maps with boolean masks instead of the reference's
boolean indexing, so all functions are `jax.jit`-friendly. The reference's 1-D vectors
("gathered in row-major (b, y, x) order") are the masked entries of these maps in C order.

Differences from the reference (deliberate; none changes a number):

* The remember count `k = max(1, int(rate * n))` must be computed in float64 exactly as Python
  does (`int(0.29 * 100) == 28`, `int(0.5111111111111111 * 225) == 114`). Inside a jitted step
  `n` is traced and float64 may be unavailable, so `k` is looked up in a host-built table
  (`num_remember_table`). The table may itself be a jit argument: a trainer that changes the
  rate every epoch then passes a new table of the same shape and does not recompile.
* `sparse_epe` returns NaN without any labelled position, as the reference does (the trainer
  is expected to skip non-finite updates); `sparse_epe_sum_count` returns `(sum, count)` for
  callers that aggregate over devices/batches or want to guard the division themselves.
* With no position in the selection mask, `small_loss_selection` returns 0 for both losses
  (what the reference's `sum([]) / max(0, 1)` gives).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Tuple, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sccorr_jax import geometry

# A remember rate in [0, 1] (Python/NumPy scalar, built into a table on the host), or a table
# from `num_remember_table` (int32 [n_max + 1], may be traced).
RateOrTable = Union[float, np.ndarray, jax.Array]


# ------------------------------------------------------------------------------------------------
# Norms and end-point errors.


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _safe_norm(x, axis):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis))


@_safe_norm.defjvp
def _safe_norm_jvp(axis, primals, tangents):
  (x,), (x_dot,) = primals, tangents
  norm = _safe_norm(x, axis)
  positive = norm > 0
  # Double `where` so that neither the primal nor the cotangent ever sees 1 / 0.
  inv = jnp.where(positive, 1.0 / jnp.where(positive, norm, 1.0), 0.0).astype(norm.dtype)
  return norm, jnp.sum(x * x_dot, axis=axis) * inv


def safe_norm(x, axis: int = -1):
  """L2 norm whose derivative is 0 (not NaN) where the vector is exactly 0.

  Args:
    x: [..., c, ...] float array, any float dtype.
    axis: the (static) axis reduced.

  Returns:
    `sqrt(sum(x ** 2, axis))`, `x`'s dtype, `axis` removed. The derivative is `x / norm` where
    `norm > 0` and 0 where `norm == 0`, as the reference's `torch.norm` (whose subgradient at 0
    is 0); `jnp.linalg.norm` would give NaN there.
  """
  return _safe_norm(x, int(axis))


def epe_sum_count(pred, gt, mask) -> Tuple[jax.Array, jax.Array]:
  """Sum and count of end-point errors over the positions of `mask`.

  Args:
    pred: [b, h, w, 2] float, predicted flow, (x, y) displacement target -> source in cells.
    gt: [b, h, w, 2] float, the true flow at least where `mask` is set.
    mask: [b, h, w] bool, the positions that count.

  Returns:
    `(sum, count)`: `sum` () in the dtype of `pred - gt`, the sum of `||gt - pred||_2` over
    `mask` in the whole batch (cells); `count` () int32, its positions.
  """
  err = safe_norm(gt - pred, axis=-1)
  total = jnp.sum(jnp.where(mask, err, 0))
  return total, jnp.sum(mask, dtype=jnp.int32)


def sparse_epe_sum_count(pred, gt) -> Tuple[jax.Array, jax.Array]:
  """`epe_sum_count` over the labelled positions of a sparse label.

  A position of `gt` [b, h, w, 2] is unlabelled iff both components are exactly 0
  (`geometry.unlabelled_mask`).
  """
  return epe_sum_count(pred, gt, ~geometry.unlabelled_mask(gt))


def masked_epe(pred, gt, mask):
  """Mean end-point error over `mask` (all images together); 0, with a zero gradient, when the
  mask is empty. The loss of `labelled_epe` and of the dense oracle (`train_step.dense_step`:
  `gt` the dense ground truth, `mask` where it is valid)."""
  total, count = epe_sum_count(pred, gt, mask)
  return total / jnp.maximum(count, 1).astype(total.dtype)


def _epe_and_count(flow, gt):
  """(sparse EPE (NaN without labels), labelled count) of one flow."""
  total, count = sparse_epe_sum_count(flow, gt)
  return total / count.astype(total.dtype), count


def labelled_epe(pred, gt):
  """`sparse_epe`, but 0 (with a zero gradient) when nothing is labelled.

  What the training steps use: a batch without any label (possible with
  `data.labelled_pair_fraction < 1`) has no supervised term instead of a NaN loss.
  """
  return masked_epe(pred, gt, ~geometry.unlabelled_mask(gt))


def sparse_epe(pred, gt):
  """Mean end-point error over the labelled positions of the whole batch (reference `EPE`).

  Args:
    pred: [b, h, w, 2] float, predicted flow, (x, y) displacement target -> source in cells.
    gt: [b, h, w, 2] float, sparse ground-truth flow, exactly (0, 0) where unlabelled.

  Returns:
    () float (dtype of `pred - gt`): mean of `||gt - pred||_2` over all labelled positions of
    all images together (not a mean of per-image means), in cells. NaN if nothing is labelled,
    as in the reference; use `sparse_epe_sum_count` to handle that case otherwise.
  """
  return _epe_and_count(pred, gt)[0]


def dilated_label_mask(gt, kernel_size: int):
  """Positions with a labelled position in their `k x k` neighbourhood.

  The reference's `conv2d(labelled, ones(k, k), padding=k // 2) > 0`, computed as a separable
  max-pool (no big convolution).

  Args:
    gt: [b, h, w, 2] float, sparse ground-truth flow (unlabelled = exactly (0, 0)).
    kernel_size: k, odd positive int (static); the window is centred, zero padded.

  Returns:
    [b, h, w] bool, True where any labelled position lies within `k // 2` cells in both y and x.
  """
  k = int(kernel_size)
  if k < 1 or k % 2 == 0:
    raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
  labelled = (~geometry.unlabelled_mask(gt)).astype(jnp.float32)
  p = k // 2
  zero = jnp.array(0, jnp.float32)
  out = lax.reduce_window(labelled, zero, lax.max, (1, k, 1), (1, 1, 1),
                          ((0, 0), (p, p), (0, 0)))
  out = lax.reduce_window(out, zero, lax.max, (1, 1, k), (1, 1, 1), ((0, 0), (0, 0), (p, p)))
  return out > 0


def pseudo_label_epe(pred, teacher):
  """Per-position end-point error against a teacher's flow, used as a constant pseudo-label.

  Args:
    pred: [b, h, w, 2] float, the student's flow (cells); gradients flow into it.
    teacher: [b, h, w, 2] float, the teacher's flow (cells); wrapped in `stop_gradient`.

  Returns:
    [b, h, w] float, `||stop_gradient(teacher) - pred||_2` in cells, with a zero (not NaN)
    gradient where the two flows coincide.
  """
  return safe_norm(lax.stop_gradient(teacher) - pred, axis=-1)


# ------------------------------------------------------------------------------------------------
# Small-loss selection (co-teaching).


def num_remember_table(remember_rate: float, n_max: int) -> np.ndarray:
  """Host-built table of the remember count `k(n) = max(1, int(rate * n))`, n = 0..n_max.

  `rate * n` is formed in float64 and truncated exactly as the reference's Python does
  (`int(0.29 * 100) == 28`, `int(0.5111111111111111 * 225) == 114`).

  Args:
    remember_rate: fraction of candidate positions kept, in [0, 1].
    n_max: the largest candidate count needed (e.g. `b * h * w` of the loss maps).

  Returns:
    [n_max + 1] int32 numpy array; entry `n` is k for n candidates (entry 0 is 1; with no
    candidate nothing is selected anyway).
  """
  rate = float(remember_rate)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"remember_rate must be in [0, 1], got {remember_rate!r}")
  n_max = int(n_max)
  if n_max < 0:
    raise ValueError(f"n_max must be >= 0, got {n_max}")
  # float64 products are the IEEE products Python computes; floor == int() for x >= 0.
  k = np.floor(np.float64(rate) * np.arange(n_max + 1, dtype=np.float64))
  return np.maximum(k, 1).astype(np.int32)


def _as_table(remember_rate: RateOrTable, n_total: int):
  """Rate (host scalar) or table (array, maybe traced) -> int32 table covering `n_total`."""
  if np.ndim(remember_rate) == 0:
    try:
      rate = float(remember_rate)
    except jax.errors.ConcretizationTypeError as e:
      raise TypeError(
          "A traced remember rate cannot give the exact float64 count k; build the table on "
          "the host with `num_remember_table(rate, n)` and pass that (it may be traced).") from e
    return jnp.asarray(num_remember_table(rate, n_total))
  table = jnp.asarray(remember_rate)
  if table.ndim != 1 or table.shape[0] < n_total + 1:
    raise ValueError(f"remember table of shape {table.shape} does not cover {n_total} "
                     f"candidates: need [>= {n_total + 1}], see `num_remember_table`")
  return table.astype(jnp.int32)


def _smallest_k_mask(loss, mask, k):
  """[b, h, w] bool: the `k` positions of `mask` with the smallest `loss` (no gradient).

  Ties are broken by position (stable sort); positions outside `mask` are never chosen.
  """
  key = jnp.where(mask, lax.stop_gradient(loss), jnp.inf).reshape(-1)
  order = jnp.argsort(key, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  return (rank.reshape(mask.shape) < k) & mask


class Selection(NamedTuple):
  """Result of the small-loss selection with exchange.

  Attributes:
    loss_a: () float, mean of `loss_a` over the `k` positions chosen by `loss_b` (`kept_b`).
    loss_b: () float, mean of `loss_b` over the `k` positions chosen by `loss_a` (`kept_a`).
    kept_a: [b, h, w] bool, the k masked positions with the smallest `loss_a`.
    kept_b: [b, h, w] bool, the k masked positions with the smallest `loss_b`.
    num_remember: () int32, k (>= 1, even when `num_candidates` is 0).
    num_candidates: () int32, n, the number of positions in the mask.
  """
  loss_a: jax.Array
  loss_b: jax.Array
  kept_a: jax.Array
  kept_b: jax.Array
  num_remember: jax.Array
  num_candidates: jax.Array


def small_loss_selection_with_masks(loss_a, loss_b, mask, remember_rate: RateOrTable
                                    ) -> Selection:
  """`small_loss_selection`, also returning the selection masks and counts (see there)."""
  mask = jnp.asarray(mask, bool)
  if loss_a.shape != mask.shape or loss_b.shape != mask.shape:
    raise ValueError(f"shape mismatch: {loss_a.shape}, {loss_b.shape}, mask {mask.shape}")
  table = _as_table(remember_rate, mask.size)
  n = jnp.sum(mask, dtype=jnp.int32)
  k = table[n]
  kept_a = _smallest_k_mask(loss_a, mask, k)
  kept_b = _smallest_k_mask(loss_b, mask, k)
  # `where`, not multiplication: garbage (inf/NaN) outside the selection must not leak.
  sel_a = jnp.sum(jnp.where(kept_b, loss_a, 0)) / k.astype(loss_a.dtype)
  sel_b = jnp.sum(jnp.where(kept_a, loss_b, 0)) / k.astype(loss_b.dtype)
  return Selection(sel_a, sel_b, kept_a, kept_b, k, n)


def small_loss_selection(loss_a, loss_b, mask, remember_rate: RateOrTable):
  """Co-teaching small-loss selection with exchange (reference `loss_dynamic_selection`).

  With `n` = number of positions in `mask` over the whole batch and
  `k = max(1, int(remember_rate * n))`, `i_a` are the k masked positions with the smallest
  `loss_a`, `i_b` likewise for `loss_b`; each loss is averaged over the positions chosen by its
  *peer*: `(sum(loss_a[i_b]) / k, sum(loss_b[i_a]) / k)`. The choice is discrete and carries no
  gradient; gradients reach only the averaged values. Ties break by position (row-major).

  Args:
    loss_a: [b, h, w] float, per-position loss of network a (e.g. `pseudo_label_epe`).
    loss_b: [b, h, w] float, per-position loss of network b.
    mask: [b, h, w] bool, candidate positions (e.g. `dilated_label_mask`). Values of the
      losses outside the mask are ignored (may be inf/NaN).
    remember_rate: either a Python/NumPy float in [0, 1] (the count table is built on the host
      at trace time, so a new value means a new compilation if it is closed over), or a table
      from `num_remember_table(rate, n_max)` with `n_max >= b * h * w`, int32 [n_max + 1],
      which may be a traced `jit` argument: pass a new table of the same shape to change the
      rate without recompiling.

  Returns:
    `(loss_a_selected, loss_b_selected)`, () floats; both 0 when the mask is empty. See
    `small_loss_selection_with_masks` for the selection masks and counts.
  """
  sel = small_loss_selection_with_masks(loss_a, loss_b, mask, remember_rate)
  return sel.loss_a, sel.loss_b


# ------------------------------------------------------------------------------------------------
# The pseudo-label objective (one home: the 'st' and 'mt' steps and the training visualiser).


class PseudoLabelTerms(NamedTuple):
  """The parts of `pseudo_label_objective` for one network.

  Attributes:
    loss_sup: () float, sparse EPE on the labelled positions (0 without labels).
    loss_pseudo: () float, mean pseudo-label EPE over the `num_remember` positions of the
      candidate mask that rank smallest (0 without candidates); unweighted.
    candidates: [b, h, w] bool, where the pseudo-label may act (the dilated label mask).
    kept: [b, h, w] bool, the candidates the small-loss selection kept (no gradient).
    num_remember: () int32, k (>= 1).
    num_candidates: () int32, n, the number of candidates.
  """
  loss_sup: jax.Array
  loss_pseudo: jax.Array
  candidates: jax.Array
  kept: jax.Array
  num_remember: jax.Array
  num_candidates: jax.Array

  @property
  def kept_fraction(self) -> jax.Array:
    """k / n, the fraction of candidates kept (0 without candidates)."""
    n = self.num_candidates
    return jnp.where(n > 0, self.num_remember / jnp.maximum(n, 1), 0.0)


def pseudo_label_objective(flow, peer_flow, gt, mask, remember_table: RateOrTable, weight):
  """One network's loss against a peer's (or a fixed teacher's) flow as pseudo-label.

      dist = ||stop_gradient(peer_flow) - flow||      per position, cells
      kept = the k = max(1, int(rate * n)) positions of `mask` with the smallest dist
      loss = labelled_epe(flow, gt) + weight * sum(dist[kept]) / k

  This is the reference's `EPE_pseudo_filtered_by_dilation` + `loss_dynamic_selection`. The
  reference's selection is an exchange (each network averages its loss over the positions its
  *peer's* loss ranks smallest), but the pseudo-label distance is symmetric,
  `||b - a|| == ||a - b||` to the bit, so the peer ranks exactly the positions this network
  ranks: ranking `dist` itself is the exchange (`small_loss_selection` keeps the general
  two-loss form, checked against the reference fixture).

  Args:
    flow: [b, h, w, 2] float, this network's flow (cells, target -> source); differentiated.
    peer_flow: [b, h, w, 2] float, the pseudo-label (the peer's or the teacher's flow); used
      under `stop_gradient`.
    gt: [b, h, w, 2] float, sparse ground truth (unlabelled = exactly (0, 0)).
    mask: [b, h, w] bool, candidate positions (`dilated_label_mask`, or all True).
    remember_table: a `num_remember_table` (may be traced) or a host float rate.
    weight: λ, float or () array (0 before the pseudo-loss epoch).

  Returns:
    `(loss, PseudoLabelTerms)`.
  """
  mask = jnp.asarray(mask, bool)
  dist = pseudo_label_epe(flow, peer_flow)
  table = _as_table(remember_table, mask.size)
  n = jnp.sum(mask, dtype=jnp.int32)
  k = table[n]
  kept = _smallest_k_mask(dist, mask, k)
  # `where`, not multiplication: garbage (inf/NaN) outside the selection must not leak.
  loss_pseudo = jnp.sum(jnp.where(kept, dist, 0)) / k.astype(dist.dtype)
  loss_sup = labelled_epe(flow, gt)
  terms = PseudoLabelTerms(loss_sup, loss_pseudo, mask, kept, k, n)
  return loss_sup + weight * loss_pseudo, terms
