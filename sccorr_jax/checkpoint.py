"""Checkpoints: the trainer's Orbax manager, model exports, their integrity, and loading a model.

Trainer checkpoints live in `<workdir>/checkpoints/<step>/` with three Orbax items:

* `state`: the `train_step.TrainState` (parameters, BatchNorm statistics and optimiser state of
  every trained model, stacked [2, ...] for 'mt'; the fixed teacher's variables for 'st'; step;
  non-finite counters);
* `meta`: JSON with `step`, `epoch` (epochs completed), the validation metrics of the checkpoint,
  `best_model` (which mutual teacher won: 0 = a, 1 = b), and `config` (the resolved config as
  JSON);
* `data`: the grain training iterator's state (mid-epoch exact).

The manager keeps the two latest steps and the best one by `select_metric(config)`
(`val/pck@<eval.select_alpha>`, the metric that also picks the better mutual teacher), with
`AnyPreservationPolicy([LatestN(2), BestN(1)])`; `best_step()` is asked from it. Saves are
asynchronous if asked. Restores always go against an abstract target (`jax.ShapeDtypeStruct`
with the sharding wanted here), so a checkpoint written on a GPU or TPU slice loads on one CPU.

Integrity: every step and every export holds `checksums.json`, the size and CRC-32 of each of
its files, written into Orbax's temporary directory just before the atomic rename (so a crash
mid-save leaves no step at all, and async saves are sealed in their background thread). Reading
a checkpoint first checks it: every item present, its JSON files parseable, the tree metadata
non-empty, and every file as the manifest says. Checkpoints written before the manifest existed
get the structural checks and Orbax's own. Resuming (`restore`) takes the newest intact of the two
latest steps, logs one line naming each damaged step, file and problem, and moves the damaged
steps to `<workdir>/checkpoints_damaged/`; the best step is not a resume point. Loading a model
(`load_model_variables`, `load_model`) from a damaged checkpoint raises a one-line
`CheckpointError` naming the file and the problem. A checkpoint that does not fit a config is
reported with the config keys that differ, and as "another config" only when they do.

Model exports (`save_model_variables`) hold one model's `{'params', 'batch_stats'}` (item
`variables`) and the config (item `config`), written atomically. `load_model_variables` reads
an export, a trainer workdir (its best step) or one checkpoint step directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import shutil
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sccorr_jax import constants
from sccorr_jax.models import build_model
from sccorr_jax.models import input_shape

CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'checkpoints_damaged'  # Beside CHECKPOINT_DIR: damaged steps set aside on resume.
STATE, META, DATA = 'state', 'meta', 'data'
VARIABLES, CONFIG = 'variables', 'config'
MANIFEST = 'checksums.json'
KEEP_LATEST = 2  # The latest step and one to fall back to if it is damaged.
# Written by Orbax into the step directory while or after the manifest is sealed.
_UNSEALED = ('_CHECKPOINT_METADATA', 'commit_success.txt', MANIFEST)
_SEALED_KEY = 'sccorr_jax_checksums'  # In Orbax's step metadata: this step has a manifest.

PathLike = Union[str, os.PathLike]
ModelIndex = Union[None, int, str]


class CheckpointError(ValueError):
  """A checkpoint cannot be used: missing, damaged, of the wrong kind or of another config.

  The message is one line naming the directory or file and the problem.
  """


def select_metric(config) -> str:
  """`val/pck@<config.eval.select_alpha>`: picks the best checkpoint and the better mt model."""
  return constants.metric_key(config.eval.select_alpha, scope='val')


# ------------------------------------------------------------------------------------------------
# Abstract targets.


def abstract_model_variables(model, img_size: int, sharding=None) -> Dict[str, Any]:
  """`{'params', 'batch_stats'}` of `model` as `jax.ShapeDtypeStruct`s (nothing computed)."""
  x = jax.ShapeDtypeStruct((1, *input_shape(model, img_size)), jnp.float32)
  shapes = jax.eval_shape(lambda a, b: model.init(jax.random.PRNGKey(0), a, b), x, x)
  shapes = flax.core.unfreeze(shapes)
  shapes.setdefault('batch_stats', {})
  return _with_sharding(shapes, sharding)


def _with_sharding(tree, sharding=None):
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def abstract_like(tree, sharding=None):
  """Abstract target (`ShapeDtypeStruct`s on `sharding`, default one local device) of `tree`."""
  return _with_sharding(tree, sharding)


# ------------------------------------------------------------------------------------------------
# Integrity: the checksum manifest and the checks made before reading.


def _crc32(path: pathlib.Path) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifest(directory: PathLike) -> None:
  """Writes `<directory>/checksums.json`: `{file: [bytes, crc32]}` of every file below it."""
  directory = pathlib.Path(directory)
  files = {}
  for path in sorted(directory.rglob('*')):
    rel = path.relative_to(directory).as_posix()
    if path.is_file() and rel not in _UNSEALED:
      files[rel] = [path.stat().st_size, _crc32(path)]
  (directory / MANIFEST).write_text(json.dumps({'algorithm': 'crc32', 'files': files}))


class _SealingRenamePath(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic-rename save directory, sealed with `checksums.json` just before the rename.

  `finalize` runs after every item is written and finalised (in the background thread for
  async saves), on the primary host only.
  """

  async def finalize(self, *args, **kwargs):
    # Orbax also finalises each item's directory inside the step's: only the step is sealed.
    if ocp.path.atomicity.TMP_DIR_SUFFIX not in self.get_final().parent.name:
      await asyncio.to_thread(write_manifest, os.fspath(self.get()))
    await super().finalize(*args, **kwargs)


