"""Bad input during preparation: each bad record is reported with its file and problem, then
skipped (counted, listed) or stops preparation; a failed preparation leaves no complete dataset."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil

import numpy as np
from PIL import Image
import pytest
import scipy.io
import tensorflow_datasets as tfds

import sccorr_jax.data as data
from sccorr_jax.data import pipeline
from sccorr_jax.data import prepare
from sccorr_jax.data import records
from sccorr_jax.data import testing
from conftest import run_python


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
  return prepare.prepare(
      name, str(tmp_path / 'tfds'), str(tmp_path / 'raw'), records.BadRecordPolicy(**policy)
  )


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
  assert (
      'malformed JSON'
      in problems[('trn', os.path.basename(_ann_path(base, 'trn', trn[0]['name'])))]
  )
  assert report.counts == {
      'trn': {'written': 2, 'bad': 2},
      'val': {'written': 1, 'bad': 1},
      'test': {'written': 1, 'bad': 1},
  }
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
  rec = next(
      val[i] for i in range(len(val)) if val[i]['pair_id'].decode() == written['val'][1]['name']
  )
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
  got = sorted(
      (b['split'], os.path.basename(b['file']), b['problem'].split(' (')[0]) for b in report.bad
  )
  assert got == [
      ('test', '2008_000012.mat', 'malformed .mat file'),
      ('trn', '2008_000010.jpg', 'image cannot be decoded'),
      ('val', '2008_000012.mat', 'malformed .mat file'),
  ]
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
    records.clean_keypoints(
        np.ones((41, 2)), np.ones((41, 2)), (10, 10), (10, 10), file='f', record='r'
    )
  with pytest.raises(records.BadRecordError, match='2 source keypoints but 1 target'):
    records.clean_keypoints(
        np.ones((2, 2)), np.ones((1, 2)), (10, 10), (10, 10), file='f', record='r'
    )


# ---------------------------------------------------------------------------------------------
# Malformed input, one defect class per case (issue 13, finding 5): each either skips the pair
# and names it, or is converted correctly; never a raw exception, never bad values in a record.
# The tiny official-layout copies are written once per module and copied per case.


@pytest.fixture(scope='module')
def templates(tmp_path_factory):
  raw = tmp_path_factory.mktemp('templates')
  written = {
      'spair71k': testing.write_spair71k(str(raw)),
      'pfpascal': testing.write_pfpascal(str(raw)),
      'pfwillow': testing.write_pfwillow(str(raw)),
  }
  return raw, written


FOLDERS = {'spair71k': 'SPair-71k', 'pfpascal': 'PF-PASCAL', 'pfwillow': 'PF-WILLOW'}


def _copy(templates, tmp_path, name):
  raw, written = templates
  shutil.copytree(raw / FOLDERS[name], tmp_path / 'raw' / FOLDERS[name])
  return tmp_path / 'raw' / FOLDERS[name], written[name]


def _edit_json(path, fn, raw_replace=None):
  ann = json.loads(path.read_text())
  fn(ann)
  text = json.dumps(ann)
  for old, new in (raw_replace or {}).items():
    text = text.replace(old, new)
  path.write_text(text)


def _spair_ann(field, value, raw_replace=None):
  """A defect: field `field` of the first trn pair's annotation set to `value`."""

  def apply(base, written):
    def fn(ann):
      if callable(value):
        ann[field] = value(ann[field])
      else:
        ann[field] = value

    _edit_json(_ann_path(base, 'trn', written['trn'][0]['name']), fn, raw_replace)

  return apply


def _spair_image(write):
  """A defect: the first trn pair's source image (2008_000001) rewritten by `write(path)`."""

  def apply(base, written):
    del written
    write(base / 'JPEGImages' / 'aeroplane' / '2008_000001.jpg')

  return apply


def _save_float_tiff(path):
  arr = np.random.default_rng(0).random((30, 40)).astype(np.float32)
  Image.fromarray(arr, 'F').save(path, format='TIFF')


def _save_int32_tiff(path):
  arr = np.random.default_rng(0).integers(0, 70000, (30, 40)).astype(np.int32)
  Image.fromarray(arr, 'I').save(path, format='TIFF')


