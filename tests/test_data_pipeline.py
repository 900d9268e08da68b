"""grain pipelines: determinism, exact resumption mid-epoch, workers, per-process sharding, eval
padding, on the embedded synthetic dataset (small knobs)."""

from __future__ import annotations

import numpy as np
import pytest

from sccorr_jax import config_lib
import sccorr_jax.data as data
from sccorr_jax.data import pipeline


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  c = data.default_data_config('synthetic')
  c.data_dir = str(tmp_path_factory.mktemp('tfds'))
  c.img_size, c.feature_size, c.receptive_field = 64, 16, 3
  c.synthetic_img_size = 48
  c.synthetic_train_pairs_per_photo = 3  # 13 photographs -> 39 training pairs
  c.synthetic_eval_pairs_per_photo = 2  # 3 photographs -> 6 pairs
  c.num_threads = 2
  data.get_builder(c)  # build once
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _assert_resumes(cfg, seed, state, expected):
  """A new train iterator of `cfg` and `seed`, set to `state`, yields the batches `expected`."""
  resumed = data.create_train_iterator(cfg, batch_size=4, seed=seed)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, len(expected))):
    _assert_same(x, y)


def test_batch_contract_shapes(cfg):
  b = next(data.create_train_iterator(cfg, batch_size=4, seed=0))
  expect = {
      'src_img': ((4, 64, 64, 3), np.float32),
      'trg_img': ((4, 64, 64, 3), np.float32),
      'src_kps': ((4, 40, 2), np.float32),
      'trg_kps': ((4, 40, 2), np.float32),
      'kps_valid': ((4, 40), np.bool_),
      'flow': ((4, 16, 16, 2), np.float32),
      'pckthres': ((4,), np.float32),
      'pckthres_bbox': ((4,), np.float32),
      'pckthres_img': ((4,), np.float32),
      'pckthres_bbox_legacy': ((4,), np.float32),
      'src_bbox': ((4, 4), np.float32),
      'trg_bbox': ((4, 4), np.float32),
      'src_imsize': ((4, 2), np.int32),
      'trg_imsize': ((4, 2), np.int32),
      'category': ((4,), np.int32),
      'pair_valid': ((4,), np.bool_),
      'viewpoint_variation': ((4,), np.int32),
      'scale_variation': ((4,), np.int32),
      'truncation': ((4,), np.int32),
      'occlusion': ((4,), np.int32),
      # Training only: what the loss never sees (label budget, dense ground truth).
      'withheld_src_kps': ((4, 40, 2), np.float32),
      'withheld_trg_kps': ((4, 40, 2), np.float32),
      'withheld_kps_valid': ((4, 40), np.bool_),
      'dense_flow': ((4, 16, 16, 2), np.float32),
      'dense_valid': ((4, 16, 16), np.bool_),
  }
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == expect
  assert not b['withheld_kps_valid'].any()  # no budget: every keypoint is a label
  assert b['pair_valid'].all() and (b['pckthres'] > 0).all()
  np.testing.assert_array_equal(b['pckthres'], b['pckthres_bbox'])  # synthetic: bbox


def test_seeded_pipeline_is_deterministic(cfg):
  a = _take(data.create_train_iterator(cfg, batch_size=4, seed=3), 4)
  b = _take(data.create_train_iterator(cfg, batch_size=4, seed=3), 4)
  for x, y in zip(a, b):
    _assert_same(x, y)
  c = next(data.create_train_iterator(cfg, batch_size=4, seed=4))
  assert not np.array_equal(a[0]['src_img'], c['src_img'])


def test_state_restored_mid_epoch_resumes_exactly(cfg):
  it = data.create_train_iterator(cfg, batch_size=4, seed=0)
  _take(it, 6)  # an epoch is 9 full batches of 4 (39 pairs): stop mid-epoch
  state = it.get_state()
  _assert_resumes(cfg, 0, state, _take(it, 6))  # crosses into the next epoch


def test_epochs_are_reshuffled_and_cover_the_data(cfg):
  c = cfg.copy_and_resolve_references()
  c.augment = False
  src = data.data_source(c, 'trn')
  n = len(src)
  it = data.create_train_iterator(c, batch_size=1, seed=0)
  rows = [next(it) for _ in range(2 * n)]
  # Identify pairs by their keypoints (unique per synthetic pair).
  key = lambda r: r['trg_kps'][0].tobytes() + r['src_kps'][0].tobytes()  # noqa: E731
  epoch1 = [key(r) for r in rows[:n]]
  epoch2 = [key(r) for r in rows[n:]]
  assert len(set(epoch1)) == n and set(epoch1) == set(epoch2)
  assert epoch1 != epoch2


