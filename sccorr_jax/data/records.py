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
unreadable image, an image whose pixel values cannot be mapped to 8 bits, missing or malformed
annotation, keypoints that are not [n, 2] finite numbers, a box that is not a non-empty xyxy box
inside its image, a difficulty level that is not an integer in its range, an undecodable
split-file line, no valid keypoint, more than 40 keypoints) makes the pair a *bad record*. With
`on_bad_record='skip'` (default) it is logged with its file and problem, counted and listed at
the end; with `'raise'` preparation stops at the first one. A pair listed twice in a split file
is kept once, with a note. Preparation always stops with an error when a split file is missing,
or when more than `max_bad_fraction` of a split's pairs are bad, or when a split has no good
pair. A single keypoint outside its image (more than 1.5 pixels beyond the border) is dropped
from the pair, like PF-PASCAL's NaN keypoints, and reported. TFDS writes into a temporary
directory and renames it only when every split is complete, so a failed preparation never
leaves a dataset that reads as complete.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from sccorr_jax import constants

MAX_KPS = 40
# A keypoint may sit this many pixels beyond the pixel-centre range [0, size - 1] and still count
# as inside (annotations of border points are often 1-based or at `size`).
KPS_BORDER_TOLERANCE = 1.5

# fmt: off
SPAIR_CATEGORIES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
                    'chair', 'cow', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
                    'sheep', 'train', 'tvmonitor')
PASCAL_CATEGORIES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
                     'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person',
                     'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
WILLOW_CATEGORIES = ('car(G)', 'car(M)', 'car(S)', 'duck(S)', 'motorbike(G)', 'motorbike(M)',
                     'motorbike(S)', 'winebottle(M)', 'winebottle(wC)', 'winebottle(woC)')
# fmt: on

DIFFICULTY_FIELDS = constants.DIFFICULTY_FIELDS
# The largest level of each SPair-71k difficulty field (Min et al. 2019): viewpoint and scale
# variation 0 easy / 1 medium / 2 hard; truncation and occlusion 0 none / 1 source / 2 target /
# 3 both.
SPAIR_MAX_LEVELS = {'viewpoint_variation': 2, 'scale_variation': 2, 'truncation': 3, 'occlusion': 3}


def pair_features(
    category_names: Sequence[str], extra: Optional[Dict[str, tfds.features.FeatureConnector]] = None
):
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


def dense_truth_features(size: int) -> Dict[str, tfds.features.FeatureConnector]:
  """The `extra` features of an embedded dataset with exact dense ground truth (`size` px):
  `dense_flow` [S, S, 2] float32 (target pixel -> source displacement, pixels) and
  `dense_valid` [S, S] bool."""
  raw = tfds.features.Encoding.BYTES
  return {
      'dense_flow': tfds.features.Tensor(shape=(size, size, 2), dtype=np.float32, encoding=raw),
      'dense_valid': tfds.features.Tensor(shape=(size, size), dtype=np.bool_, encoding=raw),
  }


class BadRecordError(ValueError):
  """A record (pair) of a benchmark is unusable; the message names the file and the problem."""

  def __init__(self, file: str, problem: str):
    problem = ' '.join(str(problem).split())  # one line, whatever a library's message was
    super().__init__(f'{" ".join(str(file).splitlines())}: {problem}')
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
    if not 0 <= self.max_bad_fraction <= 1:
      raise ValueError(f'max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}')


@dataclasses.dataclass
class PreparationReport:
  """Bad records, dropped keypoints and other notes (duplicates) met during preparation."""

  bad: List[Dict[str, str]] = dataclasses.field(default_factory=list)
  dropped_kps: List[Dict[str, str]] = dataclasses.field(default_factory=list)
  counts: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)
  notes: List[Dict[str, str]] = dataclasses.field(default_factory=list)

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
    for n in self.notes:
      lines.append(f'  note [{n["split"]}] {n["record"]}: {n["problem"]}')
    return '\n'.join(lines)


