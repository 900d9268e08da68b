"""Matching a user's own image pair: load a checkpoint once, then images in -> dense flow,
transferred keypoints and a confidence per keypoint.

    from sccorr_jax import predict
    predictor = predict.Predictor.from_checkpoint('runs/spair_mt')   # workdir: its best model
    out = predictor.predict('cat_a.jpg', 'cat_b.jpg', trg_kps=[[120, 80], [200, 150]])
    out.flow        # [hf, wf, 2]: for every target pixel, the displacement to its source match
                    # (hf, wf = the target's size, shrunk to at most 1024 on the longer side)
    out.src_kps     # [n, 2]: where the given target keypoints land in the source image
    out.confidence  # [n] in [0, 1]: peakedness x forward-backward consistency of each match

`from_checkpoint` also loads a serialized model file (`python -m sccorr_jax.export`,
docs/deployment.md): the same network run from its `jax.export` file, without the model code.

Direction (the project's convention, README "A note on coordinates and direction"): the network
predicts, for every *target* pixel, its match in the *source*. Keypoints are therefore given on
the target image and transferred to the source, as in PCK. To carry keypoints of image A into
image B, call `predict(B, A, trg_kps=kps_in_A)`.

Images of any size, aspect ratio and mode (grey, RGBA, palette, 16-bit, EXIF-rotated) are
converted to RGB (transparency composited on white), resized to the model's input
(`img_size` x `img_size`, bilinear with antialiasing, aspect not kept, as the data pipeline) and
ImageNet-normalised. Keypoints are scaled per axis (`x * S / w`, pixel centres at integers, the
reference's convention) and every output is mapped back to the original images' pixels. Images
smaller than `MIN_IMAGE_SIDE` pixels are refused. Images larger than `max_side` (default
`MAX_IMAGE_SIDE`) are shrunk right after decoding (the model sees S x S anyway): the returned
pictures and the dense flow are then at most `max_side` on their longer side (the flow's pixel
(i, j) is the target point `((j + 0.5) * Wt / wf - 0.5, (i + 0.5) * Ht / hf - 0.5)`; its values
are still in original source pixels). Keypoints always use the original pixels.

Confidence of a keypoint (`docs/matching.md` has the measurements): the product of
* `mass`: at the target cell nearest to it, the upsampled correlation's softmax (temperature
  beta, over all source cells; the distribution whose mean is the soft-argmax) is computed for
  that cell only, and the probability mass within `confidence_radius` source cells of its
  expected location is reported (1 = all mass at the match, about `pi r^2 / S^2` for a flat
  distribution): how unambiguous the match is;
* `consistency`: the pair is also matched the other way (source -> target, a second forward
  pass in the same batch); the keypoint's match is carried back with that flow and
  `exp(-e^2 / (2 sigma^2))` of the round trip's miss `e` is reported, `e` as a fraction of the
  image side, `sigma = CONSISTENCY_SIGMA` (0.05, half the PCK@0.1 tolerance): whether the two
  directions agree. A pair of unrelated images gets matches that are peaked but do not agree.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageOps

from sccorr_jax import checkpoint as ckpt_lib
from sccorr_jax import config_lib
from sccorr_jax import export
from sccorr_jax import geometry
from sccorr_jax import images
from sccorr_jax.models import flow as flow_lib

# A keypoint may lie this many pixels beyond the pixel-centre range [0, size - 1] (the same
# tolerance the dataset preparation applies).
KPS_BORDER_TOLERANCE = 1.5
# Images below this side (pixels) are refused: nothing can be matched in them.
MIN_IMAGE_SIDE = 16
# Larger images are shrunk to this longer side right after decoding; the dense flow and the
# pictures of a prediction are at most this size (the network's input is S x S anyway).
MAX_IMAGE_SIDE = 1024
# Scale of the forward-backward miss in the confidence, fraction of the image side.
CONSISTENCY_SIGMA = 0.05

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]


class ImageError(ValueError):
  """An image cannot be read or used; the message names it."""


class KeypointError(ValueError):
  """Keypoints are malformed or outside their image; the message names which."""


# One error for checkpoints, one loader and one shape check: those of `sccorr_jax.checkpoint`.
CheckpointError = ckpt_lib.CheckpointError
load_model = ckpt_lib.load_model
check_variables = ckpt_lib.check_variables


# ------------------------------------------------------------------------------------------------
# Images.


def load_image(image: ImageLike, name: Optional[str] = None) -> np.ndarray:
  """Reads an image as RGB.

  Args:
    image: a file path, a PIL image, or an array: [h, w] grey, [h, w, 1], [h, w, 3] RGB or
      [h, w, 4] RGBA; uint8, uint16 (scaled by 1/257), bool, or float in [0, 1].
    name: how to call the image in error messages (default: its path or 'image').

  Returns:
    [h, w, 3] uint8 RGB. Transparency is composited on white; EXIF rotation applied.

  Raises:
    FileNotFoundError: the path does not exist.
    ImageError: the file cannot be decoded or the array has an unusable shape or dtype.
  """
  name = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "image")
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{name}: no such image file")
    try:
      with open(path, "rb") as f:
        data = f.read()
      with Image.open(io.BytesIO(data)) as im:
        im.load()
        return _pil_to_rgb(im)
    except Image.UnidentifiedImageError as e:
      raise ImageError(
          f"{name}: cannot read the image (not an image format PIL can decode, or "
          f"the file is damaged)"
      ) from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      raise ImageError(f"{name}: cannot read the image ({type(e).__name__}: {e})") from e
  if isinstance(image, Image.Image):
    return _pil_to_rgb(image)
  arr = np.asarray(image)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
    raise ImageError(
        f"{name}: expected an [h, w], [h, w, 1], [h, w, 3] or [h, w, 4] array, "
        f"got shape {arr.shape}"
    )
  if arr.shape[0] < 1 or arr.shape[1] < 1:
    raise ImageError(f"{name}: empty image of shape {arr.shape}")
  if arr.dtype == bool:
    arr = arr.astype(np.uint8) * 255
  elif arr.dtype == np.uint16:
    arr = (arr // 257).astype(np.uint8)
  elif np.issubdtype(arr.dtype, np.floating):
    if not np.isfinite(arr).all():
      raise ImageError(f"{name}: the float image has NaN or inf values")
    arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
  elif arr.dtype != np.uint8:
    raise ImageError(f"{name}: unsupported dtype {arr.dtype} (use uint8, uint16 or float)")
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.shape[-1] == 4:
    alpha = arr[..., 3:4].astype(np.float32) / 255.0
    arr = np.rint(arr[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
  return np.ascontiguousarray(arr)


def read_image(
    image: ImageLike,
    name: Optional[str] = None,
    max_side: Optional[int] = None,
    min_side: int = MIN_IMAGE_SIDE,
) -> Tuple[np.ndarray, Tuple[int, int]]:
  """`load_image`, refusing tiny images and shrinking large ones right away.

  Args:
    image, name: see `load_image`.
    max_side: shrink (bilinear, antialiased, aspect kept) so that the longer side is at most
      this; None = keep the size.
    min_side: refuse images with a side below this (pixels).

  Returns:
    `(rgb, (h, w))`: [h', w', 3] uint8 (h', w' <= max_side) and the original size.

  Raises:
    FileNotFoundError, ImageError: as `load_image`; ImageError for an image below `min_side`.
  """
  name = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "image")
  img = load_image(image, name)
  h, w = img.shape[:2]
  if min(h, w) < min_side:
    raise ImageError(
        f"{name}: {w}x{h} pixels (w x h) is too small to match; images need at "
        f"least {min_side} pixels on each side"
    )
  if max_side and max(h, w) > max_side:
    r = max_side / max(h, w)
    size = (max(1, int(round(w * r))), max(1, int(round(h * r))))
    img = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
  return img, (h, w)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
  im = ImageOps.exif_transpose(im)
  if im.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(im, np.float64)
    hi = 65535.0 if arr.max() > 255 else 255.0
    return load_image((np.clip(arr / hi, 0, 1)).astype(np.float32))
  if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
  return np.asarray(im.convert("RGB"))


# [h, w, 3] uint8 -> [S, S, 3] float32 network input: the data pipeline's resize and ImageNet
# normalisation (one home: `images.preprocess`).
preprocess_image = images.preprocess


def load_keypoints(path: str) -> np.ndarray:
  """Reads keypoints from JSON: `[[x, y], ...]` or `{"keypoints": [[x, y], ...]}` (also accepted:
  `{"trg_kps": ...}`, a list of `{"x": .., "y": ..}`).

  Returns:
    [n, 2] float64 (x, y) pixels.

  Raises:
    FileNotFoundError, KeypointError: missing file or malformed content, naming the file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such keypoint file")
  try:
    with open(path) as f:
      content = json.load(f)
  except (OSError, ValueError) as e:
    raise KeypointError(f"{path}: not valid JSON ({e})") from e
  if isinstance(content, dict):
    for key in ("keypoints", "trg_kps", "points"):
      if key in content:
        content = content[key]
        break
    else:
      raise KeypointError(f"{path}: expected a list of [x, y] or a dict with 'keypoints'")
  try:
    if content and isinstance(content[0], dict):
      content = [[p["x"], p["y"]] for p in content]
    kps = np.asarray(content, np.float64).reshape(-1, 2) if len(content) else np.zeros((0, 2))
    if kps.shape[0] != len(content):
      raise ValueError("each keypoint needs exactly two numbers")
  except (TypeError, ValueError, KeyError) as e:
    raise KeypointError(f"{path}: keypoints must be [[x, y], ...] numbers ({e})") from e
  return kps