def test_augmentation_only_in_training(cfg):
  c = cfg.copy_and_resolve_references()
  c.shuffle = False
  c.augment = False
  plain = next(data.create_train_iterator(c, batch_size=8, seed=0))
  ev = next(iter(data.create_eval_iterator(c, 'trn', batch_size=8)))
  training_only = {k for k in plain if k.startswith('withheld_') or k.startswith('dense_')}
  assert training_only and not training_only & set(ev)
  plain_common = {k: v for k, v in plain.items() if k not in training_only}
  _assert_same(plain_common, ev)  # same records, no augmentation, no flip: identical rows
  c.augment = True
  aug = next(data.create_train_iterator(c, batch_size=8, seed=0))
  changed = [not np.array_equal(aug['src_img'][i], plain['src_img'][i]) for i in range(8)]
  assert any(changed) and not all(changed)  # each transform has p=0.2
  np.testing.assert_array_equal(aug['src_kps'], plain['src_kps'])


def test_eval_iterator_pads_last_batch(cfg):
  n = data.num_examples(cfg, 'test')
  assert n == 6
  it = data.create_eval_iterator(cfg, 'test', batch_size=4)
  batches = list(it)
  assert [b['pair_valid'].tolist() for b in batches] == [[True] * 4, [True, True, False, False]]
  assert all(np.isfinite(b['src_img']).all() for b in batches)
  again = list(it)  # a new pass each time
  _assert_same(batches[1], again[1])


def test_per_process_sharding(cfg):
  full = list(data.create_eval_iterator(cfg, 'val', batch_size=4))
  full_keys = {r.tobytes() for b in full for r, v in zip(b['src_kps'], b['pair_valid']) if v}
  keys, counts = [], []
  for p in range(2):
    batches = list(
        data.create_eval_iterator(cfg, 'val', batch_size=4, process_index=p, process_count=2)
    )
    counts.append(len(batches))
    assert all(b['src_img'].shape[0] == 2 for b in batches)
    keys += [r.tobytes() for b in batches for r, v in zip(b['src_kps'], b['pair_valid']) if v]
  assert counts[0] == counts[1]
  assert len(keys) == len(set(keys)) == len(full_keys) and set(keys) == full_keys
  t0 = next(data.create_train_iterator(cfg, batch_size=4, seed=0, process_index=0, process_count=2))
  t1 = next(data.create_train_iterator(cfg, batch_size=4, seed=0, process_index=1, process_count=2))
  assert t0['src_img'].shape[0] == 2
  assert not np.array_equal(t0['src_kps'], t1['src_kps'])
  with pytest.raises(ValueError, match='divisible'):
    data.create_train_iterator(cfg, batch_size=3, seed=0, process_count=2)


def test_mp_prefetch_workers_give_the_same_batches(cfg):
  c = cfg.copy_and_resolve_references()
  c.num_workers = 2
  with_workers = data.create_train_iterator(c, batch_size=4, seed=5)
  got = _take(with_workers, 3)
  state = with_workers.get_state()
  more = _take(with_workers, 2)
  ref_it = data.create_train_iterator(cfg, batch_size=4, seed=5)
  for x, y in zip(got + more, _take(ref_it, 5)):
    _assert_same(x, y)
  _assert_resumes(c, 5, state, more)


def test_config_checks(cfg):
  c = cfg.copy_and_resolve_references()
  c.img_size = 60
  with pytest.raises(ValueError, match='divisible'):
    data.num_examples(c, 'trn')
  with pytest.raises(ValueError, match='no split'):
    data.num_examples(cfg, 'bogus')
  assert data.category_names(cfg)[0] == 'astronaut'


def test_the_data_section_is_resolved_once(cfg, monkeypatch):
  """`resolve` reads the data section and opens the builder once; the readers and pipelines
  then use what it holds, and give what they give on the config itself (issue 19)."""
  resolved = data.resolve(cfg)
  assert data.resolve(resolved) is resolved
  monkeypatch.setattr(
      pipeline, 'get_builder', lambda *args: pytest.fail('the data config was read again')
  )
  assert resolved.split_sizes == {'trn': 39, 'val': 6, 'test': 6}
  assert data.num_examples(resolved, 'validation') == 6
  assert data.category_names(resolved)[0] == 'astronaut'
  assert resolved.steps_per_epoch(4) == 9
  with pytest.raises(config_lib.ConfigError, match='39 pairs, fewer than one batch of 40'):
    resolved.steps_per_epoch(40)
  train = _take(data.create_train_iterator(resolved, batch_size=4, seed=0), 2)
  val = list(data.create_eval_iterator(resolved, 'val', batch_size=4))
  monkeypatch.undo()
  for x, y in zip(train, _take(data.create_train_iterator(cfg, batch_size=4, seed=0), 2)):
    _assert_same(x, y)
  for x, y in zip(val, data.create_eval_iterator(cfg, 'val', batch_size=4)):
    _assert_same(x, y)
