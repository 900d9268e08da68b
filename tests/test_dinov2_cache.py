"""Cached DINOv2 features (`sccorr_jax.data.cache_features`, issue 12 part 4).

A tiny frozen DINOv2 SCorrSAN on the synthetic dataset in its real on-disk format: the cache
holds exactly the live backbone's features (float32 storage) or their bfloat16 rounding; the head
on cached features gives the live model's flow; an interrupted build resumes without recomputing;
stale, mismatched and incomplete caches are refused with a message. End to end
(`configs/*_dinov2.py:cached`): `mt` trains and validates through `train.train_and_evaluate`
reading the cache, whose pipeline batches give the live frozen model's flow up to bfloat16
rounding; a stale cache is refused when training starts, colour augmentation at the config check.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sccorr_jax import config_lib
from sccorr_jax import evaluation
from sccorr_jax import models
from sccorr_jax import train
from sccorr_jax.data import cache_features as cf
from sccorr_jax.data import pipeline
from sccorr_jax.data import transforms

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _config(data_dir, layers=(0, 1)):
  c = config_lib.tiny_config('baseline', data_dir)
  config_lib.apply_dinov2(c, 'vits14', layers, 0)
  config_lib.apply_dinov2_tiny(c, img_size=42, feature_size=6)
  return c


def _cached_config(data_dir, layers=(0, 1)):
  """`mt` on the cache of `_config`'s model (same seed: same backbone); 1 epoch of 2 steps."""
  c = config_lib.tiny_config('mt', data_dir)
  config_lib.apply_dinov2(c, 'vits14', layers, 0, cached=True)
  config_lib.apply_dinov2_tiny(c, img_size=42, feature_size=6)
  c.optim.num_epochs = 1
  return c


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = _config(str(tmp_path_factory.mktemp('data')))
  model = models.build_model(config)
  variables = models.init_variables(config, model, jax.random.PRNGKey(0), 1)
  return config, model, variables


@pytest.fixture(scope='module')
def built(setup):
  """A float32 cache of 'val' built in two sessions (the first one interrupted)."""
  config, model, variables = setup
  first = cf.build_cache(
      model,
      variables,
      config.data,
      ['val'],
      dtype='float32',
      batch_size=4,
      progress=False,
      max_batches=1,
  )
  with pytest.raises(cf.CacheError, match='incomplete'):
    cf.FeatureCache.open(model, variables, config.data, 'val', dtype='float32')
  second = cf.build_cache(
      model, variables, config.data, ['val'], dtype='float32', batch_size=4, progress=False
  )
  return first, second


def test_an_interrupted_build_resumes_where_it_stopped(built):
  first, second = built
  n = first['rows']['val']
  assert n > 4 and first['computed']['val'] == 4
  assert second['computed']['val'] == n - 4  # Only the rest.


def _cached(cache, recs, side):
  return np.stack([cache.feature(r[f'{side}_imname'], r[f'{side}_img']) for r in recs])


def _live(model, variables, images):
  return np.asarray(cf.make_features_fn(model)({'params': variables['params']}, images))


def test_cached_features_are_the_live_frozen_backbone_s(setup, built):
  config, model, variables = setup
  cache = cf.FeatureCache.open(model, variables, config.data, 'val', dtype='float32')
  source = pipeline.data_source(config.data, 'val')
  rec = source[0]
  images = np.stack([cf.preprocess_image(rec[f'{s}_img'], 42) for s in ('src', 'trg')])
  cached = np.concatenate([_cached(cache, [rec], 'src'), _cached(cache, [rec], 'trg')])
  assert cached.shape == (2, 3, 3, 64)
  np.testing.assert_allclose(cached, _live(model, variables, images), rtol=0, atol=1e-5)
  row = cache.names[0]
  flipped = cache.lookup([row], flip=[True])
  np.testing.assert_array_equal(flipped[0], cache.lookup([row])[0][:, ::-1])


def test_a_name_given_to_several_images_is_keyed_by_its_pixels(setup, built):
  """The synthetic dataset names each random crop of a photograph after the photograph: every
  record still gets the features of its own pixels."""
  config, model, variables = setup
  cache = cf.FeatureCache.open(model, variables, config.data, 'val', dtype='float32')
  source = pipeline.data_source(config.data, 'val')
  recs = [source[i] for i in range(len(source))]
  names = [r['src_imname'] for r in recs]
  assert len(set(names)) < len(names) and cache.ambiguous  # Shared names, different crops.
  with pytest.raises(cf.CacheError, match='names several images'):
    cache.lookup([names[0]])
  images = np.stack([cf.preprocess_image(r['src_img'], 42) for r in recs])
  np.testing.assert_allclose(
      _cached(cache, recs, 'src'), _live(model, variables, images), rtol=0, atol=1e-5
  )


