"""The training loop: state, data, one compiled data-parallel step, validation, checkpoints, logs.

`train_and_evaluate(config, workdir)` trains in the learning mode `config.learning_mode`
('baseline', 'st', 'mt'; see `train_step`), validates PCK@alpha on `config.eval.split` at the end
of every `config.eval.every_epochs` epochs for every trained model, and checkpoints the latest and
the best step (by validation PCK@0.1; for 'mt' the better of the two models, whose index is
recorded). A restarted run continues from the latest checkpoint exactly where it stopped: the
parameters, optimiser states, step, data-iterator position and best-so-far are restored, and the
step's randomness is `fold_in(key, step)`.

Data parallelism: one `jax.jit` step over all devices of a 1-D `('data',)` mesh, the batch sharded
along its first axis and the state replicated. Batch statistics and the small-loss selection are
then global over the batch, so N devices compute what one device computes. Several hosts: call
`jax.distributed.initialize()` first (`main.py --multihost`); each process reads its own shard of
the data (`process_index::process_count`) and the global batch is assembled with
`jax.make_array_from_process_local_data`.

Logging (process 0): a tqdm bar with steps/s and the current losses; the compile time apart from
the step time; scalars every `log_every_steps` steps (window means) and every evaluation to
TensorBoard event files (`<workdir>/tensorboard`) and to `<workdir>/metrics.jsonl`, one JSON object
per line with `step` and keys such as `train/a/loss_sup`, `train/lr/head`, `val/pck@0.1`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import pathlib
import re
import signal
import threading
import time
from typing import Any, Dict, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from sccorr_jax import checkpoint as ckpt_lib
from sccorr_jax import evaluation
from sccorr_jax import models
from sccorr_jax import schedules
from sccorr_jax import train_step as ts


TRAIN_KEYS = ('src_img', 'trg_img', 'flow')


# ------------------------------------------------------------------------------------------------
# Set-up helpers.


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D `('data',)` mesh over every device of every process (automatic sharding mode)."""
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def steps_per_epoch(config) -> int:
  """`optim.steps_per_epoch`, or the training pairs divided by the global batch size."""
  if config.optim.get('steps_per_epoch'):
    return int(config.optim.steps_per_epoch)
  from sccorr_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  n = data_lib.num_examples(config.data, config.data.get('train_split', 'trn'))
  spe = n // int(config.optim.batch_size)
  if spe < 1:
    raise ValueError(f'the training split has {n} pairs, fewer than one batch of '
                     f'{config.optim.batch_size}')
  return spe


def check_config(config) -> None:
  """Raises ValueError on inconsistent settings, naming the keys."""
  mode = config.learning_mode
  if mode not in ts.STEPS:
    raise ValueError(f'learning_mode must be one of {tuple(ts.STEPS)}, got {mode!r}')
  if mode == 'st' and not config.teacher.get('checkpoint'):
    raise ValueError("learning_mode 'st' needs --config.teacher.checkpoint=<baseline workdir, "
                     'checkpoint step directory or exported model>')
  stride = 2 ** (int(config.model.get('backbone_stages', 3)) + 1)
  grid = config.data.img_size // stride
  expected = config.model.feature_size or grid
  if config.data.feature_size != expected:
    raise ValueError(
        f'data.feature_size ({config.data.feature_size}) must equal the flow grid of the model '
        f'({expected}: model.feature_size, or img_size / stride {stride} when it is 0)')
  if config.model.batch_norm not in ('batch', 'frozen'):
    raise ValueError(f"model.batch_norm must be 'batch' or 'frozen', got "
                     f'{config.model.batch_norm!r}')
  k = config.teacher.dilation_kernel
  if k and (k < 1 or k % 2 == 0):
    raise ValueError(f'teacher.dilation_kernel must be an odd positive int, or 0 / None (no '
                     f'mask), got {k}')
  if config.optim.batch_size % jax.device_count():
    raise ValueError(f'optim.batch_size ({config.optim.batch_size}) must be divisible by the '
                     f'device count ({jax.device_count()})')


def _load_pretrained(config, model, variables):
  """Backbone from a torchvision state dict file, head kept from `variables`."""
  from sccorr_jax import convert  # pylint: disable=g-import-not-at-top
  path = config.model.pretrained
  state_dict = convert.read_state_dict(path)
  return convert.from_torch_state_dict(state_dict, model, init_variables=variables)


