"""The learning modes of SCorrSAN as pure training steps (paper Sec. 3.3-3.4, Alg. 1), and the
dense-truth oracle.

Every step has the signature `(state, batch, hparams) -> (state, metrics)`; the static
parts (model, optimiser, options) are bound with `functools.partial(step, step_config)` before
`jax.jit`. `hparams` (`schedules.StepHparams`: λ, the remember-count table, the confidence
percentile) change once per epoch with fixed shapes, so a new epoch never recompiles.

* `baseline_step`: sparse ground-truth EPE only.
* `dense_step`: EPE on the dense ground truth wherever it is valid (datasets that have one):
  the oracle of the pseudo-label schemes, and the pretraining objective.
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
statistics, optimiser state) and counts it (`apply_if_finite`): `state.nonfinite_streak`
(consecutive such steps) and `state.nonfinite_total`. The trainer stops the run when the streak
grows too long.

Pseudo-labels (`StepConfig.pseudo_label`, the config's `teacher.region`, `teacher.gate`,
`teacher.target`, `teacher.unlabelled_pairs`): by default the paper's (the dilated square, the
small-loss selection, the teacher's flow), and then the step compiles to what it always did.
Other options read more of the teacher (`teacher_signals`: its features and correlation from
the forward it runs anyway, its peak mass, its flow on the swapped pair), always as constants;
the region, gate and target are assembled in `losses.pseudo_labels`. The confidence gate's
percentile changes per epoch in `hparams` (no recompilation).

Pseudo-label quality (`pseudo_label_metrics`, logged only): against the dense ground truth when
a batch carries it (the embedded benchmarks), else against the withheld keypoints of a label
budget, the error and accuracy of the pseudo-labels the selection kept and of those it
rejected, and the recall of the right ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from sccorr_jax import geometry
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
  nonfinite_streak: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  nonfinite_total: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static parts of a step (bound with `functools.partial`).

  Attributes:
    model: a `sccorr_jax.models.SCorrSAN`.
    tx: the optimiser (`schedules.make_optimizer`).
    batch_norm: 'batch' (batch statistics, running ones updated) or 'frozen'.
    dilation_kernel: odd side of the dilation of the labelled positions that bounds the
      pseudo-label loss; None = every position is a candidate (the "no mask" ablation).
    pseudo_label: the region, gate and target options (`losses.PseudoLabelOptions`; default
      the paper's: the dilated square, the small-loss selection, the teacher's flow).
  """

  model: Any
  tx: optax.GradientTransformation
  batch_norm: str = 'batch'
  dilation_kernel: Optional[int] = 7
  pseudo_label: losses.PseudoLabelOptions = losses.PseudoLabelOptions()

  def __post_init__(self):
    if self.batch_norm not in ('batch', 'frozen'):
      raise ValueError(f"batch_norm must be 'batch' or 'frozen', got {self.batch_norm!r}")

  @classmethod
  def from_config(
      cls, config, model, tx: optax.GradientTransformation, **overrides
  ) -> 'StepConfig':
    """The step config of an experiment config (`model.batch_norm`, `teacher.dilation_kernel`;
    a kernel of 0 or None means no mask: every position is a candidate; the pseudo-label
    options of `pseudo_label_options`)."""
    kwargs = dict(
        model=model,
        tx=tx,
        batch_norm=config.model.batch_norm,
        dilation_kernel=config.teacher.dilation_kernel or None,
        pseudo_label=pseudo_label_options(config.teacher),
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def pseudo_label_options(teacher_config) -> losses.PseudoLabelOptions:
  """`losses.PseudoLabelOptions` from the `teacher` section (`teacher.region`, `teacher.gate`,
  `teacher.target`, `teacher.unlabelled_pairs` and their parameters); a key the section lacks
  (a config saved before it existed) takes the default.

  Raises:
    ValueError: an unknown value or a parameter out of range, naming the key.
  """
  defaults = losses.PseudoLabelOptions()
  return losses.PseudoLabelOptions(
      **{
          f.name: teacher_config.get(f.name, getattr(defaults, f.name))
          for f in dataclasses.fields(losses.PseudoLabelOptions)
      }
  )


# ------------------------------------------------------------------------------------------------
# Pieces shared by the steps.


def forward(
    cfg: StepConfig, params, batch_stats, batch, train: bool = True, return_aux: bool = False
):
  """One model's flow on a batch, and its BatchNorm statistics after the call.

  Args:
    cfg: the step config (model, BatchNorm mode).
    params, batch_stats: one model's variables.
    batch: dict with `src_img`, `trg_img` [b, H, W, 3] float32.
    train: training call; BN follows `cfg.batch_norm`. False: running statistics (eval).
    return_aux: also return the model's intermediate tensors (`SCorrSAN(return_aux=True)`:
      `trg_ctx`, `corr`, ...), for the pseudo-label options that read them.

  Returns:
    `(flow [b, S, S, 2] float32 (cells, target -> source), batch_stats)`, and the aux dict
    third with `return_aux`.
  """
  variables = {'params': params, 'batch_stats': batch_stats}
  kwargs = {'return_aux': True} if return_aux else {}  # The default call stays the same.
  if train and cfg.batch_norm == 'batch':
    out, updates = cfg.model.apply(
        variables, batch['src_img'], batch['trg_img'], train=True, mutable=['batch_stats'], **kwargs
    )
    batch_stats = updates.get('batch_stats', batch_stats)
  else:
    out = cfg.model.apply(variables, batch['src_img'], batch['trg_img'], train=False, **kwargs)
  return (out[0], batch_stats, out[1]) if return_aux else (out, batch_stats)


def candidate_mask(cfg: StepConfig, gt):
  """[b, S, S] bool: the paper's region, the dilated label mask (everywhere without a kernel).

  The other regions (`teacher.region`) read the teacher too: `losses.pseudo_labels`."""
  return losses.square_region(gt, cfg.dilation_kernel)


def teacher_signals(
    cfg: StepConfig, params, batch_stats, batch, teacher_flow, aux, train: bool
) -> Optional[losses.TeacherSignals]:
  """What the pseudo-label options read from a teacher besides its flow (constants).

  Computed only for the options that need them (`cfg.pseudo_label`); None for the paper's.
  Parameters, statistics and aux enter under `stop_gradient`, so nothing here is
  differentiated, also inside the mutual teachers' objective.

  Args:
    cfg: the step config.
    params, batch_stats: the teacher's variables.
    batch: the training batch (`src_img`, `trg_img`).
    teacher_flow: [b, S, S, 2] its flow on the batch.
    aux: its forward's aux dict (`forward(.., return_aux=True)`), or None when no option
      reads it.
    train: how its forward ran (the swapped pair of the cycle check runs the same way; its
      BatchNorm statistics are dropped).

  Returns:
    `losses.TeacherSignals`, or None. Extra cost per teacher: the affinity windows and the
    foreground score are small; the confidence recomputes the upsampled soft-argmax (forward
    only); the cycle check is a second forward of the teacher (forward only).
  """
  opts = cfg.pseudo_label
  if not opts.needs_signals:
    return None
  params, batch_stats, aux = jax.lax.stop_gradient((params, batch_stats, aux))
  size_hw = teacher_flow.shape[1:3]
  signals = {}
  if opts.needs_affinity:
    signals['affinity'] = losses.affinity_windows(aux['trg_ctx'], size_hw, opts.affinity_radius)
  if opts.needs_object:
    signals['object_score'] = losses.object_score(aux['corr'], size_hw)
  if opts.needs_confidence:
    signals['confidence'] = cfg.model.apply(
        {'params': params, 'batch_stats': batch_stats},
        aux['corr'],
        opts.confidence_radius,
        method='peak_mass',
    )
  if opts.needs_cycle:
    swapped = dict(batch, src_img=batch['trg_img'], trg_img=batch['src_img'])
    signals['back_flow'] = forward(cfg, params, batch_stats, swapped, train=train)[0]
  return losses.TeacherSignals(**signals)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _select(ok, new, old):
  """`new` where `ok` else `old`, leaf by leaf; `ok` is () or [m] (leading model axis)."""

  def pick(n, o):
    k = jnp.reshape(ok, ok.shape + (1,) * (jnp.ndim(n) - ok.ndim))
    return jnp.where(k, n, o)

  return jax.tree.map(pick, new, old)


def apply_if_finite(
    cfg: StepConfig,
    state: TrainState,
    loss,
    grads,
    batch_stats,
    stacked: bool = False,
    labelled=True,
) -> Tuple[TrainState, jax.Array]:
  """The optimiser update, kept only for the models whose loss and gradients are finite.

  Args:
    cfg: static config (its `tx`).
    state: the state before the step.
    loss: () float, or [m] (one per stacked model).
    grads: gradients with the structure of `state.params`.
    batch_stats: the BatchNorm statistics after the forward.
    stacked: `state` holds m models stacked on a leading axis (the mutual teachers); the
      optimiser is vmapped over them so that nothing couples the models.
    labelled: () bool, whether the batch has any label; a batch without one (possible with
      `data.labelled_pair_fraction < 1`) changes nothing and is not counted as non-finite.

  Returns:
    `(new_state, ok)`: every model whose step was not finite keeps its parameters, statistics
    and optimiser state; `step` advances and the non-finite counters are updated. `ok` is
    () bool, or [m].
  """

  def finite(l, g):
    return jnp.isfinite(l) & _all_finite(g)

  def update(g, o, p):
    updates, o = cfg.tx.update(g, o, p)
    return optax.apply_updates(p, updates), o

  if stacked:
    ok = jax.vmap(finite)(loss, grads)
    params, opt_state = jax.vmap(update)(grads, state.opt_state, state.params)
  else:
    ok = finite(loss, grads)
    params, opt_state = update(grads, state.opt_state, state.params)
  all_ok = jnp.all(ok)
  apply = ok & labelled

  def keep_finite(new, old):
    return tuple(_select(apply, n, o) for n, o in zip(new, old))

  # One conditional rather than a per-leaf `where` fused into the optimiser update: XLA:CPU
  # compiled the latter for minutes (mt: 275 s -> 39 s, compile-time memory 11.3 -> 2.7 GiB).
  params, batch_stats, opt_state = jax.lax.cond(
      jnp.all(apply),
      lambda new, old: new,
      keep_finite,
      (params, batch_stats, opt_state),
      (state.params, state.batch_stats, state.opt_state),
  )
  state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      nonfinite_streak=jnp.where(all_ok, 0, state.nonfinite_streak + 1).astype(jnp.int32),
      nonfinite_total=(state.nonfinite_total + (~all_ok).astype(jnp.int32)),
  )
  return state, ok


