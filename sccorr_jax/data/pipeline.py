"""grain pipelines over the TFDS data sources: training and evaluation batches.

Training: `MapDataset.source -> shard per process -> seed -> shuffle -> repeat -> random_map
(preprocess with the record's random stream) -> batch -> to_iter_dataset -> mp_prefetch`.
Batching happens on the `MapDataset`, so batch `i` is the same whatever the number of workers,
and the iterator's state (`get_state`/`set_state`, or grain's Orbax handlers) resumes exactly.

Evaluation: one pass over a split, no augmentation, every process gets the same number of
fixed-shape batches; the last ones are padded with copies of a real pair marked
`pair_valid=False`.

Options: the data config's keys (`config_lib.default_data_config`, the one place their defaults
are written), read here without defaults of their own, once: `resolve(config.data)` gives the
`ResolvedData` (builder, split sizes, categories, preprocessing options, feature caches) that the
trainer, the evaluator and the feature cache use. Every function here also takes the data
config itself, resolved on the call.

Label budget (training only, `keypoints_per_pair`, `labelled_pair_fraction`, `budget_seed`):
before sharding and shuffling, record `i` of the training split keeps a subset of its keypoints
fixed by `(budget_seed, i)`, the same in every epoch, on every process and for every training
seed. The withheld keypoints never reach `flow`/`kps_valid`; they travel in `withheld_*`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from typing import Any, Dict, Mapping, Tuple

import grain
import numpy as np

from sccorr_jax import config_lib
from sccorr_jax.data import parts
from sccorr_jax.data import pfpascal
from sccorr_jax.data import pfwillow
from sccorr_jax.data import spair71k
from sccorr_jax.data import synthetic
from sccorr_jax.data import transforms

BUILDERS = {
    'spair71k': spair71k.Spair71k,
    'pfpascal': pfpascal.PfPascal,
    'pfwillow': pfwillow.PfWillow,
}
# Embedded datasets: generated on first use into data_dir (no download).
EMBEDDED = {'synthetic': synthetic, 'parts': parts}
DATASETS = config_lib.DATASETS  # The names `data.name` may take: EMBEDDED and BUILDERS.
# Datasets whose records carry a dense ground truth (`dense_flow`, `dense_valid`).
DENSE_TRUTH_DATASETS = ('synthetic', 'parts')
_SPLIT_ALIASES = {'train': 'trn', 'validation': 'val', 'valid': 'val'}


def has_dense_truth(cfg) -> bool:
  """Whether the dataset's records carry a dense ground truth (learning mode 'dense')."""
  return cfg.name in DENSE_TRUTH_DATASETS


def _check(cfg):
  name = cfg.name
  if name not in DATASETS:
    raise ValueError(f'data.name must be one of {DATASETS}, got {name!r}')
  if int(cfg.img_size) % int(cfg.feature_size):
    raise ValueError(
        f'data.img_size ({cfg.img_size}) must be divisible by data.feature_size '
        f'({cfg.feature_size})'
    )
  if int(cfg.keypoints_per_pair) < 0:
    raise ValueError(f'data.keypoints_per_pair must be >= 0, got {cfg.keypoints_per_pair}')
  if name == 'parts' and int(cfg.parts_novel_categories) and float(cfg.flip_source_p) > 0:
    raise ValueError(
        "data.flip_source_p relabels keypoints with the six benchmark categories' "
        'left/right tables; the novel categories (data.parts_novel_categories) '
        'need data.flip_source_p=0'
    )
  frac = float(cfg.labelled_pair_fraction)
  if not 0.0 <= frac <= 1.0:
    raise ValueError(f'data.labelled_pair_fraction must be in [0, 1], got {frac}')


def _prepared_on_disk(builder) -> bool:
  """Whether the builder's version directory is complete on disk (re-read, not cached)."""
  return os.path.isfile(os.path.join(builder.data_dir, 'dataset_info.json'))