def _temporary_path_class(directory: PathLike):
  """The sealing class on local filesystems; Orbax's default (no manifest) on object stores."""
  return None if re.match(r'^[a-z0-9]+://', os.fspath(directory)) else _SealingRenamePath


def _json_problem(path: pathlib.Path, tree: bool = False) -> Optional[str]:
  """What is wrong with a JSON file of a checkpoint (None if nothing)."""
  if not path.is_file():
    return 'missing'
  if path.stat().st_size == 0:
    return 'empty (0 bytes)'
  try:
    content = json.loads(path.read_bytes())
  except (OSError, ValueError) as e:
    return f'not valid JSON ({_first_line(e)})'
  if tree and not (isinstance(content, dict) and content.get('tree_metadata')):
    return 'holds no tree metadata'
  if not isinstance(content, (dict, list)):
    return f'holds a {type(content).__name__}, not a JSON object'
  return None


def _damage(directory: pathlib.Path, items: Sequence[str]) -> Optional[str]:
  """The first problem of a step or export directory, as '<file>: <problem>'; None if intact.

  Checks that every item of `items` is there, that its JSON files parse (the tree metadata of
  `state`/`variables` non-empty), and every file against `checksums.json`.
  """
  if not directory.is_dir():
    return f'{directory}: missing'
  for item in items:
    if not (directory / item).is_dir():
      return f'{directory / item}: missing'
  json_files = [(directory / '_CHECKPOINT_METADATA', False)] if (
      directory / '_CHECKPOINT_METADATA').exists() else []
  for item in items:
    if item in (STATE, VARIABLES):
      json_files.append((directory / item / '_METADATA', True))
    elif item in (META, CONFIG):
      json_files.append((directory / item / 'metadata', False))
    elif item == DATA:
      found = sorted((directory / item).glob('*.json'))
      if not found:
        return f'{directory / item}: no iterator state file (*.json)'
      json_files += [(p, False) for p in found]
  if (directory / 'metrics' / 'metrics').exists():
    json_files.append((directory / 'metrics' / 'metrics', False))
  for path, tree in json_files:
    problem = _json_problem(path, tree)
    if problem:
      return f'{path}: {problem}'
  manifest = directory / MANIFEST
  if not manifest.exists():
    if _sealed(directory):
      return f'{manifest}: missing'
    return None  # Written before manifests existed: Orbax's own checks only.
  try:
    files = json.loads(manifest.read_bytes())['files']
    files = {str(k): (int(v[0]), int(v[1])) for k, v in files.items()}
  except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
    return f'{manifest}: unreadable ({_first_line(e)})'
  for rel, (size, crc) in sorted(files.items()):
    path = directory / rel
    if not path.is_file():
      return f'{path}: missing'
    actual = path.stat().st_size
    if actual != size:
      return f'{path}: {actual} bytes, {size} when saved (truncated or overwritten)'
    if _crc32(path) != crc:
      return f'{path}: contents changed since the save (CRC-32 mismatch)'
  return None