def init_variables(config, model, rng, num_models: int):
  """Initial `{'params', 'batch_stats'}` of `num_models` models (stacked if 2).

  Each model gets its own initialisation key; with `model.pretrained` every model starts from the
  same pretrained backbone and keeps its own head initialisation (the reference).
  """
  size = int(config.data.img_size)
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  keys = jax.random.split(rng, num_models)
  out = []
  for k in keys:
    v = flax.core.unfreeze(jax.jit(model.init)(k, x, x))
    v.setdefault('batch_stats', {})
    if config.model.get('pretrained'):
      v = _load_pretrained(config, model, v)
      v = jax.tree.map(jnp.asarray, v)
    out.append(v)
  if num_models == 1:
    return out[0]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


def create_train_state(config, model, tx, rng, teacher=None) -> ts.TrainState:
  """A fresh `TrainState` for `config.learning_mode` (host arrays; shard with `device_put`)."""
  mutual = config.learning_mode == 'mt'
  v = init_variables(config, model, rng, 2 if mutual else 1)
  opt_state = (jax.vmap(tx.init) if mutual else tx.init)(v['params'])
  return ts.TrainState(step=jnp.zeros((), jnp.int32), params=v['params'],
                       batch_stats=v['batch_stats'], opt_state=opt_state, teacher=teacher)


def eval_protocol(config) -> evaluation.Protocol:
  """The validation protocol: `eval.alphas` at `eval.threshold` on `eval.split`."""
  threshold = config.eval.threshold
  if threshold == 'standard':
    threshold = evaluation.STANDARD_THRESHOLD[config.data.name]
  alphas = tuple(config.eval.alphas)  # Plus the one selecting the model and the checkpoint.
  alphas += () if config.eval.select_alpha in alphas else (config.eval.select_alpha,)
  return evaluation.Protocol(benchmark=config.data.name, split=config.eval.split,
                             alphas=alphas, thresholds=(threshold,),
                             img_size=int(config.data.img_size))


def evaluate(model, variables, data_iter, protocol: evaluation.Protocol, *, mesh=None,
             eval_step=None, max_batches: Optional[int] = None, prefix: str = 'val/',
             zero_flow: bool = False) -> Dict[str, float]:
  """PCK of one model over an evaluation iterator, as flat scalars.

  Args:
    model: the network.
    variables: one model's `{'params', 'batch_stats'}`.
    data_iter: iterable of eval batches (`data.create_eval_iterator`; padding rows masked by
      `pair_valid`, padded keypoints by `kps_valid`).
    protocol: alphas, threshold kind, resolution (`eval_protocol`).
    mesh: device mesh (default all devices).
    eval_step: a prebuilt `evaluation.make_eval_step(model, protocol)` (no recompilation).
    max_batches: stop early (smoke runs).
    prefix: key prefix.
    zero_flow: also report the PCK of the zero flow (identity transfer) on the same pairs.

  Returns:
    `{prefix + 'pck@<alpha>': per-pair mean PCK in percent (the reference's number),
    prefix + 'pck_kp@<alpha>': per keypoint, prefix + 'num_pairs': pairs}` and, with
    `zero_flow`, `prefix + 'pck_zero_flow@<alpha>'`.
  """
  def run(v, step):
    return evaluation.evaluate_model(model, v, data_iter, protocol, mesh=mesh, eval_step=step,
                                     max_batches=max_batches, progress=False)

  result = run(variables, eval_step)
  kind = protocol.thresholds[0]
  out = {f'{prefix}num_pairs': float(result.groups['all'].pairs)}
  for a in protocol.alphas:
    out[f'{prefix}pck@{a:g}'] = result.pck(kind, a, 'per_pair')
    out[f'{prefix}pck_kp@{a:g}'] = result.pck(kind, a, 'per_keypoint')
  if zero_flow:
    zero = evaluation.evaluate_model(_ZeroFlow(model), variables, data_iter, protocol,
                                     mesh=mesh, max_batches=max_batches, progress=False)
    for a in protocol.alphas:
      out[f'{prefix}pck_zero_flow@{a:g}'] = zero.pck(kind, a, 'per_pair')
  return out