def check_keypoints(kps, size_hw: Tuple[int, int], name: str = "keypoints") -> np.ndarray:
  """[n, 2] (x, y) pixels; raises `KeypointError` naming the keypoints outside the image."""
  kps = np.asarray(kps, np.float64)
  if kps.ndim != 2 or kps.shape[-1] != 2:
    raise KeypointError(f"{name}: expected an [n, 2] array of (x, y), got shape {kps.shape}")
  h, w = size_hw
  bad_value = ~np.isfinite(kps).all(-1)
  t = KPS_BORDER_TOLERANCE
  outside = ~bad_value & (
      (kps[:, 0] < -t) | (kps[:, 0] > w - 1 + t) | (kps[:, 1] < -t) | (kps[:, 1] > h - 1 + t)
  )
  if bad_value.any() or outside.any():
    msgs = [f"#{i} {tuple(np.round(kps[i], 2))} is not finite" for i in np.nonzero(bad_value)[0]]
    msgs += [f"#{i} (x={kps[i, 0]:g}, y={kps[i, 1]:g})" for i in np.nonzero(outside)[0]]
    raise KeypointError(
        f"{name}: {len(msgs)} keypoint(s) outside the {w}x{h} (w x h) image "
        f"(allowed x in [0, {w - 1}], y in [0, {h - 1}], +-{t} px): "
        + ", ".join(msgs[:10])
        + (" ..." if len(msgs) > 10 else "")
    )
  return kps