def _has_labels(batch) -> jax.Array:
  return jnp.any(~geometry.unlabelled_mask(batch['flow']))


def _state_metrics(state: TrainState, ok) -> Metrics:
  return {
      'nonfinite': ~jnp.all(ok),
      'nonfinite_streak': state.nonfinite_streak,
      'nonfinite_total': state.nonfinite_total,
  }


# ------------------------------------------------------------------------------------------------
# Pseudo-label metrics (logged; never part of a loss).


def _withheld_truth(batch, grid_hw: Tuple[int, int]):
  """The withheld keypoints as a truth map: `(flow [b, S, S, 2] cells, valid [b, S, S])`.

  Each withheld target keypoint marks the flow cell it falls in (cell side = image side / S),
  whose true flow is `(src - trg) / cell side`; other cells are invalid.
  """
  trg, src = batch['withheld_trg_kps'], batch['withheld_src_kps']
  valid = jnp.asarray(batch['withheld_kps_valid'], bool)
  h, w = grid_hw
  cell = jnp.asarray([batch['src_img'].shape[2] / w, batch['src_img'].shape[1] / h], trg.dtype)
  xy = jnp.floor(trg / cell).astype(jnp.int32)
  x = jnp.clip(xy[..., 0], 0, w - 1)
  y = jnp.where(valid, jnp.clip(xy[..., 1], 0, h - 1), h)  # Row h: dropped by the scatter.
  rows = jnp.arange(trg.shape[0])[:, None]
  flow = (
      jnp.zeros((trg.shape[0], h, w, 2), trg.dtype)
      .at[rows, y, x]
      .set((src - trg) / cell, mode='drop')
  )
  mask = jnp.zeros((trg.shape[0], h, w), bool).at[rows, y, x].set(True, mode='drop')
  return flow, mask


