r"""Cached DINOv2 patch tokens of a prepared dataset, for a frozen backbone (issue 12, part 4).

    python -m sccorr_jax.data.cache_features \
        --config=configs/spair_dinov2.py:mt,cached --splits=trn,val,test \
        --config.model.pretrained=/path/to/dinov2_vitb14_pretrain.pth [--data_dir=...]

With a frozen backbone the feature of an image never changes, so it is computed once: every
distinct image (`src_imname` / `trg_imname`) of each split is resized to `data.img_size` as the
pipeline does (PIL bilinear, antialiased), ImageNet-normalised, and its feature (the patch tokens
of `model.dinov2_layers` after the final norm, concatenated: exactly what `SCorrSAN` feeds its
head) is stored next to the dataset, bfloat16 by default:

    <data_dir>/dinov2_features/<preset>_L<layers>_<img_size>px_<dtype>[_compute-<dtype>]/
        key.json                      what the cache was computed from (see `cache_key`)
        <split>.names.json            row ids (image names; see `split_image_names`)
        <split>.npy                   [n_images, h, w, c] (bfloat16 stored as uint16 bits)
        <split>.done.npy              [n_images] bool, rows written (resumable)

* Resumable: rows are flushed and marked done chunk by chunk; a rerun computes only the rest.
* Sharded: process `p` of `P` computes rows `p, p + P, ...`; each process splits its batch over
  its local devices (a `('data',)` mesh). Processes write disjoint rows of the same files.
* Keyed: `key.json` holds the preset (and overrides), the blocks, the resolution, the storage
  dtype, the compute dtype (`model.dtype`; a name suffix unless float32), a SHA-256 of the
  backbone parameters and the dataset's name, version and split sizes. `FeatureCache.open`
  refuses a cache whose key differs from the model's, naming the fields (a stale cache: other
  weights, another dataset version; a mismatched one: other blocks or resolution), and an
  incomplete one.
* Only a frozen backbone can be cached (`model.dinov2_trained_blocks == 0`).
* Augmentation: colour augmentation changes the pixels and cannot apply to cached features;
  horizontal flips can (the pipeline mirrors the token grid where it mirrors an image, and the
  keypoints as usual; `lookup(..., flip=...)` for direct use). Note that a ViT is not exactly flip-equivariant, so flipped cached
  tokens approximate the tokens of the flipped image. Random crops cannot apply either.
* The head runs on cached features with `head_flow` (`SCorrSAN.head`): the same flow as the
  live frozen backbone up to the storage dtype. A config with `model.inputs='features'` (the
  `cached` variant) trains and evaluates the head alone on the cache: `train.train_and_evaluate`
  opens it with `open_for_config` and the pipelines read it (`docs/dinov2.md`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from absl import flags
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from ml_collections import config_flags
import ml_dtypes
import numpy as np
import tqdm

from sccorr_jax import cli
from sccorr_jax import images
from sccorr_jax import models
from sccorr_jax import sharding
from sccorr_jax.data import pipeline

CACHE_DIRNAME = 'dinov2_features'
DTYPES = {'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}
_STORED = {'bfloat16': np.uint16, 'float32': np.float32}


class CacheError(ValueError):
  """A feature cache that cannot be used: missing, stale, mismatched or incomplete."""


# ------------------------------------------------------------------------------------------------
# The key.


def backbone_digest(variables) -> str:
  """SHA-256 over the backbone parameters (paths, dtypes, shapes, bytes), in path order."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(variables['params']['backbone']))[0]
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(a.dtype.str.encode())
    h.update(repr(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _check_model(model) -> None:
  if getattr(model, 'backbone_type', 'resnet') != 'dinov2':
    raise CacheError("feature caches are for the DINOv2 backbone (model.backbone='dinov2')")
  if int(model.dinov2_trained_blocks) != 0:
    raise CacheError(
        f'only a frozen backbone can be cached; model.dinov2_trained_blocks is '
        f'{model.dinov2_trained_blocks} (set it to 0)'
    )


def compute_dtype(model, variables) -> str:
  """The dtype the backbone computes in: `model.dtype`, or without one the promotion of its
  parameters and the float32 images (what `SCorrSAN` does)."""
  if model.dtype is not None:
    return jnp.dtype(model.dtype).name
  leaves = jax.tree.leaves(variables['params']['backbone'])
  return np.result_type(np.float32, *(a.dtype for a in leaves)).name


def cache_key(model, variables, data, dtype: str = 'bfloat16') -> Dict[str, Any]:
  """What a cache is computed from: any difference makes it unusable for this model.

  `data` is the `pipeline.ResolvedData` (or a data config, resolved here; likewise below).
  `dtype` is the storage dtype; `compute_dtype` (the forward's, `model.dtype`) is keyed too:
  bfloat16 compute changes the features by more than their bfloat16 storage does.
  """
  _check_model(model)
  if dtype not in DTYPES:
    raise ValueError(f'cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
  data = pipeline.resolve(data)
  return {
      'preset': model.dinov2_preset,
      'dinov2_kwargs': {k: v for k, v in sorted(model.dinov2_kwargs().items())},
      'layers': list(model.dinov2_blocks()),
      'img_size': data.img_size,
      'dtype': dtype,
      'compute_dtype': compute_dtype(model, variables),
      'weights_sha256': backbone_digest(variables),
      'dataset': {
          'name': data.name,
          'builder': data.builder.info.full_name,
          'splits': dict(sorted(data.split_sizes.items())),
      },
  }


def cache_dir(data, key: Dict[str, Any]) -> pathlib.Path:
  """`<data_dir>/dinov2_features/<preset>_L<layers>_<img>px_<dtype>[_compute-<dtype>]` (the
  suffix when the forward is not float32, so that both caches can exist)."""
  layers = '-'.join(str(i) for i in key['layers'])
  name = f"{key['preset']}_L{layers}_{key['img_size']}px_{key['dtype']}"
  if key.get('compute_dtype', 'float32') != 'float32':
    name += f"_compute-{key['compute_dtype']}"
  return pathlib.Path(os.path.expanduser(str(data.data_dir))) / CACHE_DIRNAME / name


def _diff(stored: Dict[str, Any], wanted: Dict[str, Any], prefix: str = '') -> List[str]:
  out = []
  for k in sorted(set(stored) | set(wanted)):
    a, b = stored.get(k), wanted.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f'{prefix}{k}.')
    elif a != b:
      short = lambda v: (str(v)[:16] + '...') if k == 'weights_sha256' else v  # noqa: E731
      out.append(f'{prefix}{k}: cache {short(a)}, model {short(b)}')
  return out


# ------------------------------------------------------------------------------------------------
# Images and features.


AMBIGUOUS = '#sha1:'  # Row id of an image whose name the split gives to several images.


def image_digest(img) -> str:
  """SHA-1 of a decoded image's shape and pixels."""
  a = np.ascontiguousarray(np.asarray(img))
  return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()


def _name(name: Any) -> str:
  return name.decode() if isinstance(name, bytes) else str(name)


def split_image_names(data, split: str) -> Tuple[List[str], Dict[str, Tuple[int, str]]]:
  """Row ids of a split's distinct images in first-appearance order, and where to read each.

  The id is the image name (`src_imname` / `trg_imname`), or `name#sha1:<digest of the
  pixels>` for every image of a name that the split gives to different pixels (the embedded
  `synthetic` dataset names a photograph's random crops after the photograph).

  Returns:
    `(ids, where)`, `where[id] = (record index, 'src' | 'trg')`.
  """
  source = pipeline.data_source(data, split)
  seen = []  # (name, digest, record index, side) of every image of the split.
  digests: Dict[str, set] = {}
  for i in range(len(source)):
    rec = source[i]
    for side in ('src', 'trg'):
      name, digest = _name(rec[f'{side}_imname']), image_digest(rec[f'{side}_img'])
      seen.append((name, digest, i, side))
      digests.setdefault(name, set()).add(digest)
  names, where = [], {}
  for name, digest, i, side in seen:
    row = name if len(digests[name]) == 1 else f'{name}{AMBIGUOUS}{digest}'
    if row not in where:
      where[row] = (i, side)
      names.append(row)
  return names, where


# [h, w, 3] uint8 -> [S, S, 3] float32: the pipeline's resize and normalisation.
preprocess_image = images.preprocess


def make_features_fn(model, mesh: Optional[jax.sharding.Mesh] = None):
  """Jitted `(variables, images [b, S, S, 3]) -> features [b, S/14, S/14, c]`, batch sharded."""
  _check_model(model)

  def features(variables, images):
    return model.apply(variables, images, method=lambda m, x: m._dinov2_features(x)[0])  # pylint: disable=protected-access

  if mesh is None:
    return jax.jit(features)
  data, rep = sharding.batch_sharded(mesh), sharding.replicated(mesh)
  return jax.jit(features, in_shardings=(rep, data), out_shardings=data)


def head_flow(model, variables, src_feat, trg_feat):
  """The flow from cached features: `SCorrSAN.head` ([b, S, S, 2], cells, target -> source)."""
  return model.apply(variables, src_feat, trg_feat, method=lambda m, a, b: m.head(a, b))


# ------------------------------------------------------------------------------------------------
# Building.


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  return tqdm.tqdm(total=total, desc=desc, unit='img', file=sys.stderr)


def _claim_directory(
    directory: pathlib.Path, key: Dict[str, Any], overwrite: bool, pid: int
) -> None:
  """Makes `directory` the cache of `key`: one of another key is refused, or with `overwrite`
  emptied; then process `pid` 0 writes `key.json`.

  Raises:
    CacheError: the directory holds a cache of another key and `overwrite` is False.
  """
  key_file = directory / 'key.json'
  if key_file.exists():
    stored = json.loads(key_file.read_text())
    if stored != key:
      if not overwrite:
        raise CacheError(
            f'{directory} holds a cache of another key ('
            + '; '.join(_diff(stored, key))
            + '); pass overwrite=True '
            '(--overwrite) to replace it'
        )
      if pid == 0:
        for f in directory.iterdir():
          f.unlink()
  if pid == 0:
    directory.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=1, sort_keys=True))