SPAIR_SKIPPED = {  # defect -> (apply, regex the problem must match)
    'kps_huge_int': (_spair_ann('src_kps', lambda k: [[10**400, 1]] + k[1:]), 'too large'),
    'bbox_huge_int': (_spair_ann('src_bndbox', [1, 2, 10**400, 20]), 'too large'),
    'level_1e12_int': (_spair_ann('truncation', 10**12), r'level 1000000000000 outside 0\.\.3'),
    'level_1e12_float': (_spair_ann('occlusion', 1e12), 'not an integer level'),
    'level_infinity': (_spair_ann('viewpoint_variation', float('inf')), 'inf is not an integer'),
    'level_float': (_spair_ann('scale_variation', 1.5), '1.5 is not an integer'),
    'level_negative': (_spair_ann('truncation', -1), r'level -1 outside 0\.\.3'),
    'level_bool': (_spair_ann('occlusion', True), 'True is not an integer'),
    'level_string': (_spair_ann('occlusion', '1'), "'1' is not an integer"),
    'kps_triples': (_spair_ann('src_kps', lambda k: [[x, y, 1] for x, y in k]), 'triples'),
    'kps_booleans': (_spair_ann('trg_kps', lambda k: [[True, False] for _ in k]), 'booleans'),
    'kps_flat_list': (_spair_ann('src_kps', lambda k: [v for p in k for v in p]), 'flat list'),
    'kps_strings': (_spair_ann('src_kps', lambda k: [[str(x), y] for x, y in k]), 'str'),
    'kps_nan': (_spair_ann('src_kps', lambda k: [[float('nan'), 1]] + k[1:]), 'not finite'),
    'kps_infinity': (_spair_ann('trg_kps', lambda k: k[:-1] + [[1, float('inf')]]), 'not finite'),
    'kps_1e400': (
        _spair_ann('src_kps', lambda k: [[123456789, 1]] + k[1:], {'123456789': '1e400'}),
        'not finite',
    ),
    'kps_null': (_spair_ann('src_kps', lambda k: [[None, 1]] + k[1:]), 'NoneType'),
    'bbox_x2_lt_x1': (_spair_ann('src_bndbox', [20, 2, 10, 20]), 'inverted'),
    'bbox_both_inverted': (_spair_ann('src_bndbox', [30, 25, 1, 2]), 'inverted'),
    'bbox_zero_area': (_spair_ann('src_bndbox', [5, 2, 5, 20]), 'zero area'),
    'bbox_far_outside': (_spair_ann('src_bndbox', [500, 600, 900, 800]), 'beyond the image'),
    'bbox_three_numbers': (_spair_ann('trg_bndbox', [1, 2, 3]), '4 finite numbers'),
    'bbox_booleans': (_spair_ann('trg_bndbox', [True, True, True, True]), 'booleans'),
    'float32_tiff': (_spair_image(_save_float_tiff), 'as floats .*range is unknown'),
    'int32_tiff': (_spair_image(_save_int32_tiff), '32-bit integers'),
    'truncated_image': (
        _spair_image(lambda p: p.write_bytes(p.read_bytes()[:200])),
        'cannot be decoded',
    ),
}


@pytest.mark.parametrize('defect', sorted(SPAIR_SKIPPED))
def test_spair_defect_skips_and_names_the_pair(templates, tmp_path, defect):
  apply, problem = SPAIR_SKIPPED[defect]
  base, written = _copy(templates, tmp_path, 'spair71k')
  apply(base, written)
  name = written['trn'][0]['name']
  builder = _prepare(tmp_path, max_bad_fraction=1.0)
  bad = [b for b in builder.report.bad if b['split'] == 'trn' and b['record'] == name]
  assert len(bad) == 1, builder.report.summary()
  assert re.search(problem, bad[0]['problem']), bad[0]
  assert name in builder.report.summary()
  cfg = data.default_data_config('spair71k')
  cfg.data_dir = str(tmp_path / 'tfds')
  trn = data.data_source(cfg, 'trn')
  kept = {trn[i]['pair_id'].decode() for i in range(len(trn))}
  assert name not in kept and len(kept) == 4 - builder.report.counts['trn']['bad'] >= 2


