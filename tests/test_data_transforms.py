"""Per-pair preprocessing: the NumPy flow label equals geometry's, the colour transforms do what
albumentations 1.x does, thresholds and flips on hand-made records."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from sccorr_jax import constants
from sccorr_jax import geometry
from sccorr_jax.data import augment
from sccorr_jax.data import transforms


@pytest.mark.parametrize('fs,rf,img', [(64, 11, 256), (16, 35, 256), (16, 3, 64), (8, 7, 32)])
def test_numpy_flow_equals_geometry(fs, rf, img):
  rng = np.random.default_rng(fs + rf)
  for _ in range(5):
    n = 40
    src = rng.uniform(-2, img + 2, (n, 2)).astype(np.float32)
    trg = rng.uniform(-2, img + 2, (n, 2)).astype(np.float32)
    trg[:5] = trg[0] + rng.uniform(-1, 1, (5, 2))  # shared cells: the last index wins
    valid = np.arange(n) < rng.integers(1, n + 1)
    got = transforms.keypoints_to_flow_np(src, trg, valid, fs, rf, img)
    want = np.asarray(geometry.keypoints_to_flow(src, trg, valid, fs, rf, img))
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got == 0, want == 0)


def test_numpy_flow_matches_reference_fixture(fixtures_dir):
  ref = np.load(fixtures_dir / 'keypoint_to_flow.npz')
  for setting in ('fs64_rfs11', 'fs16_rfs35'):
    fs = int(ref[f'{setting}/feat_size'])
    rf = int(ref[f'{setting}/receptive_field_size'])
    for i, n in enumerate(ref[f'{setting}/n_pts']):
      src = ref[f'{setting}/src_kps'][i].T
      trg = ref[f'{setting}/trg_kps'][i].T
      flow = transforms.keypoints_to_flow_np(src, trg, np.arange(40) < n, fs, rf, 256)
      want = ref[f'{setting}/flow'][i].transpose(1, 2, 0)
      np.testing.assert_allclose(flow, want, atol=1e-5)  # fixture README tolerance
      np.testing.assert_array_equal(geometry.unlabelled_mask(flow), geometry.unlabelled_mask(want))


def _img(seed=0, h=12, w=10):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_colour_transforms_follow_opencv_semantics():
  img = _img()
  np.testing.assert_array_equal(augment.posterize(img, 4), img & 0xF0)
  assert not augment.posterize(img, 0).any()
  np.testing.assert_array_equal(augment.solarize(img), np.where(img < 128, img, 255 - img))
  grey = augment.to_gray(img)
  want = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  assert np.abs(grey[..., 0] - want).max() <= 0.51
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  # equalizeHist: a two-level channel maps to 0 and 255; the map is monotone.
  two = np.where(np.arange(120).reshape(12, 10) < 50, 30, 200).astype(np.uint8)
  eq = augment.equalize(np.stack([two] * 3, -1))[..., 0]
  assert set(np.unique(eq)) == {0, 255}
  e = augment.equalize(img)
  order = np.argsort(img[..., 0], axis=None, kind='stable')
  assert (np.diff(e[..., 0].reshape(-1)[order].astype(int)) >= 0).all()
  # Sharpen = 3x3 correlation with reflect-101 borders ('mirror' in scipy), rounded, clipped.
  a, lt = 0.3, 0.7
  k = (1 - a) * np.pad([[1.0]], 1) + a * np.array([[-1, -1, -1], [-1, 8 + lt, -1], [-1, -1, -1]])
  want = np.stack(
      [scipy.ndimage.correlate(img[..., c].astype(np.float64), k, mode='mirror') for c in range(3)],
      -1,
  )
  got = augment.sharpen(img, a, lt).astype(np.float64)
  assert np.abs(got - np.clip(np.rint(want), 0, 255)).max() <= 1
  bc = augment.brightness_contrast(img, 1.1, -0.1)
  np.testing.assert_array_equal(
      bc, np.clip(img * np.float32(1.1) - np.float32(25.5), 0, 255).astype(np.uint8)
  )


def test_hue_rotation():
  red = np.zeros((2, 2, 3), np.uint8)
  red[..., 0] = 255
  np.testing.assert_array_equal(augment.adjust_hue(red, 1 / 3)[0, 0], [0, 255, 0])
  np.testing.assert_array_equal(augment.adjust_hue(red, -1 / 3)[0, 0], [0, 0, 255])
  img = _img(1)
  assert np.abs(augment.adjust_hue(img, 0.0).astype(int) - img).max() == 0
  assert np.abs(augment.adjust_hue(img, 1.0).astype(int) - img).max() <= 3  # 8-bit H rounding
  grey = augment.to_gray(img)
  np.testing.assert_array_equal(augment.adjust_hue(grey, 0.2), grey)  # no hue to rotate


def test_reference_augment_is_seeded_and_p_controls_it():
  img = _img(2, 20, 24)
  a = augment.reference_color_augment(img, np.random.default_rng(5))
  b = augment.reference_color_augment(img, np.random.default_rng(5))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
      augment.reference_color_augment(img, np.random.default_rng(5), p=0.0), img
  )
  assert not np.array_equal(
      augment.reference_color_augment(img, np.random.default_rng(5), p=1.0), img
  )


def _record(flip=0, n=3, w=40, h=30):
  src = np.zeros((40, 2), np.float32)
  trg = np.zeros((40, 2), np.float32)
  src[:n] = [[4, 3], [20, 15], [36, 27]][:n]
  trg[:n] = [[10, 5], [30, 20], [5, 25]][:n]
  return dict(
      src_img=_img(3, h, w),
      trg_img=_img(4, h, w),
      src_kps=src,
      trg_kps=trg,
      kps_valid=np.arange(40) < n,
      src_bbox=np.array([2, 3, 30, 24], np.float32),
      trg_bbox=np.array([1, 1, 39, 29], np.float32),
      src_imsize=np.array([h, w]),
      trg_imsize=np.array([h, w]),
      category=5,
      flip=flip,
      viewpoint_variation=2,
      scale_variation=0,
      truncation=1,
      occlusion=0,
  )


def test_preprocess_by_hand():
  rec = _record()
  out = transforms.preprocess_pair(rec, transforms.PreprocessOptions('spair71k'))
  sx, sy = 256 / 40, 256 / 30
  np.testing.assert_allclose(
      out['src_kps'][:3], [[4 * sx, 3 * sy], [20 * sx, 15 * sy], [36 * sx, 27 * sy]], rtol=1e-6
  )
  np.testing.assert_allclose(out['src_bbox'], [2 * sx, 3 * sy, 30 * sx, 24 * sy], rtol=1e-6)
  np.testing.assert_allclose(out['pckthres'], max(28 * sx, 21 * sy), rtol=1e-6)
  assert out['viewpoint_variation'] == 2 and out['category'] == 5
  # ImageNet normalisation of the bilinear-resized image.
  from PIL import Image  # pylint: disable=g-import-not-at-top

  resized = np.asarray(Image.fromarray(rec['src_img']).resize((256, 256), Image.BILINEAR))
  mean, std = np.float32(constants.IMAGENET_MEAN), np.float32(constants.IMAGENET_STD)
  np.testing.assert_allclose(out['src_img'] * std + mean, resized / 255.0, atol=1e-6)
  # PF-WILLOW thresholds: keypoint extent (corrected) and the reference's padded one (legacy).
  w = transforms.preprocess_pair(rec, transforms.PreprocessOptions('pfwillow'))
  np.testing.assert_allclose(w['pckthres'], max(32 * sx, 24 * sy), rtol=1e-6)
  np.testing.assert_allclose(w['pckthres_bbox_legacy'], max(36 * sx, 27 * sy) + 1, rtol=1e-6)
  p = transforms.preprocess_pair(rec, transforms.PreprocessOptions('pfpascal'))
  np.testing.assert_allclose(p['pckthres'], 256)


def test_flip_only_in_training_and_only_when_flagged():
  rec = _record(flip=1)
  opts = transforms.PreprocessOptions('pfpascal', train=True, augment=False)
  out = transforms.preprocess_pair(rec, opts, np.random.default_rng(0))
  plain = transforms.preprocess_pair(rec, transforms.PreprocessOptions('pfpascal'))
  np.testing.assert_allclose(out['src_kps'][:3, 0], 256 - plain['src_kps'][:3, 0], rtol=1e-6)
  np.testing.assert_array_equal(out['src_kps'][:3, 1], plain['src_kps'][:3, 1])
  np.testing.assert_array_equal(out['trg_img'], plain['trg_img'][:, ::-1])
  b = plain['src_bbox']
  np.testing.assert_allclose(out['src_bbox'], [256 - b[2], b[1], 256 - b[0], b[3]], rtol=1e-6)
  no_flip = transforms.preprocess_pair(_record(flip=0), opts, np.random.default_rng(0))
  np.testing.assert_array_equal(no_flip['src_kps'], plain['src_kps'])


def test_random_crop_option_keeps_the_box():
  rec = _record(n=3)
  opts = transforms.PreprocessOptions(
      'spair71k', train=True, augment=False, random_crop=True, random_crop_p=1.0
  )
  cropped = 0
  for seed in range(10):
    out = transforms.preprocess_pair(rec, opts, np.random.default_rng(seed))
    assert (out['src_kps'][:3] >= 0).all() and (out['src_kps'][:3] <= 255).all()
    assert (out['src_bbox'] >= -1e-3).all() and (out['src_bbox'] <= 256 + 1e-3).all()
    cropped += not np.allclose(
        out['src_bbox'],
        transforms.preprocess_pair(rec, transforms.PreprocessOptions('spair71k'))['src_bbox'],
    )
  assert cropped > 0
  left, top, cw, ch = augment.random_crop_params(
      np.random.default_rng(0), rec['src_bbox'], (30, 40)
  )
  assert left <= 2 and top <= 3 and left + cw >= 30 and top + ch >= 24