def _split_store(
    directory: pathlib.Path,
    split: str,
    names: List[str],
    shape: Tuple[int, ...],
    dtype: str,
    pid: int,
    nproc: int,
) -> Tuple[np.ndarray, np.ndarray]:
  """A split's stored features `shape` = [n, h, w, c] and its done flags [n], memory-mapped
  for writing. Process 0 writes the row ids and creates both files when absent (a rerun
  resumes into them); the others wait for that.

  Raises:
    CacheError: the stored features have another shape.
  """
  feat_path, done_path = directory / f'{split}.npy', directory / f'{split}.done.npy'
  if pid == 0:
    (directory / f'{split}.names.json').write_text(json.dumps(names))
    if not feat_path.exists():
      np.lib.format.open_memmap(feat_path, 'w+', _STORED[dtype], shape).flush()
      np.lib.format.open_memmap(done_path, 'w+', np.bool_, shape[:1]).flush()
  if nproc > 1:
    multihost_utils.sync_global_devices(f'cache_features_{split}_created')
  store = np.lib.format.open_memmap(feat_path, 'r+')
  done = np.lib.format.open_memmap(done_path, 'r+')
  if store.shape != shape:
    raise CacheError(f'{feat_path} has shape {store.shape}, expected {shape}')
  return store, done


