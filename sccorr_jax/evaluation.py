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

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sccorr_jax import geometry


def _linear_taps(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Host-side 1-D align_corners=False bilinear taps for resizing `n_in` -> `n_out` samples.

  Output sample `i` reads input coordinate `max((i + 0.5) * n_in / n_out - 0.5, 0)`, as PyTorch's
  `upsample_bilinear2d(align_corners=False)`.

  Returns:
    `(i0, i1, w0, w1)`, each [n_out]: int32 lower/upper input index (`i1 == i0` at the last
    input sample) and float64 weights `w0 = 1 - w1`, `w1 = coordinate - i0`.
  """
  scale = n_in / n_out
  coord = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(coord).astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1).astype(np.int32)
  w1 = coord - i0
  return i0, i1, 1.0 - w1, w1


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
  y0, y1, wy0, wy1 = _linear_taps(h, img_h)
  x0, x1, wx0, wx1 = _linear_taps(w, img_w)
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

  taps_y = [jnp.asarray(v)[kp_y] for v in _linear_taps(h, img_h)]  # each [b, n]
  taps_x = [jnp.asarray(v)[kp_x] for v in _linear_taps(w, img_w)]
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


# ================================================================================================
# The evaluator: protocols, sums-and-counts accumulation, reports.
#
# A *protocol* is (benchmark, split, threshold kind, alpha, averaging, resolution, direction).
# Every number the evaluator reports carries all of it. Resolution: images resized to
# `img_size` x `img_size` (aspect not kept) and keypoints scaled per axis, as the reference;
# distances and thresholds are in those pixels. Direction: *target* keypoints are transferred to
# the source with the predicted flow (target -> source) and compared with the ground-truth
# *source* keypoints.
#
# Threshold kinds (per pair, `img_size` pixels; the batch keys `pckthres_<kind>`):
#   bbox         max(w, h) of the source object box (SPair-71k, PF-PASCAL); for PF-WILLOW, of
#                the extent box of the real source keypoints (the corrected threshold).
#   img          the image side, `img_size` (PF-PASCAL's standard).
#   bbox_legacy  PF-WILLOW only: the reference's value, max over x, y of (max - min) over all 40
#                keypoint slots with the -1 padding included (kept for parity; it inflates PCK).
# Averaging:
#   per_pair     mean over pairs of each pair's PCK (the reference's validation number).
#   per_keypoint total correct keypoints / total keypoints.
# ================================================================================================

DEFAULT_ALPHAS = (0.01, 0.05, 0.1, 0.15)
THRESHOLD_KINDS = ("bbox", "img", "bbox_legacy")
AVERAGINGS = ("per_pair", "per_keypoint")
DIRECTION = "trg->src"
# The benchmark's standard threshold (the same table as `sccorr_jax.data.transforms`; a test
# checks they agree; duplicated so that this module does not import the data stack).
STANDARD_THRESHOLD = {"spair71k": "bbox", "pfpascal": "img", "pfwillow": "bbox",
                      "synthetic": "bbox", "parts": "bbox"}
BENCHMARK_NAMES = {"spair71k": "SPair-71k", "pfpascal": "PF-PASCAL", "pfwillow": "PF-WILLOW",
                   "synthetic": "synthetic (skimage.data warps)",
                   "parts": "parts (procedural articulated objects)"}
DIFFICULTY_FIELDS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")
# SPair-71k's names of the difficulty levels (its annotation documentation).
DIFFICULTY_LEVELS = {
    "viewpoint_variation": ("easy", "medium", "hard"),
    "scale_variation": ("easy", "medium", "hard"),
    "truncation": ("none", "src truncated", "trg truncated", "both truncated"),
    "occlusion": ("none", "src occluded", "trg occluded", "both occluded"),
}


def default_thresholds(benchmark: str) -> tuple:
  """Threshold kinds reported for a benchmark, its standard kind first."""
  if benchmark not in STANDARD_THRESHOLD:
    raise ValueError(f"unknown benchmark {benchmark!r}; expected one of "
                     f"{sorted(STANDARD_THRESHOLD)}")
  std = STANDARD_THRESHOLD[benchmark]
  kinds = [std] + [k for k in ("bbox", "img") if k != std]
  if benchmark == "pfwillow":
    kinds.append("bbox_legacy")
  return tuple(kinds)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What an evaluation measures; every reported number is tagged with it.

  Attributes:
    benchmark: 'spair71k' | 'pfpascal' | 'pfwillow' | 'synthetic' | 'parts'.
    split: the split evaluated ('test', 'val', ...).
    alphas: PCK alphas (fractions of the threshold).
    thresholds: threshold kinds (see the section comment); the first is reported first.
    img_size: evaluation resolution, pixels (images resized to `img_size` x `img_size`).
    direction: 'trg->src' (target keypoints transferred to the source; the only one).
  """
  benchmark: str
  split: str = "test"
  alphas: Sequence[float] = DEFAULT_ALPHAS
  thresholds: Optional[Sequence[str]] = None
  img_size: int = 256
  direction: str = DIRECTION

  def __post_init__(self):
    if self.thresholds is None:
      object.__setattr__(self, "thresholds", default_thresholds(self.benchmark))
    object.__setattr__(self, "thresholds", tuple(self.thresholds))
    object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
    bad = [k for k in self.thresholds if k not in THRESHOLD_KINDS]
    if bad:
      raise ValueError(f"unknown threshold kind(s) {bad}; expected {THRESHOLD_KINDS}")
    if self.direction != DIRECTION:
      raise ValueError(f"direction must be {DIRECTION!r} (target keypoints -> source)")

  @property
  def standard_threshold(self) -> str:
    return STANDARD_THRESHOLD[self.benchmark]

  def describe(self) -> Dict[str, Any]:
    """JSON-able description of the protocol."""
    return {
        "benchmark": self.benchmark, "split": self.split, "alphas": list(self.alphas),
        "thresholds": list(self.thresholds), "standard_threshold": self.standard_threshold,
        "resolution": f"{self.img_size}x{self.img_size}",
        "resolution_note": ("images resized to img_size x img_size (aspect not kept), keypoints "
                            "scaled per axis; distances and thresholds in those pixels"),
        "direction": self.direction,
        "direction_note": ("target keypoints are moved to the source with the predicted flow "
                           "(target -> source) and compared with the ground-truth source "
                           "keypoints"),
        "correct_if": "distance <= alpha * threshold (inclusive, threshold * alpha in float32)",
        "keypoint_rounding": "target keypoints truncated toward zero then clamped (reference)",
        "averaging": {"per_pair": "mean over pairs of each pair's PCK (the reference)",
                      "per_keypoint": "correct keypoints / keypoints over all pairs"},
    }


def metric_name(threshold: str, alpha: float, averaging: str, img_size: int = 256,
                group: str = "all") -> str:
  """The key of one number, naming its protocol, e.g. `pck@0.1/bbox/per_pair/256px/trg->src`.

  A group other than 'all' is appended (`.../category=cat`, `.../viewpoint_variation=2`).
  """
  name = f"pck@{alpha:g}/{threshold}/{averaging}/{img_size}px/{DIRECTION}"
  return name if group == "all" else f"{name}/{group}"


def pair_counts(flow, batch: Mapping[str, Any], alphas: Sequence[float],
                thresholds: Sequence[str], img_size: geometry.SizeLike = 256):
  """Per-pair keypoint counts of one batch (jittable; the device part of the evaluator).

  Args:
    flow: [b, h, w, 2] float, predicted (x, y) flow target -> source in grid cells.
    batch: the batch contract: `trg_kps`, `src_kps` [b, n, 2] (pixels of the `img_size`
      image), `kps_valid` [b, n] bool, `pckthres_<kind>` [b] for every kind in `thresholds`
      (`pckthres_bbox`, `pckthres_img`, `pckthres_bbox_legacy`).
    alphas: A PCK alphas (static).
    thresholds: K threshold kinds (static).
    img_size: the image the keypoints live in.

  Returns:
    dict: `n_valid` [b] int32 valid keypoints per pair; `n_correct` [K, A, b] int32 correct
    keypoints per pair for each threshold kind and alpha. Pair padding is *not* applied here
    (the accumulator masks with `pair_valid`).
  """
  est = transfer_keypoints(flow, batch["trg_kps"], img_size)
  valid = jnp.asarray(batch["kps_valid"], bool)
  per_kind = []
  for kind in thresholds:
    thr = batch[f"pckthres_{kind}"]
    per_kind.append(jnp.stack([
        jnp.sum(pck_correct(est, batch["src_kps"], valid, thr, a), axis=-1, dtype=jnp.int32)
        for a in alphas]))
  return {"n_valid": jnp.sum(valid, axis=-1, dtype=jnp.int32),
          "n_correct": jnp.stack(per_kind)}


@dataclasses.dataclass
class _Sums:
  """Sums and counts of one group of pairs (float64/int64 on the host)."""
  shape: tuple
  pairs: int = 0  # pairs with >= 1 valid keypoint
  pairs_without_keypoints: int = 0
  keypoints: int = 0
  pck_sum: np.ndarray = None  # [K, A] sum over pairs of the per-pair fraction correct
  correct: np.ndarray = None  # [K, A] correct keypoints

  def __post_init__(self):
    self.pck_sum = np.zeros(self.shape, np.float64)
    self.correct = np.zeros(self.shape, np.int64)

  def add(self, n_valid, n_correct):
    """n_valid [m] int, n_correct [K, A, m] int, for m real pairs of the group."""
    has = n_valid > 0
    self.pairs += int(has.sum())
    self.pairs_without_keypoints += int((~has).sum())
    self.keypoints += int(n_valid.sum())
    self.correct += n_correct.sum(-1)
    frac = n_correct[..., has] / n_valid[has].astype(np.float64)
    self.pck_sum += frac.sum(-1)

  def pck(self, averaging: str) -> np.ndarray:
    """[K, A] PCK in percent (NaN for an empty group)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      if averaging == "per_pair":
        return 100.0 * self.pck_sum / self.pairs if self.pairs else np.full(self.shape, np.nan)
      return (100.0 * self.correct / self.keypoints if self.keypoints
              else np.full(self.shape, np.nan))


class PckAccumulator:
  """Accumulates per-pair counts into sums and counts per group; divides once in `result`.

  Groups: 'all'; `category=<name>` per category; `<field>=<level>` per SPair-71k difficulty
  field present in the batches (with `difficulty=True`). Padding pairs (`pair_valid` False)
  are masked: they add nothing, whatever their values; padded keypoint slots never count
  (`pair_counts` masks them with `kps_valid`).
  """

  def __init__(self, protocol: Protocol, category_names: Optional[Sequence[str]] = None,
               difficulty: Optional[bool] = None):
    """Args:
      protocol: what is measured.
      category_names: names of the category ids (index = id); ids are used if None.
      difficulty: report per difficulty level; default: only for SPair-71k.
    """
    self.protocol = protocol
    self.category_names = None if category_names is None else list(category_names)
    self.difficulty = (protocol.benchmark == "spair71k") if difficulty is None else difficulty
    self._shape = (len(protocol.thresholds), len(protocol.alphas))
    self.groups: Dict[str, _Sums] = {"all": _Sums(self._shape)}
    self.num_padding_pairs = 0

  def _group(self, name: str) -> _Sums:
    if name not in self.groups:
      self.groups[name] = _Sums(self._shape)
    return self.groups[name]

  def category_name(self, cat: int) -> str:
    if self.category_names is not None and 0 <= cat < len(self.category_names):
      return self.category_names[cat]
    return str(cat)

  def update(self, counts: Mapping[str, Any], batch: Mapping[str, Any]):
    """Adds one batch.

    Args:
      counts: `pair_counts` output (host or device arrays): `n_valid` [b], `n_correct`
        [K, A, b].
      batch: the batch's `pair_valid` [b] bool (all True if absent), `category` [b] int and,
        for difficulty reports, the fields of `DIFFICULTY_FIELDS` [b] int.
    """
    n_valid = np.asarray(counts["n_valid"]).astype(np.int64)
    n_correct = np.asarray(counts["n_correct"]).astype(np.int64)
    b = n_valid.shape[0]
    if n_correct.shape != self._shape + (b,):
      raise ValueError(f"n_correct has shape {n_correct.shape}, expected {self._shape + (b,)}")
    pair_valid = np.asarray(batch.get("pair_valid", np.ones(b, bool)), bool).reshape(b)
    self.num_padding_pairs += int((~pair_valid).sum())

    def add(name, mask):
      mask = mask & pair_valid
      if mask.any():
        self._group(name).add(n_valid[mask], n_correct[..., mask])

    add("all", np.ones(b, bool))
    if "category" in batch:
      cats = np.asarray(batch["category"]).reshape(b)
      for c in np.unique(cats[pair_valid]):
        add(f"category={self.category_name(int(c))}", cats == c)
    if self.difficulty:
      for field in DIFFICULTY_FIELDS:
        if field not in batch:
          continue
        levels = np.asarray(batch[field]).reshape(b)
        for lv in np.unique(levels[pair_valid]):
          add(f"{field}={int(lv)}", levels == lv)

  def result(self) -> "EvalResult":
    return EvalResult(self.protocol, {k: self.groups[k] for k in self.groups},
                      self.num_padding_pairs)


def _group_sort_key(name: str):
  if name == "all":
    return (0, "", 0)
  field, value = name.split("=", 1)
  if field == "category":
    return (1, "", value)
  return (2 + DIFFICULTY_FIELDS.index(field) if field in DIFFICULTY_FIELDS else 9, field,
          int(value) if value.lstrip("-").isdigit() else value)


def _rounded(x: float) -> Optional[float]:
  return None if not math.isfinite(x) else float(x)


class EvalResult:
  """PCK numbers of one evaluation, each with its full protocol.

  Attributes:
    protocol: the `Protocol`.
    groups: group name -> sums and counts.
    num_padding_pairs: padding pairs seen (masked).
  """

  def __init__(self, protocol: Protocol, groups: Dict[str, _Sums], num_padding_pairs: int = 0):
    self.protocol = protocol
    self.groups = dict(sorted(groups.items(), key=lambda kv: _group_sort_key(kv[0])))
    self.num_padding_pairs = num_padding_pairs

  def pck(self, threshold: Optional[str] = None, alpha: float = 0.1,
          averaging: str = "per_pair", group: str = "all") -> float:
    """One PCK value in percent (threshold None: the benchmark's standard)."""
    threshold = threshold or self.protocol.standard_threshold
    k = self.protocol.thresholds.index(threshold)
    a = [i for i, x in enumerate(self.protocol.alphas) if abs(x - alpha) < 1e-12]
    if not a:
      raise KeyError(f"alpha {alpha} was not evaluated; alphas: {self.protocol.alphas}")
    if averaging not in AVERAGINGS:
      raise KeyError(f"averaging must be one of {AVERAGINGS}")
    return float(self.groups[group].pck(averaging)[k, a[0]])

  def records(self) -> List[Dict[str, Any]]:
    """Every number as a dict naming its protocol (group, threshold, alpha, averaging, ...)."""
    p = self.protocol
    out = []
    for group, sums in self.groups.items():
      for averaging in AVERAGINGS:
        values = sums.pck(averaging)
        for k, kind in enumerate(p.thresholds):
          for a, alpha in enumerate(p.alphas):
            out.append({
                "metric": metric_name(kind, alpha, averaging, p.img_size, group),
                "benchmark": p.benchmark, "split": p.split, "group": group,
                "threshold": kind, "standard_threshold": kind == p.standard_threshold,
                "alpha": alpha, "averaging": averaging,
                "resolution": f"{p.img_size}x{p.img_size}", "direction": p.direction,
                "pck": _rounded(values[k, a]), "pairs": sums.pairs,
                "keypoints": sums.keypoints})
    return out

  def flat(self, groups: bool = True) -> Dict[str, float]:
    """`metric_name -> PCK` for logging (all groups, or only 'all')."""
    return {r["metric"]: r["pck"] for r in self.records()
            if groups or r["group"] == "all"}

  def to_json(self, **extra) -> Dict[str, Any]:
    """JSON-able report: protocol, counts, every number with its protocol, plus `extra`."""
    total = self.groups["all"]
    return {
        "protocol": self.protocol.describe(), **extra,
        "pairs": total.pairs, "keypoints": total.keypoints,
        "pairs_without_keypoints": total.pairs_without_keypoints,
        "padding_pairs_masked": self.num_padding_pairs,
        "results": self.records(),
    }

  def table(self, title: Optional[str] = None) -> str:
    """A readable report: overall numbers for every threshold and averaging, then per group."""
    p = self.protocol
    total = self.groups["all"]
    bench = BENCHMARK_NAMES.get(p.benchmark, p.benchmark)
    lines = []
    if title:
      lines.append(title)
    lines.append(f"{bench}, split '{p.split}': {total.pairs} pairs, {total.keypoints} keypoints; "
                 f"images resized to {p.img_size}x{p.img_size}; target keypoints -> source "
                 f"({p.direction}); correct iff distance <= alpha * threshold.")
    alpha_cols = "".join(f"{'a=' + format(a, 'g'):>9}" for a in p.alphas)
    lines.append("")
    lines.append(f"{'threshold':<26}{'averaging':<14}{alpha_cols}")
    for k, kind in enumerate(p.thresholds):
      label = kind + (" (standard)" if kind == p.standard_threshold else "")
      if kind == "bbox_legacy":
        label = "bbox_legacy (reference)"
      for averaging in AVERAGINGS:
        vals = total.pck(averaging)[k]
        lines.append(f"{label:<26}{averaging:<14}" + "".join(f"{v:9.2f}" for v in vals))
    std = p.thresholds.index(p.standard_threshold) if p.standard_threshold in p.thresholds else 0
    kind = p.thresholds[std]
    for section, prefix in (("per category", "category="), ("per difficulty level", None)):
      names = [g for g in self.groups if g != "all" and
               (g.startswith(prefix) if prefix else not g.startswith("category="))]
      if not names:
        continue
      lines.append("")
      lines.append(f"PCK {section} ({kind} threshold, per pair average):")
      lines.append(f"{'group':<40}{'pairs':>7}{alpha_cols}")
      for g in names:
        sums = self.groups[g]
        label = g.split("=", 1)[1] if prefix else g
        if not prefix:
          field, lv = g.split("=", 1)
          names_lv = DIFFICULTY_LEVELS.get(field, ())
          if lv.isdigit() and int(lv) < len(names_lv):
            label = f"{g} ({names_lv[int(lv)]})"
        lines.append(f"{label:<40}{sums.pairs:>7}"
                     + "".join(f"{v:9.2f}" for v in sums.pck("per_pair")[std]))
    if p.benchmark == "pfwillow" and "bbox_legacy" in p.thresholds:
      lines.append("")
      lines.append("bbox_legacy is the reference's PF-WILLOW threshold, computed over all 40 "
                   "keypoint slots including the -1 padding (larger, so PCK is inflated); bbox "
                   "uses the real keypoints only.")
    return "\n".join(lines) + "\n"

  def write(self, directory: str, name: str = "eval", **extra) -> Dict[str, str]:
    """Writes `<name>.json` and `<name>.txt` into `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {"json": os.path.join(directory, f"{name}.json"),
             "table": os.path.join(directory, f"{name}.txt")}
    with open(paths["json"], "w") as f:
      json.dump(self.to_json(**extra), f, indent=1)
    with open(paths["table"], "w") as f:
      f.write(self.table())
    return paths


# ------------------------------------------------------------------------------------------------
# Running a model over a split (jitted, data-parallel).


def _batch_keys(protocol: Protocol) -> tuple:
  return ("src_img", "trg_img", "src_kps", "trg_kps", "kps_valid",
          *(f"pckthres_{k}" for k in protocol.thresholds))


def make_eval_step(model, protocol: Protocol) -> Callable:
  """`(variables, batch) -> pair_counts` of the model's flow, jitted.

  Args:
    model: a `SCorrSAN` (or any module whose `apply(variables, src_img, trg_img)` is a flow
      [b, S, S, 2] target -> source in cells of the S grid).
    protocol: alphas, thresholds and resolution.

  Returns:
    A jitted function; under a mesh, shard the batch along its first axis and replicate the
    variables, and XLA runs it data-parallel.
  """
  alphas, kinds, size = protocol.alphas, protocol.thresholds, protocol.img_size

  def step(variables, batch):
    flow = model.apply(variables, batch["src_img"], batch["trg_img"])
    return pair_counts(flow, batch, alphas, kinds, size)

  return jax.jit(step)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if x.shape[0] == n:
    return x
  reps = np.repeat(x[-1:], n - x.shape[0], axis=0)
  return np.concatenate([x, reps], axis=0)


def evaluate_model(model, variables, batches: Iterable[Mapping[str, Any]], protocol: Protocol,
                   *, category_names: Optional[Sequence[str]] = None,
                   num_pairs: Optional[int] = None, max_batches: Optional[int] = None,
                   progress: bool = True, mesh: Optional[jax.sharding.Mesh] = None,
                   eval_step: Optional[Callable] = None) -> EvalResult:
  """Runs the model over batches and accumulates PCK for every protocol variant.

  Data-parallel: the batch is sharded over a 1-D `('data',)` mesh of all devices (padded on
  the host with masked copies when its size does not divide the device count), the variables
  are replicated. The per-pair counts come back to the host, where sums and counts are kept.

  Args:
    model: the network (see `make_eval_step`).
    variables: its `{'params', 'batch_stats'}` (host or device arrays).
    batches: iterable of batch dicts (the batch contract; `create_eval_iterator`).
    protocol: what to measure.
    category_names: names of the category ids.
    num_pairs: number of real pairs, for the progress bar's total (optional).
    max_batches: stop after this many batches (smoke runs).
    progress: show a tqdm progress bar over the pairs.
    mesh: the device mesh (default: all devices on one 'data' axis).
    eval_step: a prebuilt `make_eval_step(model, protocol)` (reuses its compilation).

  Returns:
    The `EvalResult`.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  if mesh is None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  multihost = jax.process_count() > 1
  # Several processes: each holds its own rows (`create_eval_iterator(process_index=...)`),
  # padded to a multiple of its local devices; the per-pair counts and metadata of all processes
  # are gathered so every process accumulates the same global result.
  ndev = jax.local_device_count() if multihost else mesh.devices.size
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))
  variables = jax.device_put(variables, replicated)
  step = eval_step or make_eval_step(model, protocol)
  acc = PckAccumulator(protocol, category_names)
  keys = _batch_keys(protocol)
  total = num_pairs
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(desc=f"eval {protocol.benchmark}/{protocol.split}", unit="pair",
                    total=total, dynamic_ncols=True)
  try:
    for i, batch in enumerate(batches):
      if max_batches is not None and i >= max_batches:
        break
      missing = [k for k in keys if k not in batch]
      if missing:
        raise KeyError(f"the batch lacks {missing} needed by the protocol "
                       f"(thresholds {protocol.thresholds})")
      b = np.asarray(batch["src_img"]).shape[0]
      padded = -(-b // ndev) * ndev
      meta = {k: np.asarray(batch[k]) for k in ("pair_valid", "category", *DIFFICULTY_FIELDS)
              if k in batch}
      meta.setdefault("pair_valid", np.ones(b, bool))
      meta = {k: _pad_rows(v, padded) for k, v in meta.items()}
      meta["pair_valid"] = meta["pair_valid"].copy()
      meta["pair_valid"][b:] = False
      if multihost:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        dev_batch = {k: jax.make_array_from_process_local_data(
            data_sharding, _pad_rows(np.asarray(batch[k]), padded)) for k in keys}
        counts = multihost_utils.process_allgather(step(variables, dev_batch), tiled=True)
        meta = multihost_utils.process_allgather(meta, tiled=True)
        b = int(np.asarray(meta["pair_valid"]).shape[0])
        padded = b  # the gathered rows; their padding is masked by pair_valid already
      else:
        dev_batch = {k: jax.device_put(_pad_rows(np.asarray(batch[k]), padded), data_sharding)
                     for k in keys}
        counts = jax.device_get(step(variables, dev_batch))
      acc.update(counts, meta)
      acc.num_padding_pairs -= padded - b  # count only the data's own padding pairs
      if bar is not None:
        bar.update(int(np.asarray(batch.get("pair_valid", np.ones(b, bool))).sum()))
  finally:
    if bar is not None:
      bar.close()
  return acc.result()


def protocol_from_config(config, split: Optional[str] = None) -> Protocol:
  """The evaluation protocol of an experiment config (`config.data`, `config.eval`).

  Uses `config.eval.report_alphas` if present, else `DEFAULT_ALPHAS` (0.01 added to the
  trainer's validation alphas); `config.eval.report_thresholds` if present, else both kinds
  (and PF-WILLOW's legacy one).
  """
  ev = config.get("eval", {}) if hasattr(config, "get") else {}
  alphas = ev.get("report_alphas", None) or sorted(
      set(DEFAULT_ALPHAS) | set(float(a) for a in ev.get("alphas", ())))
  thresholds = ev.get("report_thresholds", None)
  return Protocol(benchmark=config.data.name, split=split or ev.get("split", "test"),
                  alphas=tuple(alphas), thresholds=thresholds,
                  img_size=int(config.data.img_size))


def evaluate_checkpoint(config, checkpoint: str, workdir: Optional[str] = None, *,
                        split: Optional[str] = None, model_index=None,
                        max_batches: Optional[int] = None, progress: bool = True,
                        batch_size: Optional[int] = None) -> EvalResult:
  """Evaluates a checkpoint on `config.data` and writes the JSON report and the table.

  The *model* is built from the checkpoint's own config when it has one (so PF-WILLOW is
  evaluated with the PF-PASCAL model that the checkpoint holds); the *data* and the protocol
  come from `config`.

  Args:
    config: experiment config (`configs/*.py`): `data`, `eval`, and `model` (used when the
      checkpoint carries no config, e.g. one converted from PyTorch).
    checkpoint: a trainer workdir, a checkpoint step directory or an exported model (see
      `sccorr_jax.checkpoint.load_model_variables`).
    workdir: where `eval_<benchmark>_<split>.{json,txt}` are written (None: nothing written).
    split: split to evaluate (default `config.eval.split`; PF-WILLOW has only 'test').
    model_index: mutual-teacher checkpoints: 0, 1, 'best' or None (the recorded best).
    max_batches: evaluate only this many batches (smoke runs).
    progress: progress bar.
    batch_size: global eval batch size (default `config.eval.batch_size`).

  Returns:
    The `EvalResult`.
  """
  from sccorr_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from sccorr_jax import predict as predict_lib  # pylint: disable=g-import-not-at-top

  model, variables, ckpt_config = predict_lib.load_model(checkpoint, model_index=model_index,
                                                         fallback_config=config)
  protocol = protocol_from_config(config, split)
  predict_lib.check_variables(model, variables, protocol.img_size, source=checkpoint)
  bs = int(batch_size or config.eval.batch_size)
  batches = data_lib.create_eval_iterator(config.data, protocol.split, batch_size=bs,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
  n = data_lib.num_examples(config.data, protocol.split)
  names = data_lib.category_names(config.data)
  start = time.time()
  result = evaluate_model(model, variables, batches, protocol, category_names=names,
                          num_pairs=n if max_batches is None else min(n, max_batches * bs),
                          max_batches=max_batches, progress=progress)
  if workdir is not None and jax.process_index() == 0:
    tag = f"eval_{protocol.benchmark}_{protocol.split}"
    result.write(workdir, tag, checkpoint=os.path.abspath(checkpoint),
                 model_index=None if model_index is None else str(model_index),
                 model_config=_to_dict(ckpt_config.get("model") if ckpt_config else
                                       config.model),
                 wall_time_s=round(time.time() - start, 2),
                 devices=[str(d) for d in jax.devices()])
  return result


def _to_dict(cfg) -> Any:
  if cfg is None:
    return None
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  return json.loads(json.dumps(cfg, default=str))
