"""What an evaluation measures: the protocol tagged onto every reported number."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence

from sccorr_jax.constants import AVERAGINGS  # noqa: F401  (re-exported)
from sccorr_jax.constants import BENCHMARK_NAMES  # noqa: F401  (re-exported)
from sccorr_jax.constants import DIFFICULTY_FIELDS  # noqa: F401
from sccorr_jax.constants import DIFFICULTY_LEVELS  # noqa: F401
from sccorr_jax.constants import DIRECTION
from sccorr_jax.constants import metric_key
from sccorr_jax.constants import STANDARD_THRESHOLD
from sccorr_jax.constants import THRESHOLD_KINDS

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


def default_thresholds(benchmark: str) -> tuple:
  """Threshold kinds reported for a benchmark, its standard kind first."""
  if benchmark not in STANDARD_THRESHOLD:
    raise ValueError(
        f"unknown benchmark {benchmark!r}; expected one of " f"{sorted(STANDARD_THRESHOLD)}"
    )
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

  @classmethod
  def from_config(cls, config, split: Optional[str] = None, validation: bool = False) -> "Protocol":
    """The protocol of an experiment config (`config.data`, `config.eval`).

    Args:
      config: the experiment config.
      split: the split evaluated (default `config.eval.split`).
      validation: the trainer's validation: `eval.alphas` (plus `eval.select_alpha`, which
        picks the mutual teacher and the best checkpoint) at the one threshold `eval.threshold`
        ('standard' = the benchmark's). Otherwise the full report: `DEFAULT_ALPHAS`, the
        config's alphas and `select_alpha`, at every threshold kind of the benchmark.
    """
    ev = config.eval
    alphas = [float(a) for a in ev.alphas]
    select = float(ev.get("select_alpha", 0.1))
    alphas += [] if select in alphas else [select]
    thresholds = None
    if validation:
      kind = ev.get("threshold", "standard")
      thresholds = (STANDARD_THRESHOLD[config.data.name] if kind in ("standard", None) else kind,)
    else:
      alphas = sorted(set(DEFAULT_ALPHAS) | set(alphas))
    return cls(
        benchmark=config.data.name,
        split=split or ev.get("split", "test"),
        alphas=tuple(alphas),
        thresholds=thresholds,
        img_size=int(config.data.img_size),
    )

  @property
  def standard_threshold(self) -> str:
    return STANDARD_THRESHOLD[self.benchmark]

  def describe(self) -> Dict[str, Any]:
    """JSON-able description of the protocol."""
    return {
        "benchmark": self.benchmark,
        "split": self.split,
        "alphas": list(self.alphas),
        "thresholds": list(self.thresholds),
        "standard_threshold": self.standard_threshold,
        "resolution": f"{self.img_size}x{self.img_size}",
        "resolution_note": (
            "images resized to img_size x img_size (aspect not kept), keypoints "
            "scaled per axis; distances and thresholds in those pixels"
        ),
        "direction": self.direction,
        "direction_note": (
            "target keypoints are moved to the source with the predicted flow "
            "(target -> source) and compared with the ground-truth source "
            "keypoints"
        ),
        "correct_if": "distance <= alpha * threshold (inclusive, threshold * alpha in float32)",
        "keypoint_rounding": "target keypoints truncated toward zero then clamped (reference)",
        "averaging": {
            "per_pair": "mean over pairs of each pair's PCK (the reference)",
            "per_keypoint": "correct keypoints / keypoints over all pairs",
        },
    }


def metric_name(
    threshold: str, alpha: float, averaging: str, img_size: int = 256, group: str = "all"
) -> str:
  """The key of one number of a report, naming its whole protocol, e.g.
  `pck@0.1/bbox/per_pair/256px/trg->src` (`constants.metric_key`, the scheme of training logs
  too). A group other than 'all' is appended (`.../category=cat`, `.../viewpoint_variation=2`).
  """
  return metric_key(alpha, threshold, averaging, img_size, DIRECTION, group)
