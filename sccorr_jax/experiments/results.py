"""What a sweep records: `results.json` (one entry per finished run) and the statistics over
seeds that the reports and plots are made of.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sccorr_jax import checkpoint
from sccorr_jax import constants
from sccorr_jax import metric_writer
from sccorr_jax.experiments.cells import Cell

RESULTS_JSON = 'results.json'


def jsonable(v):
  """JSON-safe copy: numpy scalars to Python, tuples to lists, NaN and infinities to None."""
  if isinstance(v, dict):
    return {str(k): jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [jsonable(x) for x in v]
  if isinstance(v, np.generic):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


class Results:
  """`<out>/results.json`: the sweep's settings and one entry per finished run.

  Raises (on opening) ValueError when the file was written for another --config, --sweep or
  --set: mixing runs of different settings in one table would be wrong.
  """

  def __init__(self, path: str, settings: Dict[str, Any]):
    self.path = path
    self.settings = jsonable(settings)
    self.runs: List[Dict[str, Any]] = []
    if os.path.exists(path):
      with open(path) as f:
        data = json.load(f)
      for key, value in self.settings.items():
        if data.get('settings', {}).get(key) != value:
          raise ValueError(
              f'{path} was written with {key}={data.get("settings", {}).get(key)!r}, this run '
              f'has {key}={value!r}; use another --out (or remove that file)'
          )
      self.runs = list(data.get('runs', []))
    else:
      self.save()

  def get(self, cell: str, seed: int) -> Optional[Dict[str, Any]]:
    for entry in self.runs:
      if entry['cell'] == cell and entry['seed'] == seed:
        return entry
    return None

  def add(self, entry: Dict[str, Any]) -> None:
    self.runs.append(jsonable(entry))
    self.save()

  def save(self) -> None:
    """Writes the file atomically (a temporary file, then `os.replace`)."""
    os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump({'settings': self.settings, 'runs': self.runs}, f, indent=1, allow_nan=False)
      f.write('\n')
    os.replace(tmp, self.path)


def is_zero_flow(key: str) -> bool:
  """Whether `key` is a PCK of the zero flow (`val/zero_flow/pck@0.1`)."""
  parts = constants.parse_metric_key(key)
  return parts is not None and parts.scope.rpartition('/')[2] == 'zero_flow'


def unscoped(key: str) -> str:
  """A PCK key without its scope (`val/pck@0.1` -> `pck@0.1`): the reports' names."""
  return constants.metric_key(*constants.parse_metric_key(key)._replace(scope=''))


def last_epoch_pseudo_metrics(
    rows: Sequence[Dict[str, Any]], steps_per_epoch: int
) -> Tuple[Dict[str, float], Optional[List[int]]]:
  """Every key containing 'pseudo', averaged over the logged windows of the run's last epoch
  (one 10-step window alone is noisy), and the [first, last] step of those windows.

  The window means are averaged with equal weight (the windows of one epoch have equal length
  but for the last); a key missing from a window (a metric NaN there) is averaged over the
  windows that have it.
  """
  logged = [r for r in rows if any('pseudo' in k for k in r)]
  if not logged:
    return {}, None
  spe = max(int(steps_per_epoch), 1)
  last = logged[-1]['step']
  epoch_start = (last - 1) // spe * spe  # The last epoch is steps epoch_start + 1 .. + spe.
  window = [r for r in logged if r['step'] > epoch_start]
  keys = sorted({k for r in window for k in r if 'pseudo' in k})
  out = {k: float(np.mean([r[k] for r in window if r.get(k) is not None])) for k in keys}
  return out, [window[0]['step'], last]