def build_cache(
    model,
    variables,
    data,
    splits: Sequence[str],
    *,
    dtype: str = 'bfloat16',
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
    max_batches: Optional[int] = None,
) -> Dict[str, Any]:
  """Computes (or completes) the feature cache of `splits`.

  Args:
    model: a `SCorrSAN` with the frozen DINOv2 backbone.
    variables: its variables (only the backbone is used).
    data: the `pipeline.ResolvedData`, or `config.data` (dataset, `data_dir`, `img_size`).
    splits: e.g. ('trn', 'val', 'test').
    dtype: storage dtype, 'bfloat16' or 'float32'.
    batch_size: images per step of each process (padded to a multiple of its devices).
    overwrite: replace a cache of the same name computed from another key (else refused).
    progress: a progress bar on stderr (process 0).
    max_batches: stop after this many steps per split (tests simulate an interruption).

  Returns:
    `{'dir': path, 'computed': {split: rows computed now}, 'rows': {split: total rows}}`.

  Raises:
    CacheError: a cache of that name from another key exists (without `overwrite`), or the
      model is not a frozen DINOv2.
  """
  data = pipeline.resolve(data)
  key = cache_key(model, variables, data, dtype)
  directory = cache_dir(data, key)
  pid, nproc = jax.process_index(), jax.process_count()
  _claim_directory(directory, key, overwrite, pid)
  devices = jax.local_devices()
  mesh = sharding.make_mesh(devices)
  features = make_features_fn(model, mesh)
  variables = jax.device_put(
      jax.device_get({'params': variables['params']}), sharding.replicated(mesh)
  )
  step = -(-int(batch_size) // len(devices)) * len(devices)
  out = {'dir': str(directory), 'computed': {}, 'rows': {}}
  for split in splits:
    names, where = split_image_names(data, split)
    n = len(names)
    size = data.img_size
    probe = jax.eval_shape(
        features, variables, jax.ShapeDtypeStruct((step, size, size, 3), jnp.float32)
    )
    shape = (n,) + tuple(probe.shape[1:])
    store, done = _split_store(directory, split, names, shape, dtype, pid, nproc)
    todo = [r for r in range(pid, n, nproc) if not done[r]]
    source = data.source(split)
    bar = _progress(len(todo), f'{split} features', progress and pid == 0)
    computed = 0
    for b, start in enumerate(range(0, len(todo), step)):
      if max_batches is not None and b >= max_batches:
        break
      rows = todo[start : start + step]
      batch = np.zeros((step, size, size, 3), np.float32)
      for j, r in enumerate(rows):
        i, side = where[names[r]]
        batch[j] = preprocess_image(source[i][f'{side}_img'], size)
      feats = np.asarray(jax.device_get(features(variables, batch)))[: len(rows)]
      feats = feats.astype(DTYPES[dtype])
      store[rows] = feats.view(np.uint16) if dtype == 'bfloat16' else feats
      store.flush()  # Features on disk before they are marked done.
      done[rows] = True
      done.flush()
      computed += len(rows)
      if bar is not None:
        bar.update(len(rows))
    if bar is not None:
      bar.close()
    out['computed'][split] = computed
    out['rows'][split] = n
  if nproc > 1:
    multihost_utils.sync_global_devices('cache_features_done')
  return out


# ------------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass
class FeatureCache:
  """A verified, complete cache of one split (`FeatureCache.open`)."""

  directory: pathlib.Path
  split: str
  key: Dict[str, Any]
  names: List[str]
  rows: Dict[str, int]
  store: np.ndarray
  ambiguous: Set[str] = dataclasses.field(default_factory=set)  # Names of several images.

  @classmethod
  def open(cls, model, variables, data, split: str, dtype: str = 'bfloat16') -> 'FeatureCache':
    """Opens the cache of `split` for this model, weights and data (`pipeline.ResolvedData`,
    or a data config).

    Raises:
      CacheError: none exists (saying how to build it), it is stale or mismatched (naming the
        fields that differ), or incomplete.
    """
    data = pipeline.resolve(data)
    key = cache_key(model, variables, data, dtype)
    directory = cache_dir(data, key)
    command = 'python -m sccorr_jax.data.cache_features --config=<the config> ' f'--splits={split}'
    if not (directory / 'key.json').exists():
      root = directory.parent
      others = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
      raise CacheError(
          f'no feature cache {directory.name} in {root} (present: '
          f'{", ".join(others) or "none"}); build it with: {command}'
      )
    stored = json.loads((directory / 'key.json').read_text())
    if stored != key:
      raise CacheError(
          f'the feature cache {directory} is stale or mismatched: '
          + '; '.join(_diff(stored, key))
          + f'. Rebuild it with: {command} '
          '--overwrite'
      )
    feat_path = directory / f'{split}.npy'
    if not feat_path.exists():
      raise CacheError(f'{directory} has no {split} features; build them with: {command}')
    done = np.load(directory / f'{split}.done.npy')
    if not done.all():
      raise CacheError(
          f'the {split} cache in {directory} is incomplete ({int(done.sum())} of '
          f'{done.size} images); resume it with: {command}'
      )
    names = json.loads((directory / f'{split}.names.json').read_text())
    return cls(
        directory,
        split,
        stored,
        names,
        {n: i for i, n in enumerate(names)},
        np.load(feat_path, mmap_mode='r'),
        {n.split(AMBIGUOUS)[0] for n in names if AMBIGUOUS in n},
    )

  def __getstate__(self):  # grain workers: reopen the memmap instead of pickling its rows.
    return {k: v for k, v in self.__dict__.items() if k != 'store'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.store = np.load(self.directory / f'{self.split}.npy', mmap_mode='r')

  def feature(self, name: Any, img) -> np.ndarray:
    """The feature of a record's image: [h, w, c] float32 (the pipelines' `src_img`).

    Args:
      name: its `src_imname` / `trg_imname`.
      img: its decoded pixels (hashed only when the split gives `name` to several images).
    """
    name = _name(name)
    return self.lookup(
        [f'{name}{AMBIGUOUS}{image_digest(img)}' if name in self.ambiguous else name]
    )[0]

  def lookup(self, names: Iterable[Any], flip: Optional[Sequence[bool]] = None) -> np.ndarray:
    """Features of images by row id (`split_image_names`; the name unless the split gives it to
    several images, see `feature`): [n, h, w, c] float32; `flip[i]` mirrors row i's tokens."""
    idx = []
    for name in names:
      name = _name(name)
      if name in self.ambiguous:
        raise CacheError(
            f'{name!r} names several images of the {self.split} split; look its '
            'features up with FeatureCache.feature(name, pixels)'
        )
      if name not in self.rows:
        raise CacheError(f'image {name!r} is not in the {self.split} cache {self.directory}')
      idx.append(self.rows[name])
    raw = np.asarray(self.store[np.asarray(idx, np.int64)])
    feats = (raw.view(ml_dtypes.bfloat16) if self.key['dtype'] == 'bfloat16' else raw).astype(
        np.float32
    )
    if flip is not None:
      flip = np.asarray(flip, bool)
      feats[flip] = feats[flip][:, :, ::-1]
    return feats


def full_model_variables(config):
  """The live model of a `config` and the variables whose backbone a cache is keyed by.

  With `model.inputs='features'` the model is the head alone; its cache comes from the same
  config's full model (`inputs='images'`), initialised as the trainer does (`model.pretrained`,
  else the seed's random backbone: tests and smoke runs).
  """
  model = models.build_model(config).clone(inputs='images')
  return model, models.init_variables(config, model, jax.random.PRNGKey(int(config.seed)), 1)


def open_for_config(config, splits: Sequence[str], data=None) -> Dict[str, FeatureCache]:
  """The verified caches of `splits` for a `model.inputs='features'` config (`FeatureCache.open`).

  Args:
    config: the experiment config (its model, seed and `data.img_size` key the backbone).
    splits: the splits whose caches are opened.
    data: `config.data` resolved (`pipeline.resolve`); default: resolved here.

  Raises:
    CacheError: a cache is missing, stale, mismatched or incomplete.
  """
  model, variables = full_model_variables(config)
  data = pipeline.resolve(config.data if data is None else data)
  return {
      s: FeatureCache.open(model, variables, data, s, data.feature_cache_dtype)
      for s in dict.fromkeys(splits)
  }


# ------------------------------------------------------------------------------------------------
# Command line.


def main(argv):
  del argv
  cfg = flags.FLAGS.config
  if flags.FLAGS.data_dir:
    cfg.data.data_dir = flags.FLAGS.data_dir
  try:
    model, variables = full_model_variables(cfg)
    data = pipeline.resolve(cfg.data)
    result = build_cache(
        model,
        variables,
        data,
        flags.FLAGS.splits,
        dtype=flags.FLAGS.dtype or data.feature_cache_dtype,
        batch_size=flags.FLAGS.batch_size,
        overwrite=flags.FLAGS.overwrite,
    )
  except (CacheError, FileNotFoundError, ValueError) as e:  # ConversionError is a ValueError.
    cli.fail(str(e), e)
  print(
      f"feature cache {result['dir']}: "
      + ', '.join(
          f"{s} {result['rows'][s]} images ({result['computed'][s]} computed now)"
          for s in result['rows']
      )
  )


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'a DINOv2 config with trained_blocks=0')
  flags.DEFINE_list('splits', ['trn', 'val', 'test'], 'splits to cache')
  flags.DEFINE_string('data_dir', None, 'overrides config.data.data_dir')
  flags.DEFINE_enum(
      'dtype',
      None,
      sorted(DTYPES),
      "storage dtype (default: the config's data.feature_cache_dtype)",
  )
  flags.DEFINE_integer('batch_size', 32, 'images per step and process')
  flags.DEFINE_bool('overwrite', False, 'replace a cache of the same name but another key')
  cli.run(main)