def test_head_on_cached_features_gives_the_live_flow(setup, built):
  config, model, variables = setup
  cache = cf.FeatureCache.open(model, variables, config.data, 'val', dtype='float32')
  source = pipeline.data_source(config.data, 'val')
  opts = pipeline.preprocess_options(config.data, train=False)
  recs = [source[i] for i in range(3)]
  rows = [transforms.preprocess_pair(r, opts) for r in recs]
  src = np.stack([r['src_img'] for r in rows])
  trg = np.stack([r['trg_img'] for r in rows])
  live = np.asarray(model.apply(variables, src, trg))
  cached = np.asarray(
      cf.head_flow(model, variables, _cached(cache, recs, 'src'), _cached(cache, recs, 'trg'))
  )
  assert live.shape == cached.shape == (3, 6, 6, 2)
  # float32 storage: only the two compilations' rounding (soft-argmax, beta 0.02).
  np.testing.assert_allclose(cached, live, rtol=0, atol=1e-3)
  # The head-only model (`model.inputs='features'`, what a cached run trains) has the full
  # model's variables without the backbone and gives the same flow.
  config.model.inputs = 'features'
  head = models.build_model(config)
  config.model.inputs = 'images'
  head_vars = {'params': {k: v for k, v in variables['params'].items() if k != 'backbone'}}
  shapes = jax.eval_shape(
      head.init,
      jax.random.PRNGKey(0),
      _cached(cache, recs[:1], 'src'),
      _cached(cache, recs[:1], 'trg'),
  )
  assert jax.tree.map(lambda a: a.shape, shapes['params']) == jax.tree.map(
      np.shape, head_vars['params']
  )
  only_head = np.asarray(
      head.apply(head_vars, _cached(cache, recs, 'src'), _cached(cache, recs, 'trg'))
  )
  np.testing.assert_allclose(only_head, cached, rtol=0, atol=1e-6)


def test_bfloat16_cache_is_the_rounded_features(setup, built):
  config, model, variables = setup
  out = cf.build_cache(model, variables, config.data, ['val'], batch_size=8, progress=False)
  assert out['dir'].endswith('vits14_L0-1_42px_bfloat16')  # Beside the float32 one.
  cache = cf.FeatureCache.open(model, variables, config.data, 'val')
  f32 = cf.FeatureCache.open(model, variables, config.data, 'val', dtype='float32')
  a, b = cache.lookup(cache.names), f32.lookup(cache.names)
  # bfloat16 keeps 8 significant bits: relative rounding error <= 2^-8 (plus the two
  # compilations' float32 differences, far smaller).
  assert np.all(np.abs(a - b) <= 2.0**-8 * np.abs(b) + 1e-5)
  assert np.mean(a == b.astype(ml_dtypes.bfloat16).astype(np.float32)) > 0.95


def test_stale_mismatched_and_missing_caches_are_refused(setup, built):
  config, model, variables = setup
  # Other weights: stale.
  other = jax.tree.map(lambda a: a, variables)
  other['params']['backbone']['norm']['bias'] = other['params']['backbone']['norm']['bias'] + 1
  with pytest.raises(cf.CacheError, match='stale or mismatched: weights_sha256'):
    cf.FeatureCache.open(model, other, config.data, 'val', dtype='float32')
  # Building over it without overwrite is refused too.
  with pytest.raises(cf.CacheError, match='another key'):
    cf.build_cache(model, other, config.data, ['val'], dtype='float32', progress=False)
  # Other blocks or resolution: no such cache.
  m1 = models.build_model(_config(config.data.data_dir, layers=(1,)))
  with pytest.raises(
      cf.CacheError,
      match=r'no feature cache vits14_L1_42px_float32 .*present: .*' r'vits14_L0-1_42px_float32',
  ):
    cf.FeatureCache.open(m1, variables, config.data, 'val', dtype='float32')
  c56 = _config(config.data.data_dir)
  c56.data.img_size = 56
  c56.data.feature_size = 8
  with pytest.raises(cf.CacheError, match='no feature cache vits14_L0-1_56px_float32'):
    cf.FeatureCache.open(model, variables, c56.data, 'val', dtype='float32')
  with pytest.raises(cf.CacheError, match='no test features'):
    cf.FeatureCache.open(model, variables, config.data, 'test', dtype='float32')
  # A trained backbone cannot be cached.
  with pytest.raises(cf.CacheError, match='only a frozen backbone'):
    cf.cache_key(model.clone(dinov2_trained_blocks=1), variables, config.data)


