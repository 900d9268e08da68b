"""An embedded synthetic correspondence dataset made from the photographs inside scikit-image.

No download: every pair is generated from a photograph shipped in `skimage.data`. The source
image is a random square crop of the photograph, resized to `img_size`; the target is the
source seen through a random smooth warp (a homography composed with a Gaussian radial-basis
displacement field, a smooth stand-in for a thin-plate spline) plus an appearance change (per
channel gain, gamma, brightness, noise). Because the warp is known, the dense ground truth is
exact:

* `dense_flow` [S, S, 2] float32: for every *target* pixel (x, y) (integer centres), the
  displacement to its match in the source, `source = (x, y) + dense_flow[y, x]`, in pixels (the
  project's flow direction, in pixels instead of grid cells);
* `dense_valid` [S, S] bool: where that match lies inside the source image.

The "object region" is a random box covering 45-80% of the source side; keypoints (between
`min_kps` and `max_kps` per pair) are target pixels whose match falls inside that box, drawn
with probability proportional to the source's gradient magnitude (so they sit on texture), and
`src_kps = trg_kps + dense_flow[trg_kps]`. `src_bbox` is the object box, `trg_bbox` the extent of
the target pixels mapped into it; the PCK threshold of this dataset is `bbox`: max(w, h) of the
source object box. Splits are by photograph (13 train, 3 val, 3 test); the category of a pair is
its photograph.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np
from PIL import Image
import scipy.ndimage
import tensorflow_datasets as tfds

from sccorr_jax import config_lib
from sccorr_jax.data import builder_base
from sccorr_jax.data import records

PHOTOS: Dict[str, Tuple[str, ...]] = {
    'trn': (
        'astronaut',
        'brick',
        'coins',
        'gravel',
        'hubble_deep_field',
        'immunohistochemistry',
        'moon',
        'page',
        'retina',
        'text',
        'stereo_motorcycle',
        'cell',
        'microaneurysms',
    ),
    'val': ('chelsea', 'clock', 'grass'),
    'test': ('coffee', 'rocket', 'camera'),
}
CATEGORIES = tuple(p for split in ('trn', 'val', 'test') for p in PHOTOS[split])


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticConfig(builder_base.EmbeddedConfig):
  """Size knobs of the synthetic dataset (they name the cache directory); `make_config` fills
  them, with `config_lib.SYNTHETIC_KNOBS` for those not given.

  Attributes (besides `EmbeddedConfig`'s `img_size`, `seed` and `min_kps`):
    train_pairs_per_photo: pairs per training photograph.
    eval_pairs_per_photo: pairs per validation / test photograph.
    max_kps: keypoints per pair at most (`min_kps` to `max_kps`, at most 40).
  """

  train_pairs_per_photo: int
  eval_pairs_per_photo: int
  max_kps: int


def make_config(**knobs) -> SyntheticConfig:
  """The builder config of these knobs (`SyntheticConfig`'s fields; the defaults of those not
  given are `config_lib.SYNTHETIC_KNOBS`, the data config's `synthetic_*` keys).

  Raises:
    ValueError: keypoint counts out of range; TypeError: an unknown knob.
  """
  k = {**config_lib.SYNTHETIC_KNOBS, **knobs}
  if not 1 <= k['min_kps'] <= k['max_kps'] <= records.MAX_KPS:
    raise ValueError(f'need 1 <= min_kps <= max_kps <= {records.MAX_KPS}')
  name = (
      f'img{k["img_size"]}-trn{k["train_pairs_per_photo"]}-eval{k["eval_pairs_per_photo"]}-'
      f'kps{k["min_kps"]}to{k["max_kps"]}-seed{k["seed"]}'
  )
  return SyntheticConfig(name=name, description='synthetic warps of skimage.data photographs', **k)


def load_photo(name: str) -> np.ndarray:
  """[h, w, 3] uint8 RGB photograph from `skimage.data`."""
  import skimage.data  # pylint: disable=g-import-not-at-top  # slow import, only when building

  img = getattr(skimage.data, name)()
  if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
    img = img[0]
  img = np.asarray(img)
  if img.dtype != np.uint8:
    img = (img.astype(np.float64) * (255.0 / max(float(img.max()), 1.0))).astype(np.uint8)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  return np.ascontiguousarray(img[..., :3])


def _random_warp(rng: np.random.Generator, size: int) -> np.ndarray:
  """A random target->source map: a homography about the centre after a Gaussian RBF
  displacement.

  Returns:
    [size, size, 2] float64: the source (x, y) of every target pixel (x, y).
  """
  s = float(size)
  c = (s - 1) / 2
  angle = np.deg2rad(rng.uniform(-20, 20))
  scale = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
  aspect = np.exp(rng.uniform(-0.1, 0.1))
  shear = rng.uniform(-0.1, 0.1)
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  lin = rot @ np.array([[scale * aspect, shear], [0.0, scale / aspect]])
  shift = rng.uniform(-0.08, 0.08, size=2) * s
  persp = rng.uniform(-0.3, 0.3, size=2) / s
  hom = np.eye(3)
  hom[:2, :2] = lin
  hom[:2, 2] = c + shift - lin @ np.array([c, c])
  hom[2, :2] = persp
  hom[2, 2] = 1.0 - persp @ np.array([c, c])
  centres = rng.uniform(0, s - 1, size=(6, 2))
  weights = rng.normal(0, 0.03 * s, size=(6, 2))
  sigma = 0.25 * s
  # The Gaussian RBF is separable: exp(-|p - c|^2 / 2s^2) = ex[k, x] * ey[k, y].
  axis = np.arange(size, dtype=np.float64)
  ex = np.exp(-((axis[None, :] - centres[:, 0:1]) ** 2) / (2 * sigma * sigma))  # [k, x]
  ey = np.exp(-((axis[None, :] - centres[:, 1:2]) ** 2) / (2 * sigma * sigma))  # [k, y]
  disp = np.stack([ey.T @ (weights[:, ch : ch + 1] * ex) for ch in range(2)], axis=-1)
  ys, xs = np.meshgrid(axis, axis, indexing='ij')
  q = np.stack([xs, ys], axis=-1) + disp  # [S, S, 2]
  qh = q @ hom[:, :2].T + hom[:, 2]
  return qh[..., :2] / qh[..., 2:3]


def make_pair(
    photo: np.ndarray, rng: np.random.Generator, size: int, min_kps: int, max_kps: int
) -> dict:
  """One synthetic pair (record fields plus `dense_flow`, `dense_valid`)."""
  h, w = photo.shape[:2]
  side = int(rng.uniform(0.6, 1.0) * min(h, w))
  y0 = int(rng.integers(0, h - side + 1))
  x0 = int(rng.integers(0, w - side + 1))
  src = np.asarray(
      Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side]).resize((size, size), Image.BILINEAR)
  )
  ys, xs = np.meshgrid(
      np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing='ij'
  )
  grid = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)
  grey = src.astype(np.float64).mean(-1)
  texture = np.hypot(scipy.ndimage.sobel(grey, 0), scipy.ndimage.sobel(grey, 1))
  for _ in range(20):
    match = _random_warp(rng, size).reshape(-1, 2)  # [S*S, 2] source (x, y) of target pixels
    inside = ((match >= 0) & (match <= size - 1)).all(1)
    bw, bh = rng.uniform(0.45, 0.8, size=2) * size
    bx = rng.uniform(0, size - bw)
    by = rng.uniform(0, size - bh)
    box = np.array([bx, by, bx + bw, by + bh])
    on_obj = (
        inside
        & (match[:, 0] >= box[0])
        & (match[:, 0] <= box[2])
        & (match[:, 1] >= box[1])
        & (match[:, 1] <= box[3])
    )
    cand = np.nonzero(on_obj)[0]
    if len(cand) >= 4 * max_kps:
      break
  else:
    raise RuntimeError('could not draw a warp that keeps the object region in view')
  n = int(rng.integers(min_kps, max_kps + 1))
  mx = np.clip(np.rint(match[cand, 0]).astype(int), 0, size - 1)
  my = np.clip(np.rint(match[cand, 1]).astype(int), 0, size - 1)
  weight = texture[my, mx] + 1e-3 * (texture.max() + 1.0)
  pick = rng.choice(cand, size=n, replace=False, p=weight / weight.sum())
  flow = (match - grid).reshape(size, size, 2)
  # Target image: backward warp of the source (bilinear, mirrored outside), then appearance.
  coords = [match[:, 1].reshape(size, size), match[:, 0].reshape(size, size)]
  trg = np.stack(
      [
          scipy.ndimage.map_coordinates(
              src[..., ch].astype(np.float64), coords, order=1, mode='mirror'
          )
          for ch in range(3)
      ],
      -1,
  )
  gain = rng.uniform(0.8, 1.2, size=3)
  gamma = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
  trg = 255.0 * (np.clip(trg / 255.0, 0, 1) ** gamma) * gain + rng.uniform(-20, 20)
  trg = trg + rng.normal(0, 3.0, size=trg.shape)
  trg = np.clip(np.rint(trg), 0, 255).astype(np.uint8)
  trg_kps = grid[pick]
  src_kps = match[pick]
  obj = on_obj.reshape(size, size)
  oy, ox = np.nonzero(obj)
  out_src = np.zeros((records.MAX_KPS, 2), np.float32)
  out_trg = np.zeros((records.MAX_KPS, 2), np.float32)
  out_src[:n] = src_kps
  out_trg[:n] = trg_kps
  return dict(
      src_img=src,
      trg_img=trg,
      src_kps=out_src,
      trg_kps=out_trg,
      kps_valid=np.arange(records.MAX_KPS) < n,
      src_bbox=box.astype(np.float32),
      trg_bbox=np.array([ox.min(), oy.min(), ox.max(), oy.max()], np.float32),
      dense_flow=flow.astype(np.float32),
      dense_valid=inside.reshape(size, size),
  )


class SccorrSynthetic(builder_base.EmbeddedBuilder):
  """Synthetic warped pairs of scikit-image photographs, with dense ground truth."""

  BUILDER_CONFIGS = [make_config()]
  CATEGORIES = CATEGORIES
  SPLITS = tuple(PHOTOS)
  DESCRIPTION = __doc__

  def _generate_examples(self, split):
    cfg = self.builder_config
    per_photo = cfg.train_pairs_per_photo if split == 'trn' else cfg.eval_pairs_per_photo
    for photo_name in PHOTOS[split]:
      photo = load_photo(photo_name)
      # Crops are at least 0.6 of the short side: pre-shrink big photographs to 2.5x the output.
      shrink = 2.5 * cfg.img_size / min(photo.shape[:2])
      if shrink < 1:
        photo = np.asarray(
            Image.fromarray(photo).resize(
                (round(photo.shape[1] * shrink), round(photo.shape[0] * shrink)), Image.BILINEAR
            )
        )
      cat = CATEGORIES.index(photo_name)
      for k in range(per_photo):
        rng = builder_base.record_rng(cfg, split, cat, k)
        pair = make_pair(photo, rng, cfg.img_size, cfg.min_kps, cfg.max_kps)
        key, name = f'{photo_name}-{k:04d}', f'skimage.data.{photo_name}'
        yield key, builder_base.generated_example(cfg, key, name, f'{name}#warp{k}', cat, pair)


def make_builder(data_dir: str, **knobs) -> SccorrSynthetic:
  """The synthetic builder for the given `make_config` knobs, caching under `data_dir`."""
  return SccorrSynthetic.for_config(data_dir, make_config(**knobs))
