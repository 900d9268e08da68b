"""The training loop: one set-up, one compiled data-parallel step, validation, checkpoints, logs.

`setup(config)` builds what a run needs (model, optimiser, step config, initial state, the
jitted step and the abstract batch it is compiled for); `train_and_evaluate`, the benchmark and
the experiment runner share it. `compile_step` compiles it once per distinct shape in a process
(the experiment runner's seeds reuse it).

`train_and_evaluate(config, workdir)` trains in the learning mode `config.learning_mode`
(`train_step.STEPS`), validates PCK on `config.eval.split` at the
end of every `config.eval.every_epochs` epochs for every trained model, and checkpoints (the two
latest steps and the best by `val/pck@<eval.select_alpha>`; for 'mt' the better of the two models by
the same metric, whose index is recorded). A restarted run continues from the newest intact
checkpoint exactly where it stopped: parameters, optimiser states, step, data-iterator position
and logging window are restored (the steps draw no random numbers).

Data parallelism: one `jax.jit` step over all devices of a 1-D `('data',)` mesh, the batch sharded
along its first axis and the state replicated. Batch statistics and the small-loss selection are
then global over the batch, so N devices compute what one device computes. Several hosts: call
`jax.distributed.initialize()` first (`main.py --multihost`); each process reads its own shard of
the data (`process_index::process_count`) and the global batch is assembled with
`jax.make_array_from_process_local_data`.

Logging (process 0; `metric_writer`): a tqdm bar; the compile time apart from the step time;
every `log_every_steps` steps the window means of the step metrics (read from the device only
there, where non-finite steps are also checked, as big_vision does) and every validation, to
`<workdir>/metrics.jsonl` and TensorBoard.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import ml_collections
import numpy as np
import tqdm

from sccorr_jax import checkpoint as ckpt_lib
from sccorr_jax import config_lib
from sccorr_jax.constants import metric_key
from sccorr_jax import data as data_lib
from sccorr_jax import evaluation
from sccorr_jax import models
from sccorr_jax import schedules
from sccorr_jax import sharding
from sccorr_jax import train_step
from sccorr_jax.data import cache_features
from sccorr_jax.metric_writer import MetricWriter
from sccorr_jax.metric_writer import to_python
from sccorr_jax.metric_writer import Window

TRAIN_KEYS = ('src_img', 'trg_img', 'flow')
# What the pseudo-label metrics are measured against (`train_step.pseudo_label_truth`); never
# seen by a loss. Every training batch carries them (all invalid where a dataset has none).
TRUTH_KEYS = (
    'dense_flow',
    'dense_valid',
    'withheld_src_kps',
    'withheld_trg_kps',
    'withheld_kps_valid',
)


# ------------------------------------------------------------------------------------------------
# Set-up helpers.


def steps_per_epoch(config, data: Optional[data_lib.ResolvedData] = None) -> int:
  """`optim.steps_per_epoch`, or the training pairs divided by the global batch size.

  `data`: the resolved data section; without it, `config.data` is resolved here when the
  training split's size is needed.
  """
  if config.optim.get('steps_per_epoch'):
    return int(config.optim.steps_per_epoch)
  data = data_lib.resolve(config.data if data is None else data)
  return data.steps_per_epoch(int(config.optim.batch_size))


def check_config(config, need_teacher: bool = True) -> None:
  """Raises ValueError on inconsistent settings, naming the keys.

  `need_teacher`: 'st' must name its teacher (`teacher.checkpoint`) unless one is given.
  """
  error = config_lib.ConfigError
  mode = config.learning_mode
  if mode not in train_step.STEPS:
    raise error(f'learning_mode must be one of {tuple(train_step.STEPS)}, got {mode!r}')
  if mode in train_step.DENSE_TRUTH_MODES and not data_lib.has_dense_truth(config.data):
    raise error(
        f'learning_mode {mode!r} needs a dataset with a dense ground truth '
        f"({', '.join(data_lib.DENSE_TRUTH_DATASETS)}); data.name is "
        f'{config.data.name!r}'
    )
  if mode == 'truth_teacher':
    options = train_step.pseudo_label_options(config.teacher)
    if options.needs_signals or options.target != 'teacher_flow':
      raise error(
          "learning_mode 'truth_teacher' takes the paper's pseudo-labels only "
          "(teacher.region='square', teacher.gate='small_loss', "
          "teacher.target='teacher_flow'): the others read a teacher network"
      )
  if mode == 'st' and need_teacher and not config.teacher.get('checkpoint'):
    raise error(
        "learning_mode 'st' needs --config.teacher.checkpoint=<baseline workdir, "
        'checkpoint step directory or exported model>'
    )
  stride = 2 ** (int(config.model.get('backbone_stages', 3)) + 1)
  if config.model.get('backbone') == 'dinov2':
    stride = 14  # The ViT's patch size.
    if config.data.img_size % stride:
      raise error(
          f'data.img_size ({config.data.img_size}) must be a multiple of 14, the '
          "DINOv2 patch size (model.backbone='dinov2')"
      )
  if config.model.get('inputs', 'images') == 'features':
    if config.model.get('backbone') != 'dinov2' or int(config.model.dinov2_trained_blocks):
      raise error(
          "model.inputs='features' (the head on cached features) needs "
          "model.backbone='dinov2' and model.dinov2_trained_blocks=0"
      )
    data_lib.check_cached_features(config.data)
  grid = config.data.img_size // stride
  expected = config.model.feature_size or grid
  if config.data.feature_size != expected:
    raise error(
        f'data.feature_size ({config.data.feature_size}) must equal the flow grid of the model '
        f'({expected}: model.feature_size, or img_size / stride {stride} when it is 0)'
    )
  if config.model.batch_norm not in ('batch', 'frozen'):
    raise error(f"model.batch_norm must be 'batch' or 'frozen', got {config.model.batch_norm!r}")
  k = config.teacher.dilation_kernel
  if k and (k < 1 or k % 2 == 0):
    raise error(
        f'teacher.dilation_kernel must be an odd positive int, or 0 / None (no mask), ' f'got {k}'
    )
  try:  # teacher.region, gate, target, unlabelled_pairs and their parameters.
    train_step.pseudo_label_options(config.teacher)
  except ValueError as e:
    raise error(str(e)) from None
  teacher = config.teacher
  for key in ('confidence_percentile_start', 'confidence_percentile_end'):
    value = teacher.get(key, schedules.CONFIDENCE_PERCENTILE[key])
    if not 0 <= value <= 100:
      raise error(f'teacher.{key} must be in [0, 100]; got {value!r}')
  epochs = teacher.get('confidence_percentile_epochs', 1)
  if not isinstance(epochs, int) or epochs < 1:
    raise error(f'teacher.confidence_percentile_epochs must be an int >= 1; got {epochs!r}')
  if config.optim.batch_size % jax.device_count():
    raise error(
        f'optim.batch_size ({config.optim.batch_size}) must be divisible by the device '
        f'count ({jax.device_count()})'
    )


def create_train_state(config, model, tx, rng, teacher=None) -> train_step.TrainState:
  """A fresh `TrainState` for `config.learning_mode` (host arrays; shard with `device_put`)."""
  mutual = config.learning_mode == 'mt'
  v = models.init_variables(config, model, rng, 2 if mutual else 1)
  opt_state = (jax.vmap(tx.init) if mutual else tx.init)(v['params'])
  return train_step.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=v['params'],
      batch_stats=v['batch_stats'],
      opt_state=opt_state,
      teacher=teacher,
  )


def abstract_train_batch(config, sharding) -> Dict[str, jax.ShapeDtypeStruct]:
  """The global training batch the step is compiled for (`TRAIN_KEYS` + `TRUTH_KEYS`); with
  `model.inputs='features'`, `src_img`/`trg_img` are the cached features (`models.input_shape`).
  The keypoint slots are `data.max_kps`, as the pipeline pads them."""
  b, fs, n = (int(config.optim.batch_size), int(config.data.feature_size), int(config.data.max_kps))
  x = (b, *models.input_shape(models.build_model(config), config.data.img_size))
  shapes = {
      'src_img': (x, jnp.float32),
      'trg_img': (x, jnp.float32),
      'flow': ((b, fs, fs, 2), jnp.float32),
      'dense_flow': ((b, fs, fs, 2), jnp.float32),
      'dense_valid': ((b, fs, fs), jnp.bool_),
      'withheld_src_kps': ((b, n, 2), jnp.float32),
      'withheld_trg_kps': ((b, n, 2), jnp.float32),
      'withheld_kps_valid': ((b, n), jnp.bool_),
  }
  return {
      k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
      for k, (shape, dtype) in shapes.items()
  }


@dataclasses.dataclass
class Setup:
  """What a training run needs, built once from the config (`setup`).

  Attributes:
    config: the experiment config.
    mesh: the 1-D `('data',)` device mesh; `replicated` / `data_sharding` on it.
    model, tx, step_config: the network, the optimiser, the step's static config.
    state: the initial `TrainState`, replicated on the mesh.
    step_fn: the jitted step `(state, batch, hparams) -> (state, metrics)` (state donated).
    abstract_batch: the global batch it is compiled for.
    steps_per_epoch, total_steps: the schedule.
    data_seed: the training data order's seed.
    n_max: flow positions of a global batch (the remember table's length - 1).
    data: the resolved data section: as given to `setup`, or resolved there for the schedule
      (`optim.steps_per_epoch` unset); None when neither (the benchmark reads no dataset).
  """

  config: Any
  mesh: jax.sharding.Mesh
  replicated: NamedSharding
  data_sharding: NamedSharding
  model: Any
  tx: Any
  step_config: train_step.StepConfig
  state: train_step.TrainState
  step_fn: Callable
  abstract_batch: Dict[str, jax.ShapeDtypeStruct]
  steps_per_epoch: int
  total_steps: int
  data_seed: int
  n_max: int
  data: Optional[data_lib.ResolvedData] = None
  _hparams: Optional[Tuple[int, schedules.StepHparams]] = dataclasses.field(
      default=None, repr=False
  )

  def hparams(self, epoch: int) -> schedules.StepHparams:
    """This epoch's λ and remember table, on the device (fixed shapes: no recompilation).

    They change once per epoch: built on the host and transferred once, then reused by every
    step of the epoch."""
    if self._hparams is None or self._hparams[0] != epoch:
      self._hparams = (
          epoch,
          jax.device_put(
              schedules.step_hparams(self.config.teacher, epoch, self.n_max), self.replicated
          ),
      )
    return self._hparams[1]


def setup(
    config,
    mesh: Optional[jax.sharding.Mesh] = None,
    *,
    teacher=None,
    data: Optional[data_lib.ResolvedData] = None,
) -> Setup:
  """Builds a run's model, optimiser, initial state and jitted step from `config`.

  Args:
    config: the experiment config (checked by `check_config`).
    mesh: default `sharding.make_mesh()`.
    teacher: 'st' only: the fixed teacher's `{'params', 'batch_stats'}`; default: loaded from
      `config.teacher.checkpoint` (its best model).
    data: the resolved data section (`data.resolve(config.data)`); default: resolved here
      if the schedule needs the training split's size (`optim.steps_per_epoch` unset).
  """
  check_config(config, need_teacher=teacher is None)
  mesh = mesh or sharding.make_mesh()
  replicated, data_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  mode = config.learning_mode
  if data is None and not config.optim.get('steps_per_epoch'):
    data = data_lib.resolve(config.data)
  spe = steps_per_epoch(config, data)
  # Three streams, as when the steps took a key (the second): the same initial state and data
  # order for a seed as before.
  init_rng, _, data_seed_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)), 3)
  model = models.build_model(config)
  tx = schedules.make_optimizer(config.optim, spe)
  step_config = train_step.StepConfig.from_config(config, model, tx)
  if mode == 'st' and teacher is None:
    teacher, teacher_config = ckpt_lib.load_model_variables(
        config.teacher.checkpoint, 'best', sharding=replicated, model_config=config
    )
    logging.info(
        'fixed teacher loaded from %s (its learning mode: %s)',
        config.teacher.checkpoint,
        teacher_config.get('learning_mode'),
    )
  state = jax.device_put(create_train_state(config, model, tx, init_rng, teacher), replicated)
  step_fn = jax.jit(
      functools.partial(train_step.get_step_fn(mode), step_config),
      in_shardings=(replicated, data_sharding, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,),
  )
  return Setup(
      config=config,
      mesh=mesh,
      replicated=replicated,
      data_sharding=data_sharding,
      model=model,
      tx=tx,
      step_config=step_config,
      state=state,
      step_fn=step_fn,
      abstract_batch=abstract_train_batch(config, data_sharding),
      steps_per_epoch=spe,
      total_steps=spe * int(config.optim.num_epochs),
      data_seed=int(jax.random.randint(data_seed_rng, (), 0, 2**31 - 1)),
      n_max=int(config.optim.batch_size) * int(config.data.feature_size) ** 2,
      data=data,
  )


_COMPILED: Dict[str, Any] = {}


def _compile_key(s: Setup) -> str:
  """What the compiled step depends on: everything but seeds, data contents and schedules."""
  c = s.config
  return json.dumps(
      {
          'mode': c.learning_mode,
          'model': c.model.to_dict(),
          'optim': c.optim.to_dict(),
          'spe': s.steps_per_epoch,
          'dilation': c.teacher.dilation_kernel,
          'pseudo_label': dataclasses.asdict(s.step_config.pseudo_label),
          'batch': {k: (v.shape, str(v.dtype)) for k, v in s.abstract_batch.items()},
          'devices': [d.id for d in s.mesh.devices.flat],
      },
      sort_keys=True,
      default=str,
  )


def compile_step(s: Setup) -> Tuple[Any, float]:
  """The step compiled ahead of time for `s.abstract_batch`, and the seconds it took.

  Compiled once per distinct shape and setting in a process: runs that differ only in seeds,
  data or host-side schedules (λ, remember rate) reuse it.
  """
  key = _compile_key(s)
  if key in _COMPILED:
    return _COMPILED[key], 0.0
  t0 = time.time()
  abstract = lambda tree: ckpt_lib.abstract_like(tree, s.replicated)  # noqa: E731
  compiled = s.step_fn.lower(
      abstract(s.state),
      s.abstract_batch,
      abstract(schedules.step_hparams(s.config.teacher, 0, s.n_max)),
  ).compile()
  compile_s = time.time() - t0
  logging.info('compiled the %s train step in %.1f s', s.config.learning_mode, compile_s)
  release_free_heap()
  _COMPILED[key] = compiled
  return compiled, compile_s


# ------------------------------------------------------------------------------------------------
# The loop's helpers (explicit arguments, no shared mutable state).


def _data(config, data: data_lib.ResolvedData, data_seed: int):
  """The resolved data with its feature caches, and the training iterator over it.

  With `model.inputs='features'` (the head on a frozen backbone's cached features) the
  training and validation splits' caches are opened, and so verified, before any step, and
  attached to the data (`ResolvedData.features`): the pipelines read them instead of images.
  """
  if config.model.get('inputs', 'images') == 'features':
    data = data.with_features(
        cache_features.open_for_config(config, (data.train_split, config.eval.split), data)
    )
  train_iter = data_lib.create_train_iterator(
      data,
      batch_size=int(config.optim.batch_size),
      seed=data_seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  return data, train_iter


def _restore(s: Setup, manager, train_iter) -> Tuple[train_step.TrainState, Dict[str, Any]]:
  """The newest intact checkpoint's state and meta, or the fresh state."""
  restored = ckpt_lib.restore(
      manager, ckpt_lib.abstract_like(s.state, s.replicated), train_iter, config=s.config
  )
  if restored is None:
    return s.state, {'metrics': {}}
  state, meta = restored
  logging.info(
      'resumed from %s at step %d (epoch %d)',
      manager.directory,
      int(state.step),
      int(meta.get('epoch', 0)),
  )
  return state, meta


def read_metrics(
    pending: List[Tuple[int, Dict[str, Any]]],
    window: Window,
    writer: MetricWriter,
    max_nonfinite: int,
    directory,
) -> Dict[str, float]:
  """Reads the steps' metrics from the device into the window, in one transfer.

  Logs every step that was skipped as non-finite and raises when the streak of such steps
  reaches `max_nonfinite`. Empties `pending`; returns the last step's metrics.

  Raises:
    FloatingPointError: too many consecutive non-finite steps.
  """
  last = {}
  for step, metrics in jax.device_get(pending):
    streak = int(metrics.pop('nonfinite_streak'))
    total = int(metrics.pop('nonfinite_total'))
    if bool(metrics.pop('nonfinite')):
      logging.warning(
          'step %d: non-finite loss or gradient, update skipped (%d in a row, %d in ' 'total)',
          step,
          streak,
          total,
      )
      writer.write(step, {'train/nonfinite_total': total, 'train/nonfinite_streak': streak})
    if streak >= max_nonfinite:
      raise FloatingPointError(
          f'{streak} consecutive training steps (steps {step - streak + 1}..{step}) had a '
          f'non-finite loss or gradient and were skipped; stopping (max_consecutive_nonfinite='
          f'{max_nonfinite}). The latest checkpoint in {directory} is from before the problem; '
          'lower the learning rate or check the data.'
      )
    window.add(metrics)
    last = metrics
  pending.clear()
  return last


def _train_scalars(
    config, step: int, spe: int, window: Window, steps: int, seconds: float
) -> Dict[str, Any]:
  """The logged training scalars: window means, learning rates, speed, schedules."""
  scalars = {f'train/{k}': v for k, v in window.means().items()}
  scalars.update(
      {f'train/{k}': v for k, v in schedules.learning_rates(config.optim, spe, step - 1).items()}
  )
  scalars['train/steps_per_s'] = steps / max(seconds, 1e-9)
  scalars['train/epoch'] = step / spe
  if config.learning_mode in ('st', 'mt', 'truth_teacher'):
    epoch = (step - 1) // spe
    scalars['train/pseudo_weight'] = schedules.pseudo_weight(config.teacher, epoch)
    scalars['train/remember_rate'] = schedules.remember_rate(config.teacher, epoch)
  return scalars


def _validate(
    validate: evaluation.Validator,
    state,
    epoch: int,
    step: int,
    meta: Dict[str, Any],
    writer: MetricWriter,
    config,
) -> Dict[str, float]:
  """Validates the state's model(s) after `epoch` (global step `step`), logs the scalars and
  returns them. The zero flow is measured at a run's first validation and kept in `meta`."""
  val = validate(
      {'params': state.params, 'batch_stats': state.batch_stats},
      epoch,
      zero_flow='zero_flow' not in meta,
  )
  meta.setdefault('zero_flow', {k: v for k, v in val.items() if 'zero_flow' in k})
  writer.write(step, val)
  logging.info(
      'epoch %d (step %d): %s',
      epoch,
      step,
      ', '.join(
          f'{k}={val[k]:.2f}'
          for k in (metric_key(a, scope='val') for a in config.eval.alphas)
          if k in val
      ),
  )
  return val


def _save(
    manager,
    step: int,
    epoch: int,
    state,
    meta: Dict[str, Any],
    window: Window,
    train_iter,
    config,
    val: Optional[Dict[str, float]] = None,
) -> None:
  """Checkpoints the step; the manager ranks steps by `ckpt_lib.select_metric(config)`."""
  meta.update(
      step=step,
      epoch=epoch,
      learning_mode=config.learning_mode,
      config=_config_json(config),
      log_window=window.state(),
  )
  if val is not None:
    meta['metrics'] = {k: to_python(v) for k, v in val.items()}
    if config.learning_mode == 'mt':
      meta['best_model'] = int(val['val/best_model'])
  ckpt_lib.save(manager, step, state, meta, train_iter, val)


@contextlib.contextmanager
def _sigterm_requests_stop():
  """Yields a dict whose 'stop' turns True on SIGTERM (preemption, `kill`); the handler is
  restored on exit. Only the main thread can install one."""
  flag = {'stop': False}
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def on_sigterm(signum, frame):
    del signum, frame
    flag['stop'] = True

  old = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, old)


class _ProgressBar:
  """The run's tqdm bar on process 0 (`config.progress_bar`, default on); a no-op elsewhere."""

  def __init__(self, config, total: int, initial: int, lead: bool):
    self._bar = None
    if lead and config.get('progress_bar', True):
      self._bar = tqdm.tqdm(
          total=total,
          initial=initial,
          unit='step',
          dynamic_ncols=True,
          desc=f'train {config.learning_mode}',
      )

  def update(self) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def show_losses(self, metrics: Dict[str, float]) -> None:
    """Shows a step's supervised and pseudo losses beside the bar."""
    if self._bar is not None:
      self._bar.set_postfix(
          {
              k.replace('loss_', ''): f'{v:.3f}'
              for k, v in metrics.items()
              if k.endswith(('loss_sup', 'loss_pseudo'))
          },
          refresh=False,
      )

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class _StepTimer:
  """Wall time of the training steps between two log points (`train/steps_per_s`).

  Validation and checkpoints are not step time: the loop `restart`s the timer after them.
  """

  def __init__(self):
    self.seconds_per_step: List[float] = []  # One entry per log point.
    self.restart()

  def restart(self) -> None:
    self._start, self.steps = time.time(), 0

  def tick(self) -> None:
    self.steps += 1

  def lap(self) -> Tuple[int, float]:
    """The steps and seconds since the last restart; records their time per step."""
    seconds = time.time() - self._start
    self.seconds_per_step.append(seconds / self.steps)
    return self.steps, seconds

  def median(self) -> Optional[float]:
    """The median time per step over the log points, seconds (None before the first)."""
    return float(np.median(self.seconds_per_step)) if self.seconds_per_step else None


def _stop_reason(
    step: int, stop_after_steps: Optional[int], signalled: Dict[str, bool], manager
) -> Optional[str]:
  """Why the run stops after `step`: 'as asked' (`stop_after_steps` reached), 'preempted'
  (SIGTERM, or on several hosts Orbax's preemption notice), or None (it goes on).

  Both are asked at every step: every process must reach Orbax's preemption sync points.
  """
  asked = stop_after_steps is not None and step >= stop_after_steps
  preempted = signalled['stop'] or (jax.process_count() > 1 and manager.reached_preemption(step))
  return 'as asked' if asked else 'preempted' if preempted else None


def _summary(
    state, step: int, spe: int, val: Dict[str, float], manager, compile_s: float, timer: _StepTimer
) -> Dict[str, Any]:
  """What `train_and_evaluate` returns (see there)."""
  return {
      'step': step,
      'epoch': step // spe,
      'val': val,
      'best': ckpt_lib.best_checkpoint(manager),
      'compile_s': compile_s,
      'mean_step_s': timer.median(),
      'nonfinite_total': int(jax.device_get(state.nonfinite_total)),
      'state': state,
  }


# ------------------------------------------------------------------------------------------------
# The loop.


def _config_json(config) -> str:
  return (
      config.to_json_best_effort(indent=2)
      if hasattr(config, 'to_json_best_effort')
      else (json.dumps(config, indent=2, default=str))
  )


def _log_devices(config) -> None:
  """Logs the learning mode, the process and device counts and the platform."""
  logging.info(
      'learning mode %s; %d process(es), %d device(s) (%d local): %s',
      config.learning_mode,
      jax.process_count(),
      jax.device_count(),
      jax.local_device_count(),
      jax.devices()[0].platform,
  )


def write_config(config, workdir: str) -> None:
  """Writes the resolved config to `<workdir>/config.json` (process 0)."""
  if jax.process_index() == 0:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(_config_json(config))


def release_free_heap() -> None:
  """Returns freed heap pages to the OS (glibc `malloc_trim`; a no-op elsewhere).

  XLA's compiler frees ~1-3 GiB of small allocations after compiling a ResNet-101 step, which
  glibc keeps mapped; the step's own buffers are then allocated on top (measured: the mt step's
  peak RSS 4.3 instead of 3.3 GiB at batch 2 on CPU without it).
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: Optional[int] = None
) -> Dict[str, Any]:
  """Trains (resuming from `<workdir>/checkpoints` if present) and validates.

  A SIGTERM (preemption) makes the run finish its current step, write a checkpoint and return;
  on several hosts Orbax's preemption notice does the same.

  Args:
    config: the experiment config (`configs/*.py`).
    workdir: where checkpoints, `config.json`, `metrics.jsonl` and TensorBoard files go.
    stop_after_steps: stop (with a checkpoint) once this global step is reached, as a
      preemption would; a later call resumes. None: train to the end.

  Returns:
    A summary: `step`, `epoch`, the last validation metrics `val`, `best` (step, epoch, metric,
    value, model index), `compile_s`, `mean_step_s`, `nonfinite_total`, `state`.
  """
  workdir = os.path.abspath(workdir)
  write_config(config, workdir)
  lead = jax.process_index() == 0
  _log_devices(config)
  s = setup(config)
  spe, total = s.steps_per_epoch, s.total_steps
  logging.info(
      '%s parameters%s',
      f'{sum(x.size for x in jax.tree.leaves(s.state.params)):,}',
      ' (2 models)' if config.learning_mode == 'mt' else '',
  )
  # The data section, resolved once (by `setup` if the schedule needed the split's size).
  data = s.data if s.data is not None else data_lib.resolve(config.data)
  data, train_iter = _data(config, data, s.data_seed)
  manager = ckpt_lib.make_manager(
      workdir, ckpt_lib.select_metric(config), async_saves=bool(config.async_checkpoints)
  )
  state, meta = _restore(s, manager, train_iter)
  step = int(jax.device_get(state.step))
  writer = MetricWriter(workdir, enabled=lead, resume_step=step)
  compiled, compile_s = compile_step(s) if step < total else (None, 0.0)
  if compiled is not None:
    writer.write(step, {'compile/train_step_s': compile_s})
  validate = evaluation.Validator(config, s.model, s.mesh, data)
  window = Window(meta.get('log_window'))
  pending: List[Tuple[int, Dict[str, Any]]] = []  # step metrics not yet read from the device
  read = functools.partial(
      read_metrics,
      pending,
      window,
      writer,
      int(config.max_consecutive_nonfinite),
      manager.directory,
  )
  last_val = dict(meta.get('metrics') or {})
  checkpoint_every = int(config.get('checkpoint_every_steps') or 0)
  timer, bar = _StepTimer(), _ProgressBar(config, total, step, lead)
  try:
    with _sigterm_requests_stop() as signalled:
      while step < total:
        epoch = step // spe
        batch = sharding.global_batch(next(train_iter), s.data_sharding, TRAIN_KEYS + TRUTH_KEYS)
        state, metrics = compiled(state, batch, s.hparams(epoch))
        step += 1
        pending.append((step, metrics))
        timer.tick()
        bar.update()
        if step % int(config.log_every_steps) == 0 or step == total:
          last = read()
          writer.write(step, _train_scalars(config, step, spe, window, *timer.lap()))
          timer.restart()
          bar.show_losses(last)
        if step % spe == 0:
          read()
          completed, val = step // spe, None
          if completed % int(config.eval.every_epochs) == 0 or step == total:
            val = last_val = _validate(validate, state, completed, step, meta, writer, config)
          _save(manager, step, completed, state, meta, window, train_iter, config, val)
          timer.restart()  # Evaluation and checkpointing are not step time.
        elif checkpoint_every and step % checkpoint_every == 0:
          read()  # The saved logging window includes this step.
          _save(manager, step, step // spe, state, meta, window, train_iter, config)
        reason = _stop_reason(step, stop_after_steps, signalled, manager)
        if reason and step < total:
          read()
          if manager.latest_step() != step:
            _save(manager, step, step // spe, state, meta, window, train_iter, config)
          logging.info('stopping at step %d (%s) with a checkpoint; rerun to resume', step, reason)
          break
      read()
  finally:
    manager.wait_until_finished()
    bar.close()
    writer.close()
  return _summary(state, step, spe, last_val, manager, compile_s, timer)


def run_evaluation(
    config, checkpoint: str, workdir: Optional[str] = None, model_index=None
) -> Dict[str, float]:
  """`--mode=eval`: validation PCK of a checkpoint (a workdir, step directory or export).

  The model comes from the checkpoint's config, data and protocol from `config`. Writes
  `<workdir>/eval_<benchmark>_<split>.{json,txt}` (the full report of `evaluation`) and returns
  the flat `val/pck@alpha` scalars.
  """
  result = evaluation.evaluate_checkpoint(
      config,
      checkpoint,
      workdir,
      model_index=model_index,
      max_batches=config.eval.get('max_batches'),
      progress=bool(config.get('progress_bar', True)),
      split=config.eval.split,
  )
  kind = result.protocol.standard_threshold
  if config.eval.threshold not in ('standard', None) and (
      config.eval.threshold in result.protocol.thresholds
  ):
    kind = config.eval.threshold
  out = {metric_key(a, scope=config.eval.split): result.pck(kind, a) for a in config.eval.alphas}
  logging.info('%s', result.table())
  return out