def test_spair_defect_raise_policy_names_the_file(templates, tmp_path):
  base, written = _copy(templates, tmp_path, 'spair71k')
  SPAIR_SKIPPED['kps_huge_int'][0](base, written)
  with pytest.raises(records.PreparationError, match='too large') as e:
    _prepare(tmp_path, on_bad_record='raise')
  assert _ann_path(base, 'trn', written['trn'][0]['name']).name in str(e.value)
  assert not _is_prepared(tmp_path)


def _png16(path, grey16):
  Image.fromarray(grey16).save(path, format='PNG')
  with Image.open(path) as im:
    assert im.mode.startswith('I;16')  # what the defect is about: a true 16-bit PNG


def test_spair_16bit_png_is_scaled_to_8_bits(templates, tmp_path):
  base, written = _copy(templates, tmp_path, 'spair71k')
  grey16 = np.random.default_rng(0).integers(0, 65536, (30, 40)).astype(np.uint16)
  grey16[0, :3] = [0, 65535, 32896]
  _png16(base / 'JPEGImages' / 'aeroplane' / '2008_000001.jpg', grey16)
  builder = _prepare(tmp_path)
  assert not builder.report.bad
  cfg = data.default_data_config('spair71k')
  cfg.data_dir = str(tmp_path / 'tfds')
  trn = data.data_source(cfg, 'trn')
  rec = next(
      trn[i] for i in range(len(trn)) if trn[i]['pair_id'].decode() == written['trn'][0]['name']
  )
  want = np.round(grey16.astype(np.float64) * 255 / 65535).astype(np.uint8)
  np.testing.assert_array_equal(rec['src_img'], np.repeat(want[..., None], 3, -1))
  assert rec['src_img'][0, :3, 0].tolist() == [0, 255, 128]


@pytest.mark.parametrize('spelling', ['same', 'dash'])
def test_spair_split_file_listing_a_pair_twice_keeps_it_once(templates, tmp_path, spelling):
  base, written = _copy(templates, tmp_path, 'spair71k')
  layout = base / 'Layout' / 'large' / 'trn.txt'
  first = layout.read_text().splitlines()[0]
  again = first if spelling == 'same' else first.replace(':', '-')
  layout.write_text(layout.read_text() + again + '\n')
  builder = _prepare(tmp_path)
  assert builder.report.counts['trn'] == {'written': 4, 'bad': 0}
  notes = builder.report.notes
  assert len(notes) == 1 and notes[0]['record'] == written['trn'][0]['name']
  assert 'line 5' in notes[0]['problem'] and 'repeats the pair of line 1' in notes[0]['problem']
  saved = json.loads((builder.data_path / 'preparation_report.json').read_text())
  assert saved['notes'] == notes


def test_spair_split_file_with_a_non_utf8_line(templates, tmp_path):
  base, _ = _copy(templates, tmp_path, 'spair71k')
  layout = base / 'Layout' / 'large' / 'trn.txt'
  lines = layout.read_bytes().split(b'\n')
  layout.write_bytes(b'\n'.join(lines[:2] + [b'000099-2008_\xff\xfe01-x:aeroplane'] + lines[2:]))
  builder = _prepare(tmp_path, max_bad_fraction=1.0)
  assert builder.report.counts['trn'] == {'written': 4, 'bad': 1}
  (bad,) = builder.report.bad
  assert bad['record'] == 'line 3' and bad['problem'] == 'not UTF-8 text'
  assert bad['file'].endswith('trn.txt line 3')


def _csv_cell(base, csv_name, row, col, value):
  path = base / csv_name
  rows = list(csv.reader(path.read_text().splitlines()))
  rows[row][col] = value
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows(rows)


def _savemat(path, **changes):
  mat = scipy.io.loadmat(path)
  mat = {k: v for k, v in mat.items() if not k.startswith('__')}
  mat.update(changes)
  scipy.io.savemat(path, mat)


def _non_utf8_row(base, csv_name, row):
  path = base / csv_name
  lines = path.read_bytes().split(b'\n')
  lines[row] = lines[row].replace(b'JPEG', b'JP\xe9G').replace(b'PF-d', b'PF-\xe9')
  path.write_bytes(b'\n'.join(lines))


