"""Image preprocessing shared by the data pipeline, matching one's own images and pictures.

The network's input is an RGB image resized to a square side (bilinear with antialiasing, PIL,
as the reference's pipeline; aspect ratio not kept) and ImageNet-normalised.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sccorr_jax import constants

_MEAN = np.asarray(constants.IMAGENET_MEAN, np.float32)
_STD = np.asarray(constants.IMAGENET_STD, np.float32)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
  """[h, w, 3] uint8 -> [size, size, 3] uint8, bilinear with antialiasing (PIL)."""
  if img.shape[0] == size and img.shape[1] == size:
    return img
  return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def normalize(img: np.ndarray) -> np.ndarray:
  """uint8 [.., 3] -> float32 ImageNet-normalised."""
  return (img.astype(np.float32) / 255.0 - _MEAN) / _STD


def preprocess(img: np.ndarray, size: int) -> np.ndarray:
  """[h, w, 3] uint8 RGB -> [size, size, 3] float32 network input: `resize_image`, then
  `normalize` (the data pipeline's rule; also what a serialized model records, `export.py`)."""
  return normalize(resize_image(np.asarray(img), int(size)))


def to_uint8(img: np.ndarray) -> np.ndarray:
  """[h, w, 3] ImageNet-normalised float -> uint8 RGB (the inverse of `normalize`)."""
  x = np.asarray(img, np.float32) * _STD + _MEAN
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