def pseudo_label_truth(batch) -> Optional[Tuple[jax.Array, jax.Array]]:
  """What the pseudo-labels are measured against: `(flow [b, S, S, 2], valid [b, S, S])`.

  Per pair, the dense ground truth (`dense_flow`, `dense_valid`: the embedded benchmarks) when
  it has any, else the keypoints the label budget withheld from the loss (`withheld_*`, e.g.
  SPair-71k with `data.keypoints_per_pair`); None when the batch has neither. Cells of the flow
  grid; a truth is never seen by a loss.
  """
  grid = batch['flow'].shape[1:3]
  dense = withheld = None
  if 'dense_flow' in batch:
    dense = batch['dense_flow'], jnp.asarray(batch['dense_valid'], bool)
  if 'withheld_trg_kps' in batch:
    withheld = _withheld_truth(batch, grid)
  if dense is None or withheld is None:
    return dense or withheld
  has_dense = jnp.any(dense[1], axis=(1, 2))
  flow = jnp.where(has_dense[:, None, None, None], dense[0], withheld[0])
  return flow, jnp.where(has_dense[:, None, None], dense[1], withheld[1])


def _masked_mean(x, mask):
  """Mean of `x` over `mask`; NaN when the mask is empty (a logging window skips NaN)."""
  n = jnp.sum(mask)
  return jnp.where(n > 0, jnp.sum(jnp.where(mask, x, 0)) / jnp.maximum(n, 1), jnp.nan)


