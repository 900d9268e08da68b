"""Checkpoints: the trainer's Orbax manager, model exports, and loading a model from either.

Trainer checkpoints live in `<workdir>/checkpoints/<step>/` with three Orbax items:

* `state`: the `train_step.TrainState` (parameters, BatchNorm statistics and optimiser state of
  every trained model, stacked [2, ...] for 'mt'; the fixed teacher's variables for 'st'; step;
  non-finite counters);
* `meta`: JSON with `step`, `epoch` (epochs completed), `rng` (the root key's data), the
  validation metrics of the checkpoint, `best_model` (which mutual teacher won: 0 = a, 1 = b),
  and `config` (the resolved config as JSON);
* `data`: the grain training iterator's state (mid-epoch exact).

The manager keeps the latest *and* the best checkpoint (by `val/pck@0.1`) with
`AnyPreservationPolicy([LatestN(1), BestN(1)])` (the legacy `max_to_keep` + `best_fn` would
delete the latest); saves are asynchronous. Restores always go against an abstract target
(`jax.ShapeDtypeStruct` with the sharding wanted here), so a checkpoint written on a GPU or TPU
slice loads on one CPU.

Model exports (`save_model_variables`) hold one model's `{'params', 'batch_stats'}` (item
`variables`) and the config (item `config`), written atomically. `load_model_variables` reads
an export, a trainer workdir or one checkpoint step directory.
"""

from __future__ import annotations

import json
import os
import re
import pathlib
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sccorr_jax.models import build_model

CHECKPOINT_DIR = 'checkpoints'
STATE, META, DATA = 'state', 'meta', 'data'
VARIABLES, CONFIG = 'variables', 'config'
BEST_METRIC = 'val/pck@0.1'

PathLike = Union[str, os.PathLike]
ModelIndex = Union[None, int, str]


class CheckpointError(ValueError):
  """A checkpoint cannot be used (missing, wrong kind, or of another configuration)."""


def abstract_model_variables(model, img_size: int, sharding=None) -> Dict[str, Any]:
  """`{'params', 'batch_stats'}` of `model` as `jax.ShapeDtypeStruct`s (nothing computed)."""
  x = jax.ShapeDtypeStruct((1, img_size, img_size, 3), jnp.float32)
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
# The trainer's manager.


def make_manager(workdir: PathLike, *, async_saves: bool = True,
                 best_metric: str = BEST_METRIC) -> ocp.CheckpointManager:
  """The checkpoint manager of a trainer workdir: keeps the latest and the best step.

  Args:
    workdir: the run's directory; checkpoints go to `<workdir>/checkpoints`.
    async_saves: write in a background thread (call `wait_until_finished` before exit).
    best_metric: metric (passed to `save(..., metrics=)`) maximised by the best checkpoint.
      Saves without metrics (mid-epoch) are kept only while they are the latest.
  """
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=1),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], reverse=False, n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=lambda m: m[best_metric], best_mode='max',
      enable_async_checkpointing=async_saves, create=True)
  directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  return ocp.CheckpointManager(directory, item_names=(STATE, META, DATA), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, meta: Mapping[str, Any],
         data_iter=None, metrics: Optional[Mapping[str, float]] = None) -> None:
  """Saves a training checkpoint (asynchronously if the manager is).

  Args:
    manager: from `make_manager`.
    step: the optimiser step (the checkpoint's name).
    state: the `TrainState`.
    meta: JSON-serialisable dict (epoch, rng, config, metrics, best model).
    data_iter: the grain training iterator (its position is saved), or None.
    metrics: validation metrics for the best-checkpoint policy, or None (mid-epoch save).
  """
  import grain  # pylint: disable=g-import-not-at-top
  items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(meta))}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(int(step), args=ocp.args.Composite(**items),
               metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
               force=True)


