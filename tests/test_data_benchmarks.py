"""Tiny copies of SPair-71k, PF-PASCAL and PF-WILLOW in their official layouts: prepared with the
TFDS builders, read back through grain, compared with hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

import sccorr_jax.data as data
from sccorr_jax import geometry
from sccorr_jax.data import prepare
from sccorr_jax.data import testing

S = 256


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  raw = tmp_path_factory.mktemp('raw')
  tfds_dir = tmp_path_factory.mktemp('tfds')
  written = {
      'spair71k': testing.write_spair71k(str(raw)),
      'pfpascal': testing.write_pfpascal(str(raw)),
      'pfwillow': testing.write_pfwillow(str(raw)),
  }
  reports = {}
  for name in written:
    builder = prepare.prepare(name, str(tfds_dir), str(raw))
    reports[name] = builder.report
  return written, str(tfds_dir), reports


def _cfg(name, data_dir, **kw):
  cfg = data.default_data_config(name)
  cfg.data_dir = data_dir
  cfg.update(kw)
  return cfg


def _scale(wh):
  return np.array([S / wh[0], S / wh[1]], np.float32)


def _eval_rows(cfg, split, batch_size=8):
  """(records in source order, the one eval batch)."""
  src = data.data_source(cfg, split)
  batches = list(data.create_eval_iterator(cfg, split, batch_size=batch_size))
  assert len(batches) == 1
  return [src[i] for i in range(len(src))], batches[0]


def _check_common_row(batch, i, src_kps, trg_kps, src_wh, trg_wh):
  n = len(src_kps)
  exp_src = np.asarray(src_kps, np.float32) * _scale(src_wh)
  exp_trg = np.asarray(trg_kps, np.float32) * _scale(trg_wh)
  np.testing.assert_allclose(batch['src_kps'][i, :n], exp_src, rtol=1e-6, atol=1e-4)
  np.testing.assert_allclose(batch['trg_kps'][i, :n], exp_trg, rtol=1e-6, atol=1e-4)
  assert batch['kps_valid'][i].sum() == n and batch['kps_valid'][i, :n].all()
  valid = np.zeros(40, bool)
  valid[:n] = True
  pad = lambda k: np.concatenate([k, np.zeros((40 - n, 2), np.float32)])  # noqa: E731
  flow = np.asarray(geometry.keypoints_to_flow(pad(exp_src), pad(exp_trg), valid, 64, 11, S))
  np.testing.assert_allclose(batch['flow'][i], flow, atol=1e-5)
  assert (batch['flow'][i] != 0).any()
  np.testing.assert_array_equal(batch['src_imsize'][i], [src_wh[1], src_wh[0]])
  np.testing.assert_array_equal(batch['trg_imsize'][i], [trg_wh[1], trg_wh[0]])
  assert batch['src_img'].shape[1:] == (S, S, 3) and batch['src_img'].dtype == np.float32
  assert batch['pair_valid'][i]
  np.testing.assert_allclose(batch['pckthres_img'][i], S)


def test_spair71k_records_and_batches(prepared):
  written, data_dir, reports = prepared
  assert not reports['spair71k'].bad and not reports['spair71k'].notes  # ':'/'-' are no duplicates
  cfg = _cfg('spair71k', data_dir)
  names = data.category_names(cfg)
  assert len(names) == 18 and names[0] == 'aeroplane' and names[7] == 'cat'
  for split, n in (('trn', 4), ('val', 2), ('test', 2)):
    assert data.num_examples(cfg, split) == n
  recs, batch = _eval_rows(cfg, 'test')
  by_name = {p['name']: p for p in written['spair71k']['test']}
  assert sorted(r['pair_id'].decode() for r in recs) == sorted(by_name)
  assert batch['pair_valid'].tolist() == [True, True] + [False] * 6
  for i, rec in enumerate(recs):
    p = by_name[rec['pair_id'].decode()]
    n = len(p['src_kps'])
    # Raw record: original pixels, explicit mask, boxes, category, difficulty.
    np.testing.assert_array_equal(rec['src_kps'][:n], p['src_kps'])
    assert rec['kps_valid'].sum() == n
    np.testing.assert_array_equal(rec['src_bbox'], p['src_bbox'])
    assert rec['category'] == names.index(p['category'])
    assert rec['src_img'].shape == (p['src_wh'][1], p['src_wh'][0], 3)
    # Batch row: resized keypoints, flow label, thresholds, boxes.
    _check_common_row(batch, i, p['src_kps'], p['trg_kps'], p['src_wh'], p['trg_wh'])
    box = np.array(p['src_bbox'], np.float32) * np.tile(_scale(p['src_wh']), 2)
    np.testing.assert_allclose(batch['src_bbox'][i], box, rtol=1e-6)
    thr = max(box[2] - box[0], box[3] - box[1])
    for key in ('pckthres', 'pckthres_bbox', 'pckthres_bbox_legacy'):
      np.testing.assert_allclose(batch[key][i], thr, rtol=1e-6)
    for key in ('viewpoint_variation', 'scale_variation', 'truncation', 'occlusion'):
      assert batch[key][i] == p[key]
      assert batch[key].dtype == np.int32


def test_spair71k_colon_and_dash_names(prepared):
  """Layout lines and annotation files mixing ':' and '-' all resolve (see testing.py)."""
  written, data_dir, _ = prepared
  cfg = _cfg('spair71k', data_dir)
  src = data.data_source(cfg, 'trn')
  got = sorted(src[i]['pair_id'].decode() for i in range(len(src)))
  assert got == sorted(p['name'] for p in written['spair71k']['trn'])
  assert all(':' in g for g in got)


def test_pfpascal_nan_keypoints_and_img_threshold(prepared):
  written, data_dir, reports = prepared
  assert not reports['pfpascal'].bad
  cfg = _cfg('pfpascal', data_dir)
  assert len(data.category_names(cfg)) == 20
  recs, batch = _eval_rows(cfg, 'val')
  for i, rec in enumerate(recs):
    p = next(
        q
        for q in written['pfpascal']['val']
        if rec['pair_id'].decode() == f'{q["src"]}.jpg-{q["trg"]}.jpg'
    )
    keep = np.isfinite(p['src_kps']).all(1) & np.isfinite(p['trg_kps']).all(1)
    assert rec['kps_valid'].sum() == keep.sum() > 0
    np.testing.assert_allclose(rec['src_kps'][: keep.sum()], p['src_kps'][keep], rtol=1e-6)
    assert rec['category'] == p['category']
    _check_common_row(batch, i, p['src_kps'][keep], p['trg_kps'][keep], p['src_wh'], p['trg_wh'])
    np.testing.assert_allclose(batch['pckthres'][i], S)  # PF-PASCAL's standard: the image side
    box = p['src_bbox'].astype(np.float32) * np.tile(_scale(p['src_wh']), 2)
    np.testing.assert_allclose(
        batch['pckthres_bbox'][i], max(box[2] - box[0], box[3] - box[1]), rtol=1e-6
    )


def test_pfpascal_training_flip(prepared):
  """The csv's flip flag flips both images, keypoints (x -> 256 - x) and boxes in training."""
  written, data_dir, _ = prepared
  cfg = _cfg('pfpascal', data_dir, augment=False, shuffle=False)
  recs, _ = _eval_rows(cfg, 'trn')
  it = data.create_train_iterator(cfg, batch_size=1, seed=0)
  train_rows = [next(it) for _ in recs]
  eval_batch = next(iter(data.create_eval_iterator(cfg, 'trn', batch_size=len(recs))))
  flips = [int(r['flip']) for r in recs]
  assert sorted(flips) == sorted(p['flip'] for p in written['pfpascal']['trn']) == [0, 0, 1, 1]
  for i, (rec, row) in enumerate(zip(recs, train_rows)):
    n = int(rec['kps_valid'].sum())
    for side in ('src', 'trg'):
      wh = rec[f'{side}_imsize'][::-1]
      kps = rec[f'{side}_kps'][:n] * _scale(wh)
      box = rec[f'{side}_bbox'] * np.tile(_scale(wh), 2)
      img = eval_batch[f'{side}_img'][i]
      if flips[i]:
        kps = np.stack([S - kps[:, 0], kps[:, 1]], 1)
        box = np.array([S - box[2], box[1], S - box[0], box[3]])
        img = img[:, ::-1]
      np.testing.assert_allclose(row[f'{side}_kps'][0, :n], kps, rtol=1e-6, atol=1e-4)
      np.testing.assert_allclose(row[f'{side}_bbox'][0], box, rtol=1e-6, atol=1e-4)
      np.testing.assert_array_equal(row[f'{side}_img'][0], img)
    flow = geometry.keypoints_to_flow(
        row['src_kps'][0], row['trg_kps'][0], row['kps_valid'][0], 64, 11, S
    )
    np.testing.assert_allclose(row['flow'][0], np.asarray(flow), atol=1e-5)
  # Evaluation never flips.
  for i, rec in enumerate(recs):
    n = int(rec['kps_valid'].sum())
    wh = rec['src_imsize'][::-1]
    np.testing.assert_allclose(
        eval_batch['src_kps'][i, :n], rec['src_kps'][:n] * _scale(wh), rtol=1e-6, atol=1e-4
    )


