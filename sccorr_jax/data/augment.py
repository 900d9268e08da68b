"""The reference's training augmentation, in NumPy, with an explicit per-record random stream.

The reference (`data/dataset.py`) applies to each training image, independently for source and
target and at the image's original size, seven albumentations 1.x colour transforms, each with
p=0.2 and its 1.x default parameters, in this order:

1. `ToGray`: OpenCV's RGB->grey (0.299 R + 0.587 G + 0.114 B, fixed point), copied to 3 channels.
2. `Posterize(num_bits=4)`: 1.x draws the bit count uniformly in {0, ..., 4} (an int means the
   range (0, 4)) and keeps that many high bits (0 bits: black image).
3. `Equalize(mode='cv', by_channels=True)`: `cv2.equalizeHist` on each channel.
4. `Sharpen(alpha=(0.2, 0.5), lightness=(0.5, 1.0))`: 3x3 kernel
   `(1 - a) * identity + a * [[-1, -1, -1], [-1, 8 + l, -1], [-1, -1, -1]]`, borders reflected
   without repeating the edge (OpenCV's BORDER_REFLECT_101), rounded and clipped.
5. `RandomBrightnessContrast(0.2, 0.2, brightness_by_max=True)`: `x * a + 255 * b`,
   a ~ U(0.8, 1.2), b ~ U(-0.2, 0.2), clipped and truncated to uint8.
6. `Solarize(threshold=128)`: values >= 128 become 255 - value.
7. `ColorJitter(0.2, 0.2, 0.2, 0.2)`: brightness, contrast, saturation factors ~ U(0.8, 1.2) and
   hue shift ~ U(-0.2, 0.2) of a turn (1.x; albumentations 2.x uses a wider hue range by
   default), applied in a random order, as albumentations 1.x's torchvision-style functions.

This module re-implements them in NumPy instead of depending on albumentations (184 MB with
OpenCV, and 2.x changed these defaults): numbers match OpenCV up to the rounding of the 8-bit
HSV conversion in the hue step. Each record's draws come from a `np.random.Generator` that grain
derives from the pipeline seed and the record's position, so augmentation is deterministic and
independent of the number of workers.

The reference's random crop around the box (`random_crop`, called with p=-1, i.e. never) is
offered by `random_crop_params`, off by default.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

REFERENCE_P = 0.2


def to_gray(img: np.ndarray) -> np.ndarray:
  """[h, w, 3] uint8 RGB -> [h, w, 3] uint8 grey (OpenCV's fixed-point RGB2GRAY)."""
  x = img.astype(np.int32)
  g = (x[..., 0] * 4899 + x[..., 1] * 9617 + x[..., 2] * 1868 + (1 << 13)) >> 14
  g = np.clip(g, 0, 255).astype(np.uint8)
  return np.repeat(g[..., None], 3, axis=-1)


def gray_mean(img: np.ndarray) -> float:
  return float(to_gray(img)[..., 0].mean())


def posterize(img: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the `bits` high bits of each uint8 value (0 bits: zeros)."""
  if bits <= 0:
    return np.zeros_like(img)
  if bits >= 8:
    return img.copy()
  mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
  return img & mask


def _equalize_channel(ch: np.ndarray) -> np.ndarray:
  hist = np.bincount(ch.reshape(-1), minlength=256)
  total = ch.size
  i0 = int(np.argmax(hist > 0))
  if hist[i0] == total:
    return np.full_like(ch, i0)
  scale = np.float32(255.0 / (total - hist[i0]))
  lut = np.zeros(256, np.uint8)
  cum = np.cumsum(hist[i0 + 1 :])
  lut[i0 + 1 :] = np.clip(np.rint(cum.astype(np.float32) * scale), 0, 255).astype(np.uint8)
  return lut[ch]


def equalize(img: np.ndarray) -> np.ndarray:
  """Histogram equalisation of each channel (OpenCV's `equalizeHist`)."""
  return np.stack([_equalize_channel(img[..., c]) for c in range(img.shape[-1])], axis=-1)


def sharpen(img: np.ndarray, alpha: float, lightness: float) -> np.ndarray:
  """albumentations' `Sharpen` with fixed alpha/lightness (3x3, reflect-101 borders)."""
  effect = np.array([[-1, -1, -1], [-1, 8 + lightness, -1], [-1, -1, -1]], np.float32)
  identity = np.zeros((3, 3), np.float32)
  identity[1, 1] = 1
  kernel = (1 - alpha) * identity + alpha * effect
  x = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode='reflect')
  h, w = img.shape[:2]
  out = np.zeros(img.shape, np.float32)
  for dy in range(3):
    for dx in range(3):
      out += kernel[dy, dx] * x[dy : dy + h, dx : dx + w]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _lut(img: np.ndarray, lut: np.ndarray) -> np.ndarray:
  return np.clip(lut, 0, 255).astype(np.uint8)[img]


def brightness_contrast(img: np.ndarray, alpha: float, beta: float) -> np.ndarray:
  """`x * alpha + 255 * beta`, clipped and truncated (RandomBrightnessContrast, by max)."""
  lut = np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta * 255)
  return _lut(img, lut)


def solarize(img: np.ndarray, threshold: int = 128) -> np.ndarray:
  lut = np.arange(256)
  lut = np.where(lut < threshold, lut, 255 - lut)
  return _lut(img, lut)


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
  return _lut(img, np.arange(256, dtype=np.float32) * np.float32(factor))


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
  mean = gray_mean(img)
  lut = np.arange(256, dtype=np.float32) * np.float32(factor) + np.float32(mean * (1 - factor))
  return _lut(img, lut)


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
  gray = to_gray(img).astype(np.float64)
  out = img.astype(np.float64) * factor + gray * (1 - factor)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
  """Rotates the hue by `factor` of a turn, quantised like OpenCV's 8-bit H in [0, 180)."""
  if factor == 0:
    return img.copy()
  x = img.astype(np.float64) / 255.0
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = x.max(-1)
  mn = x.min(-1)
  d = v - mn
  s = np.where(v > 0, d / np.maximum(v, 1e-12), 0.0)
  dd = np.maximum(d, 1e-12)
  h = np.where(v == r, (g - b) / dd, np.where(v == g, 2.0 + (b - r) / dd, 4.0 + (r - g) / dd))
  h = np.where(d > 0, (h / 6.0) % 1.0, 0.0)
  # OpenCV stores H as round(360 h / 2) in [0, 180) and shifts it with a LUT modulo 180.
  h8 = np.rint(h * 180.0) % 180
  h8 = np.mod(h8 + 180.0 * factor, 180.0).astype(np.uint8).astype(np.float64)
  h = h8 / 180.0
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  p = v * (1 - s)
  q = v * (1 - s * f)
  t = v * (1 - s * (1 - f))
  i = i.astype(np.int32) % 6
  choices = [
      np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
  ]
  out = np.zeros_like(x)
  for k, c in enumerate(choices):
    out = np.where((i == k)[..., None], c, out)
  return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def color_jitter(
    img: np.ndarray, rng: np.random.Generator, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.2
) -> np.ndarray:
  """albumentations 1.x `ColorJitter` with its defaults: four adjustments in a random order."""
  b = rng.uniform(1 - brightness, 1 + brightness)
  c = rng.uniform(1 - contrast, 1 + contrast)
  s = rng.uniform(1 - saturation, 1 + saturation)
  h = rng.uniform(-hue, hue)
  ops = [
      lambda x: adjust_brightness(x, b),
      lambda x: adjust_contrast(x, c),
      lambda x: adjust_saturation(x, s),
      lambda x: adjust_hue(x, h),
  ]
  for k in rng.permutation(4):
    img = ops[k](img)
  return img


def reference_color_augment(
    img: np.ndarray, rng: np.random.Generator, p: float = REFERENCE_P
) -> np.ndarray:
  """The reference's seven colour transforms, each applied with probability `p`.

  Args:
    img: [h, w, 3] uint8 RGB image.
    rng: the record's random stream.
    p: probability of each transform (0.2 in the reference).

  Returns:
    [h, w, 3] uint8 augmented image.
  """
  if rng.random() < p:
    img = to_gray(img)
  if rng.random() < p:
    img = posterize(img, int(rng.integers(0, 5)))
  if rng.random() < p:
    img = equalize(img)
  if rng.random() < p:
    img = sharpen(img, rng.uniform(0.2, 0.5), rng.uniform(0.5, 1.0))
  if rng.random() < p:
    img = brightness_contrast(img, 1 + rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2))
  if rng.random() < p:
    img = solarize(img, 128)
  if rng.random() < p:
    img = color_jitter(img, rng)
  return img


def random_crop_params(
    rng: np.random.Generator, bbox: np.ndarray, hw: Tuple[int, int]
) -> Tuple[int, int, int, int]:
  """The reference's crop around the box: `(left, top, width, height)` in original pixels.

  `left ~ U{0..x1}`, `top ~ U{0..y1}`, right edge `~ U{x2..w}`, bottom `~ U{y2..h}` (integer box
  as in the reference), so the crop always contains the object box.
  """
  h, w = hw
  x1, y1, x2, y2 = [int(v) for v in np.clip(np.asarray(bbox, np.float64), 0, None)]
  x1, x2 = min(x1, w - 1), min(max(x2, x1 + 1), w)
  y1, y2 = min(y1, h - 1), min(max(y2, y1 + 1), h)
  left = int(rng.integers(0, x1 + 1))
  top = int(rng.integers(0, y1 + 1))
  right = int(rng.integers(x2, w + 1))
  bottom = int(rng.integers(y2, h + 1))
  return left, top, max(right - left, 1), max(bottom - top, 1)
