"""Keypoint transfer and PCK (the evaluation protocol of SCorrSAN, Huang et al., ECCV 2022, Sec. 4).

The metric core follows the reference's `utils.flow2kps` and `Evaluator.eval_kps_transfer` /
`classify_prd` (specified by `pck.npz`):

1. The predicted flow (target grid -> source, grid cells) is resized to the image with
   *align_corners=False* bilinear interpolation (half-pixel centres, no antialiasing) and scaled
   from grid cells to pixels.
2. Each target keypoint is truncated toward zero, clamped to the image and moved by the resized
   flow at that pixel.
3. A transferred keypoint is correct iff its distance to the ground-truth source keypoint is at
   most `threshold * alpha` (inclusive); PCK is the percentage of correct keypoints per pair.

`transfer_keypoints` samples the resized flow only at the keypoints (the same arithmetic as
`upsample_flow`, without materialising the full map). Padded keypoint slots are masked with the
explicit `valid` mask, never recognised by value.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sccorr_jax import geometry


def _cells_to_pixels(flow_dtype, h: int, w: int, img_h: int, img_w: int):
  """[2] scale of (x, y) flow components from grid cells to image pixels."""
  return jnp.asarray(np.array([img_w / w, img_h / h]), flow_dtype)


def upsample_flow(flow, size: geometry.SizeLike):
  """Bilinear resize of a flow map to the image, in pixels (reference `flow2kps`, step 1).

  Interpolation is *align_corners=False*: output pixel `i` reads input coordinate
  `max((i + 0.5) * h / img_h - 0.5, 0)` (half-pixel centres, clamped below at 0, the last input
  sample repeated above); no antialiasing (unlike `jax.image.resize`). The x component is then
  scaled by `img_w / w` and the y component by `img_h / h` (grid cells -> pixels).

  Args:
    flow: [b, h, w, 2] float, (x, y) displacement target -> source in grid cells.
    size: image size, int or `(img_h, img_w)`.

  Returns:
    [b, img_h, img_w, 2] flow dtype, (x, y) displacement target -> source in image pixels.
  """
  img_h, img_w = geometry.as_hw(size)
  _, h, w, _ = flow.shape
  y0, y1, wy0, wy1 = geometry.linear_taps(np.arange(img_h), h, img_h)
  x0, x1, wx0, wx1 = geometry.linear_taps(np.arange(img_w), w, img_w)
  dt = flow.dtype
  wx0, wx1 = (jnp.asarray(v, dt)[:, None] for v in (wx0, wx1))
  wy0, wy1 = (jnp.asarray(v, dt)[:, None, None] for v in (wy0, wy1))
  # Along x first, then y: `wy0 * (wx0 * a + wx1 * b) + wy1 * (wx0 * c + wx1 * d)`, the
  # reference's order (`transfer_keypoints` repeats it exactly).
  along_x = flow[:, :, x0] * wx0 + flow[:, :, x1] * wx1  # [b, h, img_w, 2]
  up = along_x[:, y0] * wy0 + along_x[:, y1] * wy1  # [b, img_h, img_w, 2]
  return up * _cells_to_pixels(dt, h, w, img_h, img_w)


def transfer_keypoints(flow, trg_kps, img_size: geometry.SizeLike = 256):
  """Moves target keypoints to the source image with a predicted flow (reference `flow2kps`).

  `kp = clamp(trunc(trg_kps), 0, size - 1)` (truncation toward zero, then clamping, per axis),
  `est = kp + upsample_flow(flow, img_size)[kp_y, kp_x]`. The resized flow is only evaluated at
  the keypoints, with the same taps and arithmetic as `upsample_flow`.

  Args:
    flow: [b, h, w, 2] float, (x, y) displacement target -> source in grid cells.
    trg_kps: [b, n, 2] float, (x, y) target keypoints in pixels of the `img_size` image.
    img_size: int or `(img_h, img_w)`, the image the keypoints live in (256 in the reference).

  Returns:
    [b, n, 2] float (dtype of flow and keypoints promoted), estimated (x, y) source keypoints in
    pixels. Values at padded slots are unspecified (finite or not); mask them with `valid`.
  """
  img_h, img_w = geometry.as_hw(img_size)
  b, h, w, _ = flow.shape
  dt = jnp.result_type(flow.dtype, trg_kps.dtype)
  hi = jnp.asarray([img_w - 1, img_h - 1], dt)
  kp = jnp.clip(jnp.trunc(trg_kps.astype(dt)), 0, hi)  # [b, n, 2], integral values
  # Clip again after the cast so that NaN/garbage in padded slots still indexes in range.
  kp_x = jnp.clip(kp[..., 0].astype(jnp.int32), 0, img_w - 1)
  kp_y = jnp.clip(kp[..., 1].astype(jnp.int32), 0, img_h - 1)

  taps_y = [
      jnp.asarray(v)[kp_y] for v in geometry.linear_taps(np.arange(img_h), h, img_h)
  ]  # each [b, n]
  taps_x = [jnp.asarray(v)[kp_x] for v in geometry.linear_taps(np.arange(img_w), w, img_w)]
  y0, y1, wy0, wy1 = taps_y
  x0, x1, wx0, wx1 = taps_x
  fdt = flow.dtype
  wx0, wx1, wy0, wy1 = (v.astype(fdt)[..., None] for v in (wx0, wx1, wy0, wy1))

  flat = flow.reshape(b, h * w, 2)

  def at(iy, ix):
    return jnp.take_along_axis(flat, (iy * w + ix)[..., None], axis=1)  # [b, n, 2]

  along_x0 = at(y0, x0) * wx0 + at(y0, x1) * wx1
  along_x1 = at(y1, x0) * wx0 + at(y1, x1) * wx1
  disp = (along_x0 * wy0 + along_x1 * wy1) * _cells_to_pixels(fdt, h, w, img_h, img_w)
  return kp + disp.astype(dt)


def pck_correct(pred_kps, src_kps, valid, threshold, alpha):
  """Per-keypoint correctness of transferred keypoints (reference `classify_prd`).

  Args:
    pred_kps: [b, n, 2] float, estimated (x, y) source keypoints, pixels.
    src_kps: [b, n, 2] float, ground-truth (x, y) source keypoints, same pixels.
    valid: [b, n] bool, real keypoint slots.
    threshold: [b] float, per-pair PCK threshold in the same pixels (bbox or image size).
    alpha: float or () array, the PCK alpha.

  Returns:
    [b, n] bool, True iff the slot is valid and `||pred - src||_2 <= threshold * alpha`
    (inclusive), with `threshold * alpha` formed in float32 as in the reference. Padded slots
    are False whatever their values.
  """
  dist = jnp.sqrt(jnp.sum(jnp.square(pred_kps - src_kps), axis=-1))  # [b, n]
  bound = jnp.asarray(threshold, jnp.float32) * jnp.asarray(alpha, jnp.float32)
  return (dist <= bound.astype(dist.dtype)[:, None]) & jnp.asarray(valid, bool)


def pck(pred_kps, src_kps, valid, threshold, alpha):
  """Per-pair PCK in percent (the reference's per-image value, averaged by its validation).

  Args:
    pred_kps, src_kps, valid, threshold, alpha: as in `pck_correct`.

  Returns:
    [b] float (dtype of the distances), `100 * #correct / #valid` per pair; NaN for a pair
    without any valid keypoint.
  """
  correct = pck_correct(pred_kps, src_kps, valid, threshold, alpha)
  n_valid = jnp.sum(jnp.asarray(valid, bool), axis=-1)
  dt = jnp.result_type(pred_kps.dtype, src_kps.dtype, jnp.float32)
  n_correct = jnp.sum(correct, axis=-1).astype(dt)
  return jnp.where(n_valid > 0, 100 * n_correct / jnp.maximum(n_valid, 1).astype(dt), jnp.nan)
