"""grain pipelines over the TFDS data sources: training and evaluation batches.

Training: `MapDataset.source -> shard per process -> seed -> shuffle -> repeat -> random_map
(preprocess with the record's random stream) -> batch -> to_iter_dataset -> mp_prefetch`.
Batching happens on the `MapDataset`, so batch `i` is the same whatever the number of workers,
and the iterator's state (`get_state`/`set_state`, or grain's Orbax handlers) resumes exactly.

Evaluation: one pass over a split, no augmentation, every process gets the same number of
fixed-shape batches; the last ones are padded with copies of a real pair marked
`pair_valid=False`.

Label budget (training only, `keypoints_per_pair`, `labelled_pair_fraction`, `budget_seed`):
before sharding and shuffling, record `i` of the training split keeps a subset of its keypoints
fixed by `(budget_seed, i)`, the same in every epoch, on every process and for every training
seed. The withheld keypoints never reach `flow`/`kps_valid`; they travel in `withheld_*`.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any, Dict

import grain
import numpy as np

from sccorr_jax import config_lib
from sccorr_jax.data import parts
from sccorr_jax.data import pfpascal
from sccorr_jax.data import pfwillow
from sccorr_jax.data import spair71k
from sccorr_jax.data import synthetic
from sccorr_jax.data import transforms

BUILDERS = {'spair71k': spair71k.Spair71k, 'pfpascal': pfpascal.PfPascal,
            'pfwillow': pfwillow.PfWillow}
# Embedded datasets: generated on first use into data_dir (no download).
EMBEDDED = {'synthetic': synthetic, 'parts': parts}
DATASETS = config_lib.DATASETS  # The names `data.name` may take: EMBEDDED and BUILDERS.
# Datasets whose records carry a dense ground truth (`dense_flow`, `dense_valid`).
DENSE_TRUTH_DATASETS = ('synthetic', 'parts')
_SPLIT_ALIASES = {'train': 'trn', 'validation': 'val', 'valid': 'val'}


def has_dense_truth(cfg) -> bool:
  """Whether the dataset's records carry a dense ground truth (learning mode 'dense')."""
  return _get(cfg, 'name') in DENSE_TRUTH_DATASETS


def _get(cfg, key: str, default: Any = None) -> Any:
  return cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)


def _check(cfg):
  name = _get(cfg, 'name')
  if name not in DATASETS:
    raise ValueError(f'data.name must be one of {DATASETS}, got {name!r}')
  if int(cfg.img_size) % int(cfg.feature_size):
    raise ValueError(f'data.img_size ({cfg.img_size}) must be divisible by data.feature_size '
                     f'({cfg.feature_size})')
  if int(_get(cfg, 'keypoints_per_pair', 0)) < 0:
    raise ValueError(f'data.keypoints_per_pair must be >= 0, got {cfg.keypoints_per_pair}')
  if (name == 'parts' and int(_get(cfg, 'parts_novel_categories', 0))
      and float(_get(cfg, 'flip_source_p', 0.0)) > 0):
    raise ValueError('data.flip_source_p relabels keypoints with the six benchmark categories\' '
                     'left/right tables; the novel categories (data.parts_novel_categories) '
                     'need data.flip_source_p=0')
  frac = float(_get(cfg, 'labelled_pair_fraction', 1.0))
  if not 0.0 <= frac <= 1.0:
    raise ValueError(f'data.labelled_pair_fraction must be in [0, 1], got {frac}')


def _prepared_on_disk(builder) -> bool:
  """Whether the builder's version directory is complete on disk (re-read, not cached)."""
  return os.path.isfile(os.path.join(builder.data_dir, 'dataset_info.json'))


def _embedded_knobs(data_config) -> Dict[str, int]:
  """The `make_config` knobs of an embedded dataset from the data config."""
  if data_config.name == 'synthetic':
    return dict(
        img_size=int(_get(data_config, 'synthetic_img_size', 128)),
        train_pairs_per_photo=int(_get(data_config, 'synthetic_train_pairs_per_photo', 16)),
        eval_pairs_per_photo=int(_get(data_config, 'synthetic_eval_pairs_per_photo', 8)),
        min_kps=int(_get(data_config, 'synthetic_min_kps', 8)),
        max_kps=int(_get(data_config, 'synthetic_max_kps', 20)),
        seed=int(_get(data_config, 'synthetic_seed', 0)))
  return dict(
      img_size=int(_get(data_config, 'parts_img_size', 128)),
      train_pairs_per_category=int(_get(data_config, 'parts_train_pairs_per_category', 64)),
      eval_pairs_per_category=int(_get(data_config, 'parts_eval_pairs_per_category', 16)),
      min_kps=int(_get(data_config, 'parts_min_kps', 4)),
      seed=int(_get(data_config, 'parts_seed', 0)),
      novel_categories=int(_get(data_config, 'parts_novel_categories', 0)),
      appearance=str(_get(data_config, 'parts_appearance', 'random')))