# PF-PASCAL: the first trn pair (2007_000001 -> 2007_000002, class aeroplane, csv row 2).
_MAT = 'Annotations/aeroplane/2007_000001.mat'
PASCAL_SKIPPED = {
    'class_1e400': (lambda b: _csv_cell(b, 'trn_pairs.csv', 1, 2, '1e400'), 'not an integer'),
    'class_fraction': (lambda b: _csv_cell(b, 'trn_pairs.csv', 1, 2, '1.5'), 'not an integer'),
    'class_0': (lambda b: _csv_cell(b, 'trn_pairs.csv', 1, 2, '0'), r'outside 1\.\.20'),
    'flip_inf': (lambda b: _csv_cell(b, 'trn_pairs.csv', 1, 3, 'inf'), 'flip flag'),
    'flip_2': (lambda b: _csv_cell(b, 'trn_pairs.csv', 1, 3, '2'), r'flip flag .* outside 0\.\.1'),
    'non_utf8_row': (lambda b: _non_utf8_row(b, 'trn_pairs.csv', 1), 'not UTF-8'),
    'kps_booleans': (lambda b: _savemat(b / _MAT, kps=np.ones((6, 2), bool)), 'booleans'),
    'kps_triples': (lambda b: _savemat(b / _MAT, kps=np.ones((6, 3))), 'triples'),
    'kps_infinity': (lambda b: _savemat(b / _MAT, kps=np.full((6, 2), np.inf)), 'not finite'),
    'kps_complex': (lambda b: _savemat(b / _MAT, kps=np.ones((6, 2)) * 1j), 'real numbers'),
    'bbox_inverted': (lambda b: _savemat(b / _MAT, bbox=np.array([[30.0, 20, 1, 1]])), 'inverted'),
    'bbox_far_outside': (
        lambda b: _savemat(b / _MAT, bbox=np.array([[1.0, 1, 400, 300]])),
        'beyond the image',
    ),
}


def _prepare_with_defect(templates, tmp_path, dataset, apply):
  """A copy of the tiny official-layout `dataset` with one defect applied, prepared."""
  base, _ = _copy(templates, tmp_path, dataset)
  apply(base)
  return _prepare(tmp_path, dataset, max_bad_fraction=1.0)


@pytest.mark.parametrize('defect', sorted(PASCAL_SKIPPED))
def test_pfpascal_defect_skips_and_names_the_pair(templates, tmp_path, defect):
  builder = _prepare_with_defect(templates, tmp_path, 'pfpascal', PASCAL_SKIPPED[defect][0])
  problem = PASCAL_SKIPPED[defect][1]
  bad = [b for b in builder.report.bad if b['split'] == 'trn' and b['record'] == 'trn-00000']
  assert len(bad) == 1, builder.report.summary()
  assert re.search(problem, bad[0]['problem']), bad[0]
  where = bad[0]['file']
  assert where.endswith('trn_pairs.csv row 2') or where.endswith('2007_000001.mat'), where


# PF-WILLOW: the first pair (csv row 2); columns 2..41 are XA1..XA10, YA1..YA10, XB.., YB...
WILLOW_SKIPPED = {
    'coordinate_nan': (lambda b: _csv_cell(b, 'test_pairs.csv', 1, 2, 'nan'), 'not finite'),
    'coordinate_inf': (lambda b: _csv_cell(b, 'test_pairs.csv', 1, 13, 'inf'), 'not finite'),
    'coordinate_1e400': (lambda b: _csv_cell(b, 'test_pairs.csv', 1, 40, '1e400'), 'not finite'),
    'coordinate_text': (lambda b: _csv_cell(b, 'test_pairs.csv', 1, 5, 'x'), 'not a number'),
    'one_point': (
        lambda b: [_csv_cell(b, 'test_pairs.csv', 1, c, '5') for c in range(2, 22)],
        'all lie on one point',
    ),
    'non_utf8_row': (lambda b: _non_utf8_row(b, 'test_pairs.csv', 1), 'not UTF-8'),
}


@pytest.mark.parametrize('defect', sorted(WILLOW_SKIPPED))
def test_pfwillow_defect_skips_and_names_the_pair(templates, tmp_path, defect):
  builder = _prepare_with_defect(templates, tmp_path, 'pfwillow', WILLOW_SKIPPED[defect][0])
  problem = WILLOW_SKIPPED[defect][1]
  (bad,) = builder.report.bad
  assert bad['record'] == 'test-00000' and bad['file'].endswith('test_pairs.csv row 2'), bad
  assert re.search(problem, bad['problem']), bad
  assert builder.report.counts['test'] == {'written': 2, 'bad': 1}


