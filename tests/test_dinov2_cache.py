"""Cached DINOv2 features (`sccorr_jax.data.cache_features`, issue 12 part 4).

A tiny frozen DINOv2 SCorrSAN on the synthetic dataset in its real on-disk format: the cache
holds exactly the live backbone's features (float32 storage) or their bfloat16 rounding; the head
on cached features gives the live model's flow; an interrupted build resumes without recomputing;
stale, mismatched and incomplete caches are refused with a message.
"""

from __future__ import annotations

import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest

from sccorr_jax import config_lib
from sccorr_jax import models
from sccorr_jax import train
from sccorr_jax.data import cache_features as cf
from sccorr_jax.data import pipeline
from sccorr_jax.data import transforms

pytestmark = pytest.mark.usefixtures('fast_compiles')

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPAIR = config_lib.load_config_module(str(ROOT / 'configs' / 'spair_dinov2.py'))


def _config(data_dir, layers=(0, 1)):
  c = config_lib.tiny_config('baseline', data_dir)
  SPAIR.apply_dinov2(c, 'vits14', layers, 0)
  SPAIR.apply_dinov2_tiny(c, img_size=42, feature_size=6)
  return c


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = _config(str(tmp_path_factory.mktemp('data')))
  model = models.build_model(config)
  variables = train.init_variables(config, model, jax.random.PRNGKey(0), 1)
  return config, model, variables


@pytest.fixture(scope='module')
def built(setup):
  """A float32 cache of 'val' built in two sessions (the first one interrupted)."""
  config, model, variables = setup
  first = cf.build_cache(model, variables, config.data, ['val'], dtype='float32', batch_size=4,
                         progress=False, max_batches=1)
  with pytest.raises(cf.CacheError, match='incomplete'):
    cf.FeatureCache.open(model, variables, config.data, 'val', dtype='float32')
  second = cf.build_cache(model, variables, config.data, ['val'], dtype='float32',
                          batch_size=4, progress=False)
  return first, second


def test_an_interrupted_build_resumes_where_it_stopped(built):
  first, second = built
  n = first['rows']['val']
  assert n > 4 and first['computed']['val'] == 4
  assert second['computed']['val'] == n - 4  # Only the rest.


def _live(model, variables, images):
  return np.asarray(cf.make_features_fn(model)({'params': variables['params']}, images))


def test_cached_features_are_the_live_frozen_backbone_s(setup, built):
  config, model, variables = setup
  cache = cf.FeatureCache.open(model, variables, config.data, 'val', dtype='float32')
  source = pipeline.data_source(config.data, 'val')
  rec = source[0]
  images = np.stack([cf.preprocess_image(rec[f'{s}_img'], 42) for s in ('src', 'trg')])
  cached = cache.lookup([rec['src_imname'], rec['trg_imname']])
  assert cached.shape == (2, 3, 3, 64)
  np.testing.assert_allclose(cached, _live(model, variables, images), rtol=0, atol=1e-5)
  flipped = cache.lookup([rec['src_imname']], flip=[True])
  np.testing.assert_array_equal(flipped[0], cached[0][:, ::-1])


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
  cached = np.asarray(cf.head_flow(model, variables,
                                   cache.lookup([r['src_imname'] for r in recs]),
                                   cache.lookup([r['trg_imname'] for r in recs])))
  assert live.shape == cached.shape == (3, 6, 6, 2)
  # float32 storage: only the two compilations' rounding (soft-argmax, beta 0.02).
  np.testing.assert_allclose(cached, live, rtol=0, atol=1e-3)
  # The head-only model (`model.inputs='features'`, what a cached run trains) has the full
  # model's variables without the backbone and gives the same flow.
  config.model.inputs = 'features'
  head = models.build_model(config)
  config.model.inputs = 'images'
  head_vars = {'params': {k: v for k, v in variables['params'].items() if k != 'backbone'}}
  shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), cache.lookup(
      [recs[0]['src_imname']]), cache.lookup([recs[0]['trg_imname']]))
  assert jax.tree.map(lambda a: a.shape, shapes['params']) == jax.tree.map(
      np.shape, head_vars['params'])
  only_head = np.asarray(head.apply(head_vars, cache.lookup([r['src_imname'] for r in recs]),
                                    cache.lookup([r['trg_imname'] for r in recs])))
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
  assert np.all(np.abs(a - b) <= 2.0 ** -8 * np.abs(b) + 1e-5)
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
  with pytest.raises(cf.CacheError, match=r'no feature cache vits14_L1_42px_float32 .*present: .*'
                     r'vits14_L0-1_42px_float32'):
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