class _ZeroFlow:
  """A stand-in model predicting zero flow on the model's grid (the trivial baseline)."""

  def __init__(self, model):
    self._model = model

  def apply(self, variables, src_img, trg_img):
    del variables, trg_img
    b, h = src_img.shape[0], src_img.shape[1]
    s = self._model.feature_size or h // 16
    return jnp.zeros((b, s, s, 2), jnp.float32)


# ------------------------------------------------------------------------------------------------
# Logging.


class MetricWriter:
  """Scalars to TensorBoard event files and `<workdir>/metrics.jsonl` (process 0 only).

  A run resumed at `resume_step` first drops what the interrupted run logged after that step
  (JSONL rows with a later step, or torn; TensorBoard events from `resume_step + 1` on), so
  that every step is logged once.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      path = os.path.join(workdir, 'metrics.jsonl')
      _drop_rows_after(path, resume_step)
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                               purge_step=resume_step + 1)
      self._jsonl = open(path, 'a')

  def write(self, step: int, scalars: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _py(v) for k, v in scalars.items()}
    for k, v in clean.items():
      if isinstance(v, (int, float)) and v is not None:
        # TensorBoard tags allow [A-Za-z0-9_./-]: `val/pck@0.1` -> `val/pck_0.1` (the JSONL
        # keeps the original names).
        self._tb.add_scalar(re.sub(r'[^A-Za-z0-9_./-]', '_', k), v, step)
    self._jsonl.write(json.dumps({'step': int(step), **clean}) + '\n')
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites the JSONL file `path` (atomically) without rows of steps after `step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)['step']) <= step and line.endswith('\n'):
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # A row torn by a kill: dropped.
  if len(keep) != len(lines):
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


def _py(v):
  v = np.asarray(v).item() if not isinstance(v, (int, float, str)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return None if math.isnan(v) else v
  return v


class _Window:
  """Means of per-step scalars over a logging window (its sums travel in the checkpoint, so a
  resumed run logs the means an uninterrupted one would)."""

  def __init__(self, state: Optional[Dict[str, Dict[str, float]]] = None):
    state = state or {}
    self.sums, self.counts = dict(state.get('sums', {})), dict(state.get('counts', {}))

  def state(self) -> Dict[str, Dict[str, float]]:
    return {'sums': dict(self.sums), 'counts': dict(self.counts)}

  def add(self, metrics: Dict[str, Any]) -> None:
    for k, v in metrics.items():
      v = float(v)
      if math.isfinite(v):
        self.sums[k] = self.sums.get(k, 0.0) + v
        self.counts[k] = self.counts.get(k, 0) + 1

  def means(self) -> Dict[str, float]:
    out = {k: self.sums[k] / self.counts[k] for k in self.sums}
    self.sums, self.counts = {}, {}
    return out


# ------------------------------------------------------------------------------------------------
# The loop.


def _global_batch(batch, sharding, keys=TRAIN_KEYS):
  """Process-local numpy batch -> global arrays sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in keys}