def test_numeric_checks_refuse_what_numpy_would_accept():
  for value, problem in (
      ([[True, 1]], 'booleans'),
      ([['1', 2]], 'str'),
      ([[1, 2, 3]], 'triples'),
      ([1, 2, 3, 4], 'flat list'),
      ([[10**400, 1]], 'too large'),
      ([[1, 2], [3]], 'not a regular array'),
  ):
    with pytest.raises(records.BadRecordError, match=problem):
      records.keypoint_array(value, 'kps', 'f')
  np.testing.assert_array_equal(records.keypoint_array([[1, 2.5]], 'kps', 'f'), [[1, 2.5]])
  assert records.keypoint_array([], 'kps', 'f').shape == (0, 2)
  with pytest.raises(records.BadRecordError, match='not finite'):
    records.keypoint_array([[np.nan, 1]], 'kps', 'f')
  assert np.isnan(records.keypoint_array([[np.nan, 1]], 'kps', 'f', nan_invisible=True)).any()
  with pytest.raises(records.BadRecordError, match='not finite'):
    records.keypoint_array([[np.inf, 1]], 'kps', 'f', nan_invisible=True)
  np.testing.assert_array_equal(
      records.parse_bbox([[1, 2, 3, 4]], 'f', 'b', (10, 10)), [1, 2, 3, 4]
  )
  assert records.parse_level(np.int64(2), 'f', 'l', 3) == 2
  with pytest.raises(records.BadRecordError) as e:  # a multi-line repr still makes one line
    records.parse_bbox(np.ones((3, 2)), 'f', 'b')
  assert '\n' not in str(e.value) and 'must be 4 finite numbers' in str(e.value)


# ---------------------------------------------------------------------------------------------
# The command line: every user mistake ends with one line naming the path or flag and the
# problem, exit status non-zero, no traceback unless --verbose.


def _cli(*args, cwd):
  env = dict(os.environ, SCCORR_DATA_DIR=str(cwd / 'default_tfds'))
  proc = run_python('-m', 'sccorr_jax.data.prepare', *args, cwd=cwd, env=env, timeout=300)
  lines = proc.stderr.strip().splitlines()
  return proc.returncode, proc.stdout, proc.stderr, lines[-1] if lines else ''


@pytest.fixture(scope='module')
def cli_dirs(templates, tmp_path_factory):
  root = tmp_path_factory.mktemp('cli')
  raw, written = templates
  (root / 'empty').mkdir()
  shutil.copytree(raw / 'PF-PASCAL', root / 'pascal_only' / 'PF-PASCAL')
  shutil.copytree(raw / 'SPair-71k', root / 'spair' / 'SPair-71k')
  layout = root / 'spair' / 'SPair-71k' / 'Layout' / 'large' / 'trn.txt'
  layout.write_text(layout.read_text() + layout.read_text().splitlines()[0] + '\n')
  shutil.copytree(raw / 'SPair-71k', root / 'spair_bad' / 'SPair-71k')
  ann = _ann_path(root / 'spair_bad' / 'SPair-71k', 'test', written['spair71k']['test'][0]['name'])
  _edit_json(ann, lambda a: a.update(truncation=-1))
  return root, ann