def _sealed(directory: pathlib.Path) -> bool:
  """Whether Orbax's step metadata says this directory was saved with a manifest."""
  try:
    meta = json.loads((directory / '_CHECKPOINT_METADATA').read_bytes())
    return bool((meta.get('custom_metadata') or {}).get(_SEALED_KEY))
  except (OSError, ValueError, AttributeError):
    return False


def verify(directory: PathLike, items: Sequence[str] = (STATE, META)) -> None:
  """Raises a one-line `CheckpointError` naming the file and the problem if `directory` (a step
  or an export) is damaged; see `_damage` for what is checked."""
  problem = _damage(pathlib.Path(directory), items)
  if problem:
    raise CheckpointError(f'damaged checkpoint: {problem}')


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  text = lines[0] if lines else type(e).__name__
  return text if len(text) <= 300 else text[:297] + '...'


# ------------------------------------------------------------------------------------------------
# Shapes and configs: one check for stored metadata and for variables in memory.


def _plain(keystr: str) -> str:
  """`.opt_state[0].mu['backbone']` and `['opt_state'][0]['mu']['backbone']` -> one name."""
  return '/'.join(re.findall(r'[A-Za-z0-9_]+', keystr))


def _shapes(tree) -> Dict[str, Tuple[int, ...]]:
  """Leaf name ('params/sce/conv/kernel') -> shape of a tree of arrays, structs or metadata."""
  if tree is None:
    return {}
  flat = jax.tree_util.tree_flatten_with_path(flax.core.unfreeze(tree))[0]
  return {_plain(jax.tree_util.keystr(k)): tuple(getattr(v, 'shape', np.shape(v)))
          for k, v in flat}