def test_the_compute_dtype_is_part_of_the_key(setup, built):
  """A bfloat16 forward changes the features: its cache is another one (issue 19)."""
  config, model, variables = setup
  key = cf.cache_key(model, variables, config.data, 'float32')
  assert key['compute_dtype'] == 'float32'
  assert cf.FeatureCache.open(model, variables, config.data, 'val', 'float32').key == key
  bf16 = model.clone(dtype=jnp.bfloat16)
  assert cf.cache_key(bf16, variables, config.data, 'float32')['compute_dtype'] == 'bfloat16'
  with pytest.raises(
      cf.CacheError,
      match=r'no feature cache vits14_L0-1_42px_float32_compute-'
      r'bfloat16 .*present: .*vits14_L0-1_42px_float32',
  ):
    cf.FeatureCache.open(bf16, variables, config.data, 'val', dtype='float32')


# ------------------------------------------------------------------------------------------------
# The trainer and the evaluator on the cache (`model.inputs='features'`).


@pytest.fixture(scope='module')
def cached_run(setup, tmp_path_factory):
  """A bfloat16 cache of 'trn' and 'val' and a 2-step `mt` run that read it."""
  config = _cached_config(setup[0].data.data_dir)
  model, variables = cf.full_model_variables(config)
  cf.build_cache(model, variables, config.data, ['trn', 'val'], batch_size=16, progress=False)
  workdir = str(tmp_path_factory.mktemp('cached_mt'))
  result = train.train_and_evaluate(config, workdir)
  return config, variables, result, workdir


def test_mt_trains_validates_and_evaluates_on_the_cache(cached_run):
  config, _, result, workdir = cached_run
  assert result['step'] == 2 and result['nonfinite_total'] == 0
  assert 'backbone' not in result['state'].params  # The head alone, for both models.
  for key in ('val/pck@0.1', 'val/a/pck@0.1', 'val/b/pck@0.1'):
    assert np.isfinite(result['val'][key])
  assert result['val']['val/a/num_pairs'] == config.eval.batch_size
  # `--mode=eval` of the checkpoint reads the cache too.
  evaluated = evaluation.evaluate_checkpoint(config, workdir, max_batches=1, progress=False)
  assert evaluated.groups['all'].pairs == config.eval.batch_size
  assert np.isfinite(evaluated.pck(evaluated.protocol.standard_threshold, 0.1))


def test_cached_pipeline_gives_the_live_frozen_flow(cached_run):
  """Both pipelines over the same pairs: the head of the trained model `a` on cached features,
  and the full model (that head on the live backbone) on the images."""
  config, variables, result, _ = cached_run
  head = jax.tree.map(
      lambda x: np.asarray(x)[0],
      jax.device_get(
          {'params': result['state'].params, 'batch_stats': result['state'].batch_stats}
      ),
  )
  cache = cf.open_for_config(config, ['val'])['val']
  feats = next(
      iter(pipeline.create_eval_iterator(config.data, 'val', batch_size=4, features=cache))
  )
  imgs = next(iter(pipeline.create_eval_iterator(config.data, 'val', batch_size=4)))
  assert feats['src_img'].shape == (4, 3, 3, 64) and imgs['src_img'].shape == (4, 42, 42, 3)
  np.testing.assert_array_equal(feats['flow'], imgs['flow'])
  cached = np.asarray(models.build_model(config).apply(head, feats['src_img'], feats['trg_img']))
  full = dict(head, params=dict(head['params'], backbone=variables['params']['backbone']))
  model = models.build_model(config).clone(inputs='images')
  live = np.asarray(model.apply(full, imgs['src_img'], imgs['trg_img']))
  rounded = [
      _live(model, full, imgs[k]).astype(ml_dtypes.bfloat16).astype(np.float32)
      for k in ('src_img', 'trg_img')
  ]
  live_rounded = np.asarray(cf.head_flow(model, full, *rounded))
  assert cached.shape == live.shape == (4, 6, 6, 2)
  # The live features rounded to bfloat16 give the same flow (equal here; 1e-2 leaves room for
  # another CPU's float32 rounding moving a feature across a bfloat16 rounding boundary).
  np.testing.assert_allclose(cached, live_rounded, rtol=0, atol=1e-2)
  # Unrounded, the flow (cells of a 6x6 grid) moves by bfloat16 rounding only (0.04 cells
  # here); features of other images would move it by cells (5 cells, seen).
  np.testing.assert_allclose(cached, live, rtol=0, atol=0.25)


