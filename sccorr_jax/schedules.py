"""Optimiser and host-side schedules of SCorrSAN training (paper Sec. 4.1; reference `train.py`).

* AdamW with two parameter groups, as the reference: the backbone (`params['backbone']`) at
  `optim.backbone_lr`, everything else (context encoder, the trainable soft-argmax coordinate
  vectors `x_normal`, `y_normal`) at `optim.lr`; decoupled weight decay on every parameter, BN
  scales and biases included. A frozen backbone gets zero updates (`optax.set_to_zero`).
* A DINOv2 backbone is trained only in its last `optim.backbone_trained_blocks` blocks (and its
  final norm; everything when that covers every block run): the rest is 'frozen', zero updates
  and no weight decay. The config files link the key to `model.dinov2_trained_blocks`, whose
  model applies the matching `stop_gradient`.
* Learning-rate schedules in optimiser steps: `step` reproduces `MultiStepLR(milestones, gamma)`
  stepped once per epoch (constant inside an epoch), `cosine` decays per step to 0.
* The pseudo-loss weight, the remember rate and the confidence gate's percentile are functions
  of the epoch, computed on the host once per epoch and handed to the jitted step as arrays of
  fixed shape (a new epoch does not recompile): λ is 0 before `teacher.pseudo_start_epoch`; the
  remember rate of epoch `e >= start` is `linspace(rate_start, rate_end, n)[min(e - start,
  n - 1)]` (the reference's schedule rises, unlike co-teaching's); the percentile ramps the same
  way (`teacher.confidence_percentile_*`).
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import jax
import numpy as np
import optax

from sccorr_jax import losses
from sccorr_jax.models import dinov2

BACKBONE = 'backbone'
HEAD = 'head'
FROZEN = 'frozen'
COORDINATES = ('x_normal', 'y_normal')


def param_groups(
    params, train_coordinates: bool = True, backbone_trained_blocks: Optional[int] = None
) -> Dict[str, str]:
  """Pytree of group labels with the structure of `params`.

  'backbone' for `params['backbone']`, 'head' for the rest (context encoder and, as in the
  reference, the soft-argmax coordinate vectors); with `train_coordinates=False` the coordinate
  vectors are 'frozen' (kept at linspace(-1, 1)). A DINOv2 backbone (`pos_embed` in it) needs
  `backbone_trained_blocks`: the backbone parameters it does not train are 'frozen'
  (`dinov2.is_trained`).

  Raises:
    ValueError: a DINOv2 backbone without `backbone_trained_blocks`.
  """
  backbone = params.get(BACKBONE, {}) if hasattr(params, 'get') else {}
  dinov2_blocks = None
  if 'pos_embed' in backbone:
    if backbone_trained_blocks is None:
      raise ValueError(
          'a DINOv2 backbone needs optim.backbone_trained_blocks (the config files '
          'link it to model.dinov2_trained_blocks)'
      )
    dinov2_blocks = sum(1 for k in backbone if k.startswith('blocks_'))

  def label(path, _):
    top = getattr(path[0], 'key', None)
    if top == BACKBONE:
      if dinov2_blocks is not None and not dinov2.is_trained(
          tuple(getattr(p, 'key', None) for p in path[1:]),
          dinov2_blocks,
          int(backbone_trained_blocks),
      ):
        return FROZEN
      return BACKBONE
    if top in COORDINATES and not train_coordinates:
      return FROZEN
    return HEAD

  return jax.tree_util.tree_map_with_path(label, params)


def lr_schedule(optim_config, base_lr: float, steps_per_epoch: int) -> optax.Schedule:
  """Learning rate as a function of the optimiser step.

  Args:
    optim_config: `config.optim` (`schedule`, `lr_milestones_epochs`, `lr_gamma`, `num_epochs`).
    base_lr: the group's initial learning rate.
    steps_per_epoch: optimiser steps per epoch.

  Returns:
    An optax schedule (step -> lr).
  """
  kind = optim_config.schedule
  if kind == 'constant':
    return optax.constant_schedule(base_lr)
  if kind == 'step':
    boundaries = {
        int(m) * int(steps_per_epoch): float(optim_config.lr_gamma)
        for m in optim_config.lr_milestones_epochs
    }
    return optax.piecewise_constant_schedule(base_lr, boundaries)
  if kind == 'cosine':
    total = max(int(optim_config.num_epochs) * int(steps_per_epoch), 1)
    return optax.cosine_decay_schedule(base_lr, total)
  raise ValueError(f"optim.schedule must be 'step', 'cosine' or 'constant', got {kind!r}")


def make_optimizer(optim_config, steps_per_epoch: int) -> optax.GradientTransformation:
  """AdamW with the reference's two learning-rate groups (see the module docstring)."""

  def adamw(lr):
    return optax.adamw(
        lr_schedule(optim_config, lr, steps_per_epoch),
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
        weight_decay=optim_config.weight_decay,
    )

  backbone = (
      optax.set_to_zero() if optim_config.freeze_backbone else adamw(optim_config.backbone_lr)
  )
  train_coordinates = bool(optim_config.get('train_coordinates', True))
  trained_blocks = optim_config.get('backbone_trained_blocks')
  if trained_blocks is None and optim_config.freeze_backbone:
    trained_blocks = 0
  return optax.multi_transform(
      {BACKBONE: backbone, HEAD: adamw(optim_config.lr), FROZEN: optax.set_to_zero()},
      lambda params: param_groups(params, train_coordinates, trained_blocks),
  )