def pseudo_label_metrics(terms: losses.PseudoLabelTerms, pseudo_label, batch) -> Metrics:
  """How good the pseudo-labels a network learns from are.

  Args:
    terms: that network's `losses.pseudo_label_objective` terms (candidates, kept, and the
      pseudo-label it learnt from, `target`).
    pseudo_label: [b, S, S, 2] the flow it learns from (its peer's or the teacher's), used
      when `terms.target` is None (terms made by hand).
    batch: the training batch; `flow` (sparse label) and, if present, the truth of
      `pseudo_label_truth`.

  Returns:
    `loss_sup`, `loss_pseudo`, `kept_fraction`; `pseudo_label_acc` (within
    `PSEUDO_ACC_CELLS` of the sparse label, over labelled positions); and with a truth,
    `pseudo_kept_epe`, `pseudo_kept_acc` (over the kept candidates with a true match),
    `pseudo_rejected_epe`, `pseudo_rejected_acc` (candidates the gate or the selection
    dropped) and `pseudo_recall` (of the candidates whose pseudo-label is right, within
    `PSEUDO_ACC_CELLS` of the truth, the fraction kept). The pseudo-label is the teacher's
    flow, or the propagated target with `teacher.target='propagated'`.
  """
  if terms.target is not None:
    pseudo_label = terms.target
  pseudo_label = jax.lax.stop_gradient(pseudo_label)
  gt = batch['flow']
  labelled = ~geometry.unlabelled_mask(gt)
  close = losses.safe_norm(pseudo_label - gt, axis=-1) <= PSEUDO_ACC_CELLS
  out = {
      'loss_sup': terms.loss_sup,
      'loss_pseudo': terms.loss_pseudo,
      'kept_fraction': terms.kept_fraction,
      'pseudo_label_acc': jnp.sum(close & labelled) / jnp.maximum(jnp.sum(labelled), 1),
  }
  truth = pseudo_label_truth(batch)
  if truth is not None:
    true_flow, valid = truth
    err = losses.safe_norm(pseudo_label - true_flow, axis=-1)
    right = err <= PSEUDO_ACC_CELLS
    kept = terms.kept & valid
    rejected = terms.candidates & ~terms.kept & valid
    out.update(
        pseudo_kept_epe=_masked_mean(err, kept),
        pseudo_kept_acc=_masked_mean(right, kept),
        pseudo_rejected_epe=_masked_mean(err, rejected),
        pseudo_rejected_acc=_masked_mean(right, rejected),
        pseudo_recall=_masked_mean(terms.kept, terms.candidates & valid & right),
    )
  return out


