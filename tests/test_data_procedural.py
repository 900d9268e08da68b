"""The `parts` benchmark: procedural objects, their dense ground truth, flips, and the label
budget of the training pipeline (tiny images, few pairs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import sccorr_jax.data as data
from sccorr_jax.data import parts
from sccorr_jax.data import procedural
from sccorr_jax.data import records
from sccorr_jax.data import synthetic
from sccorr_jax.data import transforms

SIZE = 48
PHOTOS = synthetic.PHOTOS['trn']


def _pairs(per_category=3, size=SIZE, seed=0):
  return [
      (c, procedural.make_pair(c, np.random.default_rng([seed, c, k]), size, PHOTOS))
      for c in range(len(procedural.CATEGORIES))
      for k in range(per_category)
  ]


@pytest.fixture(scope='module')
def pairs():
  return _pairs()


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  c = data.default_data_config('parts')
  c.data_dir = str(tmp_path_factory.mktemp('tfds'))
  c.parts_img_size = SIZE
  c.parts_train_pairs_per_category = 3  # 18 training pairs
  c.parts_eval_pairs_per_category = 1
  c.img_size, c.feature_size, c.receptive_field = SIZE, 12, 7
  c.augment = False
  c.num_threads = 1
  data.get_builder(c)  # build once
  return c


def test_generator_is_deterministic():
  a = procedural.make_pair(3, np.random.default_rng(7), SIZE, PHOTOS)
  b = procedural.make_pair(3, np.random.default_rng(7), SIZE, PHOTOS)
  c = procedural.make_pair(3, np.random.default_rng(8), SIZE, PHOTOS)
  for k, v in a.items():
    if isinstance(v, np.ndarray):
      np.testing.assert_array_equal(v, b[k], err_msg=k)
  assert not np.array_equal(a['trg_img'], c['trg_img'])
  assert not np.array_equal(a['dense_flow'], c['dense_flow'])


def test_templates_and_flip_tables():
  assert len(procedural.CATEGORIES) >= 6
  for cat in procedural.CATEGORIES:
    names = cat.keypoint_names
    assert 10 <= len(names) <= 30 and len(set(names)) == len(names)
    perm = procedural.flip_permutation(cat.name)
    np.testing.assert_array_equal(perm[perm], np.arange(len(names)))
    for k, name in enumerate(names):
      if 'left' in name or 'right' in name:  # left <-> right, nothing else changes
        swapped = name.replace('left', '#').replace('right', 'left').replace('#', 'right')
        assert names[perm[k]] == swapped, (cat.name, name)
  # A side view has no frontal mirror: the vehicle's table is the identity.
  np.testing.assert_array_equal(procedural.flip_permutation('vehicle'), np.arange(17))


@pytest.mark.parametrize(
    'name, point',
    [
        ('face', 'eye_outer'),
        ('face', 'mouth_corner'),
        ('humanoid', 'shoulder'),
        ('flower', 'leaf_tip'),
    ],
)
def test_flips_keep_left_and_right(name, point):
  # A frontal object's left side is on the viewer's right, flipped or not (rotations < 40 deg).
  cat_id = procedural.CATEGORY_NAMES.index(name)
  cat = procedural.CATEGORIES[cat_id]
  names = cat.keypoint_names
  kl, kr = names.index(f'left_{point}'), names.index(f'right_{point}')
  flips = set()
  for k in range(40):
    inst = procedural.sample_instance(cat_id, np.random.default_rng(k), 128)
    xy = inst.to_image(cat.kp_part[[kl, kr]], cat.kp_uv[[kl, kr]])
    along = procedural._rot(inst.rotation)[:, 0]  # the image x axis of the unrotated object
    assert (xy[0] - xy[1]) @ along > 0, (k, inst.flip)
    flips.add(inst.flip)
  assert flips == {False, True}


def test_keypoint_labels_agree_with_dense_flow(pairs):
  for cat_id, p in pairs:
    v = p['kps_valid']
    n = int(v.sum())
    assert n >= 4 and v[:n].all() and not v[n:].any()
    trg, src = p['trg_kps'][v], p['src_kps'][v]
    ix = trg.astype(int)
    np.testing.assert_array_equal(ix, trg)  # target keypoints on pixel centres
    np.testing.assert_allclose(trg + p['dense_flow'][ix[:, 1], ix[:, 0]], src, atol=1e-4)
    assert p['dense_valid'][ix[:, 1], ix[:, 0]].all()
    # The label is the named keypoint: near its canonical position in both images.
    ids = p['kps_ids'][:n]
    assert (ids >= 0).all() and (p['kps_ids'][n:] == -1).all()
    cat = procedural.CATEGORIES[cat_id]
    for side, kps in (('trg', trg), ('src', src)):
      inst = p[side]['inst']
      true = inst.to_image(cat.kp_part[ids], cat.kp_uv[ids])
      # Target: rounding (<= 0.71 px); source: that offset through the relative scale.
      tol = 0.71 if side == 'trg' else 0.71 * 3.0
      assert np.abs(kps - true).max() <= tol, (cat.name, side)


def test_canonical_coordinates_round_trip_through_the_match(pairs):
  checked = 0
  for cat_id, p in pairs:
    src, trg = p['src'], p['trg']
    ys, xs = np.nonzero(p['dense_valid'])
    match = np.stack([xs, ys], -1) + p['dense_flow'][ys, xs]
    m = np.floor(match + 0.5).astype(int)
    # The source pixel nearest the match shows the same part ...
    part = trg['part'][ys, xs]
    np.testing.assert_array_equal(src['part'][m[:, 1], m[:, 0]], part)
    # ... and its canonical (u, v), put back into the target, lands on the target pixel (up to
    # the half-pixel rounding in the source times the local scale change).
    back = trg['inst'].to_image(part.astype(int), src['uv'][m[:, 1], m[:, 0]])
    cat = procedural.CATEGORIES[cat_id]
    g_t, _ = trg['inst'].geometry_of(part.astype(int), 0)
    g_s, _ = src['inst'].geometry_of(part.astype(int), 0)
    rel = np.einsum('nij,njk->nik', trg['inst'].mat[g_t], np.linalg.inv(src['inst'].mat[g_s]))
    tol = 0.5 * np.sqrt(2) * np.linalg.norm(rel, 2, axis=(1, 2)) + 1e-6
    err = np.linalg.norm(back - np.stack([xs, ys], -1), axis=-1)
    assert (err <= tol).all(), (cat.name, err.max())
    checked += len(ys)
  assert checked > 1000


def test_background_and_hidden_pixels_are_invalid(pairs):
  hidden = 0
  for _, p in pairs:
    src, trg = p['src'], p['trg']
    valid = p['dense_valid']
    assert not valid[trg['part'] < 0].any()  # background and occluders: unlabelled
    assert (p['dense_flow'][trg['part'] < 0] == 0).all()
    ys, xs = np.nonzero(trg['part'] >= 0)
    match = np.stack([xs, ys], -1) + p['dense_flow'][ys, xs]
    m = np.floor(match + 0.5).astype(int)
    inside = ((m >= 0) & (m < SIZE)).all(1)
    shown = np.zeros(len(ys), bool)
    shown[inside] = src['part'][m[inside, 1], m[inside, 0]] == trg['part'][ys, xs][inside]
    # Valid iff the match is in the source and not hidden there (by a part or an occluder).
    np.testing.assert_array_equal(valid[ys, xs], shown)
    hidden += int((inside & ~shown).sum())
  assert hidden > 0  # occlusion happens in these pairs


def test_difficulty_levels_in_spair_ranges(pairs):
  levels = {f: {int(p[f]) for _, p in pairs} for f in records.DIFFICULTY_FIELDS}
  assert levels['viewpoint_variation'] <= {0, 1, 2} and levels['scale_variation'] <= {0, 1, 2}
  assert levels['truncation'] <= {0, 1, 2, 3} and levels['occlusion'] <= {0, 1, 2, 3}
  assert len(levels['viewpoint_variation']) > 1 and len(levels['truncation']) > 1


def test_test_textures_come_from_test_photographs(monkeypatch):
  used = set()
  real = procedural.texture_photo

  def spy(name, *args):
    used.add(name)
    return real(name, *args)

  monkeypatch.setattr(procedural, 'texture_photo', spy)
  cfg = parts.make_config(img_size=SIZE)
  for cat in range(len(procedural.CATEGORIES)):
    parts.make_example('test', cat, 0, cfg)
  assert used and used <= set(parts.PHOTOS['test'])
  assert not used & set(parts.PHOTOS['trn'])


def test_records_and_iterators(cfg):
  assert data.category_names(cfg) == list(procedural.CATEGORY_NAMES)
  assert data.num_examples(cfg, 'trn') == 18 and data.num_examples(cfg, 'test') == 6
  src = data.data_source(cfg, 'val')
  rec = src[0]
  assert set(rec) == set(records.pair_features(['a']).keys()) | {
      'dense_flow',
      'dense_valid',
      'kps_ids',
  }
  assert rec['src_img'].shape == (SIZE, SIZE, 3) and rec['dense_flow'].shape == (SIZE, SIZE, 2)
  b = next(data.create_train_iterator(cfg, batch_size=4, seed=0))
  assert b['src_img'].shape == (4, SIZE, SIZE, 3) and b['dense_flow'].shape == (4, 12, 12, 2)
  assert b['dense_valid'].any() and b['kps_valid'].any(1).all()
  np.testing.assert_array_equal(b['pckthres'], b['pckthres_bbox'])
  batches = list(data.create_eval_iterator(cfg, 'test', batch_size=4))
  assert len(batches) == 2 and batches[1]['pair_valid'].sum() == 2
  assert 'dense_flow' not in batches[0]  # the evaluation batch contract is unchanged


def test_dense_grid_matches_record(cfg):
  # Same image size as the records, no crop: a cell is valid iff one of its jsz x jsz record
  # pixels is valid with its match inside the image, and holds their mean displacement, in
  # cells; every cell holding a keypoint's pixel is valid (the keypoint is visible in both).
  src = data.data_source(cfg, 'trn')
  opts = data.PreprocessOptions(
      'parts', img_size=SIZE, feature_size=12, receptive_field=7, label_truth=True
  )
  jsz = SIZE // 12
  ys, xs = np.mgrid[0:SIZE, 0:SIZE]
  for i in range(len(src)):
    rec = src[i]
    out = data.preprocess_pair(rec, opts)
    match = rec['dense_flow'] + np.stack([xs, ys], -1)
    counts = rec['dense_valid'] & (match >= -0.5).all(-1) & (match <= SIZE - 0.5).all(-1)
    for cy in range(12):
      for cx in range(12):
        block = np.s_[cy * jsz : (cy + 1) * jsz, cx * jsz : (cx + 1) * jsz]
        assert out['dense_valid'][cy, cx] == counts[block].any()
        if counts[block].any():
          np.testing.assert_allclose(
              out['dense_flow'][cy, cx] * jsz,
              rec['dense_flow'][block][counts[block]].mean(0),
              atol=1e-4,
          )
    kps = np.floor(np.asarray(rec['trg_kps'])[rec['kps_valid']] + 0.5).astype(int) // jsz
    assert out['dense_valid'][kps[:, 1], kps[:, 0]].all()


def test_dense_grid_resizes_an_affine_map():
  # Record 40 px, batch 64 px on a 16-grid; the source is a scaled and shifted target. The
  # displacement is affine in the output pixel, so a cell's mean is its value at the cell's
  # middle, where the evaluator's upsampling puts it.
  h = w = 40
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  pts = np.stack([xs, ys], -1)
  match = 1.1 * pts + np.array([2.0, -3.0])
  flow, valid = transforms.dense_flow_to_grid(
      (match - pts).astype(np.float32),
      np.ones((h, w), bool),
      (np.zeros(2), np.full(2, 1.6)),
      (np.zeros(2), np.full(2, 1.6)),
      64,
      16,
  )
  c = (np.arange(16) + 0.5) * 4 - 0.5
  p_out = np.stack(np.meshgrid(c, c, indexing='xy'), -1)
  expect = ((1.1 * (p_out / 1.6) + [2.0, -3.0]) * 1.6 - p_out) / 4
  # Valid iff some output pixel of the cell (middle +- 1.5 px) has its match inside [-0.5, 63.5].
  lo = expect * 4 + p_out - 1.5 * 1.1
  hi = expect * 4 + p_out + 1.5 * 1.1
  np.testing.assert_array_equal(valid, ((hi >= -0.5) & (lo <= 63.5)).all(-1))
  full = ((lo >= -0.5) & (hi <= 63.5)).all(-1)  # cells whose every pixel counts
  # Nearest-pixel lookup: error <= |1.1 - 1| * 0.71 record px * 1.6 / 4 px per cell.
  np.testing.assert_allclose(flow[full], expect[full], atol=0.1 * 0.71 * 1.6 / 4 + 1e-6)


def test_budget_subsets_are_seeded():
  valid = np.arange(40) < 15
  a = transforms.budget_mask(valid, 5, 100, 4, 1.0, seed=0)
  np.testing.assert_array_equal(a, transforms.budget_mask(valid, 5, 100, 4, 1.0, seed=0))
  assert a.sum() == 4 and not (a & ~valid).any()
  others = [transforms.budget_mask(valid, 5, 100, 4, 1.0, seed=s) for s in range(1, 6)]
  assert any(not np.array_equal(a, o) for o in others)
  assert transforms.budget_mask(valid, 5, 100, 0, 1.0, seed=0).sum() == 15  # 0 = all
  assert transforms.budget_mask(valid, 5, 100, 30, 1.0, seed=0).sum() == 15
  labelled = [transforms.budget_mask(valid, i, 100, 0, 0.3, seed=2).any() for i in range(100)]
  assert sum(labelled) == 30
  again = [transforms.budget_mask(valid, i, 100, 0, 0.3, seed=2).any() for i in range(100)]
  assert labelled == again
  other = [transforms.budget_mask(valid, i, 100, 0, 0.3, seed=3).any() for i in range(100)]
  assert labelled != other


def test_withheld_keypoints_never_reach_the_label(cfg):
  c = cfg.copy_and_resolve_references()
  c.keypoints_per_pair = 2
  c.labelled_pair_fraction = 0.5
  c.shuffle = False  # record order, so that epochs can be compared row by row
  n = data.num_examples(c, 'trn')  # 18 = 3 epochs of 6 batches of 3
  it = data.create_train_iterator(c, batch_size=3, seed=1)
  epochs = [[next(it) for _ in range(n // 3)] for _ in range(2)]
  src = data.data_source(c, 'trn')
  unlabelled = 0
  changed = 0
  for e in range(2):
    for j, b in enumerate(epochs[e]):
      for r in range(3):
        rec = src[3 * j + r]
        kept, withheld = b['kps_valid'][r], b['withheld_kps_valid'][r]
        n_rec = int(rec['kps_valid'].sum())
        assert kept.sum() + withheld.sum() == n_rec and kept.sum() in (0, 2)
        unlabelled += int(kept.sum() == 0)
        # The label is made from the kept keypoints only.
        label = transforms.keypoints_to_flow_np(b['src_kps'][r], b['trg_kps'][r], kept, 12, 7, SIZE)
        np.testing.assert_array_equal(b['flow'][r], label)
        every = np.concatenate([b['trg_kps'][r][kept], b['withheld_trg_kps'][r][withheld]])
        np.testing.assert_allclose(np.sort(every, 0), np.sort(rec['trg_kps'][:n_rec], 0))
        full = transforms.keypoints_to_flow_np(
            rec['src_kps'], rec['trg_kps'], rec['kps_valid'], 12, 7, SIZE
        )
        changed += int(not np.array_equal(full, b['flow'][r]))
        # The same keypoints are kept in every epoch.
        if e == 1:
          prev = epochs[0][j]
          np.testing.assert_array_equal(prev['trg_kps'][r], b['trg_kps'][r])
          np.testing.assert_array_equal(prev['withheld_trg_kps'][r], b['withheld_trg_kps'][r])
  assert unlabelled == 2 * 9  # exactly half of the 18 pairs carry no label
  assert changed > 0


def test_budget_is_the_same_for_every_seed_and_epoch(cfg):
  c = cfg.copy_and_resolve_references()
  c.keypoints_per_pair = 1
  seen = {}
  for seed in (0, 5):
    it = data.create_train_iterator(c, batch_size=3, seed=seed)
    for _ in range(12):  # two shuffled epochs of 18 pairs
      b = next(it)
      for r in range(3):
        kept = b['trg_kps'][r][b['kps_valid'][r]]
        every = np.concatenate([kept, b['withheld_trg_kps'][r][b['withheld_kps_valid'][r]]])
        key = (int(b['category'][r]), tuple(np.sort(every, 0).round(3).reshape(-1)))
        assert seen.setdefault(key, kept.tobytes()) == kept.tobytes()
  assert len(seen) == 18


def _face_record_with_both_eyes():
  cat_id = procedural.CATEGORY_NAMES.index('face')
  names = procedural.keypoint_names('face')
  want = {names.index('left_eye_outer'), names.index('right_eye_outer')}
  for k in range(50):
    p = procedural.make_pair(cat_id, np.random.default_rng([1, k]), 96, PHOTOS)
    ids = set(p['kps_ids'][p['kps_valid']].tolist())
    if want <= ids and abs(p['src']['inst'].rotation) < 15:
      p.pop('src'), p.pop('trg')
      size = np.array([96, 96], np.int32)
      return records.base_example(src_imsize=size, trg_imsize=size, category=cat_id, **p)
  raise AssertionError('no face pair with both eyes labelled')


def test_mirrored_source_keeps_left_and_right():
  rec = _face_record_with_both_eyes()
  names = procedural.keypoint_names('face')
  left, right = names.index('left_eye_outer'), names.index('right_eye_outer')
  opts = transforms.PreprocessOptions(
      'parts',
      img_size=96,
      feature_size=24,
      receptive_field=11,
      train=True,
      augment=False,
      label_truth=True,
      flip_source_p=1.0,
  )
  out = transforms.preprocess_pair(rec, opts, np.random.default_rng(0))
  plain = transforms.preprocess_pair(
      rec, dataclasses.replace(opts, flip_source_p=0.0), np.random.default_rng(0)
  )
  np.testing.assert_array_equal(out['src_img'], plain['src_img'][:, ::-1])
  np.testing.assert_array_equal(out['trg_img'], plain['trg_img'])
  assert not out['dense_valid'].any() and plain['dense_valid'].any()
  ids = rec['kps_ids']

  def src_of(kp):  # the source point the pipeline pairs with the target's keypoint `kp`
    slot = int(np.nonzero(ids == kp)[0][0])
    row = np.nonzero((out['trg_kps'] == rec['trg_kps'][slot]).all(1) & out['kps_valid'])[0]
    return out['src_kps'][row[0]]

  # The face's left eye is on the viewer's right in the mirrored source too (an unrelabelled
  # mirror would put the label on the other eye).
  assert src_of(left)[0] > src_of(right)[0]
  perm = procedural.flip_permutation('face')
  slot = int(np.nonzero(ids == perm[left])[0][0])
  np.testing.assert_allclose(src_of(left), [95 - rec['src_kps'][slot][0], rec['src_kps'][slot][1]])
  # The label is built from the re-paired keypoints.
  np.testing.assert_array_equal(
      out['flow'],
      transforms.keypoints_to_flow_np(out['src_kps'], out['trg_kps'], out['kps_valid'], 24, 11, 96),
  )