# ------------------------------------------------------------------------------------------------
# Flow sampling and confidence.


def sample_flow(flow_grid: np.ndarray, points: np.ndarray, img_size: Tuple[int, int]):
  """Bilinear (align_corners=False) sample of a grid flow at continuous image points.

  At integer points this equals `evaluation.upsample_flow(flow, img_size)` at those pixels.

  Args:
    flow_grid: [h, w, 2] flow target -> source in grid cells.
    points: [n, 2] (x, y) in pixels of the `img_size` image.
    img_size: (img_h, img_w).

  Returns:
    [n, 2] float64 displacement in pixels of the `img_size` image.
  """
  h, w, _ = flow_grid.shape
  img_h, img_w = img_size
  f = np.asarray(flow_grid, np.float64)
  x0, x1, wx0, wx1 = geometry.linear_taps(points[:, 0], w, img_w)
  y0, y1, wy0, wy1 = geometry.linear_taps(points[:, 1], h, img_h)
  wx0, wx1, wy0, wy1 = (t[:, None] for t in (wx0, wx1, wy0, wy1))
  disp = wy0 * (wx0 * f[y0, x0] + wx1 * f[y0, x1]) + wy1 * (wx0 * f[y1, x0] + wx1 * f[y1, x1])
  return disp * np.array([img_w / w, img_h / h])