def _flat_config(config, prefix: str = '') -> Dict[str, Any]:
  out = {}
  for k, v in (config or {}).items():
    if isinstance(v, Mapping):
      out.update(_flat_config(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_differences(stored, current) -> List[str]:
  """'model.sce_features: 16 in the checkpoint, 24 here' for each differing model key (and the
  learning mode); `stored` and `current` are configs (ConfigDict, dict or JSON)."""
  a, b = _flat_config(_config_dict(stored)), _flat_config(_config_dict(current))
  keys = sorted(k for k in set(a) | set(b)
                if (k == 'learning_mode' or k.startswith('model.')) and a.get(k) != b.get(k))
  return [f'{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} here' for k in keys]


def _check_tree(found, expected, source: str, what: str, *, allow_extra: bool,
                stored_config=None, config=None) -> None:
  """Raises a one-line `CheckpointError` for every leaf of `expected` missing from `found` or
  shaped differently (and, unless `allow_extra`, every leaf of `found` not expected).

  With both configs given, says which model keys differ, or that none does.
  """
  got, want = _shapes(found), _shapes(expected)
  problems = [f'{k} missing' for k in sorted(set(want) - set(got))]
  if not allow_extra:
    problems += [f'{k} unexpected' for k in sorted(set(got) - set(want))]
  needs = 'the model needs' if what.startswith('the model') else 'this config needs'
  problems += [f'{k} has shape {got[k]}, {needs} {want[k]}'
               for k in sorted(set(want) & set(got)) if got[k] != want[k]]
  if not problems:
    return
  note = ''
  if stored_config is not None and config is not None:
    diffs = config_differences(stored_config, config)
    note = (f'; it was written with another config ({"; ".join(diffs[:6])}'
            f'{" ..." if len(diffs) > 6 else ""})' if diffs else
            '; its config has the same learning mode and model keys as this one (a checkpoint '
            'of another code version?)')
  shown = '; '.join(problems[:8]) + (f' ... ({len(problems) - 8} more)' if len(problems) > 8
                                     else '')
  raise CheckpointError(f'{source} does not fit {what} ({len(problems)} problem(s): {shown})'
                        f'{note}')


def check_variables(model, variables, img_size: int = 256, source: str = 'checkpoint') -> None:
  """Checks that `{'params', 'batch_stats'}` fit `model` (names and shapes); raises a one-line
  `CheckpointError` naming every missing, unexpected or mis-shaped variable."""
  _check_tree(variables, abstract_model_variables(model, img_size), source, 'the model',
              allow_extra=False)


def _tree_metadata(path: pathlib.Path):
  try:
    md = ocp.PyTreeCheckpointHandler().metadata(path)
  except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many kinds.
    raise CheckpointError(f'damaged checkpoint: {path}: cannot read its tree metadata '
                          f'({_first_line(e)})') from e
  md = getattr(md, 'item_metadata', md)
  return getattr(md, 'tree', md)


# ------------------------------------------------------------------------------------------------
# The trainer's manager.


def _step_dirs(ckpt_dir: pathlib.Path) -> Dict[int, pathlib.Path]:
  if not ckpt_dir.is_dir():
    return {}
  return {int(p.name): p for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir()}


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


def _metrics_damage(ckpt_dir: pathlib.Path) -> Dict[int, str]:
  """Steps whose Orbax metrics file is garbled (the manager would fail to open on them)."""
  out = {}
  for step, path in sorted(_step_dirs(ckpt_dir).items()):
    metrics = path / 'metrics' / 'metrics'
    if metrics.exists():
      problem = _json_problem(metrics)
      if problem:
        out[step] = f'{metrics}: {problem}'
  return out


def _best_fn(metric: str):
  return lambda m: float(m.get(metric, -np.inf)) if isinstance(m, Mapping) else -np.inf


def make_manager(workdir: PathLike, best_metric: str, *,
                 async_saves: bool = True) -> ocp.CheckpointManager:
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
    logging.warning('damaged checkpoint step(s) moved to %s: %s', moved,
                    '; '.join(f'step {s}: {p}' for s, p in damaged.items()))
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=KEEP_LATEST),
      ocp.checkpoint_managers.BestN(get_metric_fn=_best_fn(best_metric), reverse=False, n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=_best_fn(best_metric), best_mode='max',
      enable_async_checkpointing=async_saves, create=True,
      temporary_path_class=_temporary_path_class(directory))
  return ocp.CheckpointManager(directory, item_names=(STATE, META, DATA), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, meta: Mapping[str, Any],
         data_iter=None, metrics: Optional[Mapping[str, Any]] = None) -> None:
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
    metrics = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float, np.number)) and np.isfinite(float(v))}
  manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True,
               custom_metadata={_SEALED_KEY: MANIFEST})


def restore(manager: ocp.CheckpointManager, abstract_state, data_iter=None, *,
            config=None) -> Optional[Tuple[Any, Dict[str, Any]]]:
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
        logging.warning('damaged checkpoint %s; resuming from step %d, the newest intact one '
                        '(damaged steps moved to %s)', '; '.join(
                            f'step {s} ({p})' for s, p in damaged), step, moved)
      return restored
    damaged.append((step, problem))
  others = sorted(set(steps) - set(steps[:KEEP_LATEST]))
  raise CheckpointError(
      f'{ckpt_dir}: no intact checkpoint to resume from: ' + '; '.join(
          f'step {s}: {p}' for s, p in damaged)
      + (f' (step(s) {others} are kept as the best, not as resume points; move the damaged '
         'steps away to resume from one)' if others else ''))


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
  _check_tree(stored, abstract_state, f'checkpoint {path / STATE}',
              'the training state of this config', allow_extra=True,
              stored_config=_read_json(path / META).get('config'), config=config)
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
  metric = select_metric(ml_collections.ConfigDict(_config_dict(meta.get('config') or {}))) if (
      meta.get('config')) else None
  value = (meta.get('metrics') or {}).get(metric)
  if value is None:
    return None  # No step has validation metrics yet.
  return {'step': int(step), 'epoch': meta.get('epoch'), 'metric': metric, 'value': value,
          'model': meta.get('best_model')}


# ------------------------------------------------------------------------------------------------
# Exports and loading one model.


def _config_dict(config) -> Dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  if isinstance(config, str):
    return json.loads(config)
  return json.loads(json.dumps(dict(config), default=str))


