"""The embedded synthetic dataset: its dense ground truth is the warp that made the target."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

import sccorr_jax.data as data
from sccorr_jax.data import records
from sccorr_jax.data import synthetic


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  c = data.default_data_config('synthetic')
  c.data_dir = str(tmp_path_factory.mktemp('tfds'))
  c.synthetic_img_size = 64
  c.synthetic_train_pairs_per_photo = 2
  c.synthetic_eval_pairs_per_photo = 3
  return c


def _records(cfg, split):
  src = data.data_source(cfg, split)
  return [src[i] for i in range(len(src))]


def test_dense_flow_maps_keypoints_and_pixels(cfg):
  for rec in _records(cfg, 'test'):
    v = rec['kps_valid']
    n = int(v.sum())
    assert 8 <= n <= 20 and v[:n].all()
    trg = rec['trg_kps'][v]
    src = rec['src_kps'][v]
    ix = trg.astype(int)
    np.testing.assert_array_equal(ix, trg)  # target keypoints sit on pixel centres
    flow = rec['dense_flow']
    # Target keypoint + dense flow at it = its source keypoint.
    np.testing.assert_allclose(trg + flow[ix[:, 1], ix[:, 0]], src, atol=1e-4)
    # Inversely: the target pixel whose match is nearest a source keypoint is its target keypoint.
    s = flow.shape[0]
    grid = np.stack(np.meshgrid(np.arange(s), np.arange(s), indexing='xy'), -1)
    match = (grid + flow).reshape(-1, 2)
    for k in range(n):
      nearest = np.argmin(((match - src[k]) ** 2).sum(-1))
      np.testing.assert_array_equal([nearest % s, nearest // s], trg[k])
    # Keypoints lie on the object region, inside the source image.
    box = rec['src_bbox']
    assert ((src >= box[:2] - 1e-3) & (src <= box[2:] + 1e-3)).all()
    assert rec['dense_valid'][ix[:, 1], ix[:, 0]].all()


def test_target_image_is_the_warped_source(cfg):
  for rec in _records(cfg, 'val')[:3]:
    flow, valid = rec['dense_flow'], rec['dense_valid']
    s = flow.shape[0]
    ys, xs = np.mgrid[0:s, 0:s].astype(np.float64)
    src_grey = rec['src_img'].astype(np.float64).mean(-1)
    warped = scipy.ndimage.map_coordinates(
        src_grey, [ys + flow[..., 1], xs + flow[..., 0]], order=1
    )
    trg_grey = rec['trg_img'].astype(np.float64).mean(-1)
    r = np.corrcoef(warped[valid], trg_grey[valid])[0, 1]
    assert r > 0.85, r  # appearance change (gain, gamma, noise) is monotone per channel
    shifted = np.roll(warped, 7, axis=1)
    assert np.corrcoef(shifted[valid], trg_grey[valid])[0, 1] < r


def test_splits_by_photograph_and_record_format(cfg):
  names = data.category_names(cfg)
  assert names == list(synthetic.CATEGORIES)
  cats = {
      split: {int(r['category']) for r in _records(cfg, split)} for split in ('trn', 'val', 'test')
  }
  assert cats['trn'].isdisjoint(cats['val']) and cats['trn'].isdisjoint(cats['test'])
  assert cats['val'].isdisjoint(cats['test'])
  assert {names[c] for c in cats['test']} == set(synthetic.PHOTOS['test'])
  assert data.num_examples(cfg, 'trn') == 2 * len(synthetic.PHOTOS['trn'])
  rec = _records(cfg, 'trn')[0]
  benchmark_keys = set(records.pair_features(['a']).keys())
  assert set(rec) == benchmark_keys | {'dense_flow', 'dense_valid'}
  assert rec['src_img'].shape == (64, 64, 3) and rec['src_img'].dtype == np.uint8
  np.testing.assert_array_equal(rec['src_imsize'], [64, 64])


def test_generation_is_seeded():
  photo = synthetic.load_photo('coffee')
  a = synthetic.make_pair(photo, np.random.default_rng(7), 48, 8, 20)
  b = synthetic.make_pair(photo, np.random.default_rng(7), 48, 8, 20)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = synthetic.make_pair(photo, np.random.default_rng(8), 48, 8, 20)
  assert not np.array_equal(a['dense_flow'], c['dense_flow'])