def _embedded_knobs(data_config) -> Dict[str, Any]:
  """The `make_config` knobs of an embedded dataset: its `<name>_<knob>` keys of the data
  config (`config_lib.EMBEDDED_KNOBS`), each of its default's type."""
  knobs = config_lib.EMBEDDED_KNOBS[data_config.name]
  return {k: type(default)(data_config[f'{data_config.name}_{k}']) for k, default in knobs.items()}


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
        f'the extracted archive> --data_dir={data_dir}   (see docs/data.md)'
    )
  return builder


def data_source(data, split: str):
  """Random-access TFDS data source of a split (records of `records.py`, images decoded).

  `data`, here and below: the `ResolvedData` (`resolve`), or a data config, resolved on the call.
  """
  return resolve(data).source(split)


def num_examples(data, split: str) -> int:
  """Number of pairs in a split."""
  return resolve(data).num_examples(split)


def category_names(data) -> list:
  """Category names of the dataset; index = `category` id."""
  return list(resolve(data).category_names)


def preprocess_options(data_config, train: bool) -> transforms.PreprocessOptions:
  """`preprocess_pair`'s options of a data config's training or evaluation pairs."""
  return transforms.PreprocessOptions(
      dataset=data_config.name,
      img_size=int(data_config.img_size),
      feature_size=int(data_config.feature_size),
      receptive_field=int(data_config.receptive_field),
      max_kps=int(data_config.max_kps),
      train=train,
      augment=bool(data_config.augment),
      augment_p=float(data_config.augment_p),
      random_crop=bool(data_config.random_crop),
      random_crop_p=float(data_config.random_crop_p),
      flip=bool(data_config.flip),
      label_truth=train,
      flip_source_p=float(data_config.flip_source_p),
  )


def _pixel_augmentations(data) -> Tuple[str, ...]:
  """The training augmentations that are on and change pixels (a config or `ResolvedData`)."""
  if isinstance(data, ResolvedData):
    return data.pixel_augmentations
  return tuple(k for k in ('augment', 'random_crop') if bool(data[k]))


def check_cached_features(data) -> None:
  """Raises ValueError if training augmentation that needs pixels is on (cached features).

  Colour augmentation and random crops change the pixels the backbone sees, so they cannot
  apply to cached features; flips can (the token grid is mirrored, see `preprocess_pair`).

  Args:
    data: a data config (read, not resolved: a config check) or its `ResolvedData`.
  """
  on = _pixel_augmentations(data)
  if on:
    raise ValueError(
        "cached features (model.inputs='features') cannot take colour "
        'augmentation or random crops, which change pixels: set '
        + ' and '.join(f'data.{k}=False' for k in on)
    )


def _split_features(data, features, split: str, train: bool):
  """The feature cache a pipeline over `split` reads (None: images), checked before any record
  is read: `features`, or else the `ResolvedData`'s cache of that split."""
  if features is None and isinstance(data, ResolvedData):
    features = data.features.get(split)
  if features is None:
    return None
  if train:
    check_cached_features(data)
  if features.split != _SPLIT_ALIASES.get(split, split):
    raise ValueError(f'the feature cache is of split {features.split!r}, not {split!r}')
  return features


def _read_options(data_config) -> grain.ReadOptions:
  return grain.ReadOptions(
      num_threads=int(data_config.num_threads),
      prefetch_buffer_size=int(data_config.prefetch_buffer_size),
  )


# ------------------------------------------------------------------------------------------------
# The data section, resolved once.