# ------------------------------------------------------------------------------------------------
# Baseline: sparse ground truth only.


def _supervised_step(
    cfg: StepConfig, state: TrainState, batch, label_loss, labelled
) -> Tuple[TrainState, Metrics]:
  """One step on a supervised loss `label_loss(flow) -> ()` alone (baseline, dense)."""

  def loss_fn(params):
    flow, batch_stats = forward(cfg, params, state.batch_stats, batch)
    return label_loss(flow), batch_stats

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state, ok = apply_if_finite(cfg, state, loss, grads, batch_stats, labelled=labelled)
  return state, {'loss': loss, 'loss_sup': loss, **_state_metrics(state, ok)}


def baseline_step(
    cfg: StepConfig, state: TrainState, batch, hparams: StepHparams
) -> Tuple[TrainState, Metrics]:
  """One supervised step: sparse EPE on the keypoint-derived flow labels.

  Args:
    cfg: static config.
    state: a single-model `TrainState`.
    batch: the batch contract's `src_img`, `trg_img` [b, H, W, 3] and `flow` [b, S, S, 2].
    hparams: unused by this mode.

  Returns:
    `(state, metrics)`; metrics `loss`, `loss_sup`, `nonfinite`, `nonfinite_streak`,
    `nonfinite_total`.
  """
  del hparams
  return _supervised_step(
      cfg,
      state,
      batch,
      lambda flow: losses.labelled_epe(flow, batch['flow']),
      labelled=_has_labels(batch),
  )


def dense_step(
    cfg: StepConfig, state: TrainState, batch, hparams: StepHparams
) -> Tuple[TrainState, Metrics]:
  """One step on the dense ground truth: EPE over every position where it is valid.

  The oracle of every pseudo-label scheme (perfect pseudo-labels everywhere the truth is
  known) and the pretraining objective (`configs/pretrain.py`). The sparse labels (`flow`) are
  not used; the mean runs over the valid positions of the whole batch, each counted once.

  Args:
    cfg: static config.
    state: a single-model `TrainState`.
    batch: `src_img`, `trg_img` [b, H, W, 3], `dense_flow` [b, S, S, 2] (cells) and
      `dense_valid` [b, S, S] bool (datasets with a dense truth: `parts`, `synthetic`).
    hparams: unused by this mode.

  Returns:
    `(state, metrics)` as `baseline_step`; a batch with no valid position changes nothing.
  """
  del hparams
  valid = jnp.asarray(batch['dense_valid'], bool)
  return _supervised_step(
      cfg,
      state,
      batch,
      lambda flow: losses.masked_epe(flow, batch['dense_flow'], valid),
      labelled=jnp.any(valid),
  )


# ------------------------------------------------------------------------------------------------
# A student against a given pseudo-label flow (the single-teacher step, and each half of the
# mutual-teacher step).


