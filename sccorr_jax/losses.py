"""Training objectives of SCorrSAN (Huang et al., ECCV 2022, Sec. 3.3-3.4).

* Sparse end-point error on the keypoint-derived flow labels (the supervised term; the
  reference's `EPE`).
* Pseudo-label EPE against a teacher's flow, restricted to a dilation of the labelled positions
  (the reference's `EPE_pseudo_filtered_by_dilation`).
* Small-loss selection with exchange (co-teaching; the reference's `loss_dynamic_selection`).
* Pseudo-label strategies (`PseudoLabelOptions`, `pseudo_labels`; config `teacher.region`,
  `teacher.gate`, `teacher.target`, `teacher.unlabelled_pairs`): where a teacher's flow may act
  (the paper's dilated square; positions of high teacher-feature affinity to a labelled one;
  the foreground of the teacher's correlation), which of those positions pass a check of the
  teacher before the small-loss selection (forward-backward consistency, SC-ImageNet's check;
  its soft-argmax peak mass above a scheduled percentile, curriculum labelling) and what the
  label is (the teacher's flow, or the labelled displacements propagated by affinity,
  CorrMatch's pixel propagation). The paper's choices are the defaults.
* `pseudo_label_objective`: one network's supervised + selected pseudo-label loss against a
  peer's or a fixed teacher's flow (or a propagated target), optionally gated; the 'st' and
  'mt' training steps are built on it.

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

import dataclasses
import functools
from typing import NamedTuple, Optional, Tuple, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sccorr_jax import geometry
from sccorr_jax.models import correlation
from sccorr_jax.models import flow as flow_lib

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
    raise ValueError(f'kernel_size must be a positive odd int, got {kernel_size!r}')
  labelled = (~geometry.unlabelled_mask(gt)).astype(jnp.float32)
  p = k // 2
  zero = jnp.array(0, jnp.float32)
  out = lax.reduce_window(labelled, zero, lax.max, (1, k, 1), (1, 1, 1), ((0, 0), (p, p), (0, 0)))
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
    raise ValueError(f'remember_rate must be in [0, 1], got {remember_rate!r}')
  n_max = int(n_max)
  if n_max < 0:
    raise ValueError(f'n_max must be >= 0, got {n_max}')
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
          'A traced remember rate cannot give the exact float64 count k; build the table on '
          'the host with `num_remember_table(rate, n)` and pass that (it may be traced).'
      ) from e
    return jnp.asarray(num_remember_table(rate, n_total))
  table = jnp.asarray(remember_rate)
  if table.ndim != 1 or table.shape[0] < n_total + 1:
    raise ValueError(
        f'remember table of shape {table.shape} does not cover {n_total} '
        f'candidates: need [>= {n_total + 1}], see `num_remember_table`'
    )
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


def small_loss_selection_with_masks(loss_a, loss_b, mask, remember_rate: RateOrTable) -> Selection:
  """`small_loss_selection`, also returning the selection masks and counts (see there)."""
  mask = jnp.asarray(mask, bool)
  if loss_a.shape != mask.shape or loss_b.shape != mask.shape:
    raise ValueError(f'shape mismatch: {loss_a.shape}, {loss_b.shape}, mask {mask.shape}')
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
# Pseudo-label strategies: where a teacher's flow may act (region), which of those positions pass
# a check of the teacher (gate, before the small-loss selection) and what the label is (target).
# The paper's: a square around the labelled positions, the small-loss selection alone, the
# teacher's flow. `pseudo_labels` assembles them; `pseudo_label_objective` selects and averages.

REGIONS = ('square', 'affinity', 'object')
GATES = ('cycle', 'confidence')  # Checks ANDed before the selection; 'small_loss' = none.
TARGETS = ('teacher_flow', 'propagated')
UNLABELLED_PAIRS = ('none', 'object_cycle')


@dataclasses.dataclass(frozen=True)
class PseudoLabelOptions:
  """The static pseudo-label options; defaults are the paper's. Field = `teacher.<field>`.

  Attributes:
    region: where the pseudo-label may act on a pair with keypoints. 'square': the dilated
      label mask (`dilated_label_mask`, its side the step's `dilation_kernel`); 'affinity':
      positions within `affinity_radius` cells (Chebyshev) of a labelled position whose
      teacher-feature affinity to it passes `affinity_threshold` (and, with `affinity_top_k`,
      is among that position's top k; `affinity_region`); 'object': the foreground of the
      teacher's correlation (`object_score >= object_threshold`), keypoints not needed.
    gate: 'small_loss' (only the small-loss selection) or a '+'-join of 'cycle' (the
      teacher's forward-backward check, `cycle_consistent`) and 'confidence' (its soft-argmax
      peak mass at or above this epoch's percentile of the candidates', `confidence_gate`).
      The small-loss selection (`teacher.small_loss_selection`) then ranks what passed.
    target: 'teacher_flow', or 'propagated': the labelled positions' displacements spread by
      affinity weights (`propagate_labels`), mixed with the teacher's flow by
      `propagation_mix` where both exist, the teacher's flow where no labelled position is
      within `affinity_radius`.
    unlabelled_pairs: pairs without any keypoint: 'none' (no pseudo-label there, whatever the
      region) or 'object_cycle' (the object region, gated by the cycle check and `gate`).
    affinity_radius: R, the window of the affinity region and of the propagation (cells).
    affinity_threshold: in [-1, 1], the least affinity of the affinity region.
    affinity_top_k: 0, or keep only each labelled position's k most similar window cells.
    object_threshold: in [0, 1], on the min-max normalised foreground score.
    cycle_delta: > 0, cells the forward-backward trip may miss by.
    confidence_radius: > 0, source cells of the peak mass.
    propagation_mix: in [0, 1], the teacher flow's weight in a propagated target.
    propagation_temperature: > 0, of the softmax over affinities that weights the labels.
  """

  region: str = 'square'
  gate: str = 'small_loss'
  target: str = 'teacher_flow'
  unlabelled_pairs: str = 'none'
  affinity_radius: int = 3
  affinity_threshold: float = 0.5
  affinity_top_k: int = 0
  object_threshold: float = 0.5
  cycle_delta: float = 1.0
  confidence_radius: float = 2.0
  propagation_mix: float = 0.0
  propagation_temperature: float = 0.1

  def __post_init__(self):
    def one_of(name, allowed):
      value = getattr(self, name)
      if value not in allowed:
        raise ValueError(
            f'teacher.{name} must be one of {", ".join(map(repr, allowed))}; ' f'got {value!r}'
        )

    def within(name, lo, hi, open_lo=False):
      value = getattr(self, name)
      if not (
          isinstance(value, (int, float))
          and not isinstance(value, bool)
          and (value > lo if open_lo else value >= lo)
          and value <= hi
      ):
        raise ValueError(
            f'teacher.{name} must be in {"(" if open_lo else "["}{lo:g}, {hi:g}]' f'; got {value!r}'
        )

    one_of('region', REGIONS)
    one_of('target', TARGETS)
    one_of('unlabelled_pairs', UNLABELLED_PAIRS)
    parts = self.gate.split('+') if isinstance(self.gate, str) else [self.gate]
    if self.gate != 'small_loss' and (
        any(p not in GATES for p in parts) or len(set(parts)) != len(parts)
    ):
      raise ValueError(
          f"teacher.gate must be 'small_loss' or a '+'-join of "
          f"{', '.join(map(repr, GATES))} ('cycle+confidence'); got {self.gate!r}"
      )
    for name in ('affinity_radius', 'affinity_top_k'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f'teacher.{name} must be an int >= 0; got {value!r}')
    within('affinity_threshold', -1, 1)
    within('object_threshold', 0, 1)
    within('propagation_mix', 0, 1)
    for name in ('cycle_delta', 'confidence_radius', 'propagation_temperature'):
      within(name, 0, float('inf'), open_lo=True)

  @property
  def gates(self) -> Tuple[str, ...]:
    """The checks of `gate` ('small_loss' = none)."""
    return () if self.gate == 'small_loss' else tuple(self.gate.split('+'))

  @property
  def needs_affinity(self) -> bool:
    """The teacher's feature affinity is read (`affinity_windows`)."""
    return self.region == 'affinity' or self.target == 'propagated'

  @property
  def needs_object(self) -> bool:
    """The teacher's foreground score is read (`object_score`)."""
    return self.region == 'object' or self.unlabelled_pairs == 'object_cycle'

  @property
  def needs_cycle(self) -> bool:
    """The teacher runs on the swapped pair too (its source -> target flow)."""
    return 'cycle' in self.gates or self.unlabelled_pairs == 'object_cycle'

  @property
  def needs_confidence(self) -> bool:
    """The teacher's soft-argmax peak mass is read."""
    return 'confidence' in self.gates

  @property
  def needs_teacher_aux(self) -> bool:
    """The teacher's forward must return its features and correlation (`return_aux`)."""
    return self.needs_affinity or self.needs_object or self.needs_confidence

  @property
  def needs_signals(self) -> bool:
    """Anything but the teacher's flow is read (`TeacherSignals`); False for the paper's."""
    return self.needs_teacher_aux or self.needs_cycle


class TeacherSignals(NamedTuple):
  """What the options read from the teacher besides its flow; None where no option needs it.

  Attributes:
    affinity: [b, S, S, K, K] `affinity_windows` of its target features (K = 2R + 1).
    object_score: [b, S, S] `object_score` of its correlation, in [0, 1].
    back_flow: [b, S, S, 2] its flow on the swapped pair (source -> target, cells).
    confidence: [b, S, S] its soft-argmax peak mass (`SCorrSAN.peak_mass`).
  """

  affinity: Optional[jax.Array] = None
  object_score: Optional[jax.Array] = None
  back_flow: Optional[jax.Array] = None
  confidence: Optional[jax.Array] = None


def _shift(x, dy: int, dx: int):
  """`out[:, y, x] = x[:, y - dy, x - dx]` on the grid axes 1, 2; zero (False) from outside."""
  h, w = x.shape[1:3]
  pad = [(0, 0), (max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0))] + [(0, 0)] * (x.ndim - 3)
  y0, x0 = max(-dy, 0), max(-dx, 0)
  return jnp.pad(x, pad)[:, y0 : y0 + h, x0 : x0 + w]


def neighbour_windows(x, radius: int):
  """Every cell's `(2R + 1)^2` neighbours: `[b, h, w, ...]` -> `[b, h, w, K, K, ...]`.

  `out[b, y, x, i, j] = x[b, y + i - R, x + j - R]`, zero (False) outside the grid.
  """
  k = 2 * int(radius) + 1
  rows = [
      jnp.stack([_shift(x, radius - i, radius - j) for j in range(k)], axis=3) for i in range(k)
  ]
  return jnp.stack(rows, axis=3)


def _resize_matrices(hw_in, hw_out, dtype):
  """The model's align-corners bilinear resizing (`flow.interpolation_matrix`), per axis."""
  return tuple(
      jnp.asarray(flow_lib.interpolation_matrix(int(i), int(o)), dtype)
      for i, o in zip(hw_in, hw_out)
  )


def affinity_windows(features, size_hw: Tuple[int, int], radius: int):
  """A teacher's feature affinity between each flow cell and its window of neighbours.

  The affinity of two cells of the feature grid is the cosine of their features (L2
  normalised, `correlation.correlate` of the features with themselves: the teacher's own
  similarity). On the flow grid it is that table resized on both ends with the model's
  align-corners bilinear upsampling (the cosine itself where the grids coincide), computed for
  the `(2R + 1)^2` window of each cell only.

  Args:
    features: [b, h, w, c] the teacher's target features (its `aux['trg_ctx']`).
    size_hw: (S_h, S_w), the flow grid.
    radius: R (cells of the flow grid).

  Returns:
    [b, S_h, S_w, K, K]: `out[b, y, x, i, j]` = affinity of cell (y, x) and cell
    (y + i - R, x + j - R); 0 where that cell is outside the grid.
  """
  _, h, w, _ = features.shape
  dtype = jnp.promote_types(features.dtype, jnp.float32)
  gram = correlation.correlate(features.astype(dtype), features.astype(dtype))
  my, mx = _resize_matrices((h, w), size_hw, dtype)  # [S_h, h], [S_w, w]
  near = jnp.einsum('bijkl,Pi,Qj->bPQkl', gram, my, mx)  # [b, S_h, S_w, h, w]
  k = 2 * int(radius) + 1

  def shifted(m):  # [K, S, n]: row P + d - R of m, zero outside.
    idx = jnp.arange(m.shape[0])[None, :] + jnp.arange(k)[:, None] - radius
    inside = (idx >= 0) & (idx < m.shape[0])
    return jnp.where(inside[..., None], m[jnp.clip(idx, 0, m.shape[0] - 1)], 0)

  near = jnp.einsum('bPQkl,dPk->bPQdl', near, shifted(my))
  return jnp.einsum('bPQdl,eQl->bPQde', near, shifted(mx))


def affinity_region(affinity, labelled, threshold: float, top_k: int = 0):
  """Positions whose affinity to a labelled position of their image passes a test.

  Cell p is in the region iff some labelled cell q has p in its window (`|p - q|_inf <= R`),
  `affinity(q, p) >= threshold` and, with `top_k > 0`, p is among the `top_k` cells of q's
  window with the largest affinity to q (ties: the first in row-major window order).

  Args:
    affinity: [b, S, S, K, K] `affinity_windows`.
    labelled: [b, S, S] bool, the labelled positions.
    threshold: the least affinity.
    top_k: 0 (threshold only) or k.

  Returns:
    [b, S, S] bool.
  """
  b, h, w, k, _ = affinity.shape
  radius = k // 2
  inside = neighbour_windows(jnp.ones((b, h, w), bool), radius)
  ok = inside & (affinity >= threshold) & labelled[..., None, None]  # From each q's side.
  if top_k:
    flat = jnp.where(ok, affinity, -jnp.inf).reshape(b, h, w, k * k)
    _, idx = lax.top_k(flat, min(int(top_k), k * k))
    best = jnp.any(jax.nn.one_hot(idx, k * k, dtype=bool), axis=-2).reshape(ok.shape)
    ok = ok & best
  region = jnp.zeros((b, h, w), bool)
  for i in range(k):
    for j in range(k):  # p = q + (i - R, j - R) receives q's verdict.
      region = region | _shift(ok[..., i, j], i - radius, j - radius)
  return region


def propagate_labels(affinity, gt, temperature: float):
  """The labelled displacements spread to their neighbours by affinity (pixel propagation).

      propagated(p) = sum_q w_pq gt(q),  w_pq = softmax_q(affinity(p, q) / temperature)

  over the labelled cells q in p's window (a label's displacement, not its target point,
  spreads: nearby cells of one part move alike).

  Args:
    affinity: [b, S, S, K, K] `affinity_windows`.
    gt: [b, S, S, 2] sparse ground truth (unlabelled = exactly (0, 0)), cells.
    temperature: > 0.

  Returns:
    `(flow [b, S, S, 2], exists [b, S, S] bool)`: the propagated displacement where a labelled
    cell is in the window, (0, 0) elsewhere.
  """
  b, h, w, k, _ = affinity.shape
  labelled = neighbour_windows(~geometry.unlabelled_mask(gt), k // 2).reshape(b, h, w, k * k)
  labels = neighbour_windows(gt, k // 2).reshape(b, h, w, k * k, 2)
  exists = jnp.any(labelled, axis=-1)
  logits = jnp.where(labelled, affinity.reshape(b, h, w, k * k) / temperature, -jnp.inf)
  weights = jax.nn.softmax(jnp.where(exists[..., None], logits, 0), axis=-1)
  flow = jnp.einsum('bhwn,bhwnc->bhwc', jnp.where(labelled, weights, 0), labels)
  return jnp.where(exists[..., None], flow, 0).astype(gt.dtype), exists


def object_score(corr, size_hw: Tuple[int, int]):
  """How much each target cell looks like the object: its best match in the source.

  CorrMatch's region propagation, for correspondence: a target cell whose best (mutual-NN
  filtered) correlation with any source cell is high has a counterpart in the other instance;
  background clutter mostly does not. The maximum over the source is min-max normalised per
  pair (CorrMatch thresholds at 0.5 after the same normalisation) and resized to the flow grid
  with the model's align-corners bilinear upsampling.

  Args:
    corr: [b, hs, ws, ht, wt] the teacher's filtered correlation (its `aux['corr']`).
    size_hw: (S_h, S_w), the flow grid.

  Returns:
    [b, S_h, S_w] in [0, 1]; 0 everywhere on a pair whose scores are all equal.
  """
  score = jnp.max(corr, axis=(1, 2))  # [b, ht, wt]
  lo = jnp.min(score, axis=(1, 2), keepdims=True)
  span = jnp.max(score, axis=(1, 2), keepdims=True) - lo
  norm = jnp.where(span > 0, (score - lo) / jnp.where(span > 0, span, 1), 0)
  my, mx = _resize_matrices(score.shape[1:], size_hw, norm.dtype)
  return jnp.einsum('bkl,Kk,Ll->bKL', norm, my, mx)


def cycle_consistent(flow, back_flow, delta: float):
  """The forward-backward check: a target cell, carried to the source by `flow` and back by
  `back_flow` (read there bilinearly, `geometry.sample_cells`), lands within `delta` cells.

  Args:
    flow: [b, S, S, 2] target -> source (cells).
    back_flow: [b, S, S, 2] source -> target (cells), the same network on the swapped pair.
    delta: cells.

  Returns:
    [b, S, S] bool.
  """
  _, h, w, _ = flow.shape
  ys, xs = jnp.meshgrid(
      jnp.arange(h, dtype=flow.dtype), jnp.arange(w, dtype=flow.dtype), indexing='ij'
  )
  there = jnp.stack([xs, ys], axis=-1) + flow
  miss = there + geometry.sample_cells(back_flow, there) - jnp.stack([xs, ys], axis=-1)
  return jnp.sum(jnp.square(miss), axis=-1) <= delta * delta


def confidence_gate(confidence, candidates, percentile):
  """The candidates at or above the `percentile`-th percentile of the candidates' confidence.

  Of the n candidates of the whole batch, the `floor(percentile * n / 100)` with the lowest
  confidence fail (ties: the first in row-major order fail first); the rest pass.

  Args:
    confidence: [b, S, S] float (the teacher's peak mass).
    candidates: [b, S, S] bool.
    percentile: () float in [0, 100], may be traced (this epoch's, `schedules`).

  Returns:
    [b, S, S] bool, a subset of `candidates`.
  """
  n = jnp.sum(candidates, dtype=jnp.int32)
  drop = jnp.floor(jnp.asarray(percentile, jnp.float32) * n / 100).astype(jnp.int32)
  return candidates & ~_smallest_k_mask(confidence, candidates, drop)


class PseudoLabels(NamedTuple):
  """What `pseudo_labels` hands the objective.

  Attributes:
    target: [b, S, S, 2] the pseudo-label flow (cells).
    candidates: [b, S, S] bool, the region.
    gate: [b, S, S] bool, the positions that pass the checks; None with no check.
  """

  target: jax.Array
  candidates: jax.Array
  gate: Optional[jax.Array]


def square_region(gt, dilation_kernel: Optional[int]):
  """The paper's region: `dilated_label_mask(gt, dilation_kernel)`; every position when the
  kernel is None (the "no mask" ablation). [b, S, S] bool."""
  if dilation_kernel is None:
    return jnp.ones(gt.shape[:-1], bool)
  return dilated_label_mask(gt, dilation_kernel)


def _region(
    options: PseudoLabelOptions,
    gt,
    labelled,
    signals: TeacherSignals,
    dilation_kernel: Optional[int],
):
  """[b, S, S] bool, the region of `options.region` (before the unlabelled-pair rule)."""
  if options.region == 'square':
    return square_region(gt, dilation_kernel)
  if options.region == 'affinity':
    return affinity_region(
        signals.affinity, labelled, options.affinity_threshold, options.affinity_top_k
    )
  return signals.object_score >= options.object_threshold


def pseudo_labels(
    options: PseudoLabelOptions,
    teacher_flow,
    gt,
    signals=None,
    percentile=0.0,
    dilation_kernel: Optional[int] = 7,
) -> PseudoLabels:
  """The region, gate and target of a teacher's pseudo-labels (`PseudoLabelOptions`).

  Pairs without any labelled position get no pseudo-label with `unlabelled_pairs='none'`,
  whatever the region (a square or an affinity region is empty there by construction); with
  'object_cycle' their region is the object region and their gate the cycle check (and
  `gate`'s checks). The confidence percentile ranks the candidates of the whole batch.

  Args:
    options: the static options.
    teacher_flow: [b, S, S, 2] the teacher's flow (cells), constant.
    gt: [b, S, S, 2] sparse ground truth.
    signals: `TeacherSignals` with every field the options need.
    percentile: () this epoch's confidence percentile (`StepHparams.confidence_percentile`).
    dilation_kernel: the square's side; None = every position (the no-mask ablation).

  Returns:
    `PseudoLabels`.
  """
  signals = signals or TeacherSignals()
  labelled = ~geometry.unlabelled_mask(gt)
  pair_labelled = jnp.any(labelled, axis=(1, 2))[:, None, None]
  region = _region(options, gt, labelled, signals, dilation_kernel)
  object_cycle = options.unlabelled_pairs == 'object_cycle'
  if object_cycle:
    region = jnp.where(pair_labelled, region, signals.object_score >= options.object_threshold)
  elif options.region != 'square' or dilation_kernel is None:
    region = region & pair_labelled  # The square is empty there already.
  cycle = (
      cycle_consistent(teacher_flow, signals.back_flow, options.cycle_delta)
      if options.needs_cycle
      else None
  )
  gate = cycle if 'cycle' in options.gates else None
  if 'confidence' in options.gates:
    confident = confidence_gate(signals.confidence, region, percentile)
    gate = confident if gate is None else gate & confident
  if object_cycle:
    unlabelled_gate = cycle if gate is None else cycle & gate
    gate = jnp.where(pair_labelled, True if gate is None else gate, unlabelled_gate)
  target = teacher_flow
  if options.target == 'propagated':
    propagated, exists = propagate_labels(signals.affinity, gt, options.propagation_temperature)
    mixed = options.propagation_mix * teacher_flow + (1 - options.propagation_mix) * propagated
    target = jnp.where(exists[..., None], mixed, teacher_flow)
  return PseudoLabels(target, region, gate)


# ------------------------------------------------------------------------------------------------
# The pseudo-label objective (one home: the 'st' and 'mt' steps and the training visualiser).


class PseudoLabelTerms(NamedTuple):
  """The parts of `pseudo_label_objective` for one network.

  Attributes:
    loss_sup: () float, sparse EPE on the labelled positions (0 without labels).
    loss_pseudo: () float, mean pseudo-label EPE over the `num_remember` positions of the
      candidate mask (and gate) that rank smallest (0 without candidates); unweighted.
    candidates: [b, h, w] bool, where the pseudo-label may act (the region: by default the
      dilated label mask).
    kept: [b, h, w] bool, the candidates that passed the gate and the small-loss selection
      kept (no gradient).
    num_remember: () int32, k (>= 1).
    num_candidates: () int32, n, the number of candidates.
    target: [b, h, w, 2] the pseudo-label (the teacher's flow, or a propagated target); None
      in terms built by hand.
  """

  loss_sup: jax.Array
  loss_pseudo: jax.Array
  candidates: jax.Array
  kept: jax.Array
  num_remember: jax.Array
  num_candidates: jax.Array
  target: Optional[jax.Array] = None

  @property
  def kept_fraction(self) -> jax.Array:
    """The fraction of candidates kept (k / n without a gate; 0 without candidates)."""
    n = self.num_candidates
    return jnp.where(n > 0, jnp.sum(self.kept, dtype=jnp.int32) / jnp.maximum(n, 1), 0.0)


def pseudo_label_objective(
    flow, peer_flow, gt, mask, remember_table: RateOrTable, weight, gate=None
):
  """One network's loss against a peer's (or a fixed teacher's) flow as pseudo-label.

      dist = ||stop_gradient(peer_flow) - flow||      per position, cells
      kept = the k = max(1, int(rate * n)) positions of `mask & gate` with the smallest dist,
             n = their number
      loss = labelled_epe(flow, gt) + weight * sum(dist[kept]) / k

  Without a gate this is the reference's `EPE_pseudo_filtered_by_dilation` +
  `loss_dynamic_selection`. The reference's selection is an exchange (each network averages
  its loss over the positions its *peer's* loss ranks smallest), but the pseudo-label distance
  is symmetric, `||b - a|| == ||a - b||` to the bit, so the peer ranks exactly the positions
  this network ranks: ranking `dist` itself is the exchange (`small_loss_selection` keeps the
  general two-loss form, checked against the reference fixture). The region, gate and target
  of the other strategies come from `pseudo_labels`.

  Args:
    flow: [b, h, w, 2] float, this network's flow (cells, target -> source); differentiated.
    peer_flow: [b, h, w, 2] float, the pseudo-label (the peer's or the teacher's flow, or a
      `pseudo_labels` target); used under `stop_gradient`.
    gt: [b, h, w, 2] float, sparse ground truth (unlabelled = exactly (0, 0)).
    mask: [b, h, w] bool, candidate positions (`dilated_label_mask`, or all True).
    remember_table: a `num_remember_table` (may be traced) or a host float rate.
    weight: λ, float or () array (0 before the pseudo-loss epoch).
    gate: optional [b, h, w] bool, the candidates the teacher's checks pass (`pseudo_labels`);
      the selection ranks only those.

  Returns:
    `(loss, PseudoLabelTerms)`.
  """
  mask = jnp.asarray(mask, bool)
  ranked = mask if gate is None else mask & jnp.asarray(gate, bool)
  dist = pseudo_label_epe(flow, peer_flow)
  table = _as_table(remember_table, mask.size)
  k = table[jnp.sum(ranked, dtype=jnp.int32)]
  kept = _smallest_k_mask(dist, ranked, k)
  # `where`, not multiplication: garbage (inf/NaN) outside the selection must not leak.
  loss_pseudo = jnp.sum(jnp.where(kept, dist, 0)) / k.astype(dist.dtype)
  loss_sup = labelled_epe(flow, gt)
  terms = PseudoLabelTerms(
      loss_sup,
      loss_pseudo,
      mask,
      kept,
      k,
      jnp.sum(mask, dtype=jnp.int32),
      lax.stop_gradient(peer_flow),
  )
  return loss_sup + weight * loss_pseudo, terms