def _config_json(config) -> str:
  return config.to_json_best_effort(indent=2) if hasattr(config, 'to_json_best_effort') else (
      json.dumps(config, indent=2, default=str))


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: Optional[int] = None) -> Dict[str, Any]:
  """Trains (resuming from `<workdir>/checkpoints` if present) and validates.

  A SIGTERM (preemption) makes the run finish its current step, write a checkpoint and return;
  on several hosts Orbax's preemption notice does the same.

  Args:
    config: the experiment config (`configs/*.py`).
    workdir: where checkpoints, `config.json`, `metrics.jsonl` and TensorBoard files go.
    stop_after_steps: stop (with a checkpoint) once this global step is reached, as a
      preemption would; a later call resumes. None: train to the end.

  Returns:
    A summary: `step`, `epoch`, the last validation metrics, `best` (step, epoch, metric,
    model index), `compile_s`, `mean_step_s`, `nonfinite_total`.
  """
  from sccorr_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  check_config(config)
  workdir = os.path.abspath(workdir)
  write_config(config, workdir)
  lead = jax.process_index() == 0
  mode = config.learning_mode
  mutual = mode == 'mt'
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  logging.info('learning mode %s; %d process(es), %d device(s) (%d local): %s', mode,
               jax.process_count(), jax.device_count(), jax.local_device_count(),
               jax.devices()[0].platform)

  spe = steps_per_epoch(config)
  num_epochs = int(config.optim.num_epochs)
  total_steps = spe * num_epochs
  rng = jax.random.PRNGKey(int(config.seed))
  init_rng, step_rng, data_seed_rng = jax.random.split(rng, 3)
  data_seed = int(jax.random.randint(data_seed_rng, (), 0, 2 ** 31 - 1))

  model = models.build_model(config)
  tx = schedules.make_optimizer(config.optim, spe)
  step_cfg = ts.StepConfig(model=model, tx=tx, batch_norm=config.model.batch_norm,
                           dilation_kernel=config.teacher.dilation_kernel or None)
  teacher = None
  if mode == 'st':
    teacher, teacher_config = ckpt_lib.load_model_variables(
        config.teacher.checkpoint, 'best', sharding=replicated, model_config=config)
    logging.info('fixed teacher loaded from %s (its learning mode: %s)',
                 config.teacher.checkpoint, teacher_config.get('learning_mode'))
  state = create_train_state(config, model, tx, init_rng, teacher)
  state = jax.device_put(state, replicated)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('%s parameters%s', f'{n_params:,}', ' (2 models)' if mutual else '')

  train_iter = data_lib.create_train_iterator(
      config.data, batch_size=int(config.optim.batch_size), seed=data_seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  manager = ckpt_lib.make_manager(workdir, ckpt_lib.select_metric(config),
                                  async_saves=bool(config.async_checkpoints))
  meta: Dict[str, Any] = {'metrics': {}}
  restored = ckpt_lib.restore(manager, ckpt_lib.abstract_like(state, replicated), train_iter,
                              config=config)
  if restored is not None:
    state, meta = restored
    logging.info('resumed from %s at step %d (epoch %d)', manager.directory,
                 int(state.step), int(meta.get('epoch', 0)))
  step = int(jax.device_get(state.step))

  # Compile once, ahead of time, and report it apart from the step time.
  n_max = int(config.optim.batch_size) * int(config.data.feature_size) ** 2
  step_fn = functools.partial(ts.get_step_fn(mode), step_cfg)
  jitted = jax.jit(step_fn, in_shardings=(replicated, data_sharding, replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
  hp_host = schedules.step_hparams(config.teacher, step // spe if spe else 0, n_max)
  b, s, fs = int(config.optim.batch_size), int(config.data.img_size), int(config.data.feature_size)
  abstract_batch = {
      'src_img': jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=data_sharding),
      'trg_img': jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=data_sharding),
      'flow': jax.ShapeDtypeStruct((b, fs, fs, 2), jnp.float32, sharding=data_sharding)}
  t0 = time.time()
  compiled = None
  if step < total_steps:
    compiled = jitted.lower(
        ckpt_lib.abstract_like(state, replicated), abstract_batch,
        jax.ShapeDtypeStruct(step_rng.shape, step_rng.dtype, sharding=replicated),
        ckpt_lib.abstract_like(hp_host, replicated)).compile()
  compile_s = time.time() - t0
  if compiled is not None:
    logging.info('compiled the %s train step in %.1f s', mode, compile_s)
    release_free_heap()
  else:
    logging.info('step %d: training already finished (%d epochs)', step, num_epochs)

  protocol = eval_protocol(config)
  eval_step = evaluation.make_eval_step(model, protocol)
  writer = MetricWriter(workdir, enabled=lead, resume_step=step)
  if compiled is not None:
    writer.write(step, {'compile/train_step_s': compile_s})
  lr_of = schedules.lr_fn(config.optim, spe)

  def eval_iter():
    return data_lib.create_eval_iterator(
        config.data, config.eval.split, batch_size=int(config.eval.batch_size),
        process_index=jax.process_index(), process_count=jax.process_count())

  def validate(epoch: int) -> Dict[str, float]:
    t = time.time()
    out = {}
    models_ = [('a', 0), ('b', 1)] if mutual else [('', None)]
    params = jax.device_get(state.params)
    stats = jax.device_get(state.batch_stats)
    for name, i in models_:
      v = {'params': params, 'batch_stats': stats}
      if i is not None:
        v = jax.tree.map(lambda x, i=i: x[i], v)
      prefix = f'val/{name}/' if name else 'val/'
      out.update(evaluate(model, v, eval_iter(), protocol, mesh=mesh, eval_step=eval_step,
                          max_batches=config.eval.get('max_batches'), prefix=prefix,
                          zero_flow=(i in (None, 0) and meta.get('zero_flow') is None)))
    if mutual:
      sel = [out[f'val/{m}/pck@{config.eval.select_alpha:g}'] for m in 'ab']
      winner = int(np.nanargmax(sel)) if np.isfinite(sel).any() else 0
      for a in protocol.alphas:
        out[f'val/pck@{a:g}'] = out[f'val/{"ab"[winner]}/pck@{a:g}']
      out['val/best_model'] = float(winner)
      zf = {k.replace('val/a/', 'val/'): v for k, v in out.items() if 'zero_flow' in k}
      out = {k: v for k, v in out.items() if 'zero_flow' not in k}
      out.update(zf)
    out['val/epoch'] = float(epoch)
    out['time/eval_s'] = time.time() - t
    return out

  def save_checkpoint(epoch: int, val: Optional[Dict[str, float]] = None):
    meta['step'] = step
    meta['epoch'] = epoch
    meta['learning_mode'] = mode
    meta['config'] = _config_json(config)
    meta['log_window'] = window.state()
    if val is not None:
      meta['metrics'] = {k: _py(v) for k, v in val.items()}
      if mutual:
        meta['best_model'] = int(val['val/best_model'])
    t = time.time()
    # The manager ranks the steps by `ckpt_lib.select_metric(config)` among `val`.
    ckpt_lib.save(manager, step, state, meta, train_iter, val)
    return time.time() - t

  bar = None
  if lead and config.get('progress_bar', True):
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=total_steps, initial=step, unit='step', dynamic_ncols=True,
                    desc=f'train {mode}')
  window = _Window(meta.get('log_window'))
  step_times = []
  last_val: Dict[str, float] = dict(meta.get('metrics') or {})
  hp_epoch, hp = None, None
  pending = None  # metrics of the previous step, read one step late (keeps the device busy)
  max_nonfinite = int(config.max_consecutive_nonfinite)
  t_log = time.time()
  steps_since_log = 0

  def consume(pending_step, metrics):
    metrics = jax.device_get(metrics)
    streak = int(metrics.pop('nonfinite_streak'))
    total_nf = int(metrics.pop('nonfinite_total'))
    if bool(metrics.pop('nonfinite')):
      logging.warning('step %d: non-finite loss or gradient, update skipped (%d in a row, '
                      '%d in total)', pending_step, streak, total_nf)
      writer.write(pending_step, {'train/nonfinite_total': total_nf,
                                  'train/nonfinite_streak': streak})
    if streak >= max_nonfinite:
      manager.wait_until_finished()
      raise FloatingPointError(
          f'{streak} consecutive training steps (steps {pending_step - streak + 1}..'
          f'{pending_step}) had a non-finite loss or gradient and were skipped; stopping '
          f'(max_consecutive_nonfinite={max_nonfinite}). The latest checkpoint in '
          f'{manager.directory} is from before the problem; lower the learning rate or check '
          'the data.')
    window.add(metrics)
    return metrics

  # SIGTERM (preemption, `kill`): finish the current step, checkpoint, exit cleanly.
  signalled = {'stop': False}
  old_handler = None
  if threading.current_thread() is threading.main_thread():
    def on_sigterm(signum, frame):
      del signum, frame
      signalled['stop'] = True
    old_handler = signal.signal(signal.SIGTERM, on_sigterm)

  try:
    while step < total_steps:
      epoch = step // spe
      if hp_epoch != epoch:
        hp = jax.device_put(schedules.step_hparams(config.teacher, epoch, n_max), replicated)
        hp_epoch = epoch
      batch = _global_batch(next(train_iter), data_sharding)
      rng = jax.device_put(jax.random.fold_in(step_rng, step), replicated)
      state, metrics = compiled(state, batch, rng, hp)
      if pending is not None:
        last = consume(*pending)
        if bar is not None:
          bar.set_postfix({k.replace('loss_', ''): f'{v:.3f}' for k, v in last.items()
                           if k.endswith('loss_sup') or k.endswith('loss_pseudo')},
                          refresh=False)
      pending = (step + 1, metrics)
      step += 1
      steps_since_log += 1
      if bar is not None:
        bar.update(1)
      if step % int(config.log_every_steps) == 0 or step == total_steps:
        consume(*pending)
        pending = None
        jax.block_until_ready(state.step)
        dt = time.time() - t_log
        step_times.append(dt / max(steps_since_log, 1))
        scalars = {f'train/{k}': v for k, v in window.means().items()}
        scalars.update({f'train/{k}': v for k, v in lr_of(step - 1).items()})
        scalars['train/steps_per_s'] = steps_since_log / max(dt, 1e-9)
        scalars['train/epoch'] = step / spe
        if mode != 'baseline':
          scalars['train/pseudo_weight'] = float(hp_host.pseudo_weight) if hp is None else float(
              jax.device_get(hp.pseudo_weight))
          scalars['train/remember_rate'] = schedules.remember_rate(config.teacher, epoch)
        writer.write(step, scalars)
        t_log, steps_since_log = time.time(), 0
      epoch_done = step % spe == 0
      if epoch_done:
        if pending is not None:
          consume(*pending)
          pending = None
        completed = step // spe
        val = None
        if completed % int(config.eval.every_epochs) == 0 or step == total_steps:
          val = validate(completed)
          if 'val/pck_zero_flow@0.1' in val:
            meta['zero_flow'] = val['val/pck_zero_flow@0.1']
          last_val = val
          writer.write(step, val)
          logging.info('epoch %d (step %d): %s', completed, step, ', '.join(
              f'{k}={v:.2f}' for k, v in val.items() if k.startswith('val/pck@')))
        save_checkpoint(completed, val)
        t_log = time.time()  # evaluation and checkpointing are not step time
      elif config.get('checkpoint_every_steps') and step % int(
          config.checkpoint_every_steps) == 0:
        if pending is not None:  # The saved logging window includes this step.
          consume(*pending)
          pending = None
        save_checkpoint(step // spe)
      asked = stop_after_steps is not None and step >= stop_after_steps
      preempted = signalled['stop'] or (jax.process_count() > 1
                                        and manager.reached_preemption(step))
      if (asked or preempted) and step < total_steps:
        if pending is not None:
          consume(*pending)
          pending = None
        if manager.latest_step() != step:
          save_checkpoint(step // spe)
        logging.info('stopping at step %d (%s) with a checkpoint; rerun to resume', step,
                     'as asked' if asked else 'preempted')
        break
    if pending is not None:
      consume(*pending)
  finally:
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
    manager.wait_until_finished()
    if bar is not None:
      bar.close()
    writer.close()

  nonfinite_total = int(jax.device_get(state.nonfinite_total))
  summary = {'step': step, 'epoch': step // spe, 'val': last_val,
             'best': ckpt_lib.best_checkpoint(manager),
             'compile_s': compile_s,
             'mean_step_s': float(np.median(step_times)) if step_times else None,
             'nonfinite_total': nonfinite_total, 'state': state}
  return summary


def run_evaluation(config, checkpoint: str, workdir: Optional[str] = None,
                   model_index=None) -> Dict[str, float]:
  """`--mode=eval`: validation PCK of a checkpoint (a workdir, step directory or export).

  The model comes from the checkpoint's config, data and protocol from `config`. Writes
  `<workdir>/eval_<benchmark>_<split>.{json,txt}` (the full report of `evaluation`) and returns
  the flat `val/pck@alpha` scalars.
  """
  result = evaluation.evaluate_checkpoint(config, checkpoint, workdir, model_index=model_index,
                                          max_batches=config.eval.get('max_batches'),
                                          progress=bool(config.get('progress_bar', True)),
                                          split=config.eval.split)
  kind = result.protocol.standard_threshold
  if config.eval.threshold not in ('standard', None) and (
      config.eval.threshold in result.protocol.thresholds):
    kind = config.eval.threshold
  out = {f'{config.eval.split}/pck@{a:g}': result.pck(kind, a) for a in config.eval.alphas}
  logging.info('%s', result.table())
  return out

