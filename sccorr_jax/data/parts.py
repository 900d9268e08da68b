"""The `parts` dataset: an embedded semantic-correspondence benchmark of articulated 2D objects.

A TFDS builder with no download over `procedural.py` (the generator: categories, part
templates, rendering, dense ground truth; read its docstring). Six categories (quadruped, bird,
vehicle, face, humanoid, flower), pairs of two independently drawn instances of one category:
different proportions, poses, scales, rotations, flips, textures and backgrounds, with occlusion
between parts, occluders and truncation. Every target object pixel has an exact match (or is
marked hidden in the source), and the sparse labels are the named keypoints visible in both
images.

Splits are by instance seed (`rng = default_rng([seed, split, category, k])`) and by texture
photograph: textures and backgrounds of `trn` come from the 13 training photographs of the
synthetic dataset, `val` and `test` from their own three photographs each
(`synthetic.PHOTOS`), so test appearance is never seen in training. The categories are shared
by all splits (the task is correspondence between new instances of known categories, as in
SPair-71k).

Records: the format of `records.py` plus

* `dense_flow` [S, S, 2] float32: target pixel (x, y) -> displacement to its source match,
  pixels (0 where unlabelled);
* `dense_valid` [S, S] bool: the target pixel shows the object and its match is visible in the
  source (background, occluders and matches hidden or outside the source are False);
* `kps_ids` [40] int32: which keypoint of the category each slot is
  (`procedural.keypoint_names(category)`), -1 on padding; `procedural.flip_permutation`
  relabels them for a mirrored image.

`src_bbox`/`trg_bbox` are the extent of each object's pixels (before occluders, inside the
image); the PCK threshold is `bbox` (max side of the source box), as SPair-71k. The difficulty
fields follow SPair-71k's levels (see `procedural._difficulty`). A pair for which no draw has
`min_kps` keypoints visible in both images is a bad record (skipped and reported by the usual
rules of `records.SplitGuard`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from sccorr_jax import config_lib
from sccorr_jax.data import builder_base
from sccorr_jax.data import procedural
from sccorr_jax.data import records
from sccorr_jax.data import synthetic

PHOTOS = synthetic.PHOTOS
CATEGORIES = procedural.CATEGORY_NAMES


@dataclasses.dataclass(eq=False, kw_only=True)
class PartsConfig(builder_base.EmbeddedConfig):
  """Size knobs of the `parts` dataset (they name the cache directory); `make_config` fills
  them, with `config_lib.PARTS_KNOBS` for those not given.

  Attributes (besides `EmbeddedConfig`'s `img_size`, `seed` and `min_kps`, the keypoints
  visible in both images a pair needs, redrawn otherwise):
    train_pairs_per_category: training pairs per category.
    eval_pairs_per_category: validation and test pairs per category.
    novel_categories: 0 = the benchmark's six categories, N > 0 = the pretraining variant, N
      novel categories and training photographs only.
    appearance: the parts' appearance model (`procedural.APPEARANCES`).
  """

  train_pairs_per_category: int
  eval_pairs_per_category: int
  novel_categories: int
  appearance: str


def make_config(**knobs) -> PartsConfig:
  """The builder config of these knobs (`PartsConfig`'s fields; the defaults of those not given
  are `config_lib.PARTS_KNOBS`, the data config's `parts_*` keys).

  Raises:
    ValueError: a knob out of range; TypeError: an unknown knob.
  """
  k = {**config_lib.PARTS_KNOBS, **knobs}
  if k['appearance'] not in procedural.APPEARANCES:
    raise ValueError(
        f'appearance must be one of {procedural.APPEARANCES}, ' f'got {k["appearance"]!r}'
    )
  if not 1 <= k['min_kps'] <= records.MAX_KPS:
    raise ValueError(f'need 1 <= min_kps <= {records.MAX_KPS}')
  if k['img_size'] < 16:
    raise ValueError(f'img_size must be at least 16, got {k["img_size"]}')
  if k['novel_categories'] < 0:
    raise ValueError(f'novel_categories must be >= 0, got {k["novel_categories"]}')
  name = (
      f'img{k["img_size"]}-trn{k["train_pairs_per_category"]}-'
      f'eval{k["eval_pairs_per_category"]}-kps{k["min_kps"]}-seed{k["seed"]}'
      + (f'-novel{k["novel_categories"]}' if k['novel_categories'] else '')
      + ('' if k['appearance'] == 'random' else f'-{k["appearance"]}')
  )
  return PartsConfig(name=name, description='procedural articulated objects', **k)


def category_names(cfg: PartsConfig):
  """The dataset's categories: the benchmark's six, or its novel ones."""
  if cfg.novel_categories:
    return tuple(procedural.novel_category_name(i) for i in range(cfg.novel_categories))
  return CATEGORIES


def photos(cfg: PartsConfig, split: str):
  """The photographs a split's textures and backgrounds come from: the split's own for the
  benchmark, the training ones in every split of the pretraining variant (it holds no image
  of the benchmark's `val` / `test` photographs)."""
  return PHOTOS['trn' if cfg.novel_categories else split]


def make_example(split: str, cat: int, k: int, cfg: PartsConfig) -> dict:
  """Record `k` of category `cat` in `split` (raises `records.BadRecordError`)."""
  key = f'{category_names(cfg)[cat]}-{k:05d}'
  rng = builder_base.record_rng(cfg, split, cat, k)
  cat_id = procedural.NOVEL_BASE + cat if cfg.novel_categories else cat
  pair = procedural.make_pair(
      cat_id,
      rng,
      cfg.img_size,
      photos(cfg, split),
      min_kps=cfg.min_kps,
      name=f'parts/{split}/{key}',
      appearance=cfg.appearance,
  )
  pair.pop('src')
  pair.pop('trg')
  name = f'parts/{split}/{key}'
  return builder_base.generated_example(cfg, key, f'{name}/src', f'{name}/trg', cat, pair)


class SccorrParts(builder_base.EmbeddedBuilder):
  """Procedural articulated objects with named keypoints and exact dense ground truth."""

  BUILDER_CONFIGS = [make_config()]
  SPLITS = tuple(builder_base.EMBEDDED_SPLIT_IDS)
  DESCRIPTION = __doc__

  @property
  def CATEGORIES(self):  # pylint: disable=invalid-name  # the base class's attribute
    return category_names(self.builder_config)

  def extra_features(self):
    extra = super().extra_features()
    extra['kps_ids'] = tfds.features.Tensor(shape=(records.MAX_KPS,), dtype=np.int32)
    return extra

  def _generate_examples(self, split):
    cfg = self.builder_config
    per_cat = cfg.train_pairs_per_category if split == 'trn' else cfg.eval_pairs_per_category
    guard = records.SplitGuard(split, self.policy, self.report)
    for cat, cat_name in enumerate(self.CATEGORIES):
      for k in range(per_cat):
        key = f'{cat_name}-{k:05d}'
        example = guard.run(key, lambda c=cat, i=k: make_example(split, c, i, cfg))
        if example is not None:
          yield key, example
    guard.finish()


def make_builder(data_dir: str, **knobs) -> SccorrParts:
  """The `parts` builder for the given `make_config` knobs, caching under `data_dir`."""
  return SccorrParts.for_config(data_dir, make_config(**knobs))
