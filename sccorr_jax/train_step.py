"""The three learning modes of SCorrSAN as pure training steps (paper Sec. 3.3-3.4, Alg. 1).

Every step has the signature `(state, batch, rng, hparams) -> (state, metrics)`; the static
parts (model, optimiser, options) are bound with `functools.partial(step, step_config)` before
`jax.jit`. `hparams` (`schedules.StepHparams`: λ and the remember-count table) change once per
epoch with fixed shapes, so a new epoch never recompiles.

* `baseline_step`: sparse ground-truth EPE only.
* `single_teacher_step`: a fixed offline teacher (the baseline's weights, in `state.teacher`,
  never differentiated nor updated, run with its running BN statistics) provides pseudo-labels;
  the student trains on EPE + λ · selected pseudo-label EPE inside the dilated label mask.
* `mutual_teacher_step`: two models of one architecture whose parameters, BN statistics and
  optimiser states are stacked with a leading axis of 2; one compiled step forwards both, uses
  each one's stop-gradient flow as its peer's pseudo-label, applies the small-loss selection with
  exchange and updates both with a vmapped optimiser (nothing couples the two models).

BatchNorm (`StepConfig.batch_norm`): 'batch' trains with batch statistics, source and target
images normalised separately, and updates the running statistics (the reference); 'frozen' uses
and keeps the running statistics. Under `jax.jit` with a sharded batch, batch statistics and the
small-loss selection are computed over the global batch, exactly as on one device (the
reference's `DataParallel` computes BN statistics per device shard instead).

A step whose loss or gradients are not finite leaves the model it concerns unchanged (parameters,
statistics, optimiser state) and counts it: `state.nonfinite_streak` (consecutive such steps)
and `state.nonfinite_total`. The trainer stops the run when the streak grows too long.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from sccorr_jax import losses
from sccorr_jax.schedules import StepHparams

# Flow positions whose pseudo-label is within this distance (grid cells) of the ground truth
# count as correct pseudo-labels in the `pseudo_label_acc` metric.
PSEUDO_ACC_CELLS = 1.0

Metrics = Dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  """Everything a training step reads and writes.

  Attributes:
    step: () int32, optimiser steps taken (skipped non-finite steps included).
    params: the model's `params`; for 'mt', each leaf has a leading axis of 2 (model a, b).
    batch_stats: the model's BatchNorm running statistics (stacked like `params` for 'mt').
    opt_state: the optax state (stacked for 'mt', from a vmapped `tx.init`).
    teacher: 'st' only: the fixed teacher's `{'params', 'batch_stats'}`; None otherwise.
    nonfinite_streak: () int32, consecutive steps with a non-finite loss or gradient.
    nonfinite_total: () int32, all such steps.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  teacher: Any = None
  nonfinite_streak: jax.Array = dataclasses.field(
      default_factory=lambda: jnp.zeros((), jnp.int32))
  nonfinite_total: jax.Array = dataclasses.field(
      default_factory=lambda: jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static parts of a step (bound with `functools.partial`).

  Attributes:
    model: a `sccorr_jax.models.SCorrSAN`.
    tx: the optimiser (`schedules.make_optimizer`).
    batch_norm: 'batch' (batch statistics, running ones updated) or 'frozen'.
    dilation_kernel: odd side of the dilation of the labelled positions that bounds the
      pseudo-label loss; None = every position is a candidate (the "no mask" ablation).
  """
  model: Any
  tx: optax.GradientTransformation
  batch_norm: str = 'batch'
  dilation_kernel: Optional[int] = 7

  def __post_init__(self):
    if self.batch_norm not in ('batch', 'frozen'):
      raise ValueError(f"batch_norm must be 'batch' or 'frozen', got {self.batch_norm!r}")


# ------------------------------------------------------------------------------------------------
# Pieces shared by the steps.


def forward(cfg: StepConfig, params, batch_stats, batch, train: bool = True):
  """One model's flow on a batch, and its BatchNorm statistics after the call.

  Args:
    cfg: the step config (model, BatchNorm mode).
    params, batch_stats: one model's variables.
    batch: dict with `src_img`, `trg_img` [b, H, W, 3] float32.
    train: training call; BN follows `cfg.batch_norm`. False: running statistics (eval).

  Returns:
    `(flow [b, S, S, 2] float32 (cells, target -> source), batch_stats)`.
  """
  variables = {'params': params, 'batch_stats': batch_stats}
  if train and cfg.batch_norm == 'batch':
    flow, updates = cfg.model.apply(variables, batch['src_img'], batch['trg_img'], train=True,
                                    mutable=['batch_stats'])
    return flow, updates['batch_stats']
  return cfg.model.apply(variables, batch['src_img'], batch['trg_img'], train=False), batch_stats


def candidate_mask(cfg: StepConfig, gt):
  """[b, S, S] bool: where the pseudo-label loss may act (dilated label mask or everywhere)."""
  if cfg.dilation_kernel is None:
    return jnp.ones(gt.shape[:-1], bool)
  return losses.dilated_label_mask(gt, cfg.dilation_kernel)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _select(ok, new, old):
  """`new` where `ok` else `old`, leaf by leaf; `ok` is () or [m] (leading model axis)."""
  def pick(n, o):
    k = jnp.reshape(ok, ok.shape + (1,) * (jnp.ndim(n) - ok.ndim))
    return jnp.where(k, n, o)
  return jax.tree.map(pick, new, old)


def _apply_updates(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _commit(state: TrainState, ok, params, batch_stats, opt_state) -> TrainState:
  """The new state, keeping the old values of every model whose step was not finite."""
  all_ok = jnp.all(ok)

  def keep_finite(new, old):
    return tuple(_select(ok, n, o) for n, o in zip(new, old))

  # One conditional rather than a per-leaf `where` fused into the optimiser update: XLA:CPU
  # compiled the latter for minutes (mt: 275 s -> 39 s, compile-time memory 11.3 -> 2.7 GiB).
  params, batch_stats, opt_state = jax.lax.cond(
      all_ok, lambda new, old: new, keep_finite, (params, batch_stats, opt_state),
      (state.params, state.batch_stats, state.opt_state))
  return state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      nonfinite_streak=jnp.where(all_ok, 0, state.nonfinite_streak + 1).astype(jnp.int32),
      nonfinite_total=(state.nonfinite_total + (~all_ok).astype(jnp.int32)))


def _pseudo_label_acc(pseudo_label, gt):
  """Fraction of labelled positions where the pseudo-label is within 1 cell of the label."""
  labelled = ~jnp.all(gt == 0, axis=-1)
  close = losses.safe_norm(pseudo_label - gt, axis=-1) <= PSEUDO_ACC_CELLS
  return jnp.sum(close & labelled) / jnp.maximum(jnp.sum(labelled), 1)


def _state_metrics(state: TrainState) -> Metrics:
  return {'nonfinite_streak': state.nonfinite_streak, 'nonfinite_total': state.nonfinite_total}


# ------------------------------------------------------------------------------------------------
# Baseline: sparse ground truth only.


def baseline_step(cfg: StepConfig, state: TrainState, batch, rng, hparams: StepHparams
                  ) -> Tuple[TrainState, Metrics]:
  """One supervised step: sparse EPE on the keypoint-derived flow labels.

  Args:
    cfg: static config.
    state: a single-model `TrainState`.
    batch: the batch contract's `src_img`, `trg_img` [b, H, W, 3] and `flow` [b, S, S, 2].
    rng: PRNG key (unused: the network has no stochastic layer; kept for a uniform signature).
    hparams: unused by this mode.

  Returns:
    `(state, metrics)`; metrics `loss`, `loss_sup`, `nonfinite`, `nonfinite_streak`,
    `nonfinite_total`.
  """
  del rng, hparams

  def loss_fn(params):
    flow, batch_stats = forward(cfg, params, state.batch_stats, batch)
    loss = losses.sparse_epe(flow, batch['flow'])
    return loss, batch_stats

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  ok = jnp.isfinite(loss) & _all_finite(grads)
  params, opt_state = _apply_updates(cfg.tx, grads, state.opt_state, state.params)
  state = _commit(state, ok, params, batch_stats, opt_state)
  metrics = {'loss': loss, 'loss_sup': loss, 'nonfinite': ~ok}
  metrics.update(_state_metrics(state))
  return state, metrics


# ------------------------------------------------------------------------------------------------
# A student against a given pseudo-label flow (the single-teacher step, and the per-model half of
# the mutual-teacher step).


def student_objective(cfg: StepConfig, params, batch_stats, batch, teacher_flow,
                      hparams: StepHparams):
  """Loss of one model against a constant pseudo-label flow, and its parts.

  Args:
    cfg: static config.
    params, batch_stats: the student's variables.
    batch: `src_img`, `trg_img`, `flow` (sparse label).
    teacher_flow: [b, S, S, 2] the pseudo-label (under `stop_gradient`).
    hparams: λ and the remember-count table.

  Returns:
    `(loss, (batch_stats, aux))`, aux with `loss_sup`, `loss_pseudo`, `kept_fraction`,
    `pseudo_label_acc`.
  """
  flow, batch_stats = forward(cfg, params, batch_stats, batch)
  gt = batch['flow']
  loss_sup = losses.sparse_epe(flow, gt)
  mask = candidate_mask(cfg, gt)
  vec = losses.pseudo_label_epe(flow, teacher_flow)
  sel = losses.small_loss_selection_with_masks(vec, vec, mask, hparams.remember_table)
  loss = loss_sup + hparams.pseudo_weight * sel.loss_a
  n = sel.num_candidates
  aux = {'loss_sup': loss_sup, 'loss_pseudo': sel.loss_a,
         'kept_fraction': jnp.where(n > 0, sel.num_remember / jnp.maximum(n, 1), 0.0),
         'pseudo_label_acc': _pseudo_label_acc(jax.lax.stop_gradient(teacher_flow), gt)}
  return loss, (batch_stats, aux)


def student_update(cfg: StepConfig, state: TrainState, batch, teacher_flow,
                   hparams: StepHparams) -> Tuple[TrainState, Metrics]:
  """One optimiser step of a single model against a given pseudo-label flow."""
  grad_fn = jax.value_and_grad(student_objective, argnums=1, has_aux=True)
  (loss, (batch_stats, aux)), grads = grad_fn(cfg, state.params, state.batch_stats, batch,
                                               teacher_flow, hparams)
  ok = jnp.isfinite(loss) & _all_finite(grads)
  params, opt_state = _apply_updates(cfg.tx, grads, state.opt_state, state.params)
  state = _commit(state, ok, params, batch_stats, opt_state)
  metrics = dict(aux, loss=loss, nonfinite=~ok)
  metrics.update(_state_metrics(state))
  return state, metrics


def single_teacher_step(cfg: StepConfig, state: TrainState, batch, rng, hparams: StepHparams
                        ) -> Tuple[TrainState, Metrics]:
  """One step of a student taught by a fixed offline teacher (`state.teacher`).

  1. The teacher's flow on the batch (running BN statistics, `stop_gradient`): the pseudo-label.
  2. The student's EPE on the sparse labels + λ · the mean of its k smallest distances to the
     pseudo-label inside the dilated label mask.
  3. Gradient and update of the student only; the teacher is never touched.
  """
  del rng
  teacher_flow, _ = forward(cfg, state.teacher['params'], state.teacher['batch_stats'], batch,
                            train=False)
  return student_update(cfg, state, batch, jax.lax.stop_gradient(teacher_flow), hparams)


# ------------------------------------------------------------------------------------------------
# Mutual online teachers.


def forward_pair(cfg: StepConfig, params_ab, batch_stats_ab, batch):
  """Both models' flows: `(flow_a, flow_b, batch_stats_ab)` from stacked [2, ...] variables.

  The two forwards are unrolled rather than `jax.vmap`ped: a vmap over the parameters turns
  every convolution into a batched-kernel convolution, which XLA:CPU runs several times slower
  than two plain ones (measured: 1.0 s vs 0.4 s per demo step). The numbers are the same.
  """
  flows, stats = [], []
  for i in range(2):
    take = lambda x, i=i: x[i]
    flow, s = forward(cfg, jax.tree.map(take, params_ab), jax.tree.map(take, batch_stats_ab),
                      batch)
    flows.append(flow)
    stats.append(s)
  return flows[0], flows[1], jax.tree.map(lambda a, b: jnp.stack([a, b]), *stats)


def mutual_teacher_step(cfg: StepConfig, state: TrainState, batch, rng, hparams: StepHparams
                        ) -> Tuple[TrainState, Metrics]:
  """One step of two mutual online teachers, a and b (leading axis 2 of the state).

  Args:
    cfg: static config.
    state: `TrainState` whose `params`, `batch_stats`, `opt_state` leaves are stacked [2, ...].
    batch: `src_img`, `trg_img` [b, H, W, 3], `flow` [b, S, S, 2].
    rng: unused (no stochastic layer).
    hparams: λ and the remember-count table of this epoch.

  Returns:
    `(state, metrics)`; metrics `a/loss`, `a/loss_sup`, `a/loss_pseudo`, `a/kept_fraction`,
    `a/pseudo_label_acc`, the same for `b/`, `nonfinite` and the streak counters.
  """
  del rng
  gt = batch['flow']

  def objective(params_ab):
    # 1. Forward both networks on the same batch.
    flow_a, flow_b, batch_stats = forward_pair(cfg, params_ab, state.batch_stats, batch)
    # 2. Sparse EPE of each network on the labelled keypoint positions.
    sup_a, sup_b = losses.sparse_epe(flow_a, gt), losses.sparse_epe(flow_b, gt)
    # 3. Each network's flow, without gradient, is the pseudo-label of its peer.
    vec_a = losses.pseudo_label_epe(flow_a, jax.lax.stop_gradient(flow_b))
    vec_b = losses.pseudo_label_epe(flow_b, jax.lax.stop_gradient(flow_a))
    # 4. Only positions inside the dilated keypoint mask are candidates.
    mask = candidate_mask(cfg, gt)
    # 5. Small-loss selection with exchange: each network averages its loss over the k positions
    #    its peer's loss ranks smallest (k from this epoch's remember rate).
    sel = losses.small_loss_selection_with_masks(vec_a, vec_b, mask, hparams.remember_table)
    # 6. Total = supervised + λ · pseudo (λ = 0 before the pseudo-loss epoch).
    loss_a = sup_a + hparams.pseudo_weight * sel.loss_a
    loss_b = sup_b + hparams.pseudo_weight * sel.loss_b
    # The peers enter each other's loss only as constants, so the gradient of the sum w.r.t.
    # the stacked parameters is each network's gradient of its own loss.
    n = sel.num_candidates
    kept = jnp.where(n > 0, sel.num_remember / jnp.maximum(n, 1), 0.0)
    aux = {'loss': jnp.stack([loss_a, loss_b]), 'loss_sup': jnp.stack([sup_a, sup_b]),
           'loss_pseudo': jnp.stack([sel.loss_a, sel.loss_b]),
           'kept_fraction': jnp.stack([kept, kept]),
           'pseudo_label_acc': jnp.stack([
               _pseudo_label_acc(jax.lax.stop_gradient(flow_b), gt),
               _pseudo_label_acc(jax.lax.stop_gradient(flow_a), gt)])}
    return loss_a + loss_b, (batch_stats, aux)

  # 7. Gradients and optimiser updates of each network (vmapped: the optimiser of one never sees
  #    the other's gradients); a non-finite model keeps its old state.
  (_, (batch_stats, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  ok = jnp.isfinite(aux['loss']) & jax.vmap(_all_finite)(grads)
  params, opt_state = jax.vmap(lambda g, o, p: _apply_updates(cfg.tx, g, o, p))(
      grads, state.opt_state, state.params)
  state = _commit(state, ok, params, batch_stats, opt_state)
  metrics = {f'{m}/{k}': v[i] for k, v in aux.items() for i, m in enumerate('ab')}
  metrics['nonfinite'] = ~jnp.all(ok)
  metrics.update(_state_metrics(state))
  return state, metrics


STEPS = {'baseline': baseline_step, 'st': single_teacher_step, 'mt': mutual_teacher_step}


def get_step_fn(learning_mode: str):
  """The step function of a learning mode ('baseline' | 'st' | 'mt')."""
  if learning_mode not in STEPS:
    raise ValueError(f'learning_mode must be one of {tuple(STEPS)}, got {learning_mode!r}')
  return STEPS[learning_mode]
