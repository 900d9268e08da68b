"""Matching one's own images: coordinate mapping, confidence, image modes and bad input."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from sccorr_jax import evaluation
from sccorr_jax import predict
from sccorr_jax.models import SCorrSAN
from sccorr_jax.models import flow as flow_lib


class _ConstantFlow(nn.Module):
  """Stand-in network: a constant flow of `shift` cells on an 8x8 grid, a given correlation."""

  shift: tuple = (1.0, -0.5)
  peak: bool = True
  feature_size: int = 8
  beta: float = 0.02

  @nn.compact
  def __call__(self, src_img, trg_img, train=False, return_aux=False):
    b = src_img.shape[0]
    w = self.param("w", nn.initializers.zeros, ())
    flow = jnp.broadcast_to(jnp.asarray(self.shift, jnp.float32), (b, 8, 8, 2)) + w
    corr = jnp.zeros((b, 4, 4, 4, 4)) + w
    if self.peak:  # every target cell matches source cell (y=1, x=2) of the 4x4 grid
      corr = corr.at[:, 1, 2].set(1.0)
    return (flow, {"corr": corr}) if return_aux else flow


def _predictor(**kw):
  model = _ConstantFlow(**kw)
  x = jnp.zeros((1, 64, 64, 3))
  return predict.Predictor(model, model.init(jax.random.PRNGKey(0), x, x), img_size=64)


def test_results_are_mapped_back_to_original_pixels_per_axis():
  p = _predictor()
  rng = np.random.default_rng(0)
  src = rng.integers(0, 256, (50, 70, 3), np.uint8)  # h, w
  trg = rng.integers(0, 256, (40, 90, 3), np.uint8)
  kps = np.array([[0.0, 0.0], [89.0, 39.0], [45.3, 20.7]])
  out = p.predict(src, trg, trg_kps=kps)
  assert out.flow.shape == (40, 90, 2) and out.flow.dtype == np.float32
  assert out.flow_grid.shape == (8, 8, 2)
  # A constant flow of (1, -0.5) cells = (8, -4) pixels of the 64 input; target pixel x maps to
  # input x * 64 / 90, source input -> original by 70 / 64 (x) and 50 / 64 (y).
  want = (kps * [64 / 90, 64 / 40] + [8.0, -4.0]) * [70 / 64, 50 / 64]
  np.testing.assert_allclose(out.src_kps, want, atol=1e-9)
  ys, xs = np.mgrid[:40, :90]
  grid = np.stack([xs, ys], -1)
  dense = (grid * [64 / 90, 64 / 40] + [8.0, -4.0]) * [70 / 64, 50 / 64] - grid
  np.testing.assert_allclose(out.flow, dense, atol=1e-4)
  # The dense flow and the keypoints agree at integer keypoints.
  np.testing.assert_allclose(out.src_kps[:2], kps[:2] + out.flow[[0, 39], [0, 89]], atol=1e-4)
  rec = out.to_json()
  assert len(rec["matches"]) == 3 and rec["trg_size_hw"] == [40, 90]


def test_sample_flow_equals_the_evaluator_at_integer_pixels():
  rng = np.random.default_rng(1)
  flow = rng.normal(size=(8, 6, 2)).astype(np.float32)
  pts = np.array([[0, 0], [63, 47], [17, 3], [40, 30]], np.float64)
  got = predict.sample_flow(flow, pts, (48, 64))
  up = np.asarray(evaluation.upsample_flow(flow[None], (48, 64)))[0]
  np.testing.assert_allclose(got, up[pts[:, 1].astype(int), pts[:, 0].astype(int)], atol=1e-5)


def test_confidence_peaked_and_flat():
  kps = np.array([[5.0, 5.0], [60.0, 10.0]])
  img = np.zeros((64, 64, 3), np.uint8)
  # A zero flow both ways is consistent: the confidence is the mass.
  peaked = _predictor(shift=(0.0, 0.0)).predict(img, img, trg_kps=kps)
  np.testing.assert_allclose(peaked.consistency, 1.0)
  assert (peaked.confidence > 0.99).all()
  flat = _predictor(shift=(0.0, 0.0), peak=False).predict(img, img, trg_kps=kps)
  # Uniform over 8x8 cells, expected position (3.5, 3.5): 12 cells lie within radius 2.
  np.testing.assert_allclose(flat.mass, 12 / 64, rtol=1e-5)
  np.testing.assert_allclose(flat.confidence, 12 / 64, rtol=1e-5)


def test_consistency_of_a_flow_that_does_not_come_back():
  # The stand-in moves every point by (1, -0.5) cells = (8, -4) input pixels in BOTH directions,
  # so the round trip misses by (16, -8) pixels of the 64-pixel input.
  kps = np.array([[20.0, 30.0], [40.0, 25.0]])
  img = np.zeros((64, 64, 3), np.uint8)
  out = _predictor(shift=(1.0, -0.5)).predict(img, img, trg_kps=kps)
  miss = np.hypot(16, 8) / 64
  np.testing.assert_allclose(out.consistency, np.exp(-0.5 * (miss / 0.05) ** 2), rtol=1e-5)
  np.testing.assert_allclose(out.confidence, out.mass * out.consistency, rtol=1e-6)
  # A smaller shift misses less: the consistency orders round trips by their miss.
  near = _predictor(shift=(0.1, 0.0)).predict(img, img, trg_kps=kps)
  assert (near.consistency > 0.5).all() and (out.consistency < 1e-3).all()
  rec = out.to_json()
  assert rec["matches"][0]["consistency"] == pytest.approx(float(out.consistency[0]))


def test_large_images_are_shrunk_and_the_flow_bounded():
  rng = np.random.default_rng(4)
  src = rng.integers(0, 256, (1500, 2400, 3), np.uint8)
  trg = rng.integers(0, 256, (2000, 3000, 3), np.uint8)
  kps = np.array([[2999.0, 1999.0], [10.0, 20.0]])
  p = _predictor()
  out = p.predict(src, trg, trg_kps=kps, max_side=300)
  assert out.flow.shape == (200, 300, 2) and out.trg_image.shape == (200, 300, 3)
  assert out.src_image.shape == (188, 300, 3)
  assert out.trg_size_hw == (2000, 3000) and out.to_json()["trg_size_hw"] == [2000, 3000]
  # Keypoints stay in original pixels; flow pixel (i, j) is the target point
  # ((j + .5) * 10 - .5, (i + .5) * 10 - .5), and its value maps it as the keypoints are mapped.
  want = (kps * [64 / 3000, 64 / 2000] + [8.0, -4.0]) * [2400 / 64, 1500 / 64]
  np.testing.assert_allclose(out.src_kps, want, atol=1e-6)
  i, j = 57, 123
  point = np.array([(j + 0.5) * 10 - 0.5, (i + 0.5) * 10 - 0.5])
  mapped = (point * [64 / 3000, 64 / 2000] + [8.0, -4.0]) * [2400 / 64, 1500 / 64]
  np.testing.assert_allclose(point + out.flow[i, j], mapped, atol=1e-3)
  full = p.predict(src[:300, :400], trg[:200, :300], max_side=None)
  assert full.flow.shape == (200, 300, 2)


def test_keypoint_confidence_equals_the_full_upsampled_softmax():
  rng = np.random.default_rng(2)
  corr = rng.uniform(0.5, 1.0, size=(1, 3, 5, 4, 3))
  x_c = np.linspace(-1, 1, 12) + rng.normal(scale=0.01, size=12)
  y_c = np.linspace(-1, 1, 12)
  cells = np.array([[[0, 0], [11, 7], [4, 9]]], np.int32)
  with jax.enable_x64(True):
    conf, expected = predict.keypoint_confidence(
        jnp.asarray(corr), jnp.asarray(cells), x_c, y_c, 12, beta=0.02, radius=2.0
    )
    up = np.asarray(flow_lib.upsample_correlation(jnp.asarray(corr), 12))  # [1, 12, 12, 12, 12]
    grid = np.asarray(flow_lib.soft_argmax(jnp.asarray(up), x_c, y_c, 0.02))
  for n, (cx, cy) in enumerate(cells[0]):
    logits = up[0, :, :, cy, cx]
    p = np.exp((logits - logits.max()) / 0.02)
    p /= p.sum()
    ex, ey = (grid[0, cy, cx] + 1) * 11 / 2
    np.testing.assert_allclose(expected[0, n], [ex, ey], atol=1e-9)
    ys, xs = np.mgrid[:12, :12]
    want = p[(xs - ex) ** 2 + (ys - ey) ** 2 <= 4].sum()
    np.testing.assert_allclose(conf[0, n], want, atol=1e-9)


def test_image_modes(tmp_path):
  rgb = np.random.default_rng(3).integers(0, 256, (20, 30, 3), np.uint8)
  grey = rgb[..., 0]
  assert predict.load_image(grey).shape == (20, 30, 3)
  assert predict.load_image(grey[..., None]).shape == (20, 30, 3)
  rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], -1)
  np.testing.assert_array_equal(predict.load_image(rgba), 255)  # transparent -> white
  np.testing.assert_array_equal(predict.load_image(rgb.astype(np.float32) / 255), rgb)
  for mode in ("L", "RGBA", "P", "I;16", "CMYK"):
    path = tmp_path / f"img_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.fromarray(rgb).convert(mode).save(path)
    got = predict.load_image(str(path))
    assert got.shape == (20, 30, 3) and got.dtype == np.uint8, mode


def test_bad_input_messages(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.png"):
    predict.load_image(str(tmp_path / "nope.png"))
  junk = tmp_path / "junk.jpg"
  junk.write_bytes(b"not an image at all")
  with pytest.raises(predict.ImageError, match="junk.jpg: cannot read the image"):
    predict.load_image(str(junk))
  with pytest.raises(predict.ImageError, match="shape"):
    predict.load_image(np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(predict.ImageError, match=r"1x1 pixels .* too small .* at least 16"):
    predict.read_image(np.zeros((1, 1, 3), np.uint8), "tiny.png")
  with pytest.raises(predict.KeypointError, match=r"#1 \(x=95, y=3\)"):
    predict.check_keypoints([[3, 3], [95, 3]], (40, 90))
  with pytest.raises(predict.KeypointError, match="not finite"):
    predict.check_keypoints([[np.nan, 3]], (40, 90))
  kp_file = tmp_path / "kps.json"
  kp_file.write_text('{"points": [[1, 2, 3]]}')
  with pytest.raises(predict.KeypointError, match="kps.json"):
    predict.load_keypoints(str(kp_file))
  kp_file.write_text('{"keypoints": [[1, 2], [3.5, 4]]}')
  np.testing.assert_array_equal(predict.load_keypoints(str(kp_file)), [[1, 2], [3.5, 4]])
  p = _predictor()
  with pytest.raises(predict.KeypointError, match="outside the 64x32"):
    p.predict(np.zeros((16, 16, 3), np.uint8), np.zeros((32, 64, 3), np.uint8), trg_kps=[[70, 3]])
  with pytest.raises(FileNotFoundError, match="no checkpoint there"):
    predict.load_model(str(tmp_path / "missing_run"))


def test_variables_of_another_configuration_are_named():
  small = SCorrSAN(
      stage_sizes=(1, 1, 1, 1), backbone_width=8, sce_kernel_size=3, sce_features=16, feature_size=8
  )
  other = small.clone(sce_kernel_size=5, sce_features=12)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: small.init(jax.random.PRNGKey(0), x, x))
  with pytest.raises(
      predict.CheckpointError,
      match=r"params/sce/conv/kernel has shape \(140, 16\), the model needs " r"\(148, 12\)",
  ):
    predict.check_variables(other, variables, 32, source="ckpt_dir")
  predict.check_variables(small, variables, 32)


def test_tiny_scorrsan_on_photographs():
  skimage_data = pytest.importorskip("skimage.data")
  model = SCorrSAN(
      stage_sizes=(1, 1, 1, 1), backbone_width=8, sce_kernel_size=3, sce_features=16, feature_size=8
  )
  x = jnp.zeros((1, 64, 64, 3))
  p = predict.Predictor(model, model.init(jax.random.PRNGKey(0), x, x), img_size=64)
  src = skimage_data.chelsea()  # 300 x 451 RGB
  trg = skimage_data.camera()  # 512 x 512 grey
  kps = predict.grid_keypoints(trg.shape[:2], 3)
  out = p.predict(src, trg, trg_kps=kps)
  assert out.flow.shape == (512, 512, 2) and np.isfinite(out.flow).all()
  assert out.src_kps.shape == (9, 2) and np.isfinite(out.src_kps).all()
  assert ((out.confidence >= 0) & (out.confidence <= 1 + 1e-6)).all()
  # Matches stay inside the source (the soft-argmax is a convex combination of cells).
  assert (out.src_kps >= -1).all() and (out.src_kps <= [451, 300]).all()