def _pseudo_objective(
    cfg: StepConfig,
    flow,
    teacher_flow,
    batch,
    hparams: StepHparams,
    signals: Optional[losses.TeacherSignals] = None,
    known=None,
):
  """`losses.pseudo_label_objective` on the region, gate and target of `cfg.pseudo_label`;
  `known` [b, S, S] bool (the truth teacher's `dense_valid`) bounds the candidates."""
  gt = batch['flow']
  labels = losses.pseudo_labels(
      cfg.pseudo_label,
      teacher_flow,
      gt,
      signals,
      hparams.confidence_percentile,
      cfg.dilation_kernel,
  )
  candidates = labels.candidates if known is None else labels.candidates & known
  return losses.pseudo_label_objective(
      flow,
      labels.target,
      gt,
      candidates,
      hparams.remember_table,
      hparams.pseudo_weight,
      gate=labels.gate,
  )


def _has_signal(cfg: StepConfig, batch, kept, hparams: StepHparams) -> jax.Array:
  """() bool: the batch teaches something. Labels, or (with unlabelled pairs taught by the
  object region, `teacher.unlabelled_pairs='object_cycle'`) a weighted kept pseudo-label: a
  batch of unlabelled pairs then trains too. Else a batch without labels changes nothing."""
  labelled = _has_labels(batch)
  if cfg.pseudo_label.unlabelled_pairs == 'object_cycle':
    labelled = labelled | ((hparams.pseudo_weight > 0) & jnp.any(kept))
  return labelled


def student_objective(
    cfg: StepConfig,
    params,
    batch_stats,
    batch,
    teacher_flow,
    hparams: StepHparams,
    signals: Optional[losses.TeacherSignals] = None,
    known=None,
):
  """Loss of one model against a constant pseudo-label flow (and the teacher's `signals`
  that `cfg.pseudo_label` reads; `teacher_signals`); `known`: where the teacher's flow is
  defined (None: everywhere).

  Returns:
    `(loss, (batch_stats, terms))`, terms a `losses.PseudoLabelTerms`.
  """
  flow, batch_stats = forward(cfg, params, batch_stats, batch)
  loss, terms = _pseudo_objective(cfg, flow, teacher_flow, batch, hparams, signals, known)
  return loss, (batch_stats, terms)


def student_update(
    cfg: StepConfig,
    state: TrainState,
    batch,
    teacher_flow,
    hparams: StepHparams,
    signals: Optional[losses.TeacherSignals] = None,
    known=None,
) -> Tuple[TrainState, Metrics]:
  """One optimiser step of a single model against a given pseudo-label flow."""
  grad_fn = jax.value_and_grad(student_objective, argnums=1, has_aux=True)
  (loss, (batch_stats, terms)), grads = grad_fn(
      cfg, state.params, state.batch_stats, batch, teacher_flow, hparams, signals, known
  )
  state, ok = apply_if_finite(
      cfg, state, loss, grads, batch_stats, labelled=_has_signal(cfg, batch, terms.kept, hparams)
  )
  metrics = pseudo_label_metrics(terms, teacher_flow, batch)
  return state, {'loss': loss, **metrics, **_state_metrics(state, ok)}


def single_teacher_step(
    cfg: StepConfig, state: TrainState, batch, hparams: StepHparams
) -> Tuple[TrainState, Metrics]:
  """One step of a student taught by a fixed offline teacher (`state.teacher`).

  1. The teacher's flow on the batch (running BN statistics, `stop_gradient`): the pseudo-label;
     and what the pseudo-label options read from it (`teacher_signals`; none by default).
  2. The student's EPE on the sparse labels + λ · the mean of its k smallest distances to the
     pseudo-label inside the dilated label mask (`losses.pseudo_label_objective`; the region,
     gate and target of `cfg.pseudo_label`).
  3. Gradient and update of the student only; the teacher is never touched.
  """
  teacher = (state.teacher['params'], state.teacher['batch_stats'])
  aux = cfg.pseudo_label.needs_teacher_aux
  out = forward(cfg, *teacher, batch, train=False, return_aux=aux)
  teacher_flow = jax.lax.stop_gradient(out[0])
  signals = teacher_signals(
      cfg, *teacher, batch, teacher_flow, out[2] if aux else None, train=False
  )
  return student_update(cfg, state, batch, teacher_flow, hparams, signals)


