"""Pictures of correspondences: matches side by side, a warped source, and the training signals
of the teacher-student loop (sparse labels, dilated mask, pseudo-labels kept by small-loss
selection). PIL only (no plotting library).

Conventions: images are [h, w, 3] uint8 RGB (`to_uint8` undoes the ImageNet normalisation of a
batch image); points are (x, y) pixels of their image, pixel centres at integers; flows map
*target* pixels to the *source* (README "A note on coordinates and direction").
"""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import ImageDraw
import scipy.ndimage

from sccorr_jax import evaluation
from sccorr_jax import geometry
from sccorr_jax import images

GAP = 8  # pixels between side-by-side images


to_uint8 = images.to_uint8


def palette(n: int) -> list:
  """n distinct bright RGB colours (golden-ratio hues)."""
  return [
      tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.13 + i * 0.618034) % 1.0, 0.85, 1.0))
      for i in range(n)
  ]


def _resize(img: np.ndarray, height: int) -> Tuple[np.ndarray, float, float]:
  h, w = img.shape[:2]
  new_w = max(1, int(round(w * height / h)))
  if (h, w) == (height, new_w):
    return img, 1.0, 1.0
  out = np.asarray(Image.fromarray(img).resize((new_w, height), Image.BILINEAR))
  return out, new_w / w, height / h


def side_by_side_layout(
    src_hw: Tuple[int, int],
    trg_hw: Tuple[int, int],
    height: Optional[int] = None,
    max_height: int = 768,
):
  """Geometry of `draw_matches`' picture.

  Returns:
    `(height, src_width, trg_width, total_width)`: both images are scaled to `height` (default
    `min(max(hs, ht), max_height)`), keeping their aspect, source left, target right, `GAP`
    pixels apart.
  """
  height = int(height or min(max(src_hw[0], trg_hw[0]), max_height))
  ws = max(1, int(round(src_hw[1] * height / src_hw[0])))
  wt = max(1, int(round(trg_hw[1] * height / trg_hw[0])))
  return height, ws, wt, ws + GAP + wt


def _dot(draw, xy, r, fill=None, outline=None, width=1):
  x, y = xy
  draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=outline, width=width)


