"""The trainer's checkpoint manager: save, resume from the newest intact step, the best step.

Trainer checkpoints live in `<workdir>/checkpoints/<step>/` with three Orbax items (`state`,
`meta`, `data`; see `sccorr_jax.checkpoint`). The manager keeps the two latest steps and the best
one by `select_metric(config)`; resuming takes the newest intact of the latest steps and sets
damaged steps aside in `<workdir>/checkpoints_damaged/`.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sccorr_jax import constants
from sccorr_jax.checkpoint.integrity import _check_tree
from sccorr_jax.checkpoint.integrity import _config_dict
from sccorr_jax.checkpoint.integrity import _damage
from sccorr_jax.checkpoint.integrity import _first_line
from sccorr_jax.checkpoint.integrity import _metrics_damage
from sccorr_jax.checkpoint.integrity import _read_json
from sccorr_jax.checkpoint.integrity import _SEALED_KEY
from sccorr_jax.checkpoint.integrity import _step_dirs
from sccorr_jax.checkpoint.integrity import _temporary_path_class
from sccorr_jax.checkpoint.integrity import _tree_metadata
from sccorr_jax.checkpoint.integrity import CHECKPOINT_DIR
from sccorr_jax.checkpoint.integrity import CheckpointError
from sccorr_jax.checkpoint.integrity import DAMAGED_DIR
from sccorr_jax.checkpoint.integrity import DATA
from sccorr_jax.checkpoint.integrity import MANIFEST
from sccorr_jax.checkpoint.integrity import META
from sccorr_jax.checkpoint.integrity import PathLike
from sccorr_jax.checkpoint.integrity import STATE

KEEP_LATEST = 2  # The latest step and one to fall back to if it is damaged.


def select_metric(config) -> str:
  """`val/pck@<config.eval.select_alpha>`: picks the best checkpoint and the better mt model."""
  return constants.metric_key(config.eval.select_alpha, scope='val')


def latest_step(workdir: PathLike) -> Optional[int]:
  """The newest step directory under `<workdir>/checkpoints` (not verified), or None."""
  steps = _step_dirs(pathlib.Path(workdir) / CHECKPOINT_DIR)
  return max(steps) if steps else None


def _set_aside(ckpt_dir: pathlib.Path, steps: Sequence[int]) -> pathlib.Path:
  """Moves damaged steps to `<ckpt_dir>/../checkpoints_damaged/<step>[-n]` (process 0)."""
  target = ckpt_dir.parent / DAMAGED_DIR
  if jax.process_index() == 0:
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
      dest, n = target / str(step), 1
      while dest.exists():
        dest, n = target / f'{step}-{n}', n + 1
      shutil.move(os.fspath(ckpt_dir / str(step)), os.fspath(dest))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('sccorr_jax: damaged checkpoints set aside')
  return target


def _best_fn(metric: str):
  return lambda m: float(m.get(metric, -np.inf)) if isinstance(m, Mapping) else -np.inf


def make_manager(
    workdir: PathLike, best_metric: str, *, async_saves: bool = True
) -> ocp.CheckpointManager:
  """The checkpoint manager of a trainer workdir: keeps the two latest steps and the best one.

  A step whose metrics file is garbled (the manager could not open the directory) is moved to
  `<workdir>/checkpoints_damaged/` with a one-line warning.

  Args:
    workdir: the run's directory; checkpoints go to `<workdir>/checkpoints`.
    best_metric: the metric (a key of `save(..., metrics=)`; `select_metric(config)`) the best
      checkpoint maximises. Saves without metrics (mid-epoch) are kept only while among the
      latest.
    async_saves: write in a background thread (call `wait_until_finished` before exit).
  """
  directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  damaged = _metrics_damage(directory)
  if jax.process_count() > 1:  # Every process has looked before process 0 moves anything.
    multihost_utils.sync_global_devices('sccorr_jax: checkpoint metrics checked')
  if damaged:
    moved = _set_aside(directory, sorted(damaged))
    logging.warning(
        'damaged checkpoint step(s) moved to %s: %s',
        moved,
        '; '.join(f'step {s}: {p}' for s, p in damaged.items()),
    )
  policy = ocp.checkpoint_managers.AnyPreservationPolicy(
      [
          ocp.checkpoint_managers.LatestN(n=KEEP_LATEST),
          ocp.checkpoint_managers.BestN(
              get_metric_fn=_best_fn(best_metric),
              reverse=False,
              n=1,
              keep_checkpoints_without_metrics=False,
          ),
      ]
  )
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      best_fn=_best_fn(best_metric),
      best_mode='max',
      enable_async_checkpointing=async_saves,
      create=True,
      temporary_path_class=_temporary_path_class(directory),
  )
  return ocp.CheckpointManager(directory, item_names=(STATE, META, DATA), options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state,
    meta: Mapping[str, Any],
    data_iter=None,
    metrics: Optional[Mapping[str, Any]] = None,
) -> None:
  """Saves a training checkpoint (asynchronously if the manager is), sealed with checksums.

  Args:
    manager: from `make_manager`.
    step: the optimiser step (the checkpoint's name).
    state: the `TrainState`.
    meta: JSON-serialisable dict (epoch, config, metrics, best model).
    data_iter: the grain training iterator (its position is saved), or None.
    metrics: the validation scalars (the manager ranks steps by its `best_metric` among them;
      non-finite values count as missing, i.e. worst), or None (a mid-epoch save).
  """
  import grain  # pylint: disable=g-import-not-at-top  # Only the trainer needs grain.

  items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(meta))}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
  if metrics is not None:
    metrics = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.number)) and np.isfinite(float(v))
    }
  manager.save(
      int(step),
      args=ocp.args.Composite(**items),
      metrics=metrics,
      force=True,
      custom_metadata={_SEALED_KEY: MANIFEST},
  )


def restore(
    manager: ocp.CheckpointManager, abstract_state, data_iter=None, *, config=None
) -> Optional[Tuple[Any, Dict[str, Any]]]:
  """Restores the newest intact of the latest steps against an abstract state.

  Each candidate (the `KEEP_LATEST` latest steps, newest first; the best step is not one) is
  verified (items present, JSON parseable, checksums) and then read by Orbax; a damaged one is
  skipped. If one was skipped, one warning line names each damaged step, file and problem, and
  the damaged steps are moved to `<workdir>/checkpoints_damaged/`.

  Args:
    manager: from `make_manager`.
    abstract_state: the `TrainState` as `ShapeDtypeStruct`s with the target shardings.
    data_iter: a fresh grain iterator of the same pipeline; its position is restored in place.
    config: this run's config: a checkpoint that does not fit names the model keys that differ.

  Returns:
    `(state, meta)`, or None if the workdir holds no checkpoint.

  Raises:
    CheckpointError: no intact step among the latest (one line naming the directory and each
      problem), or the checkpoint does not fit `abstract_state` (another config: the message
      names the differing keys).
  """
  ckpt_dir = pathlib.Path(manager.directory)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  items = (STATE, META) + ((DATA,) if data_iter is not None else ())
  damaged = []
  for step in steps[:KEEP_LATEST]:
    problem = _damage(ckpt_dir / str(step), items)
    if problem is None:
      problem, restored = _restore_step(manager, step, abstract_state, data_iter, config)
    if problem is None:
      if damaged:
        moved = _set_aside(ckpt_dir, [s for s, _ in damaged])
        manager.reload()
        logging.warning(
            'damaged checkpoint %s; resuming from step %d, the newest intact one '
            '(damaged steps moved to %s)',
            '; '.join(f'step {s} ({p})' for s, p in damaged),
            step,
            moved,
        )
      return restored
    damaged.append((step, problem))
  others = sorted(set(steps) - set(steps[:KEEP_LATEST]))
  raise CheckpointError(
      f'{ckpt_dir}: no intact checkpoint to resume from: '
      + '; '.join(f'step {s}: {p}' for s, p in damaged)
      + (
          f' (step(s) {others} are kept as the best, not as resume points; move the damaged '
          'steps away to resume from one)'
          if others
          else ''
      )
  )


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter, config):
  """`(None, (state, meta))` of a verified step, or `(problem, None)` if Orbax cannot read it.

  Raises:
    CheckpointError: the step does not fit `abstract_state` (another config).
  """
  import grain  # pylint: disable=g-import-not-at-top  # Only the trainer needs grain.

  path = pathlib.Path(manager.directory) / str(step)
  try:
    stored = _tree_metadata(path / STATE)
  except CheckpointError as e:
    return str(e).removeprefix('damaged checkpoint: '), None
  _check_tree(
      stored,
      abstract_state,
      f'checkpoint {path / STATE}',
      'the training state of this config',
      allow_extra=True,
      stored_config=_read_json(path / META).get('config'),
      config=config,
  )
  args = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
  if data_iter is not None:
    args[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # pylint: disable=broad-except  # Orbax's own checks failed.
    return f'{path}: Orbax cannot read it ({_first_line(e)})', None
  return None, (restored[STATE], dict(restored[META]))


def best_checkpoint(manager: ocp.CheckpointManager) -> Optional[Dict[str, Any]]:
  """`{'step', 'epoch', 'metric', 'value', 'model'}` of the manager's best step, or None."""
  step = manager.best_step()
  if step is None or not manager.all_steps():
    return None
  try:
    meta = _read_json(pathlib.Path(manager.directory) / str(step) / META)
  except CheckpointError as e:
    logging.warning('best checkpoint step %d: %s', step, e)
    return {'step': int(step)}
  metric = (
      select_metric(ml_collections.ConfigDict(_config_dict(meta.get('config') or {})))
      if (meta.get('config'))
      else None
  )
  value = (meta.get('metrics') or {}).get(metric)
  if value is None:
    return None  # No step has validation metrics yet.
  return {
      'step': int(step),
      'epoch': meta.get('epoch'),
      'metric': metric,
      'value': value,
      'model': meta.get('best_model'),
  }
