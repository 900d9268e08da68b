"""keypoints -> flow against the reference's `KeypointToFlow` (keypoint_to_flow.npz)."""

import numpy as np
import pytest

from sccorr_jax import geometry


@pytest.mark.parametrize("setting", ["fs64_rfs11", "fs16_rfs35"])
def test_keypoints_to_flow_matches_reference(fixtures_dir, setting):
  fx = np.load(fixtures_dir / "keypoint_to_flow.npz")
  g = lambda k: fx[f"{setting}/{k}"]
  fs, rfs, img = int(g("feat_size")), int(g("receptive_field_size")), int(g("img_size"))
  for i, label in enumerate(g("case_labels")):
    n = int(g("n_pts")[i])
    valid = np.arange(40) < n
    flow = geometry.keypoints_to_flow(g("src_kps")[i].T, g("trg_kps")[i].T, valid, fs, rfs, img)
    flow = np.asarray(flow)
    assert flow.dtype == np.float32
    ref = g("flow")[i].transpose(1, 2, 0)
    # The set of labelled cells must match exactly; values to float32 summation order.
    np.testing.assert_array_equal(
        geometry.unlabelled_mask(flow), geometry.unlabelled_mask(ref), err_msg=label
    )
    np.testing.assert_allclose(flow, ref, atol=1e-5, rtol=0, err_msg=label)


def test_padding_is_ignored():
  rng = np.random.default_rng(0)
  src = rng.uniform(0, 255, (40, 2)).astype(np.float32)
  trg = rng.uniform(0, 255, (40, 2)).astype(np.float32)
  valid = np.arange(40) < 7
  base = np.asarray(geometry.keypoints_to_flow(src, trg, valid, 64, 11))
  src2, trg2 = src.copy(), trg.copy()
  src2[7:], trg2[7:] = -1.0, 100.0  # whatever sits in the padding must not matter
  other = np.asarray(geometry.keypoints_to_flow(src2, trg2, valid, 64, 11))
  np.testing.assert_array_equal(base, other)


def test_keypoint_flow_round_trip():
  """A keypoint's cell carries flow that maps the target keypoint onto its source keypoint."""
  src = np.array([[40.0, 60.0], [200.0, 30.0]], np.float32)
  trg = np.array([[100.0, 120.0], [20.0, 220.0]], np.float32)
  flow = np.asarray(geometry.keypoints_to_flow(src, trg, np.array([True, True]), 64, 11))
  for s, t in zip(src, trg):
    cx, cy = int(t[0]) // 4, int(t[1]) // 4
    np.testing.assert_allclose(t / 4 + flow[cy, cx], s / 4, atol=1e-5)


def test_linear_taps_are_torch_align_corners_false():
  # 4 cells read by 16 pixels: pixel p reads cell (p + 0.5) / 4 - 0.5, clamped below at 0.
  i0, i1, w0, w1 = geometry.linear_taps(np.arange(16), 4, 16)
  coord = np.maximum((np.arange(16) + 0.5) / 4 - 0.5, 0)
  np.testing.assert_array_equal(i0, np.minimum(np.floor(coord), 3))
  np.testing.assert_allclose(w0 * i0 + w1 * i1, np.minimum(coord, 3), atol=1e-12)
  np.testing.assert_allclose(w0 + w1, 1.0)
  # Beyond the last cell both taps are the last cell (as torch's upsample_bilinear2d).
  assert i0[-1] == i1[-1] == 3
  # Continuous points (matching) use the same rule.
  i0, i1, w0, w1 = geometry.linear_taps(np.array([-3.0, 5.5, 100.0]), 4, 16)
  np.testing.assert_array_equal(i0, [0, 1, 3])
  np.testing.assert_allclose(w1[:2], [0.0, 0.0])