def save_model_variables(directory: PathLike, variables: Mapping[str, Any], config) -> str:
  """Exports one model's variables and its config as an Orbax checkpoint (atomic, checksummed).

  Args:
    directory: the export directory (must not exist yet).
    variables: `{'params': ..., 'batch_stats': ...}` of one model (not stacked).
    config: the run's config (ConfigDict, dict or JSON string); `config.model` must describe
      the variables.

  Returns:
    The absolute path written.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise CheckpointError(f'{directory} already exists; exports are never overwritten')
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  variables = jax.tree.map(np.asarray, flax.core.unfreeze(variables))
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                                  temporary_path_class=_temporary_path_class(directory))
  checkpointer.save(directory, args=ocp.args.Composite(**{
      VARIABLES: ocp.args.StandardSave(variables),
      CONFIG: ocp.args.JsonSave(_config_dict(config))}),
      custom_metadata={_SEALED_KEY: MANIFEST})
  if hasattr(checkpointer, 'wait_until_finished'):
    checkpointer.wait_until_finished()
  return str(directory)


def _read_json(item_dir: pathlib.Path) -> Dict[str, Any]:
  """The content of a JSON item (`meta`, `config`), checked; one-line error if unreadable."""
  path = item_dir / 'metadata'
  problem = _json_problem(path)
  if problem:
    raise CheckpointError(f'damaged checkpoint: {path}: {problem}')
  return json.loads(path.read_bytes())


def _resolve(path: pathlib.Path, step: Optional[int]) -> Tuple[str, pathlib.Path]:
  """('export' | 'step', directory) of an export, a step directory or a workdir (its best step,
  asked from the manager, by the metric of the checkpoint's own config)."""
  if not path.exists():
    raise FileNotFoundError(f'{path}: no checkpoint there (expected a training workdir, a '
                            'checkpoint step directory or an exported model)')
  if (path / VARIABLES).is_dir() or (path / CONFIG).is_dir():
    return 'export', path
  if (path / STATE).is_dir() or (path / META).is_dir():
    return 'step', path
  ckpt_dir = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
  steps = sorted(_step_dirs(ckpt_dir))
  if not steps:
    raise CheckpointError(f'{path} is neither a model export ({VARIABLES}/ + {CONFIG}/), a '
                          f'checkpoint step directory ({STATE}/ + {META}/) nor a workdir with '
                          f'checkpoints in {CHECKPOINT_DIR}/')
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'{ckpt_dir} has no step {step}; it has {steps}')
    return 'step', ckpt_dir / str(step)
  damaged = _metrics_damage(ckpt_dir)
  if damaged:
    raise CheckpointError(f'damaged checkpoint: {next(iter(damaged.values()))}')
  metric = None
  for s in reversed(steps):  # The metric named by the newest readable config.
    try:
      config = _read_json(ckpt_dir / str(s) / META).get('config')
      metric = select_metric(ml_collections.ConfigDict(_config_dict(config)))
      break
    except (CheckpointError, ValueError, TypeError, AttributeError, KeyError):
      continue
  if metric is None:
    verify(ckpt_dir / str(steps[-1]))  # Names the damage.
    raise CheckpointError(f'{ckpt_dir}: no step has a readable config')
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      best_fn=_best_fn(metric), best_mode='max', create=False))
  best = manager.best_step()
  best = manager.latest_step() if best is None else best
  if best is None:
    raise CheckpointError(f'{ckpt_dir}: Orbax finds no finished checkpoint step in it '
                          f'(directories: {steps})')
  return 'step', ckpt_dir / str(best)