def make_entry(
    cell: Cell,
    seed: int,
    config,
    workdir: str,
    summary: Dict[str, Any],
    wall_s: float,
    resumed_from_step: Optional[int],
    out: str,
    workers: int = 1,
) -> Dict[str, Any]:
  """The results.json entry of one finished run (from its summary and its metrics.jsonl);
  `workers`: how many runs trained at once (the wall time depends on it)."""
  rows = metric_writer.read_rows(workdir)
  best = dict(summary.get('best') or {})
  best_rows = [r for r in rows if r.get('step') == best.get('step') and 'val/epoch' in r]
  best['metrics'] = (
      {k: v for k, v in best_rows[-1].items() if k.startswith('val/')} if best_rows else {}
  )
  # The zero flow is validated once, at the run's first validation.
  zero_flow = next(
      (
          {k: v for k, v in r.items() if is_zero_flow(k)}
          for r in rows
          if any(is_zero_flow(k) for k in r)
      ),
      {},
  )
  pseudo, pseudo_steps = last_epoch_pseudo_metrics(
      rows, int(summary['step']) // max(int(summary['epoch']), 1)
  )
  return {
      'cell': cell.name,
      'seed': int(seed),
      'overrides': cell.overrides,
      'workdir': os.path.relpath(workdir, out),
      'step': int(summary['step']),
      'epoch': int(summary['epoch']),
      'select_metric': checkpoint.select_metric(config),
      'final': {k: v for k, v in (summary.get('val') or {}).items() if k.startswith('val/')},
      'best': best,
      'pseudo': pseudo,
      'pseudo_steps': pseudo_steps,
      'zero_flow': zero_flow,
      'wall_s': wall_s,
      'compile_s': summary.get('compile_s'),
      'mean_step_s': summary.get('mean_step_s'),
      'nonfinite_total': summary.get('nonfinite_total'),
      'resumed_from_step': resumed_from_step,
      'workers': int(workers),
      'finished': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def _finite(value: Optional[float]) -> bool:
  """Whether a recorded number counts in a statistic (not missing, not NaN or inf)."""
  return value is not None and math.isfinite(value)


def mean_std(values: Sequence[Optional[float]]) -> Tuple[float, float, int]:
  """(mean, sample std with ddof 1 (NaN for one value), n) of the finite values."""
  v = np.asarray([x for x in values if _finite(x)], np.float64)
  if v.size == 0:
    return math.nan, math.nan, 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def by_cell(
    entries: Sequence[Dict[str, Any]], order: Optional[Sequence[str]] = None
) -> Dict[str, List[Dict[str, Any]]]:
  """Entries grouped by cell, in `order` first, then in order of appearance."""
  groups: Dict[str, List[Dict[str, Any]]] = {name: [] for name in (order or ())}
  for e in entries:
    groups.setdefault(e['cell'], []).append(e)
  return {k: sorted(v, key=lambda e: e['seed']) for k, v in groups.items() if v}


def overrides_text(overrides: Dict[str, Any]) -> str:
  return ', '.join(f'{k}={v}' for k, v in overrides.items()) or '–'


BUDGET_KEY = 'data.keypoints_per_pair'


def networks_mean(entry: Dict[str, Any], metric: str) -> Optional[float]:
  """The mean of an mt run's two networks' final `metric` (`val/pck@0.1`: of `val/a/pck@0.1`
  and `val/b/pck@0.1`), or None for a run of one network. The selected network's number is
  chosen on the validation split itself, so the mean is the fair comparison with one network."""
  parts = constants.parse_metric_key(metric)
  values = [
      entry['final'].get(constants.metric_key(*parts._replace(scope=f'{parts.scope}/{m}')))
      for m in 'ab'
  ]
  return float(np.mean(values)) if all(v is not None for v in values) else None


BASELINE_MODE = 'baseline'


def baseline_cell(group: Sequence[Dict[str, Any]], groups: Dict[str, List[Dict[str, Any]]]):
  """The name of the cell that is `group`'s baseline: the one whose overrides are the group's
  with `learning_mode='baseline'`, the `teacher.*` keys left out on both sides (a baseline has
  no teacher; so `mt_k1` -> `baseline_k1`, `st` with its teacher's checkpoint -> `baseline`);
  None for a baseline cell, a cell without a learning mode, or when no such cell ran."""

  def key(overrides):
    return {k: v for k, v in overrides.items() if not k.startswith('teacher.')}

  own = group[0]['overrides']
  if own.get('learning_mode', BASELINE_MODE) == BASELINE_MODE:
    return None
  want = {**key(own), 'learning_mode': BASELINE_MODE}
  return next((n for n, g in groups.items() if key(g[0]['overrides']) == want), None)


def default_teacher_cell(
    group: Sequence[Dict[str, Any]], groups: Dict[str, List[Dict[str, Any]]]
) -> Optional[str]:
  """The name of the cell that runs `group`'s learning mode with the paper's pseudo-labels: the
  one whose overrides are the group's without its `teacher.*` keys (so `mt_gate_cycle` ->
  `mt`, `mt_dilation3` -> `mt`); None for a cell without `teacher.*` overrides, or when no such
  cell ran. An 'st' cell's teacher checkpoint is a `teacher.*` key too, so it has none."""
  own = group[0]['overrides']
  if not any(k.startswith('teacher.') for k in own):
    return None
  want = {k: v for k, v in own.items() if not k.startswith('teacher.')}
  return next((n for n, g in groups.items() if g[0]['overrides'] == want), None)


def welch(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> Tuple[float, float]:
  """(mean(a) - mean(b), two-sided Welch t-test p) of the finite values; p is NaN with fewer
  than two values on a side, and 1 when both sides are constant and equal."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  x = np.asarray([v for v in a if _finite(v)], np.float64)
  y = np.asarray([v for v in b if _finite(v)], np.float64)
  if x.size == 0 or y.size == 0:
    return math.nan, math.nan
  diff = float(x.mean() - y.mean())
  if x.size < 2 or y.size < 2:
    return diff, math.nan
  if x.std() == 0 and y.std() == 0:
    return diff, 1.0 if diff == 0 else 0.0
  return diff, float(stats.ttest_ind(x, y, equal_var=False).pvalue)


def paired(a: Dict[int, Optional[float]], b: Dict[int, Optional[float]]) -> Tuple[float, float]:
  """(mean of a[s] - b[s], two-sided paired t-test p) over the seeds s where both are finite; p
  is NaN with fewer than two such seeds, and 1 when every difference is 0."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  seeds = [s for s in a if s in b and _finite(a[s]) and _finite(b[s])]
  d = np.asarray([a[s] - b[s] for s in seeds], np.float64)
  if d.size == 0:
    return math.nan, math.nan
  if d.size < 2:
    return float(d.mean()), math.nan
  if np.all(d == d[0]):
    return float(d.mean()), 1.0 if d[0] == 0 else 0.0
  return float(d.mean()), float(stats.ttest_1samp(d, 0.0).pvalue)


def budget_series(
    entries: Sequence[Dict[str, Any]], metric: str, key: str = BUDGET_KEY, networks: bool = False
) -> Dict[str, List[Tuple[int, float, float, int]]]:
  """For a sweep over `key`: curve label (the cell's other overrides) -> [(k, mean, std, n)]
  of the final `metric` over seeds, by k with 0 (all labels) last; with `networks`, of the
  two networks' mean (`networks_mean`), for the runs that have two."""
  points: Dict[str, Dict[int, List[float]]] = {}
  for e in entries:
    if key not in e['overrides']:
      continue
    value = networks_mean(e, metric) if networks else e['final'].get(metric)
    if networks and value is None:
      continue
    rest = {k: v for k, v in e['overrides'].items() if k != key}
    label = str(rest['learning_mode']) if list(rest) == ['learning_mode'] else overrides_text(rest)
    points.setdefault(label, {}).setdefault(int(e['overrides'][key]), []).append(value)
  return {
      label: [(k, *mean_std(v[k])) for k in sorted(v, key=lambda k: (k == 0, k))]
      for label, v in points.items()
  }