def truth_teacher_step(
    cfg: StepConfig, state: TrainState, batch, hparams: StepHparams
) -> Tuple[TrainState, Metrics]:
  """The single-teacher step with the exact dense truth as its teacher: the ceiling of the
  paper's pseudo-labels (perfect pseudo-labels where the method lets them stand).

  The student's objective of `single_teacher_step` unchanged (sparse EPE + λ · the small-loss
  selection inside the dilated label mask, λ and the remember rate on their schedules), the
  teacher's flow replaced by `dense_flow`, and the candidates limited to where it is known
  (`dense_valid`). Only the paper's region, gate and target (the others read a teacher
  network); datasets with a dense truth.

  Args:
    cfg: static config.
    state: a single-model `TrainState`.
    batch: the batch contract's `src_img`, `trg_img`, `flow`, and `dense_flow` [b, S, S, 2],
      `dense_valid` [b, S, S].
    hparams: λ, the remember-count table of this epoch.

  Returns:
    `(state, metrics)` as `single_teacher_step`.
  """
  known = jnp.asarray(batch['dense_valid'], bool)
  return student_update(cfg, state, batch, jnp.asarray(batch['dense_flow']), hparams, known=known)


# ------------------------------------------------------------------------------------------------
# Mutual online teachers.


def _take(tree, i: int):
  """Model i of stacked [2, ...] variables."""
  return jax.tree.map(lambda x: x[i], tree)


def forward_pair(cfg: StepConfig, params_ab, batch_stats_ab, batch, return_aux: bool = False):
  """Both models' flows: `(flow_a, flow_b, batch_stats_ab)` from stacked [2, ...] variables,
  and `(aux_a, aux_b)` fourth with `return_aux` (see `forward`).

  The two forwards are unrolled rather than `jax.vmap`ped: a vmap over the parameters turns
  every convolution into a batched-kernel convolution, which XLA:CPU runs several times slower
  than two plain ones (measured: 1.0 s vs 0.4 s per demo step). The numbers are the same.
  """
  outs = [
      forward(cfg, _take(params_ab, i), _take(batch_stats_ab, i), batch, return_aux=return_aux)
      for i in range(2)
  ]
  stats = jax.tree.map(lambda a, b: jnp.stack([a, b]), outs[0][1], outs[1][1])
  if return_aux:
    return outs[0][0], outs[1][0], stats, (outs[0][2], outs[1][2])
  return outs[0][0], outs[1][0], stats


def mutual_teacher_objective(
    cfg: StepConfig, params_ab, batch_stats_ab, batch, hparams: StepHparams
):
  """The summed objective of the two mutual teachers, as differentiated by the step.

  1. Forward both networks on the same batch.
  2. Each network's flow, under `stop_gradient`, is the pseudo-label of its peer.
  3. `losses.pseudo_label_objective` for each: sparse EPE on the labelled positions + λ · the
     mean pseudo-label EPE over the positions of the dilated keypoint mask that the small-loss
     selection keeps (k from this epoch's remember rate). The exchange of the reference (each
     network averages over the positions its *peer's* loss ranks smallest) selects the same
     positions for both networks, because the pseudo-label EPE is symmetric: ||b - a|| is
     ||a - b|| to the bit. Other regions, gates and targets (`cfg.pseudo_label`) read the
     peer as the teacher (`teacher_signals`: its features and correlation from this forward,
     its flow on the swapped pair for the cycle check), all as constants.
  4. Total = loss_a + loss_b. The peers enter each other's loss only as constants, so the
     gradient of the sum w.r.t. the stacked parameters is each network's gradient of its own
     loss.

  Returns:
    `(loss_a + loss_b, (batch_stats_ab, losses [2], (terms_a, terms_b), (flow_a, flow_b)))`.
  """
  opts = cfg.pseudo_label
  if opts.needs_teacher_aux:
    flow_a, flow_b, batch_stats, aux = forward_pair(
        cfg, params_ab, batch_stats_ab, batch, return_aux=True
    )
  else:
    flow_a, flow_b, batch_stats = forward_pair(cfg, params_ab, batch_stats_ab, batch)
    aux = (None, None)
  # What each network, as its peer's teacher, offers besides its flow (None by default).
  signals_a, signals_b = (
      teacher_signals(
          cfg,
          _take(params_ab, i),
          _take(batch_stats_ab, i),
          batch,
          jax.lax.stop_gradient(flow),
          aux[i],
          train=True,
      )
      for i, flow in enumerate((flow_a, flow_b))
  )
  loss_a, terms_a = _pseudo_objective(cfg, flow_a, flow_b, batch, hparams, signals_b)
  loss_b, terms_b = _pseudo_objective(cfg, flow_b, flow_a, batch, hparams, signals_a)
  return loss_a + loss_b, (
      batch_stats,
      jnp.stack([loss_a, loss_b]),
      (terms_a, terms_b),
      (flow_a, flow_b),
  )