def load_model_variables(path: PathLike, model_index: ModelIndex = None, *,
                         step: Optional[int] = None, sharding=None,
                         model_config=None) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
  """Loads one model's `{'params', 'batch_stats'}` and the config it was trained with.

  Args:
    path: a model export (`save_model_variables`), a checkpoint step directory
      (`<workdir>/checkpoints/<step>`), or a trainer workdir (its best step by
      `select_metric` of its config, else the latest; `step=` picks one).
    model_index: for a mutual-teacher ('mt') checkpoint: 0 (model a), 1 (model b), or 'best' /
      None (the one that won validation, as recorded). Single-model checkpoints accept None,
      0 or 'best'.
    step: with a workdir, load this step instead of the best.
    sharding: where the arrays go (default: one local device); e.g. a replicated
      `NamedSharding` over a mesh.
    model_config: describe the expected model with this config instead of the checkpoint's
      own (a mismatch then names the differing model keys).

  Returns:
    `(variables, config)`: variables as jax arrays; config the checkpoint's ConfigDict.

  Raises:
    FileNotFoundError: nothing at `path`.
    CheckpointError (one line): not a checkpoint, damaged (names the file and the problem), a
      bad `model_index`, or arrays of another configuration (names the differing keys).
  """
  path = pathlib.Path(path).absolute()
  kind, directory = _resolve(path, step)
  item = VARIABLES if kind == 'export' else STATE
  verify(directory, (VARIABLES, CONFIG) if kind == 'export' else (STATE, META))
  if kind == 'export':
    config = ml_collections.ConfigDict(_read_json(directory / CONFIG))
  else:
    meta = _read_json(directory / META)
    config = ml_collections.ConfigDict(_config_dict(meta['config']))
  target_config = config if model_config is None else model_config
  model = build_model(target_config)
  one = abstract_model_variables(model, _img_size(target_config), sharding)
  index, abstract = None, one
  if kind == 'step' and config.get('learning_mode') == 'mt':
    if model_index in (None, 'best'):
      index = int(meta.get('best_model', 0))
    elif model_index in (0, 1):
      index = int(model_index)
    else:
      raise CheckpointError(f'{directory}: model_index must be 0, 1, "best" or None for a '
                            f'mutual-teacher checkpoint, got {model_index!r}')
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((2,) + x.shape, x.dtype, sharding=x.sharding), one)
  elif model_index not in (None, 0, 'best'):
    raise CheckpointError(f'{directory} holds a single model '
                          f'({config.get("learning_mode", "export")}); model_index '
                          f'{model_index!r} is only for mutual-teacher checkpoints')
  what = f'the model of {_describe(target_config)}' + (' (stacked x2)' if index is not None
                                                        else '')
  stored = _tree_metadata(directory / item)
  if kind == 'step':  # A training state holds more (optimiser, teacher): keep the model's part.
    stored = {k: stored[k] for k in ('params', 'batch_stats') if k in stored}
  _check_tree(stored, abstract, f'checkpoint {directory / item}', what, allow_extra=False,
              stored_config=config, config=target_config)
  try:
    # The item's handler directly: a Checkpointer would look for step metadata in the item.
    restored = ocp.PyTreeCheckpointHandler().restore(directory / item, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  # Orbax's own checks failed.
    raise CheckpointError(f'damaged checkpoint: {directory / item}: Orbax cannot read it '
                          f'({_first_line(e)})') from e
  variables = {'params': restored['params'], 'batch_stats': restored.get('batch_stats', {})}
  if index is not None:
    variables = jax.tree.map(lambda x: x[index], variables)
  return variables, config


def load_model(path: PathLike, model_index: ModelIndex = None, fallback_config=None):
  """Loads a checkpoint (see `load_model_variables`) and builds its model.

  Args:
    path: a trainer workdir (its best model), a checkpoint step directory or an export.
    model_index: for mutual-teacher checkpoints: 0, 1, 'best' or None (the recorded best).
    fallback_config: experiment config whose `model` section builds the network when the
      checkpoint carries no config.

  Returns:
    `(model, variables, config)` with `config` the checkpoint's config (or the fallback).

  Raises:
    FileNotFoundError: nothing at `path`.
    CheckpointError: one line naming the file and the problem.
  """
  variables, config = load_model_variables(path, model_index=model_index)
  config = fallback_config if config is None else config
  if config is None:
    raise CheckpointError(f'{path}: the checkpoint has no config; pass one (--config) to say '
                          'which model it holds')
  return build_model(config), variables, config


def _img_size(config) -> int:
  data = config.get('data') if hasattr(config, 'get') else None
  size = data.get('img_size') if data is not None else None
  return int(size) if size else 64


def _describe(config) -> str:
  m = config.get('model', config)
  return (f"config model (depth {m.get('backbone_depth')}, stages {m.get('stage_sizes')}, "
          f"width {m.get('backbone_width')}, sce {m.get('sce_kernel_size')}/"
          f"{m.get('sce_features')}, feature_size {m.get('feature_size')})")
