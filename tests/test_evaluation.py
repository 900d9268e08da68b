"""Keypoint transfer and PCK against the reference (pck.npz) and properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sccorr_jax import evaluation
from sccorr_jax import geometry

# Fixture README: `est_kps`, `flow_up_pair0` atol 1e-4 (the reference ran in float32; a float64
# computation differs by <= 1.1e-5); `correct` exact; `pck` exact up to the float32 division
# (the stored values are float64 `100 * c / n`, so rtol 1e-6 in float32).
ATOL_PX = 1e-4
PRECISIONS = pytest.mark.parametrize("x64", [True, False], ids=["x64", "f32"])


@pytest.fixture(scope="module")
def ref(fixtures_dir):
  return dict(np.load(fixtures_dir / "pck.npz"))


def _inputs(ref, x64):
  dt = np.float64 if x64 else np.float32
  flow = np.ascontiguousarray(ref["flow"].transpose(0, 2, 3, 1)).astype(dt)
  trg = np.ascontiguousarray(ref["trg_kps"].transpose(0, 2, 1)).astype(dt)
  src = np.ascontiguousarray(ref["src_kps"].transpose(0, 2, 1)).astype(dt)
  valid = np.arange(40)[None] < ref["n_pts"][:, None]
  return flow, trg, src, valid


def _upsample_numpy(flow, img_h, img_w):
  """Independent float64 loop version of the align_corners=False resize, for properties."""
  _, h, w, _ = flow.shape

  def taps(n_in, n_out, i):
    c = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = int(c)
    return i0, min(i0 + 1, n_in - 1), c - i0

  out = np.zeros((flow.shape[0], img_h, img_w, 2))
  for y in range(img_h):
    y0, y1, ly = taps(h, img_h, y)
    for x in range(img_w):
      x0, x1, lx = taps(w, img_w, x)
      out[:, y, x] = (1 - ly) * ((1 - lx) * flow[:, y0, x0] + lx * flow[:, y0, x1]) + ly * (
          (1 - lx) * flow[:, y1, x0] + lx * flow[:, y1, x1]
      )
  return out * np.array([img_w / w, img_h / h])


@PRECISIONS
def test_upsample_flow_matches_reference(ref, x64):
  flow, _, _, _ = _inputs(ref, x64)
  with jax.enable_x64(x64):
    up = jax.jit(evaluation.upsample_flow, static_argnums=1)(flow[:1], 256)
  np.testing.assert_allclose(
      np.asarray(up)[0], ref["flow_up_pair0"].transpose(1, 2, 0), atol=ATOL_PX, rtol=0
  )


def test_upsample_flow_rectangular_matches_loop_version():
  rng = np.random.default_rng(0)
  flow = rng.normal(size=(2, 5, 7, 2))
  with jax.enable_x64(True):
    up = np.asarray(evaluation.upsample_flow(flow, (12, 30)))
  np.testing.assert_allclose(up, _upsample_numpy(flow, 12, 30), atol=1e-12)
  # A constant flow stays constant, scaled to pixels per axis (x by 30/7, y by 12/5).
  const = np.broadcast_to(np.array([1.0, -2.0], np.float32), (1, 5, 7, 2))
  up_c = np.asarray(evaluation.upsample_flow(const, (12, 30)))
  np.testing.assert_allclose(up_c[..., 0], 30 / 7, rtol=1e-6)
  np.testing.assert_allclose(up_c[..., 1], -2 * 12 / 5, rtol=1e-6)


@PRECISIONS
def test_transfer_keypoints_matches_reference(ref, x64):
  flow, trg, _, valid = _inputs(ref, x64)
  with jax.enable_x64(x64):
    est = jax.jit(evaluation.transfer_keypoints, static_argnums=2)(flow, trg, 256)
    assert est.dtype == flow.dtype
  want = ref["est_kps"].transpose(0, 2, 1)
  np.testing.assert_allclose(np.asarray(est)[valid], want[valid], atol=ATOL_PX, rtol=0)


@PRECISIONS
@pytest.mark.parametrize("img_size", [256, (96, 128)], ids=["256", "96x128"])
def test_transfer_keypoints_samples_the_full_upsampled_map(x64, img_size):
  img_h, img_w = geometry.as_hw(img_size)
  dt = np.float64 if x64 else np.float32
  rng = np.random.default_rng(1)
  flow = rng.normal(scale=5.0, size=(3, 16, 12, 2)).astype(dt)
  kps = rng.uniform(-3, [img_w + 3, img_h + 3], size=(3, 40, 2)).astype(dt)
  kps[0, :4] = [[-0.7, 0.3], [img_w - 0.2, img_h + 0.9], [0.0, img_h - 1], [img_w - 1, 5.999]]
  with jax.enable_x64(x64):
    est = np.asarray(evaluation.transfer_keypoints(flow, kps, img_size))
    up = np.asarray(evaluation.upsample_flow(flow, img_size))
  # The specification, on the materialised map: truncate toward zero, then clamp.
  kp = np.clip(np.trunc(kps), 0, [img_w - 1, img_h - 1]).astype(np.int64)
  want = kp + up[np.arange(3)[:, None], kp[..., 1], kp[..., 0]]
  # Same taps and operation order; XLA may fuse differently (an ulp of the pixel coordinate).
  np.testing.assert_allclose(est, want, rtol=1e-12 if x64 else 1e-6, atol=1e-12 if x64 else 1e-6)


def test_transfer_keypoints_tolerates_garbage_in_padding(ref):
  flow, trg, _, valid = _inputs(ref, False)
  base = np.asarray(evaluation.transfer_keypoints(flow, trg))
  junk = trg.copy()
  junk[~valid] = np.array([np.nan, 1e9], np.float32)
  got = np.asarray(evaluation.transfer_keypoints(flow, junk))
  np.testing.assert_array_equal(got[valid], base[valid])


@PRECISIONS
def test_pck_matches_reference(ref, x64):
  flow, trg, src, valid = _inputs(ref, x64)
  with jax.enable_x64(x64):
    est = evaluation.transfer_keypoints(flow, trg, 256)
    for i, alpha in enumerate(ref["alphas"]):
      correct = jax.jit(evaluation.pck_correct)(est, src, valid, ref["pckthres"], alpha)
      np.testing.assert_array_equal(np.asarray(correct), ref["correct"][i])
      pck = np.asarray(evaluation.pck(est, src, valid, ref["pckthres"], float(alpha)))
      np.testing.assert_allclose(pck, ref["pck"][i], rtol=1e-12 if x64 else 1e-6, atol=0)
      np.testing.assert_array_equal(np.round(pck * ref["n_pts"] / 100), ref["correct"][i].sum(-1))


def test_pck_ignores_padding(ref):
  flow, trg, src, valid = _inputs(ref, False)
  est = np.asarray(evaluation.transfer_keypoints(flow, trg))
  base = np.asarray(evaluation.pck(est, src, valid, ref["pckthres"], 0.1))
  rng = np.random.default_rng(2)
  for fill in (src, np.nan, 0.0):  # padded predictions equal to the truth, NaN, or 0
    est2, src2 = est.copy(), src.copy()
    est2[~valid] = fill[~valid] if isinstance(fill, np.ndarray) else fill
    src2[~valid] = rng.normal(size=src2[~valid].shape)
    got = np.asarray(evaluation.pck(est2, src2, valid, ref["pckthres"], 0.1))
    np.testing.assert_array_equal(got, base)
    correct = np.asarray(evaluation.pck_correct(est2, src2, valid, ref["pckthres"], 0.1))
    assert not correct[~valid].any()


def test_pck_threshold_is_inclusive_and_formed_in_float32():
  src = np.zeros((1, 3, 2), np.float32)
  # Distances 2, 6 and just above 6; threshold 40 * alpha 0.05 / 0.15 -> exactly 2 / 6 in f32.
  est = np.array([[[2.0, 0.0], [0.0, 6.0], [0.0, np.nextafter(np.float32(6), 7)]]], np.float32)
  valid = np.ones((1, 3), bool)
  thr = np.array([40.0], np.float32)
  np.testing.assert_array_equal(
      np.asarray(evaluation.pck_correct(est, src, valid, thr, 0.05)), [[True, False, False]]
  )
  np.testing.assert_array_equal(
      np.asarray(evaluation.pck_correct(est, src, valid, thr, 0.15)), [[True, True, False]]
  )
  with jax.enable_x64(True):
    got = evaluation.pck_correct(est.astype(np.float64), src.astype(np.float64), valid, thr, 0.15)
    np.testing.assert_array_equal(np.asarray(got), [[True, True, False]])
    # 256 * 0.1 is 25.6 in float64 but 25.600000381... in float32: a float64 distance between
    # the two counts as correct, as in the reference's float32 threshold.
    d = 25.6000002
    got = evaluation.pck_correct(
        np.array([[[d, 0.0]]]), np.zeros((1, 1, 2)), valid[:, :1], np.array([256.0]), 0.1
    )
    np.testing.assert_array_equal(np.asarray(got), [[True]])


def test_pck_without_valid_keypoints_is_nan():
  kps = jnp.zeros((2, 4, 2))
  valid = np.array([[False] * 4, [True, False, False, False]])
  got = np.asarray(evaluation.pck(kps, kps, valid, jnp.array([10.0, 10.0]), 0.1))
  assert np.isnan(got[0]) and got[1] == 100.0