def mutual_teacher_step(
    cfg: StepConfig, state: TrainState, batch, hparams: StepHparams
) -> Tuple[TrainState, Metrics]:
  """One step of two mutual online teachers, a and b (leading axis 2 of the state).

  Args:
    cfg: static config.
    state: `TrainState` whose `params`, `batch_stats`, `opt_state` leaves are stacked [2, ...].
    batch: `src_img`, `trg_img` [b, H, W, 3], `flow` [b, S, S, 2] (and optionally the truth
      of `pseudo_label_truth`, for metrics only).
    hparams: λ, the remember-count table and the confidence percentile of this epoch.

  Returns:
    `(state, metrics)`; metrics `a/loss` and the `pseudo_label_metrics` of a (`a/loss_sup`,
    `a/loss_pseudo`, `a/kept_fraction`, `a/pseudo_label_acc`, `a/pseudo_kept_epe`, ...), the
    same for `b/`, `pseudo_agreement` (fraction of candidates where the two flows are within
    `PSEUDO_ACC_CELLS`), `nonfinite` and the streak counters.
  """
  # 1-4: the objective (see `mutual_teacher_objective`).
  grad_fn = jax.value_and_grad(mutual_teacher_objective, argnums=1, has_aux=True)
  (_, (batch_stats, loss_ab, terms, flows)), grads = grad_fn(
      cfg, state.params, state.batch_stats, batch, hparams
  )
  # 5. Updates of each network by its own (vmapped) optimiser; a non-finite model is kept.
  labelled = _has_labels(batch)
  if cfg.pseudo_label.unlabelled_pairs == 'object_cycle':  # Per network (`_has_signal`).
    labelled = jnp.stack([_has_signal(cfg, batch, t.kept, hparams) for t in terms])
  state, ok = apply_if_finite(
      cfg, state, loss_ab, grads, batch_stats, stacked=True, labelled=labelled
  )
  metrics = _state_metrics(state, ok)
  for i, name in enumerate('ab'):
    metrics[f'{name}/loss'] = loss_ab[i]
    for k, v in pseudo_label_metrics(terms[i], flows[1 - i], batch).items():
      metrics[f'{name}/{k}'] = v
  agree = losses.safe_norm(flows[0] - flows[1], axis=-1) <= PSEUDO_ACC_CELLS
  metrics['pseudo_agreement'] = _masked_mean(jax.lax.stop_gradient(agree), terms[0].candidates)
  return state, metrics


STEPS = {
    'baseline': baseline_step,
    'dense': dense_step,
    'st': single_teacher_step,
    'mt': mutual_teacher_step,
    'truth_teacher': truth_teacher_step,
}
# The modes that read the batch's dense ground truth in their loss.
DENSE_TRUTH_MODES = ('dense', 'truth_teacher')


def get_step_fn(learning_mode: str):
  """The step function of a learning mode ('baseline' | 'dense' | 'st' | 'mt' |
  'truth_teacher')."""
  if learning_mode not in STEPS:
    raise ValueError(f'learning_mode must be one of {tuple(STEPS)}, got {learning_mode!r}')
  return STEPS[learning_mode]