def test_cached_training_flips_the_token_grid(cached_run):
  """A flipped training pair: the cached features mirrored as the images, same labels."""
  config = cached_run[0]
  cache = cf.open_for_config(config, ['trn'])['trn']
  rec = dict(pipeline.data_source(config.data, 'trn')[0], flip=1)
  opts = pipeline.preprocess_options(config.data, train=True)
  a = transforms.preprocess_pair(rec, opts, np.random.default_rng(0), features=cache)
  b = transforms.preprocess_pair(rec, opts, np.random.default_rng(0))
  for side in ('src', 'trg'):
    np.testing.assert_array_equal(a[f'{side}_img'], _cached(cache, [rec], side)[0][:, ::-1])
  for k in ('src_kps', 'trg_kps', 'flow', 'kps_valid', 'src_bbox'):
    np.testing.assert_array_equal(a[k], b[k])


class _FakeFeatures:
  """A feature per image name: [3, 3, 4] float32, distinct per image."""

  def feature(self, name, img):
    del img
    return np.random.default_rng(list(bytes(name))).standard_normal((3, 3, 4)).astype(np.float32)


def test_cached_training_mirrors_a_source_as_its_image(setup):
  """`flip_source_p` (a `parts` source mirrored alone, keypoints relabelled): the same labels as
  with images, in image pixels, and the source's token grid mirrored."""
  config = setup[0]
  rec = dict(pipeline.data_source(config.data, 'trn')[0])
  n = len(rec['kps_valid'])
  rec.update(kps_ids=np.arange(n) % len(transforms.FLIP_TABLES['parts'](0)), category=0)
  opts = dataclasses.replace(
      pipeline.preprocess_options(config.data, train=True), dataset='parts', flip_source_p=1.0
  )
  features = _FakeFeatures()
  a = transforms.preprocess_pair(rec, opts, np.random.default_rng(0), features=features)
  b = transforms.preprocess_pair(rec, opts, np.random.default_rng(0))
  np.testing.assert_array_equal(a['src_img'], features.feature(rec['src_imname'], None)[:, ::-1])
  np.testing.assert_array_equal(a['trg_img'], features.feature(rec['trg_imname'], None))
  assert b['src_kps'][b['kps_valid']].max() > 10  # Pixels of the 42-pixel image, not cells.
  for k in ('src_kps', 'trg_kps', 'flow', 'kps_valid', 'src_bbox', 'pckthres'):
    np.testing.assert_array_equal(a[k], b[k])


def test_a_stale_cache_is_refused_when_training_starts(cached_run, tmp_path):
  config = _cached_config(cached_run[0].data.data_dir)
  config.seed = 1  # Another random backbone: the cache of seed 0 is stale.
  with pytest.raises(cf.CacheError, match='stale or mismatched: weights_sha256') as e:
    train.train_and_evaluate(config, str(tmp_path / 'stale'))
  assert '\n' not in str(e.value)
  other = _cached_config(cached_run[0].data.data_dir, layers=(1,))
  with pytest.raises(cf.CacheError, match='no feature cache vits14_L1_42px_bfloat16'):
    train.train_and_evaluate(other, str(tmp_path / 'other_layers'))


def test_colour_augmentation_with_the_cache_is_refused(tmp_path):
  config = _cached_config(str(tmp_path))
  config.data.augment = True
  with pytest.raises(
      ValueError, match=r'cannot take colour augmentation .*: set ' r'data.augment=False$'
  ):
    train.check_config(config)
  config.data.augment, config.data.random_crop = False, True
  with pytest.raises(ValueError, match='set data.random_crop=False'):
    pipeline.create_train_iterator(config.data, batch_size=4, seed=0, features=object())