def restore(manager: ocp.CheckpointManager, abstract_state, data_iter=None,
            step: Optional[int] = None) -> Optional[Tuple[Any, Dict[str, Any]]]:
  """Restores the latest (or `step`) checkpoint against an abstract state.

  Args:
    manager: from `make_manager`.
    abstract_state: the `TrainState` as `ShapeDtypeStruct`s with the target shardings.
    data_iter: a fresh grain iterator of the same pipeline; its position is restored in place.
    step: which step (default the latest).

  Returns:
    `(state, meta)`, or None if the workdir holds no checkpoint.

  Raises:
    CheckpointError: the checkpoint does not fit `abstract_state` (another configuration).
  """
  import grain  # pylint: disable=g-import-not-at-top
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  path = pathlib.Path(manager.directory) / str(step)
  _check_shapes(path / STATE, abstract_state, 'the training state of this config')
  items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
  if data_iter is not None:
    if not (path / DATA).exists():
      raise CheckpointError(f'{path} has no data-iterator state ({DATA}/)')
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE], dict(restored[META])


# ------------------------------------------------------------------------------------------------
# Exports and loading one model.


def _config_dict(config) -> Dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  if isinstance(config, str):
    return json.loads(config)
  return json.loads(json.dumps(dict(config), default=str))


def save_model_variables(directory: PathLike, variables: Mapping[str, Any], config) -> str:
  """Exports one model's variables and its config as an Orbax checkpoint (atomic).

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
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(directory, args=ocp.args.Composite(**{
      VARIABLES: ocp.args.StandardSave(variables),
      CONFIG: ocp.args.JsonSave(_config_dict(config))}))
  if hasattr(checkpointer, 'wait_until_finished'):
    checkpointer.wait_until_finished()
  return str(directory)


def _tree_metadata(path: pathlib.Path):
  md = ocp.PyTreeCheckpointer().metadata(path)
  md = getattr(md, 'item_metadata', md)
  return getattr(md, 'tree', md)


def _check_shapes(item_path: pathlib.Path, abstract, what: str, prefix: Tuple[str, ...] = ()):
  """Raises `CheckpointError` listing every leaf of `abstract` missing or shaped differently."""
  stored = _tree_metadata(item_path)
  for p in prefix:
    stored = stored.get(p) if isinstance(stored, Mapping) else None
  stored_flat = {jax.tree_util.keystr(k): v for k, v in
                 jax.tree_util.tree_flatten_with_path(stored)[0]} if stored is not None else {}
  problems = []
  for key, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = jax.tree_util.keystr(key)
    # The stored tree is dict-based: compare on names without the container kind.
    match = stored_flat.get(name)
    if match is None:
      alt = {_plain(k): v for k, v in stored_flat.items()}
      match = alt.get(_plain(name))
    if match is None:
      problems.append(f'{name}: missing')
    elif tuple(match.shape) != tuple(leaf.shape):
      problems.append(f'{name}: checkpoint {tuple(match.shape)}, expected {tuple(leaf.shape)}')
  if problems:
    shown = '\n  '.join(problems[:20])
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise CheckpointError(f'checkpoint {item_path} does not fit {what} ({len(problems)} '
                          f'problem(s); written with another configuration?):\n  {shown}{more}')


def _plain(keystr: str) -> str:
  """`.opt_state[0].mu['backbone']` and `['opt_state'][0]['mu']['backbone']` -> one name."""
  return '/'.join(re.findall(r'[A-Za-z0-9_]+', keystr))


def _read_json(path: pathlib.Path) -> Dict[str, Any]:
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


def _resolve(path: pathlib.Path, step: Optional[int]) -> Tuple[str, pathlib.Path]:
  """('export' | 'step', directory) of an export, a step directory or a workdir."""
  if not path.exists():
    raise FileNotFoundError(f'no checkpoint at {path}')
  if (path / VARIABLES).is_dir() and (path / CONFIG).is_dir():
    return 'export', path
  if (path / STATE).is_dir() and (path / META).is_dir():
    return 'step', path
  ckpt_dir = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()
                 and (p / STATE).is_dir()) if ckpt_dir.is_dir() else []
  if not steps:
    raise CheckpointError(f'{path} is neither a model export ({VARIABLES}/ + {CONFIG}/), a '
                          f'checkpoint step directory ({STATE}/ + {META}/) nor a workdir with '
                          f'checkpoints in {CHECKPOINT_DIR}/')
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'{ckpt_dir} has no step {step}; it has {steps}')
    return 'step', ckpt_dir / str(step)
  # The best step by validation PCK (metrics saved beside each step), else the latest.
  best, best_value = steps[-1], -np.inf
  for s in steps:
    value = _read_json(ckpt_dir / str(s) / META).get('metrics', {}).get(BEST_METRIC)
    if value is not None and value > best_value:
      best, best_value = s, value
  return 'step', ckpt_dir / str(best)


def load_model_variables(path: PathLike, model_index: ModelIndex = None, *,
                         step: Optional[int] = None, sharding=None,
                         model_config=None) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
  """Loads one model's `{'params', 'batch_stats'}` and the config it was trained with.

  Args:
    path: a model export (`save_model_variables`), a checkpoint step directory
      (`<workdir>/checkpoints/<step>`), or a trainer workdir (its best checkpoint by validation
      PCK, else the latest; `step=` picks one).
    model_index: for a mutual-teacher ('mt') checkpoint: 0 (model a), 1 (model b), or 'best' /
      None (the one that won validation, as recorded). Single-model checkpoints accept None,
      0 or 'best'.
    step: with a workdir, load this step instead of the best.
    sharding: where the arrays go (default: one local device); e.g. a replicated
      `NamedSharding` over a mesh.
    model_config: describe the expected model with this config instead of the checkpoint's
      own (a mismatch then raises a clear error).

  Returns:
    `(variables, config)`: variables as jax arrays; config the checkpoint's ConfigDict.

  Raises:
    FileNotFoundError: nothing at `path`.
    CheckpointError: not a checkpoint, a bad `model_index`, or arrays of another configuration
      (the message names the path and every mismatching array).
  """
  path = pathlib.Path(path).absolute()
  kind, directory = _resolve(path, step)
  if kind == 'export':
    config = ml_collections.ConfigDict(_read_json(directory / CONFIG))
    target_config = config if model_config is None else model_config
    model = build_model(target_config)
    abstract = abstract_model_variables(model, _img_size(target_config), sharding)
    _check_shapes(directory / VARIABLES, abstract, f'the model of {_describe(target_config)}')
    out = ocp.StandardCheckpointer().restore(directory / VARIABLES, abstract)
    return dict(out), config

  meta = _read_json(directory / META)
  config = ml_collections.ConfigDict(json.loads(meta['config']) if isinstance(
      meta['config'], str) else meta['config'])
  target_config = config if model_config is None else model_config
  model = build_model(target_config)
  one = abstract_model_variables(model, _img_size(target_config), sharding)
  mutual = config.get('learning_mode') == 'mt'
  if mutual:
    if model_index in (None, 'best'):
      index = int(meta.get('best_model', 0))
    elif model_index in (0, 1):
      index = int(model_index)
    else:
      raise CheckpointError(f'{directory}: model_index must be 0, 1, "best" or None for a '
                            f'mutual-teacher checkpoint, got {model_index!r}')
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((2,) + x.shape, x.dtype, sharding=x.sharding), one)
  else:
    if model_index not in (None, 0, 'best'):
      raise CheckpointError(f'{directory} holds a single model '
                            f'({config.get("learning_mode")}); model_index {model_index!r} '
                            'is only for mutual-teacher checkpoints')
    index, abstract = None, one
  _check_shapes(directory / STATE, abstract, f'the model of {_describe(target_config)}'
                + (' (stacked x2)' if mutual else ''))
  restored = ocp.PyTreeCheckpointer().restore(
      directory / STATE, args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=True))
  variables = {'params': restored['params'], 'batch_stats': restored.get('batch_stats', {})}
  if index is not None:
    variables = jax.tree.map(lambda x: x[index], variables)
  return variables, config


def _img_size(config) -> int:
  data = config.get('data') if hasattr(config, 'get') else None
  size = data.get('img_size') if data is not None else None
  return int(size) if size else 64


def _describe(config) -> str:
  m = config.get('model', config)
  return (f"config model (depth {m.get('backbone_depth')}, stages {m.get('stage_sizes')}, "
          f"width {m.get('backbone_width')}, sce {m.get('sce_kernel_size')}/"
          f"{m.get('sce_features')}, feature_size {m.get('feature_size')})")