def learning_rates(optim_config, steps_per_epoch: int, step: int) -> Dict[str, float]:
  """Host-side learning rates of both groups at `step` (for logging)."""
  head = float(lr_schedule(optim_config, optim_config.lr, steps_per_epoch)(step))
  backbone = (
      0.0
      if optim_config.freeze_backbone
      else float(lr_schedule(optim_config, optim_config.backbone_lr, steps_per_epoch)(step))
  )
  return {'lr/head': head, 'lr/backbone': backbone}


def pseudo_weight(teacher_config, epoch: int) -> float:
  """λ of `epoch` (0-based): `teacher.pseudo_weight` from `pseudo_start_epoch` on, else 0."""
  return (
      float(teacher_config.pseudo_weight)
      if epoch >= int(teacher_config.pseudo_start_epoch)
      else 0.0
  )


def _ramp(teacher_config, start: float, end: float, epochs: int, epoch: int) -> float:
  """`linspace(start, end, n)[min(epoch - pseudo_start_epoch, n - 1)]` (the first value before
  the pseudo-loss start), n = max(epochs, 1)."""
  n = max(int(epochs), 1)
  schedule = np.linspace(float(start), float(end), n)
  i = min(max(epoch - int(teacher_config.pseudo_start_epoch), 0), n - 1)
  return float(schedule[i])


def remember_rate(teacher_config, epoch: int) -> float:
  """Fraction of candidate positions kept by the small-loss selection in `epoch` (0-based).

  Before the pseudo-loss start the first value of the schedule is used (the terms are computed
  but weighted 0). With `teacher.small_loss_selection` off every candidate is kept (1.0).
  """
  if not teacher_config.small_loss_selection:
    return 1.0
  return _ramp(
      teacher_config,
      teacher_config.remember_rate_start,
      teacher_config.remember_rate_end,
      teacher_config.remember_rate_epochs,
      epoch,
  )


# The confidence gate's percentile schedule when a config has none (`base_config` documents it).
CONFIDENCE_PERCENTILE = dict(
    confidence_percentile_start=20.0,
    confidence_percentile_end=80.0,
    confidence_percentile_epochs=10,
)


def confidence_percentile(teacher_config, epoch: int) -> float:
  """The confidence gate's percentile in `epoch` (`teacher.gate` with 'confidence'): a linear
  ramp from `teacher.confidence_percentile_start` to `_end` over `_epochs` epochs from the
  pseudo-loss start, then constant (the curriculum: a rising percentile, the gate grows
  stricter as the teacher learns). In [0, 100]."""
  get = lambda k: teacher_config.get(k, CONFIDENCE_PERCENTILE[k])  # noqa: E731
  return _ramp(
      teacher_config,
      get('confidence_percentile_start'),
      get('confidence_percentile_end'),
      get('confidence_percentile_epochs'),
      epoch,
  )


class StepHparams(NamedTuple):
  """Per-epoch values the jitted step takes as arguments (fixed shapes: no recompilation).

  Attributes:
    pseudo_weight: () float32, λ.
    remember_table: [n_max + 1] int32, `losses.num_remember_table(rate, n_max)`, n_max = the
      number of flow positions of a global batch (b * S * S).
    confidence_percentile: () float32 in [0, 100], the confidence gate's percentile (read only
      with `teacher.gate` containing 'confidence').
  """

  pseudo_weight: jax.Array
  remember_table: jax.Array
  confidence_percentile: jax.Array = np.float32(0.0)


def step_hparams(teacher_config, epoch: int, n_max: int) -> StepHparams:
  """The `StepHparams` of `epoch` (host numpy arrays)."""
  return StepHparams(
      pseudo_weight=np.asarray(pseudo_weight(teacher_config, epoch), np.float32),
      remember_table=losses.num_remember_table(remember_rate(teacher_config, epoch), n_max),
      confidence_percentile=np.asarray(confidence_percentile(teacher_config, epoch), np.float32),
  )


def lr_fn(optim_config, steps_per_epoch: int) -> Callable[[int], Dict[str, float]]:
  """`step -> {'lr/head': .., 'lr/backbone': ..}` (host)."""
  return lambda step: learning_rates(optim_config, steps_per_epoch, step)