def keypoint_confidence(
    corr,
    trg_cells,
    x_coords,
    y_coords,
    size: Optional[int],
    beta: float = flow_lib.SOFTMAX_BETA,
    radius: float = 2.0,
):
  """Soft-argmax probability mass near the expected match, for some target cells only.

  The target dims of the correlation are interpolated only at the requested cells (one row of
  each align-corners interpolation matrix), the source dims upsampled in full, then the softmax
  over source positions, as the model's `upsampled_soft_argmax_flow` does for every cell.

  Args:
    corr: [b, hs, ws, ht, wt] filtered correlation (the model's `aux['corr']`).
    trg_cells: [b, n, 2] int32 (x, y) cells of the upsampled target grid.
    x_coords, y_coords: [S] the model's coordinate vectors (`x_normal`, `y_normal`).
    size: S, the upsampled grid side (None: no upsampling, S = the correlation's grid).
    beta: softmax temperature.
    radius: in source cells of the S grid.

  Returns:
    `(confidence [b, n], expected [b, n, 2])`: mass within `radius` of the expected source
    position, and that position (x, y) in source cells of the S grid.
  """
  b, hs, ws, ht, wt = corr.shape
  dt = corr.dtype
  if size is None:
    my_t, mx_t = np.eye(ht), np.eye(wt)
    my_s, mx_s = np.eye(hs), np.eye(ws)
    sh, sw = hs, ws
  else:
    my_t = flow_lib.interpolation_matrix(ht, size)
    mx_t = flow_lib.interpolation_matrix(wt, size)
    my_s = flow_lib.interpolation_matrix(hs, size)
    mx_s = flow_lib.interpolation_matrix(ws, size)
    sh = sw = size
  ry = jnp.asarray(my_t, dt)[trg_cells[..., 1]]  # [b, n, ht]
  rx = jnp.asarray(mx_t, dt)[trg_cells[..., 0]]  # [b, n, wt]
  at_cells = jnp.einsum("bijkl,bnk,bnl->bnij", corr, ry, rx)  # [b, n, hs, ws]
  up = jnp.einsum("bnij,Ii,Jj->bnIJ", at_cells, jnp.asarray(my_s, dt), jnp.asarray(mx_s, dt))
  logits = up.reshape(b, -1, sh * sw)
  prob = jax.nn.softmax((logits - logits.max(-1, keepdims=True)) / beta, axis=-1)
  prob = prob.reshape(b, -1, sh, sw)
  gx = jnp.einsum("bnij,j->bn", prob, jnp.asarray(x_coords, dt))
  gy = jnp.einsum("bnij,i->bn", prob, jnp.asarray(y_coords, dt))
  ex = (gx + 1) * (sw - 1) / 2
  ey = (gy + 1) * (sh - 1) / 2
  ys = jnp.arange(sh, dtype=dt)[:, None]
  xs = jnp.arange(sw, dtype=dt)[None, :]
  d2 = (xs - ex[..., None, None]) ** 2 + (ys - ey[..., None, None]) ** 2
  conf = jnp.sum(jnp.where(d2 <= radius * radius, prob, 0), axis=(-2, -1))
  return conf, jnp.stack([ex, ey], axis=-1)


