"""The reports of a sweep: `results.md` (mean ± std over seeds per cell) and its plot."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

from sccorr_jax import constants
from sccorr_jax.experiments.heldout import heldout_entry
from sccorr_jax.experiments.heldout import heldout_splits
from sccorr_jax.experiments.plots import plot_bars
from sccorr_jax.experiments.plots import plot_budget
from sccorr_jax.experiments.results import baseline_cell
from sccorr_jax.experiments.results import BUDGET_KEY
from sccorr_jax.experiments.results import by_cell
from sccorr_jax.experiments.results import default_teacher_cell
from sccorr_jax.experiments.results import mean_std
from sccorr_jax.experiments.results import networks_mean
from sccorr_jax.experiments.results import overrides_text
from sccorr_jax.experiments.results import paired
from sccorr_jax.experiments.results import unscoped
from sccorr_jax.experiments.results import welch

RESULTS_MD = 'results.md'


def _format(mean: float, std: float, digits: int = 2) -> str:
  if not math.isfinite(mean):
    return '–'
  text = f'{mean:.{digits}f}'
  return text + (f' ± {std:.{digits}f}' if math.isfinite(std) else '')


def pck_keys(entries: Sequence[Dict[str, Any]], scope: str = 'val') -> List[str]:
  """The final `<scope>/pck@alpha` keys of the entries (the selected model's), by alpha."""
  parts = {k: constants.parse_metric_key(k) for e in entries for k in e['final']}
  keys = [k for k, p in parts.items() if p and p == constants.MetricKey(p.alpha, scope=scope)]
  return sorted(keys, key=lambda k: parts[k].alpha)


def pseudo_columns(entries: Sequence[Dict[str, Any]]) -> List[str]:
  """The pseudo-label metrics worth a column, named without `train/` and `a/`: network a's and
  the shared ones (network b is symmetric and stays in results.json), without the λ schedule.
  An 'st' run's `train/<x>` and an 'mt' run's `train/a/<x>` share the column `<x>`."""
  cols = set()
  for e in entries:
    for k in e.get('pseudo', {}):
      if k.startswith('train/b/') or k == 'train/pseudo_weight':
        continue
      cols.add(
          k.replace('train/', '', 1).replace('a/', '', 1)
          if k.startswith('train/a/')
          else k.replace('train/', '', 1)
      )
  return sorted(cols)


def pseudo_value(entry: Dict[str, Any], column: str) -> Optional[float]:
  """The entry's value of a `pseudo_columns` column (network a's for 'mt')."""
  pseudo = entry.get('pseudo', {})
  return pseudo.get(f'train/a/{column}', pseudo.get(f'train/{column}'))


def _difference(diff: float, p: float, paired_p: float = math.nan) -> str:
  if not math.isfinite(diff):
    return '–'
  ps = [f'p = {p:.2g}'] if math.isfinite(p) else []
  ps += [f'paired p = {paired_p:.2g}'] if math.isfinite(paired_p) else []
  return f'{diff:+.2f}' + (f' ({"; ".join(ps)})' if ps else '')


def _two_networks(entry: Dict[str, Any], metric: str) -> Optional[float]:
  """An mt run's mean of networks a and b, a one-network run's own number."""
  two = networks_mean(entry, metric)
  return entry['final'].get(metric) if two is None else two


def _compared(group, reference, value, reference_value) -> str:
  """`group` by `value(entry)` against `reference` by `reference_value(entry)`: the difference
  of the means, its Welch p, and the paired t-test p over the seeds both ran (the same seed is
  the same initialisation and data order, so runs of two cells at one seed are correlated)."""
  mine = {e['seed']: value(e) for e in group}
  theirs = {e['seed']: reference_value(e) for e in reference}
  if any(v is None for v in mine.values()):
    return '–'
  return _difference(*welch(list(mine.values()), list(theirs.values())), paired(mine, theirs)[1])


def comparisons(
    groups: Dict[str, List[Dict[str, Any]]],
    metric: str,
    reference: Callable[..., Optional[str]] = baseline_cell,
    heading: str = 'Against the baseline',
    what: str = 'the baseline cell with the same overrides',
) -> List[str]:
  """results.md's lines comparing each cell with its `reference` cell (`baseline_cell`, or
  `default_teacher_cell`): the difference of the means of the final `metric`, its Welch p and
  its paired p over common seeds, for the selected network and, for mt, the mean of its two
  networks (against the reference's own mean of two, or its one network: the fair comparison);
  none when no cell has one."""
  rows = []
  for name, group in groups.items():
    ref = reference(group, groups)
    if ref is None:
      continue
    final = lambda e: e['final'].get(metric)
    two = lambda e: networks_mean(e, metric)
    rows.append(
        f'| {name} | {ref} | {len(group)} / {len(groups[ref])} | '
        + _compared(group, groups[ref], final, final)
        + ' | '
        + _compared(group, groups[ref], two, lambda e: _two_networks(e, metric))
        + ' |'
    )
  if not rows:
    return []
  return [
      '',
      f'## {heading}',
      '',
      f'Difference of the mean final {unscoped(metric)} from {what}, the two-sided Welch '
      't-test p over seeds, and the paired t-test p over the seeds both cells ran (a seed is '
      'one initialisation and data order in every cell).',
      '',
      f'| cell | {"baseline" if reference is baseline_cell else "reference"} | n / n | selected '
      'network | mean of networks a, b |',
      '|---|---|---|---|---|',
  ] + rows


# The comparisons of results.md: (reference cell, heading, what the reference is).
_COMPARISONS = (
    (baseline_cell, 'Against the baseline', 'the baseline cell with the same overrides'),
    (
        default_teacher_cell,
        "Against the paper's pseudo-labels",
        "the cell with the same overrides but no `teacher.*` key (the paper's region, gate and "
        'target)',
    ),
)


def markdown_table(
    entries: Sequence[Dict[str, Any]],
    order: Optional[Sequence[str]] = None,
    settings: Optional[Dict[str, Any]] = None,
) -> str:
  """results.md: per cell, mean ± std over seeds of the final validation PCK, the best one,
  the pseudo-label metrics and the times, with the number of seeds n."""
  groups = by_cell(entries, order)
  pcks = pck_keys(entries)
  lines = []
  if settings:
    lines.append(f'# Sweep `{settings.get("sweep")}` on `{settings.get("config")}`\n')
    if settings.get('set'):
      lines.append(
          'Overrides for every cell: '
          + ', '.join(f'`{k}={v}`' for k, v in settings['set'].items())
          + '.\n'
      )
  select = next((e.get('select_metric') for e in entries if e.get('select_metric')), 'val/pck@0.1')
  lines.append(
      f'Mean ± sample standard deviation over the n seeds of each cell. Final: the validation '
      f'at the end of training (for mt the network selected on this validation split; the '
      f'mean of its two networks is the fair comparison with one network). Best: the highest '
      f'{select} seen '
      f'during training (model selection on the same split, so optimistic). Times in seconds '
      f'per run on this machine (wall: the invocation that finished the run; compile: the '
      f'train step, near 0 when the persistent cache had it; step: the mean training step, with '
      f'`workers` runs sharing the machine).\n'
  )
  key = constants.metric_key(constants.parse_metric_key(select).alpha, scope='val/zero_flow')
  zero = [e.get('zero_flow', {}).get(key, e['final'].get(key)) for e in entries]
  m, s, n = mean_std(zero)
  if n:
    lines.append(f'Zero-flow (identity) {select}: {_format(m, s)} (n={n}).\n')
  two = any(networks_mean(e, select) is not None for e in entries)
  head = (
      ['cell', 'overrides', 'n']
      + [f'final {unscoped(k)}' for k in pcks]
      + ([f'final {unscoped(select)}, mean of networks a, b'] if two else [])
      + [f'best {unscoped(select)}', 'best epoch', 'wall s', 'step s', 'compile s']
  )
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, group in groups.items():
    row = [
        name + (f' (= {group[0]["same_as"]})' if group[0].get('same_as') else ''),
        overrides_text(group[0]['overrides']),
        str(len(group)),
    ]
    row += [_format(*mean_std([e['final'].get(k) for e in group])[:2]) for k in pcks]
    if two:
      row.append(_format(*mean_std([networks_mean(e, select) for e in group])[:2]))
    row.append(_format(*mean_std([e['best'].get('value') for e in group])[:2]))
    row.append(_format(*mean_std([e['best'].get('epoch') for e in group])[:2], digits=1))
    row.append(_format(*mean_std([e.get('wall_s') for e in group])[:2], digits=0))
    row.append(_format(*mean_std([e.get('mean_step_s') for e in group])[:2], digits=3))
    row.append(_format(*mean_std([e.get('compile_s') for e in group])[:2], digits=1))
    lines.append('| ' + ' | '.join(row) + ' |')
  for reference, heading, what in _COMPARISONS:
    lines += comparisons(groups, select, reference, heading, what)
  for split in heldout_splits(entries):
    lines += heldout_lines(entries, order, split, constants.parse_metric_key(select).alpha)
  columns = pseudo_columns(entries)
  if columns:
    lines += [
        '',
        '## Pseudo-labels',
        '',
        'Averaged over the logged windows of the last epoch of each run (for mt network a; '
        'b and every other key in results.json).',
        '',
    ]
    head = ['cell', 'n'] + columns
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, group in groups.items():
      if not any(e.get('pseudo') for e in group):
        continue
      row = [name, str(len(group))]
      row += [
          _format(*mean_std([pseudo_value(e, k) for e in group])[:2], digits=3) for k in columns
      ]
      lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'


def heldout_lines(
    entries: Sequence[Dict[str, Any]], order: Optional[Sequence[str]], split: str, alpha: float
) -> List[str]:
  """results.md's section of the runs evaluated on the held-out `split` (`heldout.py`): PCK per
  cell, then the comparisons with the baseline and the paper's pseudo-labels on that split."""
  held = [h for h in (heldout_entry(e, split) for e in entries) if h is not None]
  groups = by_cell(held, order)
  pcks = pck_keys(held, split)
  metric = constants.metric_key(alpha, scope=split)
  two = any(networks_mean(e, metric) is not None for e in held)
  head = (
      ['cell', 'n']
      + [unscoped(k) for k in pcks]
      + ([f'{unscoped(metric)}, mean of networks a, b'] if two else [])
  )
  lines = [
      '',
      f'## Held-out split `{split}`',
      '',
      f"The same runs' final checkpoints evaluated on `{split}` (`--eval_split={split}`), at the "
      "validation's protocol; for mt the network selected on validation, and the mean of both. "
      'The comparisons below are on this split.',
      '',
      '| ' + ' | '.join(head) + ' |',
      '|' + '---|' * len(head),
  ]
  for name, group in groups.items():
    row = [name, str(len(group))]
    row += [_format(*mean_std([e['final'].get(k) for e in group])[:2]) for k in pcks]
    if two:
      row.append(_format(*mean_std([networks_mean(e, metric) for e in group])[:2]))
    lines.append('| ' + ' | '.join(row) + ' |')
  for reference, heading, what in _COMPARISONS:
    lines += comparisons(groups, metric, reference, f'{heading}, on `{split}`', what)
  return lines


def write_reports(
    out: str,
    entries: Sequence[Dict[str, Any]],
    order: Optional[Sequence[str]] = None,
    settings: Optional[Dict[str, Any]] = None,
) -> List[str]:
  """Writes results.md and `<sweep>.png` (a curve for a sweep over the label budget, else bars);
  returns their paths."""
  if not entries:
    return []
  settings = settings or {}
  paths = [os.path.join(out, RESULTS_MD)]
  with open(paths[0] + '.tmp', 'w') as f:
    f.write(markdown_table(entries, order, settings))
  os.replace(paths[0] + '.tmp', paths[0])
  metric = next((e['select_metric'] for e in entries if e.get('select_metric')), 'val/pck@0.1')
  png = os.path.join(out, f'{settings.get("sweep") or "results"}.png')
  if all(BUDGET_KEY in e['overrides'] for e in entries):
    plot_budget(entries, metric, png)
  else:
    plot_bars(entries, metric, png, order)
  return paths + [png]
