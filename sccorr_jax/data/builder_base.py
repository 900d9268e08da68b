"""Shared machinery of the benchmark TFDS builders: ArrayRecord output, manual dir or download,
the bad-record policy and its report."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from sccorr_jax.data import records

# In-memory shuffle buffer while an embedded dataset is generated (TFDS's default is 1 GB).
EMBEDDED_SHUFFLE_BYTES = 16 << 30


class PairDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the benchmark builders (not registered itself).

  Subclasses set `FOLDER` (the dataset's folder name in its archive), `MARKER` (a path inside
  the dataset root that identifies it), `URLS` (archive URLs), `CATEGORIES`, `SPLITS`, and
  implement `_examples(root, split, guard)` yielding `(key, example)`.

  Construction: `Builder(data_dir=D, policy=records.BadRecordPolicy(...))`; the file format
  defaults to ArrayRecord. After `download_and_prepare`, `builder.report` holds the bad records.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  FOLDER: str = ''
  MARKER: str = ''
  URLS: Dict[str, str] = {}
  CATEGORIES: Sequence[str] = ()
  SPLITS: Sequence[str] = ()
  HOMEPAGE: str = ''
  CITATION: str = ''
  DESCRIPTION: str = ''

  def __init__(self, *, policy: Optional[records.BadRecordPolicy] = None, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)
    self.policy = policy or records.BadRecordPolicy()
    self.report = records.PreparationReport()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=records.pair_features(self.CATEGORIES),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
    )

  def _find_root(self, dl_manager) -> str:
    # A manual dir that was given but is missing or empty must not fall back to a download:
    # tfds' `manual_dir` raises in both cases, so look at what was configured. Without one,
    # tfds configures `<download dir>/manual`, which may well not exist: then download.
    configured = getattr(dl_manager, '_manual_dir', None)
    default = os.path.join(os.fspath(dl_manager.download_dir), 'manual')
    if configured and os.path.normpath(os.fspath(configured)) == os.path.normpath(default):
      configured = None
    try:
      manual = os.fspath(dl_manager.manual_dir)
    except Exception:  # pylint: disable=broad-except  # tfds raises when no manual dir exists
      manual = None
    if manual is None and configured:
      raise records.PreparationError(
          manual_dir_problem(os.fspath(configured), type(self))
          or f'{self.name}: manual dir {os.fspath(configured)} cannot be used'
      )
    if manual:
      root = records.find_root(manual, self.FOLDER, self.MARKER)
      if root:
        logging.info('%s: reading %s', self.name, root)
        return root
      raise records.PreparationError(
          manual_dir_problem(manual, type(self)) or f'{self.name}: {manual} has the wrong layout'
      )
    logging.info('%s: no manual dir, downloading %s', self.name, self.URLS)
    paths = dl_manager.download_and_extract(dict(self.URLS))
    for path in paths.values():
      root = records.find_root(os.fspath(path), self.FOLDER, self.MARKER)
      if root:
        return root
    raise records.PreparationError(
        f'{self.name}: the downloaded archives {list(paths.values())} do not contain '
        f'{self.FOLDER}/{self.MARKER}'
    )

  def _split_generators(self, dl_manager):
    root = self._find_root(dl_manager)
    records.read_encoded_image.cache_clear()  # files may have changed since an earlier preparation
    return {split: self._generate_examples(root=root, split=split) for split in self.SPLITS}

  def _generate_examples(self, root: str, split: str):
    guard = records.SplitGuard(split, self.policy, self.report)
    for key, example in self._examples(root, split, guard):
      yield key, example
    guard.finish()

  def _examples(self, root: str, split: str, guard: records.SplitGuard):
    raise NotImplementedError


def manual_dir_problem(manual: str, builder_cls, name: Optional[str] = None) -> Optional[str]:
  """One line saying why `manual` is not a manual dir of `builder_cls` (None when it is); the
  line starts with `name` (default: the builder's TFDS name)."""
  name = name or getattr(builder_cls, 'name', builder_cls.__name__)
  expected = f'{builder_cls.FOLDER}/{builder_cls.MARKER} or {builder_cls.MARKER}'
  if not os.path.exists(manual):
    return f'{name}: manual dir {manual} does not exist'
  if not os.path.isdir(manual):
    return f'{name}: manual dir {manual} is not a directory'
  try:
    entries = sorted(os.listdir(manual))
  except OSError as e:
    return f'{name}: manual dir {manual} cannot be read ({e.strerror})'
  if not entries:
    return (
        f'{name}: manual dir {manual} is empty; extract the archive there (expected '
        f'{expected}; see docs/data.md)'
    )
  if records.find_root(manual, builder_cls.FOLDER, builder_cls.MARKER):
    return None
  shown = ', '.join(entries[:6]) + (', ...' if len(entries) > 6 else '')
  return (
      f'{name}: manual dir {manual} has the wrong layout: it contains neither '
      f'{builder_cls.FOLDER}/{builder_cls.MARKER} nor {builder_cls.MARKER} (found: {shown}); '
      'see docs/data.md for the expected layout'
  )


# The splits of an embedded dataset and their ids in its records' seeds (`record_rng`).
EMBEDDED_SPLIT_IDS = {'trn': 0, 'val': 1, 'test': 2}


@dataclasses.dataclass(eq=False, kw_only=True)
class EmbeddedConfig(tfds.core.BuilderConfig):
  """The size knobs every embedded dataset has; its config adds its own (all of them name the
  cache directory).

  Attributes:
    img_size: side S of the stored square images, pixels.
    min_kps: the fewest keypoints a pair has (how they are drawn: the dataset's docstring).
    seed: generation seed.
  """

  img_size: int
  min_kps: int
  seed: int


def record_rng(cfg: EmbeddedConfig, split: str, category: int, index: int) -> np.random.Generator:
  """The random stream of record `index` of `category` in `split`: `default_rng([seed, split
  id, category, index])`, so every record, and so every split, is drawn independently."""
  return np.random.default_rng([cfg.seed, EMBEDDED_SPLIT_IDS[split], category, index])


def generated_example(
    cfg: EmbeddedConfig, key: str, src_imname: str, trg_imname: str, category: int, pair: dict
) -> dict:
  """The record of a generated pair: `pair`'s `src_img` / `trg_img` (S x S arrays, popped from
  it) PNG-encoded, the rest of `pair` as it is (`records.base_example`)."""
  size = np.array([cfg.img_size, cfg.img_size], np.int32)
  return records.base_example(
      pair_id=key,
      src_imname=src_imname,
      trg_imname=trg_imname,
      src_img=records.encode_png(pair.pop('src_img')),
      trg_img=records.encode_png(pair.pop('trg_img')),
      src_imsize=size,
      trg_imsize=size,
      category=category,
      **pair,
  )


class EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the embedded datasets generated here (`parts`, `synthetic`; not registered itself).

  Subclasses set `BUILDER_CONFIGS` (an `EmbeddedConfig`), `CATEGORIES` and `SPLITS`, may extend
  `extra_features` (the record's features beyond `records.pair_features`; default: the dense
  ground truth) and implement `_generate_examples(split)`. Bad records go through
  `self.policy` / `self.report`. Build one with `for_config`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  CATEGORIES: Sequence[str] = ()
  SPLITS: Sequence[str] = ()
  DESCRIPTION = ''
  HOMEPAGE = 'https://scikit-image.org/docs/stable/api/skimage.data.html'

  def __init__(self, *, policy: Optional[records.BadRecordPolicy] = None, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)
    self.policy = policy or records.BadRecordPolicy()
    self.report = records.PreparationReport()

  @classmethod
  def for_config(cls, data_dir: str, config: EmbeddedConfig) -> 'EmbeddedBuilder':
    """The builder of `config` caching under `data_dir` (a registered config by its name)."""
    known = {c.name for c in cls.BUILDER_CONFIGS}
    return cls(data_dir=data_dir, config=config.name if config.name in known else config)

  def download_and_prepare(self, *args, **kwargs):
    """TFDS's preparation, its shuffle buffer kept in memory (`EMBEDDED_SHUFFLE_BYTES`).

    Past 1 GB of records (e.g. 9,600 `parts` pairs of 96 px with their dense truth) TFDS's
    shuffler spills to bucket files through `tf.io.gfile`, which needs TensorFlow; this project
    does not install it, and the generated records fit in memory.
    """
    limit = tfds_shuffle.MAX_MEM_BUFFER_SIZE
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = max(limit, EMBEDDED_SHUFFLE_BYTES)
    try:
      return super().download_and_prepare(*args, **kwargs)
    finally:
      tfds_shuffle.MAX_MEM_BUFFER_SIZE = limit

  def extra_features(self) -> Dict[str, tfds.features.FeatureConnector]:
    """The record's features beyond `records.pair_features`: the exact dense ground truth."""
    return records.dense_truth_features(self.builder_config.img_size)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=records.pair_features(self.CATEGORIES, self.extra_features()),
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split=split) for split in self.SPLITS}