def _axis_weights(points: np.ndarray, cells: int, img_len: int) -> np.ndarray:
  """[len(points), cells] bilinear weights of `sample_flow` along one axis (align_corners=False,
  clamped): sampling a grid at a lattice of points is `W_y @ grid @ W_x^T` per channel."""
  i0, i1, w0, w1 = geometry.linear_taps(points, cells, img_len)
  w = np.zeros((len(i0), cells), np.float64)
  np.add.at(w, (np.arange(len(i0)), i0), w0)
  np.add.at(w, (np.arange(len(i0)), i1), w1)
  return w


def dense_flow(
    flow_grid: np.ndarray,
    img_size: int,
    src_hw: Tuple[int, int],
    trg_hw: Tuple[int, int],
    out_hw: Optional[Tuple[int, int]] = None,
) -> np.ndarray:
  """The network's flow as a displacement per target pixel, in source pixels.

  Equal to mapping every target pixel with `sample_flow` (as `Predictor.predict` does for the
  keypoints), but separable: memory is the output's, not a multiple of it.

  Args:
    flow_grid: [fs, fs, 2] flow target -> source in grid cells of the S x S input.
    img_size: S, the network's input side.
    src_hw, trg_hw: the original images' sizes (h, w).
    out_hw: (hf, wf) of the result (default: `trg_hw`); pixel (i, j) is the target point
      `((j + 0.5) * Wt / wf - 0.5, (i + 0.5) * Ht / hf - 0.5)`.

  Returns:
    [hf, wf, 2] float32: `source = target point + flow`, original source pixels.
  """
  (hs, ws), (ht, wt) = src_hw, trg_hw
  hf, wf = out_hw or trg_hw
  s = img_size
  fs_h, fs_w = flow_grid.shape[:2]
  # Target points of the output lattice, original pixels, and in input pixels.
  xt = (np.arange(wf) + 0.5) * (wt / wf) - 0.5
  yt = (np.arange(hf) + 0.5) * (ht / hf) - 0.5
  wx = _axis_weights(xt * (s / wt), fs_w, s)  # [wf, fs]
  wy = _axis_weights(yt * (s / ht), fs_h, s)  # [hf, fs]
  g = np.asarray(flow_grid, np.float64)
  out = np.empty((hf, wf, 2), np.float32)
  # source x = (x_in + disp_x) * ws / s with disp in input pixels (cells * s / fs).
  disp_x = wy @ g[..., 0] @ wx.T * (s / fs_w)
  out[..., 0] = (xt[None, :] * (s / wt) + disp_x) * (ws / s) - xt[None, :]
  del disp_x
  disp_y = wy @ g[..., 1] @ wx.T * (s / fs_h)
  out[..., 1] = (yt[:, None] * (s / ht) + disp_y) * (hs / s) - yt[:, None]
  return out


def cycle_consistency(
    flow_ts: np.ndarray,
    flow_st: np.ndarray,
    points: np.ndarray,
    img_size: int,
    sigma: float = CONSISTENCY_SIGMA,
):
  """Forward-backward agreement of matches: target point -> source (flow_ts) -> back (flow_st).

  Args:
    flow_ts: [fs, fs, 2] flow target -> source, grid cells (the pair as given).
    flow_st: [fs, fs, 2] flow source -> target, grid cells (the pair swapped).
    points: [n, 2] (x, y) target points, pixels of the S x S input.
    img_size: S.
    sigma: scale of the miss, fraction of the image side.

  Returns:
    `(consistency [n] in [0, 1], miss [n])`: `exp(-miss^2 / (2 sigma^2))` and the round trip's
    miss `|back - point| / S`.
  """
  s = (img_size, img_size)
  points = np.asarray(points, np.float64).reshape(-1, 2)
  there = points + sample_flow(flow_ts, points, s)
  back = there + sample_flow(flow_st, there, s)
  miss = np.linalg.norm(back - points, axis=-1) / img_size
  return np.exp(-0.5 * (miss / sigma) ** 2), miss


# ------------------------------------------------------------------------------------------------
# The predictor.


