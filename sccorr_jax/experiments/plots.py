"""The plots of a sweep: bars per cell, or a curve over the label budget."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

from sccorr_jax.experiments.results import budget_series
from sccorr_jax.experiments.results import by_cell
from sccorr_jax.experiments.results import mean_std
from sccorr_jax.experiments.results import unscoped


def plot_budget(entries: Sequence[Dict[str, Any]], metric: str, path: str) -> None:
  """PNG: `metric` against the labels per pair k (log scale, 'all' last), one curve per mode,
  error bars = std over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  series = budget_series(entries, metric)
  ks = sorted({k for s in series.values() for k, *_ in s if k > 0})
  all_x = 2.0 * (ks[-1] if ks else 1)
  fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
  styles = [
      (series, '-', 'o', ''),
      (budget_series(entries, metric, networks=True), '--', 's', ', mean of a and b'),
  ]
  for i, (label, _) in enumerate(series.items()):
    for curves, line, marker, suffix in styles:
      if label not in curves:
        continue
      points = curves[label]
      x = [k if k > 0 else all_x for k, *_ in points]
      y = [m for _, m, _, _ in points]
      err = [0.0 if not math.isfinite(s) else s for _, _, s, _ in points]
      n = sorted({c for *_, c in points})
      ax.errorbar(
          x,
          y,
          yerr=err,
          marker=marker,
          linestyle=line,
          capsize=4,
          color=f'C{i}',
          label=f'{label}{suffix} (n={"/".join(map(str, n))})',
      )
  ax.set_xscale('log', base=2)
  ticks = ks + [all_x]
  ax.set_xticks(ticks, [str(k) for k in ks] + ['all'])
  ax.minorticks_off()
  ax.set_title('mean ± std over seeds', fontsize=9)
  ax.set_xlabel('labelled keypoints per training pair (k)')
  ax.set_ylabel(f'validation {unscoped(metric)} (%)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_bars(
    entries: Sequence[Dict[str, Any]], metric: str, path: str, order: Optional[Sequence[str]] = None
) -> None:
  """PNG: mean final `metric` per cell with std error bars and each seed as a dot."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = by_cell(entries, order)
  names = list(groups)
  fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 1.5), 4), dpi=120)
  for i, name in enumerate(names):
    values = [e['final'].get(metric) for e in groups[name]]
    m, s, n = mean_std(values)
    ax.bar(i, m, yerr=s if math.isfinite(s) else 0.0, capsize=4, color='C0', alpha=0.6)
    finite = [v for v in values if v is not None]
    ax.plot([i] * len(finite), finite, 'k.', ms=4)
    ax.annotate(
        f'n={n}', (i, 0), textcoords='offset points', xytext=(0, 3), ha='center', fontsize=7
    )
  ax.set_title('mean ± std over seeds (dots: seeds)', fontsize=9)
  ax.set_xticks(range(len(names)), names, rotation=30, ha='right')
  ax.set_ylabel(f'validation {unscoped(metric)} (%)')
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
