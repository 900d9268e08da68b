"""The record format shared by every dataset, and the checks that preparation applies.

Every TFDS builder of this package (SPair-71k, PF-PASCAL, PF-WILLOW, the embedded synthetic
set) writes examples with the same features, so the grain pipelines treat them alike. Values are
in the *original* images' pixels; resizing to the network's input happens in the pipeline.

| feature | shape, dtype | meaning |
| --- | --- | --- |
| `pair_id` | str | the benchmark's name of the pair (SPair layout line, csv row, ...) |
| `src_imname`, `trg_imname` | str | image file paths relative to the dataset root |
| `src_img`, `trg_img` | [h, w, 3] uint8 (stored encoded) | the original JPEG bytes; images that are not RGB JPEGs (grey, CMYK, RGBA, palette, PNG) are converted to RGB and stored as lossless PNG |
| `src_imsize`, `trg_imsize` | [2] int32 | (h, w) of the images |
| `src_kps`, `trg_kps` | [40, 2] float32 | (x, y) keypoints in original pixels; padding slots are 0 |
| `kps_valid` | [40] bool | real keypoint slots (a prefix: the first `n` slots) |
| `src_bbox`, `trg_bbox` | [4] float32 | object boxes xyxy, original pixels |
| `category` | int (ClassLabel) | category id; names in the dataset's metadata |
| `flip` | int32 | PF-PASCAL training pairs: 1 = flip both images horizontally (the csv's flag) |
| `viewpoint_variation`, `scale_variation`, `truncation`, `occlusion` | int32 | SPair-71k difficulty levels (0 elsewhere) |

Bad input (the documented rule, see `docs/data.md`): a problem confined to one pair (missing or
unreadable image, missing or malformed annotation, no valid keypoint, more than 40 keypoints)
makes the pair a *bad record*. With `on_bad_record='skip'` (default) it is logged with its file
and problem, counted and listed at the end; with `'raise'` preparation stops at the first one.
Preparation always stops with an error when a split file is missing, or when more than
`max_bad_fraction` of a split's pairs are bad, or when a split has no good pair. A single
keypoint outside its image (more than 1.5 pixels beyond the border) is dropped from the pair,
like PF-PASCAL's NaN keypoints, and reported. TFDS writes into a temporary directory and renames it
only when every split is complete, so a failed preparation never leaves a dataset that reads as
complete.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

MAX_KPS = 40
# A keypoint may sit this many pixels beyond the pixel-centre range [0, size - 1] and still count
# as inside (annotations of border points are often 1-based or at `size`).
KPS_BORDER_TOLERANCE = 1.5

SPAIR_CATEGORIES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
                    'chair', 'cow', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
                    'sheep', 'train', 'tvmonitor')
PASCAL_CATEGORIES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
                     'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person',
                     'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
WILLOW_CATEGORIES = ('car(G)', 'car(M)', 'car(S)', 'duck(S)', 'motorbike(G)', 'motorbike(M)',
                     'motorbike(S)', 'winebottle(M)', 'winebottle(wC)', 'winebottle(woC)')

DIFFICULTY_FIELDS = ('viewpoint_variation', 'scale_variation', 'truncation', 'occlusion')


def pair_features(category_names: Sequence[str],
                  extra: Optional[Dict[str, tfds.features.FeatureConnector]] = None):
  """The TFDS `FeaturesDict` of one pair record (see the module docstring)."""
  f32 = np.float32
  feats = {
      'pair_id': tfds.features.Text(),
      'src_imname': tfds.features.Text(),
      'trg_imname': tfds.features.Text(),
      'src_img': tfds.features.Image(shape=(None, None, 3)),
      'trg_img': tfds.features.Image(shape=(None, None, 3)),
      'src_imsize': tfds.features.Tensor(shape=(2,), dtype=np.int32),
      'trg_imsize': tfds.features.Tensor(shape=(2,), dtype=np.int32),
      'src_kps': tfds.features.Tensor(shape=(MAX_KPS, 2), dtype=f32),
      'trg_kps': tfds.features.Tensor(shape=(MAX_KPS, 2), dtype=f32),
      'kps_valid': tfds.features.Tensor(shape=(MAX_KPS,), dtype=np.bool_),
      'src_bbox': tfds.features.Tensor(shape=(4,), dtype=f32),
      'trg_bbox': tfds.features.Tensor(shape=(4,), dtype=f32),
      'category': tfds.features.ClassLabel(names=list(category_names)),
      'flip': tfds.features.Tensor(shape=(), dtype=np.int32),
  }
  for name in DIFFICULTY_FIELDS:
    feats[name] = tfds.features.Tensor(shape=(), dtype=np.int32)
  feats.update(extra or {})
  return tfds.features.FeaturesDict(feats)


class BadRecordError(ValueError):
  """A record (pair) of a benchmark is unusable; the message names the file and the problem."""

  def __init__(self, file: str, problem: str):
    super().__init__(f'{file}: {problem}')
    self.file = str(file)
    self.problem = problem


class PreparationError(RuntimeError):
  """Preparation cannot produce a complete dataset (missing split file, too many bad pairs)."""


@dataclasses.dataclass
class BadRecordPolicy:
  """What preparation does with bad records (see the module docstring).

  Attributes:
    on_bad_record: 'skip' (log, count, list at the end) or 'raise' (stop at the first).
    max_bad_fraction: stop when more than this fraction of a split's pairs is bad.
  """
  on_bad_record: str = 'skip'
  max_bad_fraction: float = 0.25

  def __post_init__(self):
    if self.on_bad_record not in ('skip', 'raise'):
      raise ValueError(f"on_bad_record must be 'skip' or 'raise', got {self.on_bad_record!r}")


@dataclasses.dataclass
class PreparationReport:
  """Bad records and dropped keypoints met during preparation, per split."""
  bad: List[Dict[str, str]] = dataclasses.field(default_factory=list)
  dropped_kps: List[Dict[str, str]] = dataclasses.field(default_factory=list)
  counts: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  def summary(self) -> str:
    lines = []
    for split, c in sorted(self.counts.items()):
      lines.append(f'{split}: {c["written"]} pairs written, {c["bad"]} bad pairs skipped')
    for b in self.bad:
      lines.append(f'  skipped [{b["split"]}] {b["record"]}: {b["file"]}: {b["problem"]}')
    for d in self.dropped_kps:
      lines.append(f'  dropped keypoints [{d["split"]}] {d["record"]}: {d["problem"]}')
    return '\n'.join(lines)


class SplitGuard:
  """Runs a split's records through the bad-record policy.

  Usage inside `_generate_examples`: `for name, make in items: ex = guard.run(name, make)`;
  `make()` builds the example or raises `BadRecordError`; `run` returns None for a skipped record.
  `guard.finish()` raises `PreparationError` when too many records were bad.
  """

  def __init__(self, split: str, policy: BadRecordPolicy, report: PreparationReport):
    self.split = split
    self.policy = policy
    self.report = report
    self.written = 0
    self.bad = 0

  def run(self, record: str, make):
    try:
      example = make()
    except BadRecordError as e:
      if self.policy.on_bad_record == 'raise':
        raise PreparationError(f'[{self.split}] bad record {record}: {e}') from e
      self.bad += 1
      self.report.bad.append(dict(split=self.split, record=record, file=e.file,
                                  problem=e.problem))
      logging.warning('Skipping bad record [%s] %s: %s', self.split, record, e)
      return None
    self.written += 1
    return example

  def drop_note(self, record: str, problem: str):
    self.report.dropped_kps.append(dict(split=self.split, record=record, problem=problem))
    logging.warning('[%s] %s: %s', self.split, record, problem)

  def finish(self):
    total = self.written + self.bad
    self.report.counts[self.split] = dict(written=self.written, bad=self.bad)
    if self.bad:
      logging.warning('[%s] %d of %d pairs skipped as bad records', self.split, self.bad, total)
    if self.written == 0:
      raise PreparationError(f'split {self.split!r}: no usable pair out of {total}')
    if self.bad > self.policy.max_bad_fraction * total:
      raise PreparationError(
          f'split {self.split!r}: {self.bad} of {total} pairs are bad (more than '
          f'max_bad_fraction={self.policy.max_bad_fraction}); is the dataset directory right? '
          'Bad records:\n' + self.report.summary())


@functools.lru_cache(maxsize=4096)
def load_image(path: str) -> Tuple[bytes, Tuple[int, int]]:
  """Reads an image file for a record.

  Args:
    path: image file.

  Returns:
    (encoded bytes, (h, w)). RGB JPEGs keep their original bytes; any other image (grey, CMYK,
    RGBA, palette, PNG, ...) is converted to RGB as the reference does (`PIL .convert('RGB')`,
    which drops alpha) and re-encoded as lossless PNG.

  Raises:
    BadRecordError: the file is missing or cannot be decoded.
  """
  if not os.path.isfile(path):
    raise BadRecordError(path, 'image file is missing')
  try:
    with open(path, 'rb') as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      fmt, mode = im.format, im.mode
      w, h = im.size
      if fmt == 'JPEG' and mode == 'RGB':
        return data, (h, w)
      rgb = im.convert('RGB')
  except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
    raise BadRecordError(path, f'image cannot be decoded ({type(e).__name__}: {e})') from e
  buf = io.BytesIO()
  rgb.save(buf, format='PNG')
  return buf.getvalue(), (h, w)


def _inside(kps: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
  h, w = hw
  t = KPS_BORDER_TOLERANCE
  return ((kps[:, 0] >= -t) & (kps[:, 0] <= w - 1 + t) & (kps[:, 1] >= -t)
          & (kps[:, 1] <= h - 1 + t))


def clean_keypoints(src_kps, trg_kps, src_hw, trg_hw, *, file: str, record: str,
                    guard: Optional[SplitGuard] = None):
  """Validates, filters and pads one pair's keypoints.

  Keypoints with a NaN in either image are dropped silently (PF-PASCAL's rule); keypoints
  outside either image (beyond `KPS_BORDER_TOLERANCE`) are dropped and reported.

  Args:
    src_kps, trg_kps: [n, 2] array-likes, (x, y) original pixels.
    src_hw, trg_hw: (h, w) of the images.
    file: annotation file, for messages.
    record: record name, for messages.
    guard: where to report dropped keypoints.

  Returns:
    (src_kps [40, 2] float32, trg_kps [40, 2] float32, kps_valid [40] bool); padding is 0.

  Raises:
    BadRecordError: malformed arrays, different counts, more than 40 keypoints, or none left.
  """
  try:
    src = np.asarray(src_kps, dtype=np.float64).reshape(-1, 2)
    trg = np.asarray(trg_kps, dtype=np.float64).reshape(-1, 2)
  except (TypeError, ValueError) as e:
    raise BadRecordError(file, f'keypoints are not (x, y) number pairs ({e})') from e
  if len(src) != len(trg):
    raise BadRecordError(file, f'{len(src)} source keypoints but {len(trg)} target keypoints')
  finite = np.isfinite(src).all(1) & np.isfinite(trg).all(1)
  src, trg = src[finite], trg[finite]
  inside = _inside(src, src_hw) & _inside(trg, trg_hw)
  if not inside.all():
    bad = np.nonzero(~inside)[0]
    msg = (f'dropped {len(bad)} keypoint(s) outside the images (source (h, w)={tuple(src_hw)}, '
           f'target (h, w)={tuple(trg_hw)}): ' + ', '.join(
               f'src {tuple(np.round(src[i], 1))} trg {tuple(np.round(trg[i], 1))}' for i in bad))
    if guard is not None:
      guard.drop_note(record, f'{file}: {msg}')
    src, trg = src[inside], trg[inside]
  n = len(src)
  if n == 0:
    raise BadRecordError(file, 'no valid keypoint in the pair')
  if n > MAX_KPS:
    raise BadRecordError(file, f'{n} keypoints, more than the supported {MAX_KPS}')
  out_src = np.zeros((MAX_KPS, 2), np.float32)
  out_trg = np.zeros((MAX_KPS, 2), np.float32)
  out_src[:n] = src
  out_trg[:n] = trg
  valid = np.arange(MAX_KPS) < n
  return out_src, out_trg, valid


def parse_bbox(value, file: str, field: str) -> np.ndarray:
  """[4] xyxy float32 from an annotation value; raises `BadRecordError` naming the field."""
  try:
    box = np.asarray(value, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError) as e:
    raise BadRecordError(file, f'field {field!r} is not a box ({e})') from e
  if box.shape != (4,) or not np.isfinite(box).all():
    raise BadRecordError(file, f'field {field!r} must be 4 finite numbers xyxy, got {value!r}')
  return box.astype(np.float32)


def keypoint_box(kps: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """[4] xyxy float32 extent of the valid keypoints."""
  k = kps[valid]
  return np.array([k[:, 0].min(), k[:, 1].min(), k[:, 0].max(), k[:, 1].max()], np.float32)


def base_example(**kw) -> dict:
  """Fills the fields a benchmark does not have with their neutral values."""
  ex = dict(flip=np.int32(0))
  for name in DIFFICULTY_FIELDS:
    ex[name] = np.int32(0)
  ex.update(kw)
  return ex


def find_root(manual_dir: str, folder_name: str, marker: str) -> Optional[str]:
  """The dataset root inside `manual_dir`: `manual_dir` itself or `manual_dir/folder_name`,
  whichever contains `marker`."""
  for cand in (manual_dir, os.path.join(manual_dir, folder_name)):
    if cand and os.path.exists(os.path.join(cand, marker)):
      return cand
  return None