@dataclasses.dataclass
class Prediction:
  """What `Predictor.predict` returns; pixel coordinates of the *original* images.

  Attributes:
    src_image: [Hs, Ws, 3] uint8, the source as read.
    trg_image: [Ht, Wt, 3] uint8, the target as read.
    flow: [hf, wf, 2] float32: for every target pixel (x, y), the displacement to its match in
      the source, `source = (x + flow[y, x, 0], y + flow[y, x, 1])`, source pixels. (hf, wf) =
      (Ht, Wt), or smaller when the target is larger than `max_side`: then pixel (i, j) is the
      target point `((j + 0.5) * Wt / wf - 0.5, (i + 0.5) * Ht / hf - 0.5)`.
    flow_grid: [S, S, 2] float32, the network's flow in cells of its S grid (target -> source).
    trg_kps: [n, 2] float64, the given target keypoints (x, y), target pixels.
    src_kps: [n, 2] float64, their matches in the source, source pixels.
    confidence: [n] float32 in [0, 1], `mass * consistency`.
    img_size: S_img, the network's input side (pixels).
    mass: [n] float32, soft-argmax mass within the radius of the match.
    consistency: [n] float32, forward-backward agreement (module docstring).
    src_size_hw, trg_size_hw: the original images' sizes (src_image and trg_image are shrunk
      to at most `max_side`).
  """

  src_image: np.ndarray
  trg_image: np.ndarray
  flow: np.ndarray
  flow_grid: np.ndarray
  trg_kps: np.ndarray
  src_kps: np.ndarray
  confidence: np.ndarray
  img_size: int
  mass: Optional[np.ndarray] = None
  consistency: Optional[np.ndarray] = None
  src_size_hw: Optional[Tuple[int, int]] = None
  trg_size_hw: Optional[Tuple[int, int]] = None

  def to_json(self, **extra) -> dict:
    """Keypoints and confidences as a JSON-able dict (the CLI's keypoints file)."""
    hs, ws = self.src_size_hw or self.src_image.shape[:2]
    ht, wt = self.trg_size_hw or self.trg_image.shape[:2]
    n = len(self.trg_kps)
    mass = self.mass if self.mass is not None else [None] * n
    consistency = self.consistency if self.consistency is not None else [None] * n
    opt = lambda v: None if v is None else float(v)  # noqa: E731
    return {
        "direction": "target keypoints -> their matches in the source (flow: target -> source)",
        "units": "pixels of the original images, (x, y), pixel centres at integers",
        "confidence": "mass (soft-argmax peakedness) x consistency (forward-backward "
        "agreement); see docs/matching.md",
        "src_size_hw": [int(hs), int(ws)],
        "trg_size_hw": [int(ht), int(wt)],
        "flow_size_hw": [int(a) for a in self.flow.shape[:2]],
        **extra,
        "mean_confidence": float(np.mean(self.confidence)) if n else None,
        "matches": [
            {
                "trg": [float(a) for a in t],
                "src": [float(a) for a in s],
                "confidence": float(c),
                "mass": opt(m),
                "consistency": opt(k),
            }
            for t, s, c, m, k in zip(self.trg_kps, self.src_kps, self.confidence, mass, consistency)
        ],
    }


def grid_keypoints(size_hw: Tuple[int, int], n: int = 6, margin: float = 0.1) -> np.ndarray:
  """An n x n grid of (x, y) points inside the image (used when no keypoints are given)."""
  h, w = size_hw
  xs = np.linspace(margin * (w - 1), (1 - margin) * (w - 1), n)
  ys = np.linspace(margin * (h - 1), (1 - margin) * (h - 1), n)
  return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)


