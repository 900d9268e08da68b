"""Checkpoint integrity: the on-disk names, the checksum manifest, the checks made before reading
a step or an export, and the check that stored trees fit a config.

Every step and every export holds `checksums.json`, the size and CRC-32 of each of its files,
written into Orbax's temporary directory just before the atomic rename (so a crash mid-save
leaves no step at all, and async saves are sealed in their background thread). Reading a
checkpoint first checks it: every item present, its JSON files parseable, the tree metadata
non-empty, and every file as the manifest says. Checkpoints written before the manifest existed
get the structural checks and Orbax's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'checkpoints_damaged'  # Beside CHECKPOINT_DIR: damaged steps set aside on resume.
STATE, META, DATA = 'state', 'meta', 'data'
VARIABLES, CONFIG = 'variables', 'config'
MANIFEST = 'checksums.json'
# Written by Orbax into the step directory while or after the manifest is sealed.
_UNSEALED = ('_CHECKPOINT_METADATA', 'commit_success.txt', MANIFEST)
_SEALED_KEY = 'sccorr_jax_checksums'  # In Orbax's step metadata: this step has a manifest.

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
  """A checkpoint cannot be used: missing, damaged, of the wrong kind or of another config.

  The message is one line naming the directory or file and the problem.
  """


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
  json_files = (
      [(directory / '_CHECKPOINT_METADATA', False)]
      if (directory / '_CHECKPOINT_METADATA').exists()
      else []
  )
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
  return {_plain(jax.tree_util.keystr(k)): tuple(getattr(v, 'shape', np.shape(v))) for k, v in flat}


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
  keys = sorted(
      k
      for k in set(a) | set(b)
      if (k == 'learning_mode' or k.startswith('model.')) and a.get(k) != b.get(k)
  )
  return [f'{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} here' for k in keys]


def _check_tree(
    found, expected, source: str, what: str, *, allow_extra: bool, stored_config=None, config=None
) -> None:
  """Raises a one-line `CheckpointError` for every leaf of `expected` missing from `found` or
  shaped differently (and, unless `allow_extra`, every leaf of `found` not expected).

  With both configs given, says which model keys differ, or that none does.
  """
  got, want = _shapes(found), _shapes(expected)
  problems = [f'{k} missing' for k in sorted(set(want) - set(got))]
  if not allow_extra:
    problems += [f'{k} unexpected' for k in sorted(set(got) - set(want))]
  needs = 'the model needs' if what.startswith('the model') else 'this config needs'
  problems += [
      f'{k} has shape {got[k]}, {needs} {want[k]}'
      for k in sorted(set(want) & set(got))
      if got[k] != want[k]
  ]
  if not problems:
    return
  note = ''
  if stored_config is not None and config is not None:
    diffs = config_differences(stored_config, config)
    note = (
        f'; it was written with another config ({"; ".join(diffs[:6])}'
        f'{" ..." if len(diffs) > 6 else ""})'
        if diffs
        else '; its config has the same learning mode and model keys as this one (a checkpoint '
        'of another code version?)'
    )
  shown = '; '.join(problems[:8]) + (
      f' ... ({len(problems) - 8} more)' if len(problems) > 8 else ''
  )
  raise CheckpointError(
      f'{source} does not fit {what} ({len(problems)} problem(s): {shown})' f'{note}'
  )


def _tree_metadata(path: pathlib.Path):
  try:
    md = ocp.PyTreeCheckpointHandler().metadata(path)
  except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many kinds.
    raise CheckpointError(
        f'damaged checkpoint: {path}: cannot read its tree metadata ' f'({_first_line(e)})'
    ) from e
  md = getattr(md, 'item_metadata', md)
  return getattr(md, 'tree', md)


def _config_dict(config) -> Dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  if isinstance(config, str):
    return json.loads(config)
  return json.loads(json.dumps(dict(config), default=str))


# ------------------------------------------------------------------------------------------------
# Reading a step or export directory.


def _read_json(item_dir: pathlib.Path) -> Dict[str, Any]:
  """The content of a JSON item (`meta`, `config`), checked; one-line error if unreadable."""
  path = item_dir / 'metadata'
  problem = _json_problem(path)
  if problem:
    raise CheckpointError(f'damaged checkpoint: {path}: {problem}')
  return json.loads(path.read_bytes())


def _step_dirs(ckpt_dir: pathlib.Path) -> Dict[int, pathlib.Path]:
  if not ckpt_dir.is_dir():
    return {}
  return {int(p.name): p for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir()}


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
