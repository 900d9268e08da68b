"""Model exports and loading one model from an export, a checkpoint step or a trainer workdir.

Model exports (`save_model_variables`) hold one model's `{'params', 'batch_stats'}` (item
`variables`) and the config (item `config`), written atomically and checksummed.
`load_model_variables` reads an export, a trainer workdir (its best step) or one checkpoint step
directory; restores go against an abstract target (`jax.ShapeDtypeStruct` with the sharding
wanted here), so a checkpoint written on a GPU or TPU slice loads on one CPU.
"""

from __future__ import annotations

import pathlib
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sccorr_jax import config_lib
from sccorr_jax.checkpoint.integrity import _check_tree
from sccorr_jax.checkpoint.integrity import _config_dict
from sccorr_jax.checkpoint.integrity import _first_line
from sccorr_jax.checkpoint.integrity import _metrics_damage
from sccorr_jax.checkpoint.integrity import _read_json
from sccorr_jax.checkpoint.integrity import _SEALED_KEY
from sccorr_jax.checkpoint.integrity import _step_dirs
from sccorr_jax.checkpoint.integrity import _temporary_path_class
from sccorr_jax.checkpoint.integrity import _tree_metadata
from sccorr_jax.checkpoint.integrity import CHECKPOINT_DIR
from sccorr_jax.checkpoint.integrity import CheckpointError
from sccorr_jax.checkpoint.integrity import CONFIG
from sccorr_jax.checkpoint.integrity import MANIFEST
from sccorr_jax.checkpoint.integrity import META
from sccorr_jax.checkpoint.integrity import PathLike
from sccorr_jax.checkpoint.integrity import STATE
from sccorr_jax.checkpoint.integrity import VARIABLES
from sccorr_jax.checkpoint.integrity import verify
from sccorr_jax.checkpoint.manager import _best_fn
from sccorr_jax.checkpoint.manager import select_metric
from sccorr_jax.models import build_model
from sccorr_jax.models import input_shape

ModelIndex = Union[None, int, str]


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


def check_variables(model, variables, img_size: int = 256, source: str = 'checkpoint') -> None:
  """Checks that `{'params', 'batch_stats'}` fit `model` (names and shapes); raises a one-line
  `CheckpointError` naming every missing, unexpected or mis-shaped variable."""
  _check_tree(
      variables, abstract_model_variables(model, img_size), source, 'the model', allow_extra=False
  )


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
  checkpointer = ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(), temporary_path_class=_temporary_path_class(directory)
  )
  checkpointer.save(
      directory,
      args=ocp.args.Composite(
          **{
              VARIABLES: ocp.args.StandardSave(variables),
              CONFIG: ocp.args.JsonSave(_config_dict(config)),
          }
      ),
      custom_metadata={_SEALED_KEY: MANIFEST},
  )
  if hasattr(checkpointer, 'wait_until_finished'):
    checkpointer.wait_until_finished()
  return str(directory)


def _resolve(path: pathlib.Path, step: Optional[int]) -> Tuple[str, pathlib.Path]:
  """('export' | 'step', directory) of an export, a step directory or a workdir (its best step,
  asked from the manager, by the metric of the checkpoint's own config)."""
  if not path.exists():
    raise FileNotFoundError(
        f'{path}: no checkpoint there (expected a training workdir, a '
        'checkpoint step directory or an exported model)'
    )
  if (path / VARIABLES).is_dir() or (path / CONFIG).is_dir():
    return 'export', path
  if (path / STATE).is_dir() or (path / META).is_dir():
    return 'step', path
  ckpt_dir = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
  steps = sorted(_step_dirs(ckpt_dir))
  if not steps:
    raise CheckpointError(
        f'{path} is neither a model export ({VARIABLES}/ + {CONFIG}/), a '
        f'checkpoint step directory ({STATE}/ + {META}/) nor a workdir with '
        f'checkpoints in {CHECKPOINT_DIR}/'
    )
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
  manager = ocp.CheckpointManager(
      ckpt_dir,
      options=ocp.CheckpointManagerOptions(best_fn=_best_fn(metric), best_mode='max', create=False),
  )
  best = manager.best_step()
  best = manager.latest_step() if best is None else best
  if best is None:
    raise CheckpointError(
        f'{ckpt_dir}: Orbax finds no finished checkpoint step in it ' f'(directories: {steps})'
    )
  return 'step', ckpt_dir / str(best)


def load_model_variables(
    path: PathLike,
    model_index: ModelIndex = None,
    *,
    step: Optional[int] = None,
    sharding=None,
    model_config=None,
) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
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
    config = config_lib.restored_config(_read_json(directory / CONFIG))
  else:
    meta = _read_json(directory / META)
    config = config_lib.restored_config(_config_dict(meta['config']))
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
      raise CheckpointError(
          f'{directory}: model_index must be 0, 1, "best" or None for a '
          f'mutual-teacher checkpoint, got {model_index!r}'
      )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((2,) + x.shape, x.dtype, sharding=x.sharding), one
    )
  elif model_index not in (None, 0, 'best'):
    raise CheckpointError(
        f'{directory} holds a single model '
        f'({config.get("learning_mode", "export")}); model_index '
        f'{model_index!r} is only for mutual-teacher checkpoints'
    )
  what = f'the model of {_describe(target_config)}' + (' (stacked x2)' if index is not None else '')
  stored = _tree_metadata(directory / item)
  if kind == 'step':  # A training state holds more (optimiser, teacher): keep the model's part.
    stored = {k: stored[k] for k in ('params', 'batch_stats') if k in stored}
  _check_tree(
      stored,
      abstract,
      f'checkpoint {directory / item}',
      what,
      allow_extra=False,
      stored_config=config,
      config=target_config,
  )
  try:
    # The item's handler directly: a Checkpointer would look for step metadata in the item.
    restored = ocp.PyTreeCheckpointHandler().restore(
        directory / item,
        args=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        ),
    )
  except Exception as e:  # pylint: disable=broad-except  # Orbax's own checks failed.
    raise CheckpointError(
        f'damaged checkpoint: {directory / item}: Orbax cannot read it ' f'({_first_line(e)})'
    ) from e
  variables = {'params': restored['params'], 'batch_stats': restored.get('batch_stats', {})}
  if index is not None:
    variables = jax.tree.map(lambda x: x[index], variables)
  return variables, config


def load_model(path: PathLike, model_index: ModelIndex = None):
  """Loads a checkpoint (see `load_model_variables`) and builds its model.

  Args:
    path: a trainer workdir (its best model), a checkpoint step directory or an export.
    model_index: for mutual-teacher checkpoints: 0, 1, 'best' or None (the recorded best).

  Returns:
    `(model, variables, config)` with `config` the checkpoint's config (every export and every
    trainer step holds one).

  Raises:
    FileNotFoundError: nothing at `path`.
    CheckpointError: one line naming the file and the problem.
  """
  variables, config = load_model_variables(path, model_index=model_index)
  return build_model(config), variables, config


def _img_size(config) -> int:
  data = config.get('data') if hasattr(config, 'get') else None
  size = data.get('img_size') if data is not None else None
  return int(size) if size else 64


def _describe(config) -> str:
  m = config.get('model', config)
  return (
      f"config model (depth {m.get('backbone_depth')}, stages {m.get('stage_sizes')}, "
      f"width {m.get('backbone_width')}, sce {m.get('sce_kernel_size')}/"
      f"{m.get('sce_features')}, feature_size {m.get('feature_size')})"
  )