class SplitGuard:
  """Runs a split's records through the bad-record policy.

  Usage inside `_generate_examples`: `for name, make in items: ex = guard.run(name, make)`;
  `make()` builds the example or raises `BadRecordError`; `run` returns None for a skipped record.
  Any other exception from `make()` stops preparation with a `PreparationError` naming the
  record (it is a defect nobody foresaw, or a bug: it is not skipped silently).
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
      self.report.bad.append(dict(split=self.split, record=record, file=e.file, problem=e.problem))
      logging.warning('Skipping bad record [%s] %s: %s', self.split, record, e)
      return None
    except (PreparationError, KeyboardInterrupt):
      raise
    except Exception as e:  # pylint: disable=broad-except  # named, never swallowed
      raise PreparationError(
          f'[{self.split}] record {record}: unexpected {type(e).__name__}: {_one_line(e)} '
          '(an unforeseen defect of the input or a bug; please report it)'
      ) from e
    self.written += 1
    return example

  def drop_note(self, record: str, problem: str):
    self.report.dropped_kps.append(dict(split=self.split, record=record, problem=problem))
    logging.warning('[%s] %s: %s', self.split, record, problem)

  def note(self, record: str, problem: str):
    """Records something about the input that preparation worked around (a duplicate line)."""
    self.report.notes.append(dict(split=self.split, record=record, problem=problem))
    logging.warning('[%s] %s: %s', self.split, record, problem)

  def finish(self):
    total = self.written + self.bad
    self.report.counts[self.split] = dict(written=self.written, bad=self.bad)
    if self.bad:
      logging.warning('[%s] %d of %d pairs skipped as bad records', self.split, self.bad, total)
    if self.written == 0:
      if self.bad:
        logging.error('Bad records:\n%s', self.report.summary())
      first = self.report.bad[-self.bad] if self.bad else None
      raise PreparationError(
          f'split {self.split!r}: no usable pair out of {total}'
          + (f' (first problem: {first["file"]}: {first["problem"]})' if first else '')
      )
    if self.bad > self.policy.max_bad_fraction * total:
      logging.error('Bad records:\n%s', self.report.summary())
      raise PreparationError(
          f'split {self.split!r}: {self.bad} of {total} pairs are bad (more than '
          f'max_bad_fraction={self.policy.max_bad_fraction}); is the dataset directory right? '
          'The bad records are listed above.'
      )


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split())[:500]


def encode_png(img: np.ndarray) -> bytes:
  """[h, w, 3] uint8 -> PNG bytes of a record (lossless; fast compression: generated datasets)."""
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


@functools.lru_cache(maxsize=4096)
def read_encoded_image(path: str) -> Tuple[bytes, Tuple[int, int]]:
  """Reads an image file for a record.

  Args:
    path: image file.

  Returns:
    (encoded bytes, (h, w)). RGB JPEGs keep their original bytes; any other image (grey, CMYK,
    RGBA, palette, PNG, ...) is converted to RGB as the reference does (`PIL .convert('RGB')`,
    which drops alpha) and re-encoded as lossless PNG. 16-bit grey images (PIL modes `I;16*`)
    are scaled to 8 bits (`round(v * 255 / 65535)`; PIL's own conversion would clip them to
    255); 16-bit colour PNGs are read by PIL as their high bytes.

  Raises:
    BadRecordError: the file is missing or cannot be decoded, or its pixels are 32-bit integers
      or floats (PIL modes `I`, `F`), whose range is unknown.
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
      if mode.startswith('I;16'):
        grey = np.asarray(im).astype(np.uint32)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        rgb = Image.fromarray(np.repeat(grey8[..., None], 3, axis=-1), 'RGB')
      elif mode in ('I', 'F') or mode.startswith(('I;', 'F;')):
        kind = 'float' if mode[0] == 'F' else '32-bit integer'
        raise BadRecordError(
            path,
            f'{fmt} image whose pixels PIL reads as {kind}s (mode {mode!r}): their range '
            'is unknown; convert it to an 8-bit RGB image',
        )
      else:
        rgb = im.convert('RGB')
  except BadRecordError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds on bad files
    raise BadRecordError(
        path, f'image cannot be decoded ({type(e).__name__}: {_one_line(e)})'
    ) from e
  if w < 1 or h < 1:
    raise BadRecordError(path, f'image has no pixels ({w}x{h})')
  buf = io.BytesIO()
  rgb.save(buf, format='PNG')
  return buf.getvalue(), (h, w)