def get_builder(data_config):
  """The TFDS builder of `data_config.name` over `data_config.data_dir`.

  The embedded datasets ('synthetic', 'parts') are generated on first use; a benchmark must have
  been prepared with `python -m sccorr_jax.data.prepare` (raises `FileNotFoundError` saying so
  otherwise).
  """
  _check(data_config)
  name = data_config.name
  data_dir = os.path.expanduser(str(data_config.data_dir))
  if name in EMBEDDED:
    module = EMBEDDED[name]
    knobs = _embedded_knobs(data_config)
    builder = module.make_builder(data_dir, **knobs)
    if not builder.is_prepared():
      # Several processes (the hosts of one run, parallel jobs) may start at once: one
      # generates under a file lock, the others wait and then read what it wrote.
      os.makedirs(data_dir, exist_ok=True)
      with open(os.path.join(data_dir, f'.sccorr_{name}.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
          if not _prepared_on_disk(builder):
            builder.download_and_prepare()
        finally:
          fcntl.flock(lock, fcntl.LOCK_UN)
      builder = module.make_builder(data_dir, **knobs)  # re-reads the finished dataset
    return builder
  builder = BUILDERS[name](data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'{name} is not prepared in {data_dir} (looked for {builder.data_dir}). Prepare it '
        f'with: python -m sccorr_jax.data.prepare --dataset={name} --manual_dir=<folder with '
        f'the extracted archive> --data_dir={data_dir}   (see docs/data.md)')
  return builder


def _split(builder, split: str) -> str:
  split = _SPLIT_ALIASES.get(split, split)
  if split not in builder.info.splits:
    raise ValueError(f'{builder.name} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits.keys())}')
  return split


def data_source(data_config, split: str):
  """Random-access TFDS data source of a split (records of `records.py`, images decoded)."""
  builder = get_builder(data_config)
  return builder.as_data_source(split=_split(builder, split))


def num_examples(data_config, split: str) -> int:
  """Number of pairs in a split."""
  builder = get_builder(data_config)
  return int(builder.info.splits[_split(builder, split)].num_examples)


def category_names(data_config) -> list:
  """Category names of the dataset; index = `category` id."""
  return list(get_builder(data_config).info.features['category'].names)


def preprocess_options(data_config, train: bool) -> transforms.PreprocessOptions:
  return transforms.PreprocessOptions(
      dataset=data_config.name, img_size=int(data_config.img_size),
      feature_size=int(data_config.feature_size),
      receptive_field=int(data_config.receptive_field), max_kps=int(data_config.max_kps),
      train=train, augment=bool(_get(data_config, 'augment', True)),
      augment_p=float(_get(data_config, 'augment_p', 0.2)),
      random_crop=bool(_get(data_config, 'random_crop', False)),
      random_crop_p=float(_get(data_config, 'random_crop_p', 0.5)),
      flip=bool(_get(data_config, 'flip', True)), label_truth=train,
      flip_source_p=float(_get(data_config, 'flip_source_p', 0.0)))


def check_cached_features(data_config) -> None:
  """Raises ValueError if training augmentation that needs pixels is on (cached features).

  Colour augmentation and random crops change the pixels the backbone sees, so they cannot
  apply to cached features; flips can (the token grid is mirrored, see `preprocess_pair`).
  """
  on = [k for k in ('augment', 'random_crop') if bool(_get(data_config, k, False))]
  if on:
    raise ValueError('cached features (model.inputs=\'features\') cannot take colour '
                     'augmentation or random crops, which change pixels: set '
                     + ' and '.join(f'data.{k}=False' for k in on))


def _check_features(data_config, features, split: str, train: bool) -> None:
  if features is None:
    return
  if train:
    check_cached_features(data_config)
  if features.split != _SPLIT_ALIASES.get(split, split):
    raise ValueError(f'the feature cache is of split {features.split!r}, not {split!r}')


def _read_options(data_config) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=int(_get(data_config, 'num_threads', 4)),
                           prefetch_buffer_size=int(_get(data_config, 'prefetch_buffer_size', 16)))


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by process_count {process_count}')
  return batch_size // process_count


def _batched_iter_dataset(data_config, ds, batch_size: int):
  """Batches on the MapDataset (batches do not depend on the worker count), then reads it with
  `num_workers` prefetch processes (0: in-process read threads)."""
  it = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(_read_options(data_config))
  workers = int(_get(data_config, 'num_workers', 0))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it


def create_train_iterator(data_config, *, batch_size: int, seed: int, process_index: int = 0,
                          process_count: int = 1, features=None) -> grain.DatasetIterator:
  """Infinite, shuffled, augmented training batches of this process (checkpointable).

  Args:
    data_config: see `config_lib.default_data_config`.
    batch_size: global batch size; this process yields `batch_size // process_count` pairs.
    seed: data seed (shuffling and augmentation).
    process_index, process_count: this process and the number of processes; each reads the
      records `process_index::process_count` of the split.
    features: the training split's `cache_features.FeatureCache`: `src_img`/`trg_img` are then
      the cached features of the images ([h, w, c] float32), flipped with them; colour
      augmentation and random crops are refused (`check_cached_features`).

  Returns:
    A grain `DatasetIterator` of batch dicts (the batch contract of CONTRIBUTING.md, with the
    training keys `withheld_*`, `dense_flow`, `dense_valid`); its `get_state()`/`set_state()`
    resume exactly, mid-epoch included.
  """
  local = _local_batch_size(batch_size, process_count)
  split = _get(data_config, 'train_split', 'trn')
  _check_features(data_config, features, split, train=True)
  source = data_source(data_config, split)
  ds = grain.MapDataset.source(source)
  # The label budget is fixed per record (index in the split), before sharding and shuffling.
  ds = ds.map_with_index(transforms.LabelBudget(
      keypoints_per_pair=int(_get(data_config, 'keypoints_per_pair', 0)),
      labelled_pair_fraction=float(_get(data_config, 'labelled_pair_fraction', 1.0)),
      num_records=len(source), seed=int(_get(data_config, 'budget_seed', 0))))
  if process_count > 1:
    ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError('the training split of this process is empty')
  process_seed = int(np.random.SeedSequence([int(seed), int(process_index)]).generate_state(1)[0])
  ds = ds.seed(process_seed)
  if _get(data_config, 'shuffle', True):
    ds = ds.shuffle()
  ds = ds.repeat()
  ds = ds.random_map(transforms.TrainPreprocess(preprocess_options(data_config, train=True),
                                                features))
  return iter(_batched_iter_dataset(data_config, ds, local))


class _PaddedSource:
  """`base[indices]` followed by copies of its first record marked `_padding` up to `length`."""

  def __init__(self, base, indices, length: int):
    self._base = base
    self._indices = np.asarray(indices, np.int64)
    self._length = int(length)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> Dict[str, Any]:
    i = int(i)
    if i < len(self._indices):
      return self._base[int(self._indices[i])]
    rec = dict(self._base[int(self._indices[0])])
    rec['_padding'] = True
    return rec


def create_eval_iterator(data_config, split: str, *, batch_size: int, process_index: int = 0,
                         process_count: int = 1, features=None) -> grain.IterDataset:
  """One pass over a split in fixed-shape batches, no augmentation.

  Args:
    data_config: see `config_lib.default_data_config`.
    split: 'trn' | 'val' | 'test' (PF-WILLOW: 'test').
    batch_size: global batch size; this process yields `batch_size // process_count` rows.
    process_index, process_count: this process gets records `process_index::process_count`.
    features: the split's `cache_features.FeatureCache`: `src_img`/`trg_img` are the cached
      features ([h, w, c] float32).

  Returns:
    An iterable (each `iter()` starts a new pass) of batch dicts; all processes yield the same
    number of batches; rows past the end of the data are copies with `pair_valid=False`.
  """
  local = _local_batch_size(batch_size, process_count)
  _check_features(data_config, features, split, train=False)
  source = data_source(data_config, split)
  n = len(source)
  indices = np.arange(process_index, n, process_count)
  if len(indices) == 0:
    raise ValueError(f'split {split!r} has no pair for process {process_index}')
  per_process = -(-n // process_count)
  num_batches = -(-per_process // local)
  padded = _PaddedSource(source, indices, num_batches * local)
  ds = grain.MapDataset.source(padded)
  ds = ds.map(transforms.EvalPreprocess(preprocess_options(data_config, train=False), features))
  return _batched_iter_dataset(data_config, ds, local)