def test_pfwillow_png_and_thresholds(prepared):
  written, data_dir, reports = prepared
  assert not reports['pfwillow'].bad
  cfg = _cfg('pfwillow', data_dir)
  assert data.category_names(cfg)[0] == 'car(G)'
  recs, batch = _eval_rows(cfg, 'test', batch_size=4)
  assert batch['pair_valid'].tolist() == [True, True, True, False]
  for i, rec in enumerate(recs):
    p = next(q for q in written['pfwillow']['test'] if rec['src_imname'].decode() == q['src'])
    assert rec['src_img'].shape[-1] == 3 and rec['trg_img'].shape[-1] == 3  # RGBA / grey PNGs
    assert data.category_names(cfg)[rec['category']] == p['category']
    _check_common_row(batch, i, p['src_kps'], p['trg_kps'], p['src_wh'], p['trg_wh'])
    k = p['src_kps'].astype(np.float32) * _scale(p['src_wh'])
    corrected = max(k[:, 0].max() - k[:, 0].min(), k[:, 1].max() - k[:, 1].min())
    legacy = max(k[:, 0].max(), k[:, 1].max()) + 1  # the -1 padding is the minimum
    np.testing.assert_allclose(batch['pckthres_bbox'][i], corrected, rtol=1e-5)
    np.testing.assert_allclose(batch['pckthres'][i], corrected, rtol=1e-5)
    np.testing.assert_allclose(batch['pckthres_bbox_legacy'][i], legacy, rtol=1e-5)
    box = [k[:, 0].min(), k[:, 1].min(), k[:, 0].max(), k[:, 1].max()]
    np.testing.assert_allclose(batch['src_bbox'][i], box, rtol=1e-5)


def test_unprepared_benchmark_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='sccorr_jax.data.prepare --dataset=spair71k'):
    data.num_examples(_cfg('spair71k', str(tmp_path)), 'test')


def test_small_image_size(prepared):
  _, data_dir, _ = prepared
  cfg = _cfg('spair71k', data_dir, img_size=64, feature_size=16, receptive_field=3, max_kps=10)
  rec = data.data_source(cfg, 'test')[0]
  batch = next(iter(data.create_eval_iterator(cfg, 'test', batch_size=2)))
  assert batch['src_img'].shape == (2, 64, 64, 3) and batch['flow'].shape == (2, 16, 16, 2)
  assert batch['src_kps'].shape == (2, 10, 2)
  n = int(rec['kps_valid'].sum())
  k = rec['src_kps'][:n] * np.array([64 / rec['src_imsize'][1], 64 / rec['src_imsize'][0]])
  np.testing.assert_allclose(batch['src_kps'][0, :n], k, rtol=1e-5)
  np.testing.assert_allclose(batch['pckthres_img'], 64)