def _inside(kps: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
  h, w = hw
  t = KPS_BORDER_TOLERANCE
  return (kps[:, 0] >= -t) & (kps[:, 0] <= w - 1 + t) & (kps[:, 1] >= -t) & (kps[:, 1] <= h - 1 + t)


def _describe(value, limit: int = 80) -> str:
  """`repr(value)` on one line, shortened to `limit` characters."""
  text = ' '.join(repr(value).split())
  return text if len(text) <= limit else text[:limit] + '...'


def _check_numbers(value, what: str, file: str):
  """Raises `BadRecordError` unless `value` is (nested lists/tuples of) int/float numbers."""
  if isinstance(value, (bool, np.bool_)):
    raise BadRecordError(file, f'{what}: booleans ({_describe(value)}), expected numbers')
  if isinstance(value, (int, float, np.integer, np.floating)):
    return
  if isinstance(value, (list, tuple)):
    for v in value:
      _check_numbers(v, what, file)
    return
  raise BadRecordError(
      file, f'{what}: {type(value).__name__} {_describe(value)} where numbers ' 'were expected'
  )


def numeric_array(value, what: str, file: str) -> np.ndarray:
  """`value` (a JSON value, a numpy array) as a float64 array, checked element by element.

  Booleans, strings, nulls, complex numbers and integers too large for a float are refused
  (numpy would silently turn `True` into 1.0 and `'12'` into 12.0).

  Args:
    value: nested lists/tuples of numbers, or a numeric numpy array.
    what: the field, for messages (e.g. "field 'src_kps'").
    file: the annotation file, for messages.

  Returns:
    float64 array of the same nesting (non-finite values are kept: callers decide).

  Raises:
    BadRecordError: naming `file`, `what` and the problem.
  """
  if isinstance(value, np.ndarray):
    if value.dtype.kind == 'b':
      raise BadRecordError(file, f'{what}: booleans, expected numbers')
    if value.dtype.kind == 'O':
      value = value.tolist()
    elif value.dtype.kind not in 'iuf':
      raise BadRecordError(file, f'{what}: values of type {value.dtype}, expected real numbers')
    else:
      return value.astype(np.float64)
  try:
    _check_numbers(value, what, file)
  except RecursionError as e:
    raise BadRecordError(file, f'{what}: nested too deeply') from e
  try:
    return np.array(value, dtype=np.float64)
  except OverflowError as e:
    raise BadRecordError(file, f'{what}: a number too large for a float ({e})') from e
  except (TypeError, ValueError) as e:
    raise BadRecordError(file, f'{what}: not a regular array of numbers ({_one_line(e)})') from e


def keypoint_array(value, what: str, file: str, *, nan_invisible: bool = False) -> np.ndarray:
  """[n, 2] float64 (x, y) keypoints from an annotation value; refuses anything else.

  Args:
    value: nested lists [[x, y], ...] or an [n, 2] numeric array; `[]` means no keypoint.
    what: the field, for messages.
    file: the annotation file, for messages.
    nan_invisible: NaN marks an invisible keypoint (PF-PASCAL) and is kept for the caller to
      drop; otherwise a NaN is a defect. Infinities are always a defect.

  Raises:
    BadRecordError: booleans, strings, flat lists, (x, y, visibility) triples, NaN (unless
      `nan_invisible`), infinities or numbers too large for a float.
  """
  arr = numeric_array(value, what, file)
  if arr.size == 0:
    return np.zeros((0, 2), np.float64)
  if arr.ndim != 2 or arr.shape[1] != 2:
    hint = ''
    if arr.ndim == 1:
      hint = f' (a flat list of {arr.shape[0]} numbers)'
    elif arr.ndim == 2 and arr.shape[1] == 3:
      hint = ' ((x, y, visibility) triples?)'
    raise BadRecordError(
        file, f'{what}: keypoints must be [n, 2] (x, y) pairs, got shape ' f'{arr.shape}{hint}'
    )
  bad = np.isinf(arr) if nan_invisible else ~np.isfinite(arr)
  if bad.any():
    i = int(np.nonzero(bad.any(1))[0][0])
    raise BadRecordError(
        file,
        f'{what}: keypoint {i} is not finite ({tuple(arr[i])}); '
        f'{int(bad.any(1).sum())} such keypoint(s)',
    )
  return arr


def clean_keypoints(
    src_kps,
    trg_kps,
    src_hw,
    trg_hw,
    *,
    file: str,
    record: str,
    guard: Optional[SplitGuard] = None,
    nan_invisible: bool = True,
):
  """Validates, filters and pads one pair's keypoints.

  Keypoints must be [n, 2] real numbers (see `keypoint_array`). With `nan_invisible` (the
  default, PF-PASCAL's rule) keypoints with a NaN in either image are dropped silently;
  otherwise a NaN makes the pair bad. Keypoints outside either image (beyond
  `KPS_BORDER_TOLERANCE`) are dropped and reported.

  Args:
    src_kps, trg_kps: [n, 2] array-likes, (x, y) original pixels.
    src_hw, trg_hw: (h, w) of the images.
    file: annotation file, for messages.
    record: record name, for messages.
    guard: where to report dropped keypoints.
    nan_invisible: whether NaN marks an invisible keypoint.

  Returns:
    (src_kps [40, 2] float32, trg_kps [40, 2] float32, kps_valid [40] bool); padding is 0.

  Raises:
    BadRecordError: malformed arrays, different counts, more than 40 keypoints, or none left.
  """
  src = keypoint_array(src_kps, 'source keypoints', file, nan_invisible=nan_invisible)
  trg = keypoint_array(trg_kps, 'target keypoints', file, nan_invisible=nan_invisible)
  if len(src) != len(trg):
    raise BadRecordError(file, f'{len(src)} source keypoints but {len(trg)} target keypoints')
  finite = np.isfinite(src).all(1) & np.isfinite(trg).all(1)
  src, trg = src[finite], trg[finite]
  inside = _inside(src, src_hw) & _inside(trg, trg_hw)
  if not inside.all():
    bad = np.nonzero(~inside)[0]
    msg = (
        f'dropped {len(bad)} keypoint(s) outside the images (source (h, w)={tuple(src_hw)}, '
        f'target (h, w)={tuple(trg_hw)}): '
        + ', '.join(
            f'src {tuple(np.round(src[i], 1))} trg {tuple(np.round(trg[i], 1))}' for i in bad
        )
    )
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


def parse_bbox(value, file: str, field: str, hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """[4] xyxy float32 from an annotation value; raises `BadRecordError` naming the field.

  The box must be 4 finite real numbers (a [1, 4] array is accepted) with x1 < x2 and y1 < y2;
  given the image's `hw` = (h, w), it must also lie inside the image, with the keypoints'
  tolerance (`KPS_BORDER_TOLERANCE` beyond the pixel-centre range [0, size - 1]).
  """
  box = numeric_array(value, f'field {field!r}', file)
  if box.shape not in ((4,), (1, 4)) or not np.isfinite(box).all():
    raise BadRecordError(
        file, f'field {field!r} must be 4 finite numbers xyxy, got ' f'{_describe(value)}'
    )
  box = box.reshape(4)
  x1, y1, x2, y2 = box
  if not (x1 < x2 and y1 < y2):
    kind = 'zero area' if x1 == x2 or y1 == y2 else 'inverted (x2 < x1 or y2 < y1)'
    raise BadRecordError(
        file,
        f'field {field!r}: box {box.tolist()} is {kind}; expected xyxy ' 'with x1 < x2 and y1 < y2',
    )
  if hw is not None:
    check_box_in_image(box, hw, file, field)
  return box.astype(np.float32)


def check_box_in_image(box, hw: Tuple[int, int], file: str, field: str):
  """Raises `BadRecordError` when the xyxy `box` extends beyond the (h, w) image by more than
  `KPS_BORDER_TOLERANCE` pixels (boxes of the benchmarks are 0- or 1-based pixel boxes)."""
  h, w = hw
  x1, y1, x2, y2 = (float(v) for v in box)
  t = KPS_BORDER_TOLERANCE
  if x1 < -t or y1 < -t or x2 > w - 1 + t or y2 > h - 1 + t:
    raise BadRecordError(
        file,
        f'field {field!r}: box {[x1, y1, x2, y2]} extends beyond the ' f'image (h, w)={tuple(hw)}',
    )


def parse_level(value, file: str, field: str, max_level: int) -> np.int32:
  """A difficulty level: an integer (JSON int, not bool/float/string) in [0, max_level]."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise BadRecordError(
        file, f'field {field!r}: {_describe(value)} is not an integer level ' f'(0..{max_level})'
    )
  if not 0 <= value <= max_level:
    raise BadRecordError(
        file, f'field {field!r}: level {_describe(value)} outside ' f'0..{max_level}'
    )
  return np.int32(value)


_INT_TEXT = re.compile(r'[+-]?\d+(\.0*)?')


def parse_int_text(text: str, file: str, what: str, lo: int, hi: int) -> int:
  """An integer written in a csv cell ('3', '3.0'), checked to lie in [lo, hi]."""
  if not _INT_TEXT.fullmatch(text.strip()):
    raise BadRecordError(file, f'{what} {_describe(text)} is not an integer')
  v = int(text.strip().split('.')[0])
  if not lo <= v <= hi:
    raise BadRecordError(file, f'{what} {_describe(text)} outside {lo}..{hi}')
  return v


def read_text_lines(path: str) -> List[Tuple[int, Optional[str]]]:
  """Non-empty lines of a text file as (1-based line number, stripped text); the text is None
  for a line that is not UTF-8 (a leading byte-order mark is ignored)."""
  with open(path, 'rb') as f:
    raw = f.read()
  if raw.startswith(b'\xef\xbb\xbf'):
    raw = raw[3:]
  out = []
  for i, line in enumerate(raw.split(b'\n')):
    try:
      text = line.decode('utf-8').strip()
    except UnicodeDecodeError:
      if line.strip():
        out.append((i + 1, None))
      continue
    if text:
      out.append((i + 1, text))
  return out


def _undecodable(text: str) -> bool:
  return any('\udc80' <= ch <= '\udcff' for ch in text)


def read_csv_rows(path: str) -> List[Tuple[int, Optional[List[str]]]]:
  """Non-empty rows of a csv file (header included) as (1-based line number, stripped cells);
  the cells are None for a row that is not UTF-8.

  Raises:
    PreparationError: the file is missing or is not csv (e.g. a field over the csv limit).
  """
  if not os.path.isfile(path):
    raise PreparationError(f'pair list is missing: {path}')
  with open(path, 'rb') as f:
    raw = f.read()
  if raw.startswith(b'\xef\xbb\xbf'):
    raw = raw[3:]
  reader = csv.reader(io.StringIO(raw.decode('utf-8', errors='surrogateescape'), newline=''))
  out = []
  try:
    for row in reader:
      if any(_undecodable(c) for c in row):
        out.append((reader.line_num, None))
      elif any(c.strip() for c in row):
        out.append((reader.line_num, [c.strip() for c in row]))
  except csv.Error as e:
    raise PreparationError(f'{path} line {reader.line_num}: not a csv file ({e})') from e
  return out


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
