"""Bad input during preparation: each bad record is reported with its file and problem, then
skipped (counted, listed) or stops preparation; a failed preparation leaves no complete dataset."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
import pytest

import sccorr_jax.data as data
from sccorr_jax.data import pipeline
from sccorr_jax.data import prepare
from sccorr_jax.data import records
from sccorr_jax.data import testing


def _spair(tmp_path):
  raw = tmp_path / 'raw'
  written = testing.write_spair71k(str(raw))
  return raw / 'SPair-71k', written


def _ann_path(base, split, name):
  for cand in (name, name.replace(':', '-')):
    p = base / 'PairAnnotation' / split / (cand + '.json')
    if p.exists():
      return p
  raise FileNotFoundError(name)


def _prepare(tmp_path, name='spair71k', **policy):
  return prepare.prepare(name, str(tmp_path / 'tfds'), str(tmp_path / 'raw'),
                         records.BadRecordPolicy(**policy))


def _is_prepared(tmp_path, name='spair71k'):
  return pipeline.BUILDERS[name](data_dir=str(tmp_path / 'tfds')).is_prepared()


def test_bad_records_are_skipped_and_listed(tmp_path):
  base, written = _spair(tmp_path)
  trn = written['trn']
  # 1. missing image (used by trn[2], val[0], test[1]); 2. malformed JSON (trn[0]);
  # 3. a keypoint outside the image (val[1]).
  os.remove(base / 'JPEGImages' / 'cat' / '2009_000002.jpg')
  _ann_path(base, 'trn', trn[0]['name']).write_text('{"src_kps": [[1, 2]')
  ann_file = _ann_path(base, 'val', written['val'][1]['name'])
  ann = json.loads(ann_file.read_text())
  ann['src_kps'][0] = [500, 3]
  ann_file.write_text(json.dumps(ann))
  builder = _prepare(tmp_path, max_bad_fraction=1.0)
  report = builder.report
  problems = {(b['split'], os.path.basename(b['file'])): b['problem'] for b in report.bad}
  assert 'missing' in problems[('trn', '2009_000002.jpg')]
  assert 'malformed JSON' in problems[('trn', os.path.basename(
      _ann_path(base, 'trn', trn[0]['name'])))]
  assert report.counts == {'trn': {'written': 2, 'bad': 2}, 'val': {'written': 1, 'bad': 1},
                           'test': {'written': 1, 'bad': 1}}
  assert len(report.dropped_kps) == 1 and 'outside' in report.dropped_kps[0]['problem']
  assert '500' in report.dropped_kps[0]['problem']
  # The report lands beside the data and the summary lists every skipped pair.
  saved = json.loads((builder.data_path / 'preparation_report.json').read_text())
  assert len(saved['bad']) == len(report.bad)
  assert all(b['record'] in report.summary() for b in report.bad)
  # The dropped keypoint is gone from the record; the rest of the pair is kept.
  cfg = data.default_data_config('spair71k')
  cfg.data_dir = str(tmp_path / 'tfds')
  val = data.data_source(cfg, 'val')
  rec = next(val[i] for i in range(len(val))
             if val[i]['pair_id'].decode() == written['val'][1]['name'])
  assert rec['kps_valid'].sum() == len(written['val'][1]['src_kps']) - 1


def test_split_with_no_good_pair_stops_and_writes_nothing(tmp_path):
  base, _ = _spair(tmp_path)
  for f in (base / 'JPEGImages' / 'cat').iterdir():
    os.remove(f)
  for f in (base / 'JPEGImages' / 'aeroplane').iterdir():
    os.remove(f)
  with pytest.raises(records.PreparationError, match='no usable pair'):
    _prepare(tmp_path, max_bad_fraction=1.0)
  assert not _is_prepared(tmp_path)


def test_too_many_bad_records_stop(tmp_path):
  base, _ = _spair(tmp_path)
  os.remove(base / 'JPEGImages' / 'cat' / '2009_000002.jpg')
  with pytest.raises(records.PreparationError, match='max_bad_fraction'):
    _prepare(tmp_path, max_bad_fraction=0.1)
  assert not _is_prepared(tmp_path)


def test_raise_policy_stops_at_first_bad_record(tmp_path):
  base, written = _spair(tmp_path)
  ann_file = _ann_path(base, 'test', written['test'][0]['name'])
  ann = json.loads(ann_file.read_text())
  del ann['src_bndbox']
  ann_file.write_text(json.dumps(ann))
  with pytest.raises(records.PreparationError, match=r"missing field\(s\) \['src_bndbox'\]") as e:
    _prepare(tmp_path, on_bad_record='raise')
  assert ann_file.name in str(e.value)
  assert not _is_prepared(tmp_path)


def test_missing_annotation_and_no_valid_keypoint(tmp_path):
  base, written = _spair(tmp_path)
  os.remove(_ann_path(base, 'trn', written['trn'][1]['name']))
  ann_file = _ann_path(base, 'trn', written['trn'][3]['name'])
  ann = json.loads(ann_file.read_text())
  ann['trg_kps'] = [[-50, -50]] * len(ann['trg_kps'])
  ann_file.write_text(json.dumps(ann))
  report = _prepare(tmp_path, max_bad_fraction=1.0).report
  problems = sorted(b['problem'] for b in report.bad if b['split'] == 'trn')
  assert any('annotation file is missing' in p for p in problems)
  assert any('no valid keypoint' in p for p in problems)
  assert report.counts['trn'] == {'written': 2, 'bad': 2}


def test_missing_split_file_stops(tmp_path):
  base, _ = _spair(tmp_path)
  os.remove(base / 'Layout' / 'large' / 'val.txt')
  with pytest.raises(records.PreparationError, match='val.txt'):
    _prepare(tmp_path)
  assert not _is_prepared(tmp_path)


def test_pfpascal_bad_mat_unreadable_image_and_cmyk_grey_images(tmp_path):
  raw = tmp_path / 'raw'
  testing.write_pfpascal(str(raw))
  base = raw / 'PF-PASCAL'
  (base / 'Annotations' / 'dog' / '2008_000012.mat').write_bytes(b'garbage')  # val[0], test[0]
  (base / 'JPEGImages' / '2008_000010.jpg').write_bytes(b'\xff\xd8 truncated')  # trn[2], test[0]
  # A CMYK and a grey JPEG are read as RGB.
  img = Image.open(base / 'JPEGImages' / '2007_000001.jpg')
  img.convert('CMYK').save(base / 'JPEGImages' / '2007_000001.jpg', 'JPEG')
  img = Image.open(base / 'JPEGImages' / '2007_000002.jpg')
  img.convert('L').save(base / 'JPEGImages' / '2007_000002.jpg', 'JPEG')
  report = _prepare(tmp_path, 'pfpascal', max_bad_fraction=1.0).report
  got = sorted((b['split'], os.path.basename(b['file']), b['problem'].split(' (')[0])
               for b in report.bad)
  assert got == [('test', '2008_000012.mat', 'malformed .mat file'),
                 ('trn', '2008_000010.jpg', 'image cannot be decoded'),
                 ('val', '2008_000012.mat', 'malformed .mat file')]
  cfg = data.default_data_config('pfpascal')
  cfg.data_dir = str(tmp_path / 'tfds')
  rec = data.data_source(cfg, 'trn')[0]
  assert rec['src_img'].ndim == 3 and rec['src_img'].shape[-1] == 3
  batch = next(data.create_train_iterator(cfg, batch_size=2, seed=0))
  assert np.isfinite(batch['src_img']).all()


def test_clean_keypoints_rules():
  src = [[1, 1], [np.nan, 2], [3, 3], [100, 1]]
  trg = [[2, 2], [2, 2], [np.nan, 1], [1, 1]]
  s, t, v = records.clean_keypoints(src, trg, (10, 10), (10, 10), file='f', record='r')
  assert v.sum() == 1 and s.shape == (40, 2)
  np.testing.assert_array_equal(s[0], [1, 1])
  with pytest.raises(records.BadRecordError, match='more than the supported 40'):
    records.clean_keypoints(np.ones((41, 2)), np.ones((41, 2)), (10, 10), (10, 10), file='f',
                            record='r')
  with pytest.raises(records.BadRecordError, match='2 source keypoints but 1 target'):
    records.clean_keypoints(np.ones((2, 2)), np.ones((1, 2)), (10, 10), (10, 10), file='f',
                            record='r')