@dataclasses.dataclass(frozen=True, eq=False)
class ResolvedData:
  """The data section of a config, resolved once (`resolve`): what the pipelines, the trainer,
  the evaluator and the feature cache read instead of the config.

  Attributes:
    name: the dataset (`DATASETS`).
    data_dir: its TFDS data dir, `~` expanded.
    builder: its prepared TFDS builder (`get_builder`).
    split_sizes: pairs per split, for every split the dataset has (its names: 'trn', 'val',
      'test').
    category_names: the category names; index = `category` id.
    dense_truth: the records carry a dense ground truth (`dense_flow`, `dense_valid`).
    train_split: the split the training iterator reads, as configured (checked where it is
      read: a dataset that is only evaluated, PF-WILLOW, has no training split).
    train_options, eval_options: `preprocess_pair`'s options of training and evaluation pairs.
    keypoints_per_pair, labelled_pair_fraction, budget_seed: the training label budget
      (`transforms.LabelBudget`).
    shuffle: shuffle the training data every epoch.
    num_workers: grain prefetch processes (0: in-process read threads).
    read_options: grain's read threads and prefetch buffer.
    pixel_augmentations: the training augmentations that are on and change pixels
      ('augment', 'random_crop'), which cached features refuse (`check_cached_features`).
    feature_cache_dtype: the storage dtype of the feature caches (`cache_features`).
    features: split -> verified `cache_features.FeatureCache`, attached at set-up
      (`with_features`, `model.inputs='features'`); the pipelines of those splits read it
      instead of the images. Empty: images.
  """

  name: str
  data_dir: str
  builder: Any
  split_sizes: Mapping[str, int]
  category_names: Tuple[str, ...]
  dense_truth: bool
  train_split: str
  train_options: transforms.PreprocessOptions
  eval_options: transforms.PreprocessOptions
  keypoints_per_pair: int
  labelled_pair_fraction: float
  budget_seed: int
  shuffle: bool
  num_workers: int
  read_options: grain.ReadOptions
  pixel_augmentations: Tuple[str, ...]
  feature_cache_dtype: str
  features: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def img_size(self) -> int:
    """The network's input side, pixels."""
    return self.eval_options.img_size

  def split_name(self, split: str) -> str:
    """The dataset's name of `split` ('train' -> 'trn', 'validation' -> 'val').

    Raises:
      ValueError: the dataset has no such split.
    """
    split = _SPLIT_ALIASES.get(split, split)
    if split not in self.split_sizes:
      raise ValueError(
          f'{self.builder.name} has no split {split!r}; it has ' f'{sorted(self.split_sizes)}'
      )
    return split

  def source(self, split: str):
    """Random-access TFDS data source of a split (records of `records.py`, images decoded)."""
    return self.builder.as_data_source(split=self.split_name(split))

  def num_examples(self, split: str) -> int:
    """Number of pairs in a split."""
    return self.split_sizes[self.split_name(split)]

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full global batches of `batch_size` pairs in the training split.

    Raises:
      config_lib.ConfigError: the split has fewer pairs than one batch.
    """
    n = self.num_examples(self.train_split)
    spe = n // int(batch_size)
    if spe < 1:
      raise config_lib.ConfigError(
          f'the training split has {n} pairs, fewer than one batch of ' f'{batch_size}'
      )
    return spe

  def with_features(self, features: Mapping[str, Any]) -> 'ResolvedData':
    """The same data with the verified feature caches of some splits (`FeatureCache`s)."""
    return dataclasses.replace(self, features=dict(features))


def resolve(data) -> ResolvedData:
  """The data section resolved once: its builder (prepared, or generated for the embedded
  datasets, see `get_builder`), split sizes, categories and every option the pipelines read.

  Args:
    data: `config.data` (`config_lib.default_data_config`); a `ResolvedData` is returned as is.

  Raises:
    ValueError: inconsistent data options, naming the keys.
    FileNotFoundError: a benchmark that is not prepared (saying how to prepare it).
  """
  if isinstance(data, ResolvedData):
    return data
  builder = get_builder(data)
  return ResolvedData(
      name=str(data.name),
      data_dir=os.path.expanduser(str(data.data_dir)),
      builder=builder,
      split_sizes={k: int(v.num_examples) for k, v in builder.info.splits.items()},
      category_names=tuple(builder.info.features['category'].names),
      dense_truth=has_dense_truth(data),
      train_split=str(data.train_split),
      train_options=preprocess_options(data, train=True),
      eval_options=preprocess_options(data, train=False),
      keypoints_per_pair=int(data.keypoints_per_pair),
      labelled_pair_fraction=float(data.labelled_pair_fraction),
      budget_seed=int(data.budget_seed),
      shuffle=bool(data.shuffle),
      num_workers=int(data.num_workers),
      read_options=_read_options(data),
      pixel_augmentations=_pixel_augmentations(data),
      feature_cache_dtype=str(data.get('feature_cache_dtype', 'bfloat16')),
  )


# ------------------------------------------------------------------------------------------------
# The pipelines.


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by process_count {process_count}')
  return batch_size // process_count


def _batched_iter_dataset(data: ResolvedData, ds, batch_size: int):
  """Batches on the MapDataset (batches do not depend on the worker count), then reads it with
  `num_workers` prefetch processes (0: in-process read threads)."""
  it = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(data.read_options)
  if data.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  return it


def create_train_iterator(
    data,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    features=None,
) -> grain.DatasetIterator:
  """Infinite, shuffled, augmented training batches of this process (checkpointable).

  Args:
    data: the `ResolvedData` (`resolve`), or a data config (`config_lib.default_data_config`).
    batch_size: global batch size; this process yields `batch_size // process_count` pairs.
    seed: data seed (shuffling and augmentation).
    process_index, process_count: this process and the number of processes; each reads the
      records `process_index::process_count` of the split.
    features: the training split's `cache_features.FeatureCache` (default: the
      `ResolvedData`'s, if it has one): `src_img`/`trg_img` are then the cached features of
      the images ([h, w, c] float32), flipped with them; colour augmentation and random crops
      are refused (`check_cached_features`).

  Returns:
    A grain `DatasetIterator` of batch dicts (the batch contract of CONTRIBUTING.md, with the
    training keys `withheld_*`, `dense_flow`, `dense_valid`); its `get_state()`/`set_state()`
    resume exactly, mid-epoch included.
  """
  local = _local_batch_size(batch_size, process_count)
  split = data.train_split
  features = _split_features(data, features, split, train=True)
  data = resolve(data)
  source = data.source(split)
  ds = grain.MapDataset.source(source)
  # The label budget is fixed per record (index in the split), before sharding and shuffling.
  ds = ds.map_with_index(
      transforms.LabelBudget(
          keypoints_per_pair=data.keypoints_per_pair,
          labelled_pair_fraction=data.labelled_pair_fraction,
          num_records=len(source),
          seed=data.budget_seed,
      )
  )
  if process_count > 1:
    ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError('the training split of this process is empty')
  process_seed = int(np.random.SeedSequence([int(seed), int(process_index)]).generate_state(1)[0])
  ds = ds.seed(process_seed)
  if data.shuffle:
    ds = ds.shuffle()
  ds = ds.repeat()
  ds = ds.random_map(transforms.TrainPreprocess(data.train_options, features))
  return iter(_batched_iter_dataset(data, ds, local))


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


def create_eval_iterator(
    data,
    split: str,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    features=None,
) -> grain.IterDataset:
  """One pass over a split in fixed-shape batches, no augmentation.

  Args:
    data: the `ResolvedData` (`resolve`), or a data config (`config_lib.default_data_config`).
    split: 'trn' | 'val' | 'test' (PF-WILLOW: 'test').
    batch_size: global batch size; this process yields `batch_size // process_count` rows.
    process_index, process_count: this process gets records `process_index::process_count`.
    features: the split's `cache_features.FeatureCache` (default: the `ResolvedData`'s, if it
      has one): `src_img`/`trg_img` are the cached features ([h, w, c] float32).

  Returns:
    An iterable (each `iter()` starts a new pass) of batch dicts; all processes yield the same
    number of batches; rows past the end of the data are copies with `pair_valid=False`.
  """
  local = _local_batch_size(batch_size, process_count)
  features = _split_features(data, features, split, train=False)
  data = resolve(data)
  source = data.source(split)
  n = len(source)
  indices = np.arange(process_index, n, process_count)
  if len(indices) == 0:
    raise ValueError(f'split {split!r} has no pair for process {process_index}')
  per_process = -(-n // process_count)
  num_batches = -(-per_process // local)
  padded = _PaddedSource(source, indices, num_batches * local)
  ds = grain.MapDataset.source(padded)
  ds = ds.map(transforms.EvalPreprocess(data.eval_options, features))
  return _batched_iter_dataset(data, ds, local)
