"""Per-pair preprocessing of the grain pipelines: record -> one row of the batch contract.

Follows the reference (`data/dataset.py`, `data/spair.py`, `data/pfpascal.py`,
`data/pfwillow.py`):

1. training only, `augment`: the seven colour transforms of `augment.py` on each image at its
   original size (independent draws for source and target);
2. training only, `random_crop` (off by default; the reference's call has p=-1): crop each image
   around its box; keypoints are shifted and, as in the reference, clamped to the image;
3. resize both images to `img_size` x `img_size` (bilinear with antialiasing, PIL, as
   torchvision's `Resize` on PIL images; aspect ratio not kept) and scale keypoints and boxes by
   `(img_size / w, img_size / h)`;
4. training only, PF-PASCAL pairs flagged by the csv: flip both images horizontally, keypoints
   `x -> img_size - x` while image column `x` moves to `img_size - 1 - x` (the reference's
   one-pixel inconsistency, kept for parity), boxes mirrored the same way; with
   `flip_source_p` (datasets with keypoint ids: `parts`), mirror the *source* image alone
   (`x -> img_size - 1 - x`) and relabel its keypoints with the category's left/right table
   (`mirror_source`);
5. PCK thresholds (img_size units) and the sparse flow label
   (`geometry.keypoints_to_flow(.., feature_size, receptive_field, img_size)`, NumPy twin here)
   from the *kept* keypoints only (the label budget, `LabelBudget`, marks a record's kept
   keypoints; without it every keypoint is kept);
6. ImageNet normalisation to float32;
7. with `label_truth` (the training pipeline): what the loss must not see but pseudo-label
   metrics need: the withheld keypoints (`withheld_src_kps`, `withheld_trg_kps`,
   `withheld_kps_valid`) and the dense ground truth on the flow grid (`dense_flow` in cells,
   `dense_valid`; all False for datasets without dense truth), see `dense_flow_to_grid`.

Thresholds per pair: `pckthres_bbox` = max(w, h) of the resized source box (SPair-71k,
PF-PASCAL, synthetic) or of the source keypoints' extent box (PF-WILLOW; real keypoints only);
`pckthres_img` = img_size; `pckthres_bbox_legacy` = the reference's PF-WILLOW value, max over x,
y of (max - min) over all 40 keypoint slots with the -1 padding included (equal to
`pckthres_bbox` for the other datasets); `pckthres` = the benchmark's standard kind.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional

import grain
import numpy as np

from sccorr_jax import constants
from sccorr_jax import geometry
from sccorr_jax import images
from sccorr_jax.data import augment as augment_lib
from sccorr_jax.data import procedural
from sccorr_jax.data import records

# How each benchmark's `bbox` threshold is measured (its standard kind: `constants`).
BBOX_FROM_KEYPOINTS = {'pfwillow'}
# Datasets whose records name their keypoints (`kps_ids`): category -> [K] left/right table.
FLIP_TABLES = {'parts': procedural.flip_permutation}


# The data workers' keypoints -> flow label: `geometry.keypoints_to_flow` in NumPy (a per-example
# jax call would cost a dispatch and a device transfer).
keypoints_to_flow_np = functools.partial(geometry.keypoints_to_flow, xp=np)


resize_image = images.resize_image
normalize = images.normalize


def legacy_willow_threshold(src_kps: np.ndarray, valid: np.ndarray) -> np.float32:
  """The reference's PF-WILLOW `bbox` threshold: max over x, y of (max - min) over all 40
  slots, the padding slots holding -1."""
  k = np.full((records.MAX_KPS, 2), -1.0, np.float32)
  n = min(int(valid.sum()), records.MAX_KPS)
  k[:n] = src_kps[valid][:n]
  return np.float32((k.max(0) - k.min(0)).max())


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  """Static options of `preprocess_pair` (hashable, picklable).

  Attributes:
    dataset: 'synthetic' | 'parts' | 'spair71k' | 'pfpascal' | 'pfwillow' (selects the
      thresholds).
    img_size: output image side, pixels.
    feature_size: flow grid side.
    receptive_field: flow label receptive field, pixels.
    max_kps: keypoint slots in the output (real keypoints beyond it are dropped).
    train: apply the training-only steps (augmentation, crop, PF-PASCAL flip).
    augment: colour augmentation (training only).
    augment_p: probability of each colour transform.
    random_crop: the reference's crop around the box (training only).
    random_crop_p: probability of cropping each image when `random_crop`.
    flip: honour PF-PASCAL's flip flag (training only).
    label_truth: also output the withheld keypoints and the dense ground truth on the flow
      grid (the training pipeline; never inputs of the loss).
    flip_source_p: probability of mirroring the source image of a training pair
      (`mirror_source`; only datasets in `FLIP_TABLES`, others ignore it).
  """

  dataset: str
  img_size: int = 256
  feature_size: int = 64
  receptive_field: int = 11
  max_kps: int = records.MAX_KPS
  train: bool = False
  augment: bool = False
  augment_p: float = augment_lib.REFERENCE_P
  random_crop: bool = False
  random_crop_p: float = 0.5
  flip: bool = True
  label_truth: bool = False
  flip_source_p: float = 0.0


def _pad_kps(kps: np.ndarray, n: int) -> np.ndarray:
  out = np.zeros((n, 2), np.float32)
  m = min(n, len(kps))
  out[:m] = kps[:m]
  return out


def mirror_source(
    src_img, src_kps, trg_kps, valid, kept, kps_ids, perm, src_box, img_size: Optional[int] = None
):
  """Mirrors the source image of a pair and re-pairs the keypoints semantically.

  In the mirror image, the point that was keypoint `id` is keypoint `perm[id]` (a left eye
  becomes a right eye), so target keypoint `t` now matches the mirrored source point of the
  source slot whose id is `perm[t]`. Keypoints whose mirror partner is not labelled in the pair
  drop out; a pair stays kept (visible to the loss) only if both slots were kept.

  Args:
    src_img: [S, S, 3] the resized source image.
    src_kps, trg_kps: [n, 2] float32, (x, y) pixels of the S image.
    valid, kept: [n] bool, real and kept (label budget) slots.
    kps_ids: [n] int, each slot's keypoint id in its category.
    perm: [K] int, the category's left/right table (`procedural.flip_permutation`).
    src_box: [4] float32 xyxy source box.
    img_size: S, the side of the image the keypoints live in; default `src_img`'s width (pass
      it when `src_img` is a feature grid, cached features).

  Returns:
    None when no keypoint has its partner in the pair (nothing to learn: keep the pair as it
    is); else (src_img, src_kps, trg_kps, valid, kept, src_box) with the same shapes, mirrored
    by `x -> S - 1 - x`, the re-paired keypoints as a prefix.
  """
  s = int(img_size) if img_size else src_img.shape[1]
  slot_of = {int(kps_ids[j]): j for j in np.nonzero(valid)[0]}
  pairs = [
      (i, slot_of[int(perm[kps_ids[i]])])
      for i in np.nonzero(valid)[0]
      if int(perm[kps_ids[i]]) in slot_of
  ]
  if not pairs:
    return None
  ti, sj = np.array(pairs).T
  n, m = len(valid), len(pairs)
  new_src = np.zeros((n, 2), np.float32)
  new_trg = np.zeros((n, 2), np.float32)
  new_src[:m] = src_kps[sj]
  new_src[:m, 0] = (s - 1) - new_src[:m, 0]
  new_trg[:m] = trg_kps[ti]
  new_valid = np.arange(n) < m
  new_kept = np.zeros(n, bool)
  new_kept[:m] = kept[ti] & kept[sj]
  box = np.array([s - 1 - src_box[2], src_box[1], s - 1 - src_box[0], src_box[3]], np.float32)
  return src_img[:, ::-1], new_src, new_trg, new_valid, new_kept, box


def _compact(kps: np.ndarray, mask: np.ndarray, n: int):
  """The `mask`ed rows of `kps` as a prefix of `n` slots -> ([n, 2] float32, [n] bool)."""
  sel = kps[mask][:n]
  return _pad_kps(sel, n), np.arange(n) < len(sel)


@functools.lru_cache(maxsize=16)
def _labelled_records(seed: int, num_records: int, fraction: float) -> np.ndarray:
  """[num_records] bool: which records keep labels (exactly round(fraction * num_records))."""
  order = np.random.default_rng([int(seed), 0]).permutation(num_records)
  labelled = np.zeros(num_records, bool)
  labelled[order[: int(round(fraction * num_records))]] = True
  return labelled


def budget_mask(
    kps_valid: np.ndarray,
    index: int,
    num_records: int,
    keypoints_per_pair: int,
    labelled_pair_fraction: float,
    seed: int,
) -> np.ndarray:
  """Which keypoints of training record `index` the loss may see (the label budget).

  A function of `(seed, index)` only: the same subset in every epoch, on every process and for
  every training seed, so withheld keypoints never reach the loss.

  Args:
    kps_valid: [n] bool, the record's real keypoints.
    index: the record's position in its split.
    num_records: the split's size.
    keypoints_per_pair: k keypoints kept per labelled pair, a seeded subset (0 = all).
    labelled_pair_fraction: exactly round(p * num_records) records, a seeded subset, keep any
      label; the others keep none.
    seed: the budget seed.

  Returns:
    [n] bool, kept keypoints (a subset of `kps_valid`).
  """
  valid = np.asarray(kps_valid, bool)
  if (
      labelled_pair_fraction < 1.0
      and not _labelled_records(int(seed), int(num_records), float(labelled_pair_fraction))[index]
  ):
    return np.zeros_like(valid)
  idx = np.nonzero(valid)[0]
  if keypoints_per_pair <= 0 or len(idx) <= keypoints_per_pair:
    return valid.copy()
  rng = np.random.default_rng([int(seed), 1, int(index)])
  kept = np.zeros_like(valid)
  kept[rng.choice(idx, size=int(keypoints_per_pair), replace=False)] = True
  return kept


@dataclasses.dataclass(frozen=True)
class LabelBudget(grain.transforms.MapWithIndex):
  """grain map over a split's records in their stored order: marks the kept keypoints
  (`_kept` [n] bool, see `budget_mask`); `preprocess_pair` builds labels from them only."""

  keypoints_per_pair: int
  labelled_pair_fraction: float
  num_records: int
  seed: int = 0

  def map_with_index(self, index: int, element):
    rec = dict(element)
    # grain passes the index of the repeated/shuffled view (epoch * num_records + i).
    rec['_kept'] = budget_mask(
        rec['kps_valid'],
        int(index) % self.num_records,
        self.num_records,
        self.keypoints_per_pair,
        self.labelled_pair_fraction,
        self.seed,
    )
    return rec


def dense_flow_to_grid(
    dense_flow: np.ndarray,
    dense_valid: np.ndarray,
    trg_map,
    src_map,
    img_size: int,
    feature_size: int,
):
  """A record's dense ground truth (original pixels) -> the flow grid of the batch, in cells.

  Cell `(i, j)` of the `feature_size` grid covers the output-image pixels whose centres lie in
  `[j jsz - 0.5, (j + 1) jsz - 0.5)` x `[i jsz - 0.5, (i + 1) jsz - 0.5)` (`jsz = img_size /
  feature_size`; bilinear upsampling, `evaluation.upsample_flow`, puts the cell's value at the
  middle of that square). Each output target pixel is taken back to the nearest original target
  pixel, given its displacement, and its match taken to the output source image; the pixel
  counts when the original pixel is valid and the match lies inside the output source image.
  A cell is valid iff one of its pixels counts, and its flow is the mean displacement of those
  pixels: every cell the object touches is labelled, as the sparse labels label the cells
  around a keypoint, so the cells whose middle falls just off a part's edge (where keypoints at
  tips and joints sit) are not left out.

  Args:
    dense_flow: [H, W, 2] float, original target pixel -> source displacement, pixels.
    dense_valid: [H, W] bool.
    trg_map, src_map: `(offset [2], scale [2])` of each image, original pixel -> output pixel
      `out = (orig - offset) * scale` (resize and crop).
    img_size: output image side S.
    feature_size: grid side fs.

  Returns:
    flow: [fs, fs, 2] float32, (x, y) displacement target -> source in grid cells, 0 where
    invalid; valid: [fs, fs] bool.
  """
  fs, s = int(feature_size), int(img_size)
  jsz = s / fs
  c = np.arange(s, dtype=np.float64)
  p_out = np.stack(np.meshgrid(c, c, indexing='xy'), -1)  # [S, S, 2] (x, y) output pixels
  t_off, t_scale = (np.asarray(a, np.float64) for a in trg_map)
  s_off, s_scale = (np.asarray(a, np.float64) for a in src_map)
  p_orig = p_out / t_scale + t_off
  h, w = dense_valid.shape
  q = np.floor(p_orig + 0.5).astype(np.int64)
  inside = (q[..., 0] >= 0) & (q[..., 0] < w) & (q[..., 1] >= 0) & (q[..., 1] < h)
  qx = np.clip(q[..., 0], 0, w - 1)
  qy = np.clip(q[..., 1], 0, h - 1)
  src_out = (p_orig + dense_flow[qy, qx] - s_off) * s_scale
  counts = (
      inside
      & np.asarray(dense_valid, bool)[qy, qx]
      & (src_out >= -0.5).all(-1)
      & (src_out <= s - 0.5).all(-1)
  ).ravel()
  cell = np.minimum(np.floor((c + 0.5) / jsz).astype(np.int64), fs - 1)
  ids = (cell[:, None] * fs + cell[None, :]).ravel()[counts]  # row-major cell of each pixel
  disp = (src_out - p_out).reshape(-1, 2)[counts] / jsz
  n = np.bincount(ids, minlength=fs * fs)
  total = np.stack([np.bincount(ids, disp[:, k], minlength=fs * fs) for k in (0, 1)], -1)
  valid = n > 0
  flow = np.where(valid[:, None], total / np.maximum(n, 1)[:, None], 0.0)
  return flow.reshape(fs, fs, 2).astype(np.float32), valid.reshape(fs, fs)


def preprocess_pair(
    rec: dict, opts: PreprocessOptions, rng: Optional[np.random.Generator] = None, features=None
) -> dict:
  """One record -> one row of the batch contract (see the module docstring).

  Args:
    rec: a record as read from the TFDS data source (`records` module), images decoded.
    opts: static options.
    rng: the record's random stream (training); None for evaluation.
    features: cached backbone features (`cache_features.FeatureCache`, frozen DINOv2): the
      images are replaced by their features `features.feature(imname, pixels)` [h, w, c],
      mirrored (token grid) wherever the image would be; colour augmentation and random crops
      are refused (ValueError).

  Returns:
    dict of numpy arrays: `src_img`, `trg_img` [S, S, 3] float32 (with `features`, [h, w, c]
    float32 features); `src_kps`, `trg_kps`
    [max_kps, 2] float32 (S-pixel units, the kept keypoints as a prefix, padding 0);
    `kps_valid` [max_kps] bool; `flow` [fs, fs, 2] float32 (from the kept keypoints);
    `pckthres`, `pckthres_bbox`, `pckthres_img`, `pckthres_bbox_legacy` () float32;
    `src_bbox`, `trg_bbox` [4] float32 (S-pixel units); `src_imsize`, `trg_imsize` [2] int32
    (original (h, w)); `category` () int32; `pair_valid` () bool; the SPair-71k difficulty
    levels () int32; with `opts.label_truth` also `withheld_src_kps`, `withheld_trg_kps`
    [max_kps, 2] float32, `withheld_kps_valid` [max_kps] bool (the record's keypoints the
    budget withheld, a prefix), `dense_flow` [fs, fs, 2] float32 (cells) and `dense_valid`
    [fs, fs] bool (`dense_flow_to_grid`; False everywhere without a dense ground truth).
  """
  s = int(opts.img_size)
  train = opts.train and rng is not None
  if features is not None and train and (opts.augment or opts.random_crop):
    raise ValueError(
        'cached features cannot take colour augmentation or random crops '
        '(data.augment, data.random_crop)'
    )
  valid = np.asarray(rec['kps_valid'], bool).copy()
  kept = valid & np.asarray(rec.get('_kept', valid), bool)
  out_imsize = {}
  imgs, kps, boxes, maps = {}, {}, {}, {}
  for side in ('src', 'trg'):  # In this order: the rng draws are the record's sequence.
    out_imsize[side] = np.asarray(rec[f'{side}_imsize'], np.int32)
    imgs[side], kps[side], boxes[side], maps[side] = _one_image(
        rec, side, opts, rng, train, features
    )
  flipped = bool(train and opts.flip and int(rec.get('flip', 0)))
  if flipped:
    _flip_pair(imgs, kps, boxes, valid, s)
  dense_known = 'dense_flow' in rec
  if _mirrors_source(rec, opts, rng, train):
    ids, perm = np.asarray(rec['kps_ids']), FLIP_TABLES[opts.dataset](int(rec['category']))
    mirrored = mirror_source(
        imgs['src'], kps['src'], kps['trg'], valid, kept, ids, perm, boxes['src'], s
    )
    if mirrored is not None:
      imgs['src'], kps['src'], kps['trg'], valid, kept, boxes['src'] = mirrored
      dense_known = False  # the record's dense truth is for the unmirrored source
  n = int(opts.max_kps)
  # Slots past `max_kps` are dropped, as before the budget; the kept ones form a prefix.
  in_range = np.arange(len(valid)) < n
  src_kps, valid_out = _compact(kps['src'], kept & in_range, n)
  trg_kps, _ = _compact(kps['trg'], kept & in_range, n)
  out = {
      'src_img': _network_input(imgs['src'], features),
      'trg_img': _network_input(imgs['trg'], features),
      'src_kps': src_kps,
      'trg_kps': trg_kps,
      'kps_valid': valid_out,
      'flow': keypoints_to_flow_np(
          src_kps, trg_kps, valid_out, opts.feature_size, opts.receptive_field, s
      ),
      **_thresholds(opts.dataset, kps['src'], valid, boxes['src'], s),
      'src_bbox': boxes['src'].astype(np.float32),
      'trg_bbox': boxes['trg'].astype(np.float32),
      'src_imsize': out_imsize['src'],
      'trg_imsize': out_imsize['trg'],
      'category': np.int32(rec['category']),
      'pair_valid': np.bool_(True),
  }
  for name in records.DIFFICULTY_FIELDS:
    out[name] = np.int32(rec.get(name, 0))
  if opts.label_truth:
    withheld = valid & ~kept & in_range
    out['withheld_src_kps'], out['withheld_kps_valid'] = _compact(kps['src'], withheld, n)
    out['withheld_trg_kps'], _ = _compact(kps['trg'], withheld, n)
    out['dense_flow'], out['dense_valid'] = _dense_truth(
        rec if dense_known else None, maps, flipped, s, int(opts.feature_size)
    )
  return out


def _one_image(rec: dict, side: str, opts: PreprocessOptions, rng, train: bool, features):
  """One side of a pair: (colour augmentation, random crop,) resize, keypoints and box scaled.

  Returns:
    `(image [S, S, 3] uint8 (or the cached features), kps [n, 2] float32 S-pixel units,
    box [4] float32, map)`, `map` = (offset, scale) from original pixels to S pixels.
  """
  s = int(opts.img_size)
  img = np.asarray(rec[f'{side}_img'])
  k = np.asarray(rec[f'{side}_kps'], np.float32).copy()
  box = np.asarray(rec[f'{side}_bbox'], np.float32).copy()
  if train and opts.augment:
    img = augment_lib.reference_color_augment(img, rng, opts.augment_p)
  h, w = img.shape[:2]
  if train and opts.random_crop and rng.random() < opts.random_crop_p:
    left, top, cw, ch = augment_lib.random_crop_params(rng, box, (h, w))
    img = img[top : top + ch, left : left + cw]
    k = k - np.array([left, top], np.float32)
    box = box - np.array([left, top, left, top], np.float32)
    h, w = ch, cw
    scale = np.array([s / w, s / h], np.float32)
    k = np.clip(k * scale, 0, s - 1)  # the reference clamps cropped keypoints
    offset = np.array([left, top], np.float64)
  else:
    scale = np.array([s / w, s / h], np.float32)
    k = k * scale
    offset = np.zeros(2)
  box = box * np.tile(scale, 2)
  img = (
      features.feature(rec[f'{side}_imname'], rec[f'{side}_img'])
      if features is not None
      else resize_image(np.ascontiguousarray(img), s)
  )
  return img, k, box, (offset, scale.astype(np.float64))


def _flip_pair(imgs, kps, boxes, valid, s: int) -> None:
  """Step 4, PF-PASCAL's flag: mirrors both images of a pair, in place (the dicts' 'src' and
  'trg'): image column `x` -> `S - 1 - x`, keypoints `x -> S - x` (the reference's one-pixel
  inconsistency, kept for parity), boxes mirrored as the keypoints."""
  for side in ('src', 'trg'):
    imgs[side] = imgs[side][:, ::-1]
    kps[side][valid, 0] = s - kps[side][valid, 0]
    x1, x2 = boxes[side][0], boxes[side][2]
    boxes[side][0], boxes[side][2] = s - x2, s - x1


def _mirrors_source(rec: dict, opts: PreprocessOptions, rng, train: bool) -> bool:
  """Step 4, `flip_source_p`: whether this training pair's source is mirrored. Draws from `rng`
  only for a dataset with keypoint ids (`FLIP_TABLES`, `kps_ids`) and `flip_source_p > 0`."""
  return bool(
      train
      and opts.flip_source_p > 0
      and opts.dataset in FLIP_TABLES
      and 'kps_ids' in rec
      and rng.random() < opts.flip_source_p
  )


def _network_input(img: np.ndarray, features) -> np.ndarray:
  """Step 6: the ImageNet-normalised image, float32; with cached `features`, `img` is the
  feature grid already, passed as float32."""
  if features is None:
    return normalize(img)
  return np.ascontiguousarray(img, np.float32)


def _thresholds(dataset: str, src_kps, valid, src_box, s: int) -> Dict[str, np.float32]:
  """The pair's PCK thresholds, S-pixel units (module docstring): `pckthres` (the benchmark's
  standard kind), `pckthres_bbox` (see `BBOX_FROM_KEYPOINTS`), `pckthres_img`,
  `pckthres_bbox_legacy`."""
  if dataset in BBOX_FROM_KEYPOINTS:
    ext = src_kps[valid]
    bbox = np.float32((ext.max(0) - ext.min(0)).max())
    legacy = legacy_willow_threshold(src_kps, valid)
  else:
    bbox = legacy = np.float32(max(src_box[2] - src_box[0], src_box[3] - src_box[1]))
  img = np.float32(s)
  standard = constants.STANDARD_THRESHOLD[dataset]
  return {
      'pckthres': bbox if standard == 'bbox' else img,
      'pckthres_bbox': bbox,
      'pckthres_img': img,
      'pckthres_bbox_legacy': legacy,
  }


def _dense_truth(rec: Optional[dict], maps, flipped: bool, s: int, fs: int):
  """The record's dense ground truth on the flow grid, `(flow [fs, fs, 2], valid [fs, fs])`;
  all invalid without one (`rec` None)."""
  if rec is None:
    return np.zeros((fs, fs, 2), np.float32), np.zeros((fs, fs), bool)
  flow, valid = dense_flow_to_grid(
      np.asarray(rec['dense_flow']), np.asarray(rec['dense_valid']), maps['trg'], maps['src'], s, fs
  )
  if flipped:  # both images mirrored (x -> S - 1 - x on pixels): cell j <-> fs - 1 - j
    flow = flow[:, ::-1] * np.array([-1.0, 1.0], np.float32)
    valid = valid[:, ::-1]
  return np.ascontiguousarray(flow, np.float32), np.ascontiguousarray(valid)


@dataclasses.dataclass(frozen=True)
class TrainPreprocess(grain.transforms.RandomMap):
  """grain random map: `preprocess_pair` with the record's random stream (and `features`)."""

  opts: PreprocessOptions
  features: Any = dataclasses.field(default=None, compare=False)

  def random_map(self, element, rng: np.random.Generator):
    return preprocess_pair(element, self.opts, rng, self.features)


@dataclasses.dataclass(frozen=True)
class EvalPreprocess(grain.transforms.Map):
  """grain map: `preprocess_pair` without randomness; padding rows get `pair_valid=False`."""

  opts: PreprocessOptions
  features: Any = dataclasses.field(default=None, compare=False)

  def map(self, element):
    padding = bool(element.get('_padding', False))
    out = preprocess_pair(element, self.opts, None, self.features)
    out['pair_valid'] = np.bool_(not padding)
    return out