class Predictor:
  """A loaded model that matches image pairs (see the module docstring).

  Attributes:
    model: the `SCorrSAN` (None for a serialized model).
    variables: its variables (on device; None for a serialized model).
    serialized: the `export.SerializedModel` it runs, or None.
    img_size: network input side, pixels.
    config: the experiment config it came with (or None).
  """

  def __init__(
      self,
      model,
      variables,
      img_size: Optional[int] = None,
      config=None,
      confidence_radius: float = 2.0,
      *,
      serialized=None,
  ):
    """Args:
    model: a `SCorrSAN` (None with `serialized`).
    variables: `{'params', 'batch_stats'}` fitting it (checked; None with `serialized`).
    img_size: input side (the config's `data.img_size`; a multiple of 16); None: 256, or a
      serialized model's own (which is the only one it takes).
    config: the experiment config (information).
    confidence_radius: radius of the confidence mass, source cells of the flow grid.
    serialized: an `export.SerializedModel` to run instead of `model` and `variables`.
    """
    self.serialized = serialized
    if serialized is not None:
      if model is not None or variables is not None:
        raise ValueError("pass a model and its variables, or a serialized model, not both")
      if img_size is not None and int(img_size) != serialized.img_size:
        raise CheckpointError(
            f"{serialized.path}: its input is {serialized.img_size} pixels, " f"not {img_size}"
        )
      self.model = self.variables = None
      self.img_size = serialized.img_size
      self._run = serialized.flow_and_corr
      size, beta = serialized.header["model"]["feature_size"], serialized.header["model"]["beta"]
    else:
      img_size = 256 if img_size is None else img_size
      check_variables(model, variables, img_size, source="variables")
      self.model = model
      self.variables = jax.device_put(variables)
      self.img_size = int(img_size)
      forward = jax.jit(self._forward_impl)
      self._run = lambda src, trg: forward(self.variables, src, trg)
      size = getattr(model, "feature_size", None)
      beta = getattr(model, "beta", flow_lib.SOFTMAX_BETA)
    self.config = config
    self.confidence_radius = float(confidence_radius)
    self._confidence = jax.jit(
        functools.partial(
            keypoint_confidence, size=size, beta=float(beta), radius=self.confidence_radius
        )
    )

  @classmethod
  def from_checkpoint(cls, path: str, model_index=None, config=None, **kwargs) -> "Predictor":
    """Loads `path` (workdir -> its best model; step directory; export; serialized model) once.

    Args:
      path: see `load_model`, or a serialized model file (`from_serialized`).
      model_index: mutual-teacher checkpoints: 0, 1, 'best' or None (the recorded best).
      config: ignored: every checkpoint carries its own config (kept for the callers that
        still pass one: tools/match.py --config, export.export_checkpoint).
      **kwargs: `confidence_radius`, `img_size` (default: the config's `data.img_size`).
    """
    del config
    if os.path.isfile(path):
      return cls.from_serialized(path, model_index=model_index, **kwargs)
    model, variables, cfg = load_model(path, model_index=model_index)
    img_size = kwargs.pop("img_size", None)
    if img_size is None:
      try:
        img_size = int(cfg.data.img_size)
      except (AttributeError, KeyError, TypeError):
        img_size = 256
    return cls(model, variables, img_size=img_size, config=cfg, **kwargs)

  @classmethod
  def from_serialized(cls, path: str, model_index=None, **kwargs) -> "Predictor":
    """Loads a serialized model file (`python -m sccorr_jax.export`; `export.load`).

    Args:
      path: the file.
      model_index: None or 'best' (the file holds the one network it was written with).
      **kwargs: `confidence_radius`, `img_size` (must be the file's).

    Raises:
      FileNotFoundError, export.SerializedModelError, CheckpointError: one line naming `path`.
    """
    serialized = export.load(path)
    if model_index not in (None, "best"):
      index = serialized.header.get("source", {}).get("model_index", "best")
      raise CheckpointError(
          f"{path}: a serialized model holds one network (written with "
          f"model_index={index}); model_index={model_index!r} is for "
          "checkpoints"
      )
    cfg = serialized.header.get("config")
    cfg = None if cfg is None else config_lib.restored_config(cfg)
    return cls(None, None, config=cfg, serialized=serialized, **kwargs)

  def _forward_impl(self, variables, src, trg):
    flow, aux = self.model.apply(variables, src, trg, return_aux=True)
    return flow, aux["corr"]

  def _coords(self, s: int):
    if self.serialized is not None:
      coords = self.serialized.header["model"]["coords"]
      if coords is not None:
        return (jnp.asarray(coords["x"], jnp.float32), jnp.asarray(coords["y"], jnp.float32))
    elif "x_normal" in self.variables["params"]:
      params = self.variables["params"]
      return params["x_normal"], params["y_normal"]
    lin = jnp.linspace(-1.0, 1.0, s, dtype=jnp.float32)
    return lin, lin

  def predict(
      self, src: ImageLike, trg: ImageLike, trg_kps=None, max_side: Optional[int] = MAX_IMAGE_SIDE
  ) -> Prediction:
    """Matches one pair (both directions in one batch: the second gives the consistency).

    Args:
      src: the source image (path, PIL image or array; see `load_image`).
      trg: the target image.
      trg_kps: [n, 2] (x, y) keypoints on the *target*, its original pixels, or None.
      max_side: images are shrunk to this longer side when read, and the dense flow is at most
        this size (None: full size; module docstring).

    Returns:
      A `Prediction` (original pixel coordinates).

    Raises:
      FileNotFoundError, ImageError, KeypointError: naming the image or keypoints at fault.
    """
    src_img, (hs, ws) = read_image(src, _name(src, "source image"), max_side)
    trg_img, (ht, wt) = read_image(trg, _name(trg, "target image"), max_side)
    if trg_kps is None:
      trg_kps = np.zeros((0, 2))
    trg_kps = check_keypoints(trg_kps, (ht, wt), name=f"keypoints on {_name(trg, 'target')}")
    s = self.img_size
    src_in = preprocess_image(src_img, s)
    trg_in = preprocess_image(trg_img, s)
    # Row 0: the pair as given (target -> source); row 1: swapped (source -> target).
    flow, corr = self._run(
        jnp.asarray(np.stack([src_in, trg_in])), jnp.asarray(np.stack([trg_in, src_in]))
    )
    flows = np.asarray(flow, np.float64)
    flow_grid = flows[0]
    scale_t = np.array([s / wt, s / ht])  # target original -> input pixels
    scale_s = np.array([ws / s, hs / s])  # source input -> original pixels
    out_hw = (ht, wt)
    if max_side and max(ht, wt) > max_side:
      out_hw = trg_img.shape[:2]
    dense = dense_flow(flow_grid, s, (hs, ws), (ht, wt), out_hw)
    p = trg_kps * scale_t
    src_kps = (p + sample_flow(flow_grid, p, (s, s))) * scale_s
    n = len(trg_kps)
    if n:
      fs = flow_grid.shape[0]
      # The flow-grid cell whose centre is nearest to each keypoint (align_corners=False).
      cells = np.clip(np.rint((p + 0.5) * (fs / s) - 0.5), 0, fs - 1)
      padded = max(8, 1 << (n - 1).bit_length())  # bucket n to limit recompilations
      cells = np.concatenate([cells, np.zeros((padded - n, 2))]).astype(np.int32)
      x_c, y_c = self._coords(fs)
      conf, _ = self._confidence(corr[:1], jnp.asarray(cells[None]), x_c, y_c)
      mass = np.asarray(conf[0, :n], np.float32)
      consistency = cycle_consistency(flow_grid, flows[1], p, s)[0].astype(np.float32)
    else:
      mass = consistency = np.zeros((0,), np.float32)
    return Prediction(
        src_image=src_img,
        trg_image=trg_img,
        flow=dense,
        flow_grid=flow_grid.astype(np.float32),
        trg_kps=trg_kps,
        src_kps=src_kps,
        confidence=mass * consistency,
        img_size=s,
        mass=mass,
        consistency=consistency,
        src_size_hw=(hs, ws),
        trg_size_hw=(ht, wt),
    )


def _name(image: Any, default: str) -> str:
  return os.fspath(image) if isinstance(image, (str, os.PathLike)) else default