@pytest.mark.parametrize(
    'case',
    [
        'unknown_dataset',
        'no_dataset',
        'missing_manual_dir',
        'empty_manual_dir',
        'wrong_layout',
        'bad_record_raise',
        'bad_flag',
        'data_dir_is_a_file',
    ],
)
def test_prepare_command_user_mistake_is_one_line(cli_dirs, case):
  root, bad_ann = cli_dirs
  tfds_dir = f'--data_dir={root / f"tfds_{case}"}'
  args, expect = {
      'unknown_dataset': (['--dataset=spair', tfds_dir], ['--dataset=spair', 'unknown dataset']),
      'no_dataset': ([tfds_dir], ['--dataset is required']),
      'missing_manual_dir': (
          ['--dataset=spair71k', f'--manual_dir={root / "nope"}', tfds_dir],
          [str(root / 'nope'), 'does not exist'],
      ),
      'empty_manual_dir': (
          ['--dataset=pfwillow', f'--manual_dir={root / "empty"}', tfds_dir],
          [str(root / 'empty'), 'is empty', 'PF-WILLOW/test_pairs.csv'],
      ),
      'wrong_layout': (
          ['--dataset=spair71k', f'--manual_dir={root / "pascal_only"}', tfds_dir],
          [str(root / 'pascal_only'), 'wrong layout', 'PF-PASCAL'],
      ),
      'bad_record_raise': (
          [
              '--dataset=spair71k',
              f'--manual_dir={root / "spair_bad"}',
              '--on_bad_record=raise',
              tfds_dir,
          ],
          [bad_ann.name, 'truncation', 'outside'],
      ),
      'bad_flag': (
          ['--dataset=spair71k', '--max_bad_fraction=lots', tfds_dir],
          ['--max_bad_fraction=lots'],
      ),
      'data_dir_is_a_file': (
          ['--dataset=spair71k', f'--manual_dir={root / "spair"}', f'--data_dir={bad_ann}'],
          [bad_ann.name, 'not a directory'],
      ),
  }[case]
  rc, out, err, last = _cli(*args, cwd=root)
  assert rc == 2, (out, err)
  assert last.startswith('error: '), err
  for word in expect:
    assert word in last, last
  assert 'Traceback' not in out + err, err
  assert not pipeline.BUILDERS['spair71k'](data_dir=str(root / f'tfds_{case}')).is_prepared()


def test_prepare_command_verbose_shows_the_traceback(cli_dirs):
  root, _ = cli_dirs
  rc, _, err, last = _cli(
      '--dataset=spair71k',
      f'--manual_dir={root / "nope"}',
      '--verbose',
      f'--data_dir={root / "tfds_verbose"}',
      cwd=root,
  )
  assert rc != 0 and 'Traceback' in err and 'does not exist' in last


def test_prepare_command_success_lists_notes(cli_dirs):
  root, _ = cli_dirs
  rc, out, err, _ = _cli(
      '--dataset=spair71k',
      f'--manual_dir={root / "spair"}',
      f'--data_dir={root / "tfds_ok"}',
      cwd=root,
  )
  assert rc == 0, err
  assert 'trn: 4 pairs' in out and 'repeats the pair of line 1; kept once' in out
  assert out.strip().splitlines()[-1].startswith('prepared in ')


def test_manual_dir_given_never_downloads_and_none_given_downloads(
    templates, tmp_path, monkeypatch
):
  """A mistyped manual dir is an error (it used to start a download); no manual dir at all
  downloads (here: a stand-in returning the extracted archive)."""
  raw, _ = templates
  calls = []

  def fake_download_and_extract(self, urls):
    del self
    calls.append(urls)
    return {k: raw for k in urls}

  monkeypatch.setattr(
      tfds.download.DownloadManager, 'download_and_extract', fake_download_and_extract
  )
  builder = pipeline.BUILDERS['pfwillow'](data_dir=str(tmp_path / 'a'))
  for missing in (tmp_path / 'nope', tmp_path / 'empty'):
    if missing.name == 'empty':
      missing.mkdir()
    with pytest.raises(records.PreparationError, match=f'{missing}.*(does not exist|is empty)'):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=str(missing))
      )
  assert not calls and not builder.is_prepared()
  builder = prepare.prepare('pfwillow', str(tmp_path / 'b'))
  assert len(calls) == 1 and builder.info.splits['test'].num_examples == 3


def test_unforeseen_exception_in_a_record_stops_naming_it(templates, tmp_path, monkeypatch):
  """Not a BadRecordError: neither skipped silently nor a bare traceback from deep inside."""
  _, written = _copy(templates, tmp_path, 'spair71k')

  def broken(*args, **kwargs):
    raise ZeroDivisionError('something nobody foresaw')

  monkeypatch.setattr(records, 'parse_level', broken)
  with pytest.raises(
      records.PreparationError,
      match=r'\[trn\] record .*unexpected ' 'ZeroDivisionError: something nobody foresaw',
  ) as e:
    _prepare(tmp_path, max_bad_fraction=1.0)
  assert any(p['name'] in str(e.value) for p in written['trn'])
  assert not _is_prepared(tmp_path)
