"""Pictures: side-by-side matches, warped source, and the training-signal panels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from conftest import load_tool
from sccorr_jax import config_lib
from sccorr_jax import visualize
from sccorr_jax.data import transforms
from sccorr_jax.models import SCorrSAN


def test_draw_matches_layout_and_lines():
  rng = np.random.default_rng(0)
  src = np.full((30, 60, 3), 100, np.uint8)
  trg = np.full((40, 20, 3), 100, np.uint8)
  height, ws, wt, total = visualize.side_by_side_layout((30, 60), (40, 20))
  assert (height, ws, wt, total) == (40, 80, 20, 80 + visualize.GAP + 20)
  pic = visualize.draw_matches(
      src,
      trg,
      np.array([[10.0, 10.0]]),
      np.array([[5.0, 30.0]]),
      confidence=np.array([0.7]),
      gt_src_kps=np.array([[12.0, 11.0]]),
  )
  assert pic.shape == (40, total, 3) and pic.dtype == np.uint8
  # Something was drawn in the gap between the images (the line crosses it).
  gap = pic[:, ws : ws + visualize.GAP]
  assert (gap != 255).any()
  del rng


def test_warp_source_identity_and_shift():
  rng = np.random.default_rng(1)
  src = rng.integers(0, 256, (12, 16, 3), np.uint8)
  np.testing.assert_array_equal(visualize.warp_source(src, np.zeros((12, 16, 2))), src)
  shift = np.zeros((10, 8, 2))
  shift[..., 0] = 3  # target (x, y) <- source (x + 3, y + 1)
  shift[..., 1] = 1
  out = visualize.warp_source(src, shift)
  assert out.shape == (10, 8, 3)
  np.testing.assert_array_equal(out, src[1:11, 3:11])


def test_training_signals_panels():
  tool = load_tool("visualize_training")
  model = SCorrSAN(
      stage_sizes=(1, 1, 1, 1), backbone_width=8, sce_kernel_size=3, sce_features=16, feature_size=8
  )
  x = jnp.zeros((1, 64, 64, 3))
  va = model.init(jax.random.PRNGKey(0), x, x)
  vb = model.init(jax.random.PRNGKey(1), x, x)
  rng = np.random.default_rng(2)
  b, n = 2, 40
  src_kps = np.zeros((b, n, 2), np.float32)
  trg_kps = np.zeros((b, n, 2), np.float32)
  valid = np.zeros((b, n), bool)
  src_kps[:, :5] = rng.uniform(4, 60, (b, 5, 2))
  trg_kps[:, :5] = rng.uniform(4, 60, (b, 5, 2))
  valid[:, :5] = True
  flow = np.stack(
      [
          transforms.keypoints_to_flow_np(src_kps[i], trg_kps[i], valid[i], 8, 11, 64)
          for i in range(b)
      ]
  )
  batch = dict(
      src_img=rng.normal(size=(b, 64, 64, 3)).astype(np.float32),
      trg_img=rng.normal(size=(b, 64, 64, 3)).astype(np.float32),
      src_kps=src_kps,
      trg_kps=trg_kps,
      kps_valid=valid,
      flow=flow,
      pair_valid=np.array([True, True]),
  )
  config = config_lib.tiny_config("mt")
  config.teacher.dilation_kernel = 3
  config.teacher.remember_rate_start, config.teacher.remember_rate_end = 0.5, 0.5
  sig = tool.compute_signals(config, model, va, vb, batch)
  labelled = (flow != 0).any(-1)
  assert (sig["dilated"] | ~labelled).all()  # labels lie in the dilated mask
  assert not sig["dilated"].all()
  assert (sig["dilated"] | ~sig["kept"]).all()  # kept pseudo-labels are candidates
  assert sig["kept"].sum() == sig["num_remember"] == max(1, int(0.5 * sig["dilated"].sum()))
  # The kept ones are those with the smallest disagreement.
  cand = sig["pseudo_epe"][sig["dilated"]]
  assert sig["pseudo_epe"][sig["kept"]].max() <= np.sort(cand)[sig["num_remember"] - 1] + 1e-6
  # The run's settings are followed: no mask (kernel 0) makes every position a candidate, and
  # without the small-loss selection every candidate is kept.
  config.teacher.dilation_kernel = 0
  config.teacher.small_loss_selection = False
  sig = tool.compute_signals(config, model, va, vb, batch)
  assert sig["dilated"].all() and sig["kept"].all() and sig["remember_rate"] == 1.0
  pic = tool.render(batch, sig, scale=2)
  height, _, _, total = visualize.side_by_side_layout((128, 128), (128, 128), 128)
  assert pic.shape == (16 + 2 * 128 + visualize.GAP, total + 2 * (visualize.GAP + 128), 3)
  Image.fromarray(pic)  # a valid image
