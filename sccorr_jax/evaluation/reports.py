"""PCK results as sums and counts per group, and their reports (JSON records, a readable table)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Optional

import numpy as np

from sccorr_jax.evaluation.protocol import AVERAGINGS
from sccorr_jax.evaluation.protocol import BENCHMARK_NAMES
from sccorr_jax.evaluation.protocol import DIFFICULTY_FIELDS
from sccorr_jax.evaluation.protocol import DIFFICULTY_LEVELS
from sccorr_jax.evaluation.protocol import metric_name
from sccorr_jax.evaluation.protocol import Protocol


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
      return (
          100.0 * self.correct / self.keypoints if self.keypoints else np.full(self.shape, np.nan)
      )


def _group_sort_key(name: str):
  if name == "all":
    return (0, "", 0)
  field, value = name.split("=", 1)
  if field == "category":
    return (1, "", value)
  return (
      2 + DIFFICULTY_FIELDS.index(field) if field in DIFFICULTY_FIELDS else 9,
      field,
      int(value) if value.lstrip("-").isdigit() else value,
  )


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
    self.zero_flow: Optional["EvalResult"] = None  # The zero flow's, when asked for.

  def pck(
      self,
      threshold: Optional[str] = None,
      alpha: float = 0.1,
      averaging: str = "per_pair",
      group: str = "all",
  ) -> float:
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
            out.append(
                {
                    "metric": metric_name(kind, alpha, averaging, p.img_size, group),
                    "benchmark": p.benchmark,
                    "split": p.split,
                    "group": group,
                    "threshold": kind,
                    "standard_threshold": kind == p.standard_threshold,
                    "alpha": alpha,
                    "averaging": averaging,
                    "resolution": f"{p.img_size}x{p.img_size}",
                    "direction": p.direction,
                    "pck": _rounded(values[k, a]),
                    "pairs": sums.pairs,
                    "keypoints": sums.keypoints,
                }
            )
    return out

  def flat(self, groups: bool = True) -> Dict[str, float]:
    """`metric_name -> PCK` for logging (all groups, or only 'all')."""
    return {r["metric"]: r["pck"] for r in self.records() if groups or r["group"] == "all"}

  def to_json(self, **extra) -> Dict[str, Any]:
    """JSON-able report: protocol, counts, every number with its protocol, plus `extra`."""
    total = self.groups["all"]
    return {
        "protocol": self.protocol.describe(),
        **extra,
        "pairs": total.pairs,
        "keypoints": total.keypoints,
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
    lines.append(
        f"{bench}, split '{p.split}': {total.pairs} pairs, {total.keypoints} keypoints; "
        f"images resized to {p.img_size}x{p.img_size}; target keypoints -> source "
        f"({p.direction}); correct iff distance <= alpha * threshold."
    )
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
      names = [
          g
          for g in self.groups
          if g != "all" and (g.startswith(prefix) if prefix else not g.startswith("category="))
      ]
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
        lines.append(
            f"{label:<40}{sums.pairs:>7}" + "".join(f"{v:9.2f}" for v in sums.pck("per_pair")[std])
        )
    if p.benchmark == "pfwillow" and "bbox_legacy" in p.thresholds:
      lines.append("")
      lines.append(
          "bbox_legacy is the reference's PF-WILLOW threshold, computed over all 40 "
          "keypoint slots including the -1 padding (larger, so PCK is inflated); bbox "
          "uses the real keypoints only."
      )
    return "\n".join(lines) + "\n"

  def write(self, directory: str, name: str = "eval", **extra) -> Dict[str, str]:
    """Writes `<name>.json` and `<name>.txt` into `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {
        "json": os.path.join(directory, f"{name}.json"),
        "table": os.path.join(directory, f"{name}.txt"),
    }
    with open(paths["json"], "w") as f:
      json.dump(self.to_json(**extra), f, indent=1)
    with open(paths["table"], "w") as f:
      f.write(self.table())
    return paths