def draw_matches(
    src_img: np.ndarray,
    trg_img: np.ndarray,
    src_kps: np.ndarray,
    trg_kps: np.ndarray,
    *,
    confidence: Optional[np.ndarray] = None,
    gt_src_kps: Optional[np.ndarray] = None,
    height: Optional[int] = None,
    max_height: int = 768,
    line_width: int = 2,
) -> np.ndarray:
  """The source (left) and the target (right) with matched keypoints joined by lines.

  Args:
    src_img: [Hs, Ws, 3] uint8.
    trg_img: [Ht, Wt, 3] uint8.
    src_kps: [n, 2] (x, y) predicted source points, source pixels.
    trg_kps: [n, 2] (x, y) target points they match, target pixels.
    confidence: [n] in [0, 1]; low-confidence lines are drawn thinner and dimmer.
    gt_src_kps: [n, 2] ground-truth source points, drawn as rings (with a thin line from the
      prediction), or None.
    height, max_height: picture height (see `side_by_side_layout`).
    line_width: width of the match lines, pixels.

  Returns:
    [height, total_width, 3] uint8.
  """
  height, ws, wt, total = side_by_side_layout(
      src_img.shape[:2], trg_img.shape[:2], height, max_height
  )
  src_r, sxs, sys_ = _resize(src_img, height)
  trg_r, txs, tys = _resize(trg_img, height)
  canvas = Image.new("RGB", (total, height), (255, 255, 255))
  canvas.paste(Image.fromarray(src_r), (0, 0))
  canvas.paste(Image.fromarray(trg_r), (ws + GAP, 0))
  draw = ImageDraw.Draw(canvas, "RGBA")
  src_kps = np.asarray(src_kps, np.float64).reshape(-1, 2)
  trg_kps = np.asarray(trg_kps, np.float64).reshape(-1, 2)
  n = len(src_kps)
  colors = palette(n)
  r = max(2, height // 120)
  for i in range(n):
    ps = (src_kps[i, 0] * sxs, src_kps[i, 1] * sys_)
    pt = (trg_kps[i, 0] * txs + ws + GAP, trg_kps[i, 1] * tys)
    c = 1.0 if confidence is None else float(np.clip(confidence[i], 0, 1))
    alpha = int(90 + 165 * c)
    width = max(1, int(round(line_width * (0.5 + c))))
    draw.line([ps, pt], fill=colors[i] + (alpha,), width=width)
    _dot(draw, ps, r, fill=colors[i] + (255,), outline=(0, 0, 0, 255))
    _dot(draw, pt, r, fill=colors[i] + (255,), outline=(0, 0, 0, 255))
    if gt_src_kps is not None:
      pg = (gt_src_kps[i, 0] * sxs, gt_src_kps[i, 1] * sys_)
      draw.line([ps, pg], fill=(255, 255, 255, 200), width=1)
      _dot(draw, pg, r + 2, outline=colors[i] + (255,), width=2)
  return np.asarray(canvas)


def warp_source(src_img: np.ndarray, flow: np.ndarray, fill: int = 0) -> np.ndarray:
  """The source warped into the target's frame: `out[y, x] = src[(x, y) + flow[y, x]]`.

  Args:
    src_img: [Hs, Ws, 3] uint8.
    flow: [Ht, Wt, 2] (x, y) displacement of every target pixel to its source match, source
      pixels (`Prediction.flow`).
    fill: value where the match falls outside the source.

  Returns:
    [Ht, Wt, 3] uint8 (bilinear sampling).
  """
  ht, wt, _ = flow.shape
  ys, xs = np.meshgrid(
      np.arange(ht, dtype=np.float64), np.arange(wt, dtype=np.float64), indexing="ij"
  )
  coords = [ys + flow[..., 1], xs + flow[..., 0]]
  out = np.stack(
      [
          scipy.ndimage.map_coordinates(
              src_img[..., ch].astype(np.float64), coords, order=1, mode="constant", cval=fill
          )
          for ch in range(3)
      ],
      -1,
  )
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blend(a: np.ndarray, b: np.ndarray, t: float = 0.5) -> np.ndarray:
  """`(1 - t) * a + t * b` of two uint8 images of one shape."""
  return np.clip(np.rint((1 - t) * a.astype(np.float32) + t * b.astype(np.float32)), 0, 255).astype(
      np.uint8
  )


def hstack(images: Sequence[np.ndarray], gap: int = GAP) -> np.ndarray:
  """Images of one height side by side on white."""
  h = max(i.shape[0] for i in images)
  w = sum(i.shape[1] for i in images) + gap * (len(images) - 1)
  out = np.full((h, w, 3), 255, np.uint8)
  x = 0
  for img in images:
    out[: img.shape[0], x : x + img.shape[1]] = img
    x += img.shape[1] + gap
  return out


def vstack(images: Sequence[np.ndarray], gap: int = GAP) -> np.ndarray:
  """Images stacked vertically on white (left aligned): `hstack` of the transposed images."""
  side_by_side = hstack([np.swapaxes(img, 0, 1) for img in images], gap)
  return np.ascontiguousarray(np.swapaxes(side_by_side, 0, 1))


def draw_training_signals(
    src_img: np.ndarray,
    trg_img: np.ndarray,
    pred_flow: np.ndarray,
    peer_flow: np.ndarray,
    gt_flow: np.ndarray,
    dilated: np.ndarray,
    kept: np.ndarray,
    src_kps: np.ndarray,
    trg_kps: np.ndarray,
    kps_valid: np.ndarray,
    scale: int = 2,
) -> np.ndarray:
  """One pair's training signals as a row of three panels.

  1. Source | target with the predicted matches of the labelled target keypoints (lines) and
     the ground-truth source keypoints (rings).
  2. The target with the flow grid's cells: sparse labels (yellow squares), the dilated mask
     (blue tint), candidate cells kept by small-loss selection (green dots) and dropped (red
     dots).
  3. The source with where the kept pseudo-labels (the peer's flow at the kept cells) point.

  Args:
    src_img, trg_img: [S, S, 3] uint8 network inputs.
    pred_flow: [F, F, 2] this network's flow (target -> source, cells).
    peer_flow: [F, F, 2] the peer's flow, i.e. the pseudo-label.
    gt_flow: [F, F, 2] sparse label ((0, 0) = unlabelled).
    dilated: [F, F] bool dilated label mask (pseudo-label candidates).
    kept: [F, F] bool candidates kept by the small-loss selection.
    src_kps, trg_kps: [n, 2] ground-truth keypoints, pixels of the S image.
    kps_valid: [n] bool.
    scale: panels are drawn at `scale` times the input size.

  Returns:
    [scale * S, width, 3] uint8.
  """
  s = src_img.shape[0]
  f = gt_flow.shape[0]
  cell = s / f
  valid = np.asarray(kps_valid, bool)
  trg_v = np.asarray(trg_kps)[valid]
  src_v = np.asarray(src_kps)[valid]
  est = np.asarray(
      evaluation.transfer_keypoints(
          pred_flow[None].astype(np.float32), trg_v[None].astype(np.float32), s
      )
  )[0]
  big = s * scale
  matches = draw_matches(src_img, trg_img, est, trg_v, gt_src_kps=src_v, height=big)

  trg_big = np.asarray(Image.fromarray(trg_img).resize((big, big), Image.BILINEAR))
  tint = np.zeros_like(trg_big)
  tint[..., 2] = 255
  mask_big = np.kron(
      np.asarray(dilated, np.uint8), np.ones((int(cell * scale),) * 2, np.uint8)
  ).astype(bool)
  mask_big = np.pad(mask_big, ((0, big - mask_big.shape[0]), (0, big - mask_big.shape[1])))
  panel = trg_big.copy()
  panel[mask_big] = blend(trg_big[mask_big], tint[mask_big], 0.35)
  im = Image.fromarray(panel)
  draw = ImageDraw.Draw(im, "RGBA")
  labelled = ~np.asarray(geometry.unlabelled_mask(np.asarray(gt_flow)))
  k = cell * scale

  def centre(iy, ix):
    return ((ix + 0.5) * k - 0.5, (iy + 0.5) * k - 0.5)

  for iy, ix in zip(*np.nonzero(np.asarray(dilated) & ~np.asarray(kept))):
    _dot(draw, centre(iy, ix), max(1, k / 6), fill=(230, 40, 40, 200))
  for iy, ix in zip(*np.nonzero(kept)):
    _dot(draw, centre(iy, ix), max(1, k / 5), fill=(40, 220, 40, 230))
  for iy, ix in zip(*np.nonzero(labelled)):
    x, y = centre(iy, ix)
    draw.rectangle(
        [x - k / 2, y - k / 2, x + k / 2, y + k / 2],
        outline=(255, 220, 0, 255),
        width=max(1, scale),
    )
  masks = np.asarray(im)

  src_big = np.asarray(Image.fromarray(src_img).resize((big, big), Image.BILINEAR))
  im = Image.fromarray(src_big)
  draw = ImageDraw.Draw(im, "RGBA")
  for iy, ix in zip(*np.nonzero(kept)):
    sx, sy = ix + peer_flow[iy, ix, 0], iy + peer_flow[iy, ix, 1]
    _dot(draw, centre(sy, sx), max(1, k / 5), fill=(40, 220, 40, 200))
  for p in src_v:
    _dot(draw, (p[0] * scale, p[1] * scale), 2 * scale, outline=(255, 220, 0, 255), width=scale)
  pseudo = np.asarray(im)
  return hstack([matches, masks, pseudo])


def save_png(path: str, img: np.ndarray):
  """Writes an [h, w, 3] uint8 array as PNG."""
  Image.fromarray(np.asarray(img, np.uint8)).save(path, format="PNG")
