r"""Runs a sweep of config overrides x seeds and reports mean ± std over seeds.

    python tools/experiment.py --config=configs/demo.py --sweep=modes --seeds=3 --out=runs/modes \
        --workers=2
    python tools/experiment.py --config=configs/demo.py --sweep=budget --seeds=3 \
        --out=runs/budget --dry_run
    python tools/experiment.py --config=configs/demo.py --sweep=modes --seeds=1 \
        --out=/tmp/modes --cells=st --set=optim.num_epochs=2

The sweeps (cell name -> dotted-key overrides) are `get_sweep(name)` of the config file if it
defines one, else `sccorr_jax.config_lib.get_sweep(name)` (`modes`, `budget`, `ablation`,
`strategies`; docs/experiments.md). Every cell runs once per seed (`config.seed` = 0 ..
--seeds - 1) through `sccorr_jax.train.train_and_evaluate` in `<out>/runs/<cell>/seed<k>`, in
this process or, with
`--workers=N`, N at a time in worker processes pinned to their share of the CPUs (each run's log
in its workdir's train.log; `sccorr_jax/workers.py`); `--set key=value` applies
to every cell (the cell's own overrides win). A value `'cell:NAME'` is the workdir of cell NAME
at the same seed (an 'st' cell's teacher): NAME runs first, and `--cells` adds it when it is
needed. Cells whose resolved configs are identical run once and are reported under each name
(`same_as`).

Writes into `--out`:
  results.json    the sweep's settings and one entry per finished run: cell, overrides, seed,
                  final and best validation metrics, the pseudo-label metrics (keys containing
                  'pseudo', averaged over the last epoch's logged windows), wall time (of the
                  invocation that finished the run) and compile time. Rewritten atomically after every run.
  results.md      mean ± std over seeds per cell (n shown), validation PCK and pseudo-labels.
  <sweep>.png     validation PCK@alpha per cell (bars, error bars and seeds), or against the
                  labels per pair k for a sweep over `data.keypoints_per_pair` (`budget.png`).
  runs/           the workdirs.
  jax_cache/      the persistent XLA compilation cache (--compilation_cache_dir): the runs of
                  one learning mode and shape (seeds, label budgets, resumed runs) compile once.

Resuming: a run in results.json is never rerun; an interrupted one (killed, or stopped by
SIGTERM, which ends the sweep after a checkpoint) continues from its latest checkpoint when the
same command is run again. results.json records --config, --sweep and --set; another --out is
needed to change them (seeds and --cells may change).
"""

from __future__ import annotations

import ast
from concurrent import futures
import dataclasses
import datetime
import gc
import json
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from sccorr_jax import checkpoint
from sccorr_jax import cli
from sccorr_jax import config_lib
from sccorr_jax import constants
from sccorr_jax import train
from sccorr_jax import workers as workers_lib

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'


# ------------------------------------------------------------------------------------------------
# Cells and their configs.


@dataclasses.dataclass(frozen=True)
class Cell:
  """One point of a sweep: a name and the dotted-key overrides of the base config."""
  name: str
  overrides: Dict[str, Any]

  @property
  def depends(self) -> Tuple[str, ...]:
    """Names of the cells whose workdirs this cell's overrides refer to (`'cell:NAME'`)."""
    prefix = config_lib.CELL_REFERENCE
    return tuple(v[len(prefix):] for v in self.overrides.values()
                 if isinstance(v, str) and v.startswith(prefix))


def load_sweep(config_spec: str, name: str) -> Dict[str, Dict[str, Any]]:
  """The config file's `get_sweep(name)` if it defines one, else `config_lib.get_sweep(name)`."""
  module = config_lib.load_config_module(config_spec.partition(':')[0])
  return getattr(module, 'get_sweep', config_lib.get_sweep)(name)


def plan_cells(sweep: Dict[str, Dict[str, Any]], only: Optional[Sequence[str]] = None
               ) -> List[Cell]:
  """The cells to run, in sweep order with every cell after the cells it refers to.

  Args:
    sweep: cell name -> overrides (`get_sweep`).
    only: cell names to run (those they refer to are added); None = all.

  Raises:
    ValueError: an unknown cell name, a reference to a cell the sweep lacks, or a cycle.
  """
  cells = {name: Cell(name, dict(overrides)) for name, overrides in sweep.items()}
  for cell in cells.values():
    for dep in cell.depends:
      if dep not in cells:
        raise ValueError(f'cell {cell.name!r} refers to cell {dep!r}, which the sweep lacks')
  unknown = [n for n in (only or ()) if n not in cells]
  if unknown:
    raise ValueError(f'unknown cell(s) {", ".join(unknown)}; the sweep has: '
                     f'{", ".join(cells)}')
  wanted = set(only) if only else set(cells)
  order: List[Cell] = []
  visiting = set()

  def visit(name):
    if any(c.name == name for c in order):
      return
    if name in visiting:
      raise ValueError(f'cells refer to each other in a cycle through {name!r}')
    visiting.add(name)
    for dep in cells[name].depends:
      visit(dep)
    visiting.discard(name)
    order.append(cells[name])

  for name in cells:
    if name in wanted:
      visit(name)
  return order


def run_dir(out: str, cell_name: str, seed: int) -> str:
  """The workdir of one run: `<out>/runs/<cell>/seed<k>`."""
  return os.path.join(out, 'runs', cell_name, f'seed{seed}')


def resolve(overrides: Dict[str, Any], out: str, seed: int) -> Dict[str, Any]:
  """`overrides` with every `'cell:NAME'` replaced by NAME's absolute workdir at `seed`."""
  prefix = config_lib.CELL_REFERENCE
  return {k: (os.path.abspath(run_dir(out, v[len(prefix):], seed))
              if isinstance(v, str) and v.startswith(prefix) else v)
          for k, v in overrides.items()}


def parse_set(items: Sequence[str]) -> Dict[str, Any]:
  """`['optim.num_epochs=4', 'data.data_dir=/tmp/d']` -> {key: value}; values are Python
  literals where they parse as one (`4`, `1e-3`, `True`, `None`, `(1, 2)`), else strings."""
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key.strip():
      raise ValueError(f'--set {item!r}: expected key=value')
    value = value.strip()
    if value.lower() in ('true', 'false'):
      value = value.lower() == 'true'
    else:
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass
    out[key.strip()] = value
  return out


def make_config(config_spec: str, cell: Cell, seed: int, out: str,
                common: Optional[Dict[str, Any]] = None):
  """The locked config of one run: the file's config, then `common`, then the cell, then seed."""
  config = config_lib.load_config(config_spec)
  config.lock()
  config_lib.apply_overrides(config, common or {})
  config_lib.apply_overrides(config, resolve(cell.overrides, out, seed))
  config.seed = int(seed)
  return config


def _config_key(config) -> str:
  return config.to_json_best_effort(sort_keys=True)


def identical_cells(cells: Sequence[Cell], configs: Sequence[Any]) -> Dict[str, str]:
  """Cell name -> the name of an earlier cell with an identical config (`configs[i]` is
  `cells[i]`'s config at one seed)."""
  first: Dict[str, str] = {}
  same = {}
  for cell, config in zip(cells, configs):
    key = _config_key(config)
    if key in first:
      same[cell.name] = first[key]
    else:
      first[key] = cell.name
  return same


def latest_checkpoint_step(workdir: str) -> Optional[int]:
  """The newest step under `<workdir>/checkpoints`, or None."""
  path = os.path.join(workdir, 'checkpoints')
  steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
  return max(steps) if steps else None


# ------------------------------------------------------------------------------------------------
# results.json


def _jsonable(v):
  """JSON-safe copy: numpy scalars to Python, tuples to lists, NaN and infinities to None."""
  if isinstance(v, dict):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
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
    self.settings = _jsonable(settings)
    self.runs: List[Dict[str, Any]] = []
    if os.path.exists(path):
      with open(path) as f:
        data = json.load(f)
      for key, value in self.settings.items():
        if data.get('settings', {}).get(key) != value:
          raise ValueError(
              f'{path} was written with {key}={data.get("settings", {}).get(key)!r}, this run '
              f'has {key}={value!r}; use another --out (or remove that file)')
      self.runs = list(data.get('runs', []))
    else:
      self.save()

  def get(self, cell: str, seed: int) -> Optional[Dict[str, Any]]:
    for entry in self.runs:
      if entry['cell'] == cell and entry['seed'] == seed:
        return entry
    return None

  def add(self, entry: Dict[str, Any]) -> None:
    self.runs.append(_jsonable(entry))
    self.save()

  def save(self) -> None:
    """Writes the file atomically (a temporary file, then `os.replace`)."""
    os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump({'settings': self.settings, 'runs': self.runs}, f, indent=1, allow_nan=False)
      f.write('\n')
    os.replace(tmp, self.path)


def read_metrics(workdir: str) -> List[Dict[str, Any]]:
  """The rows of `<workdir>/metrics.jsonl` (a torn last line is skipped)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          pass
  return rows


def last_epoch_pseudo_metrics(rows: Sequence[Dict[str, Any]], steps_per_epoch: int
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


def make_entry(cell: Cell, seed: int, config, workdir: str, summary: Dict[str, Any],
               wall_s: float, resumed_from_step: Optional[int], out: str, workers: int = 1
               ) -> Dict[str, Any]:
  """The results.json entry of one finished run (from its summary and its metrics.jsonl);
  `workers`: how many runs trained at once (the wall time depends on it)."""
  rows = read_metrics(workdir)
  best = dict(summary.get('best') or {})
  best_rows = [r for r in rows if r.get('step') == best.get('step') and 'val/epoch' in r]
  best['metrics'] = ({k: v for k, v in best_rows[-1].items() if k.startswith('val/')}
                     if best_rows else {})
  # The zero flow is validated once, at the run's first validation.
  zero_flow = next(({k: v for k, v in r.items() if 'zero_flow' in k} for r in rows
                    if any('zero_flow' in k for k in r)), {})
  pseudo, pseudo_steps = last_epoch_pseudo_metrics(
      rows, int(summary['step']) // max(int(summary['epoch']), 1))
  return {
      'cell': cell.name, 'seed': int(seed), 'overrides': cell.overrides,
      'workdir': os.path.relpath(workdir, out),
      'step': int(summary['step']), 'epoch': int(summary['epoch']),
      'select_metric': checkpoint.select_metric(config),
      'final': {k: v for k, v in (summary.get('val') or {}).items() if k.startswith('val/')},
      'best': best,
      'pseudo': pseudo, 'pseudo_steps': pseudo_steps, 'zero_flow': zero_flow,
      'wall_s': wall_s, 'compile_s': summary.get('compile_s'),
      'mean_step_s': summary.get('mean_step_s'),
      'nonfinite_total': summary.get('nonfinite_total'),
      'resumed_from_step': resumed_from_step, 'workers': int(workers),
      'finished': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


# ------------------------------------------------------------------------------------------------
# The runner.


def build_configs(config_spec: str, cells: Sequence[Cell], seeds: Sequence[int], out: str,
                  common: Dict[str, Any]) -> Dict[Tuple[str, int], Any]:
  """Every run's config, checked (`train.check_config`) before anything trains.

  Raises:
    ValueError: a cell whose overrides do not apply or give an inconsistent config, named.
  """
  configs = {}
  for seed in seeds:
    for cell in cells:
      try:
        config = make_config(config_spec, cell, seed, out, common)
        if seed == seeds[0]:
          train.check_config(config)
      except (KeyError, TypeError, ValueError) as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError quotes its text.
        raise ValueError(f'cell {cell.name!r}: {why}') from e
      configs[cell.name, seed] = config
  return configs


class _InProcess:
  """The executor of `--workers=1`: a run trains in this process when submitted, so the next runs
  of its shape reuse its compiled step, its log goes to the terminal, and an error propagates."""

  def submit(self, fn, *args):
    future = futures.Future()
    future.set_result(fn(*args, log_to_file=False))
    gc.collect()  # The trained arrays (dropped from the summary) are freed before the next run.
    return future

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def run_sweep(config_spec: str, sweep_name: str, cells: Sequence[Cell], seeds: Sequence[int],
              out: str, common: Optional[Dict[str, Any]] = None,
              train_fn: Optional[Callable[..., Dict[str, Any]]] = None, workers: int = 1,
              cache_dir: Optional[str] = None) -> List[Dict[str, Any]]:
  """Runs every (seed, cell) not yet in `<out>/results.json`, seed by seed, and writes reports.

  Args:
    config_spec: `'configs/demo.py[:arg]'`.
    sweep_name: recorded in results.json and naming the plot.
    cells: in run order (`plan_cells`).
    seeds: `config.seed` values.
    out: output directory.
    common: overrides for every cell (`--set`), applied before the cell's.
    train_fn: `(config, workdir) -> summary`; default `train.train_and_evaluate`. With
      `workers > 1` it must be picklable (a module-level function).
    workers: runs at once. 1: in this process, one after another. N > 1: in N spawned worker
      processes, each pinned to its share of the CPUs (`sccorr_jax.workers`); a run starts when
      the cells it refers to have finished at its seed.
    cache_dir: the persistent compilation cache for the workers (this process's is set by main).

  Returns:
    The entries of results.json. A run stopped early (SIGTERM) is not one; the sweep then
    stops starting runs, and the same call resumes it.

  Raises:
    RuntimeError: a run failed in a worker (named, with its log); the other runs finished first.
  """
  common = dict(common or {})
  seeds = list(seeds)
  configs = build_configs(config_spec, cells, seeds, out, common)
  results = Results(os.path.join(out, RESULTS_JSON),
                    {'config': config_spec, 'sweep': sweep_name, 'set': common})
  for cell in cells:
    for seed in seeds:
      entry = results.get(cell.name, seed)
      if entry is not None and entry['overrides'] != _jsonable(cell.overrides):
        raise ValueError(f'{results.path}: cell {cell.name!r} was run with overrides '
                         f'{entry["overrides"]}, the sweep now says {cell.overrides}; use '
                         'another --out')
  todo = [(seed, cell) for seed in seeds for cell in cells if results.get(cell.name, seed) is None]
  logging.info('%d of %d runs to do in %s%s', len(todo), len(cells) * len(seeds), out,
               f', {workers} at a time' if workers > 1 else '')
  same_by_seed = {seed: identical_cells(cells, [configs[c.name, seed] for c in cells])
                  for seed in seeds}
  executor = _InProcess() if workers == 1 else workers_lib.pool(workers, cache_dir)
  with executor:
    failed = _schedule(executor, workers, todo, configs, same_by_seed, results, out, train_fn,
                       [c.name for c in cells])
  write_reports(out, results.runs, [c.name for c in cells], results.settings)
  if failed:
    raise RuntimeError(failed)
  return results.runs


def _schedule(executor, slots: int, todo: Sequence[Tuple[int, Cell]],
              configs: Dict[Tuple[str, int], Any], same_by_seed: Dict[int, Dict[str, str]],
              results: Results, out: str, train_fn, order: Sequence[str]) -> Optional[str]:
  """Starts each run of `todo`, in order, once a slot is free and the cells it needs (refers to,
  or is identical to) are in `results`; records each finished run. Returns why a run failed, or
  None."""
  pending, running = list(todo), {}
  stop, failed = False, None
  while pending or running:
    for seed, cell in list(pending if not stop else ()):
      same = same_by_seed[seed].get(cell.name)
      if any(results.get(name, seed) is None for name in cell.depends + ((same,) if same else ())):
        continue
      if same is not None:
        pending.remove((seed, cell))
        results.add(dict(results.get(same, seed), cell=cell.name, overrides=cell.overrides,
                         same_as=same))
        logging.info('cell %s seed %d: identical to %s, not rerun', cell.name, seed, same)
      elif len(running) < slots:
        pending.remove((seed, cell))
        workdir = run_dir(out, cell.name, seed)
        resumed = latest_checkpoint_step(workdir)
        logging.info('[%d/%d] cell %s seed %d in %s%s%s', len(todo) - len(pending), len(todo),
                     cell.name, seed, workdir,
                     f' (resuming from step {resumed})' if resumed is not None else '',
                     f', log in {workers_lib.LOG_NAME}' if slots > 1 else '')
        future = executor.submit(workers_lib.train_run, train_fn, configs[cell.name, seed],
                                 workdir)
        running[future] = (seed, cell, workdir, resumed)
    if not running:
      break  # Stopped, or what is left needs a run that failed.
    done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
    for future in done:
      seed, cell, workdir, resumed = running.pop(future)
      config = configs[cell.name, seed]
      if future.exception() is not None:
        log = os.path.join(workdir, workers_lib.LOG_NAME)
        failed = failed or f'cell {cell.name} seed {seed} failed: {future.exception()} ({log})'
        logging.error('%s', failed)
        stop = True
        continue
      summary, wall_s = future.result()
      if int(summary['epoch']) < int(config.optim.num_epochs):
        logging.warning('cell %s seed %d stopped at step %d (epoch %d of %d); the sweep stops '
                        'here, run the same command to resume', cell.name, seed,
                        summary['step'], summary['epoch'], config.optim.num_epochs)
        stop = True
        continue
      entry = make_entry(cell, seed, config, workdir, summary, wall_s, resumed, out, slots)
      results.add(entry)
      logging.info('cell %s seed %d: %s = %s (best %s), %.0f s', cell.name, seed,
                   entry['select_metric'], entry['final'].get(entry['select_metric']),
                   entry['best'].get('value'), wall_s)
      write_reports(out, results.runs, order, results.settings)
  return failed


def describe(config_spec: str, cells: Sequence[Cell], seeds: Sequence[int], out: str,
             common: Dict[str, Any]) -> str:
  """The `--dry_run` listing: each cell in run order with its overrides and each seed's state
  (done, a checkpoint to resume from, or to run), and the equivalent `sccorr_jax.main` flags."""
  configs = build_configs(config_spec, cells, seeds, out, common)
  path = os.path.join(out, RESULTS_JSON)
  done, conflict = set(), []
  if os.path.exists(path):
    with open(path) as f:
      data = json.load(f)
    done = {(r['cell'], r['seed']) for r in data.get('runs', [])}
    given = _jsonable({'config': config_spec, 'set': dict(common)})
    conflict = [f'{k}={data.get("settings", {}).get(k)!r}' for k, v in given.items()
                if data.get('settings', {}).get(k) != v]
  same = identical_cells(cells, [configs[c.name, seeds[0]] for c in cells])
  lines = [f'{len(cells)} cells x {len(seeds)} seeds of {config_spec}'
           + (f' with {common}' if common else '') + f', into {out}:']
  if conflict:
    lines.append(f'NOTE: {path} was written with {", ".join(conflict)}; running this would stop '
                 'with an error (use another --out)')
  for i, cell in enumerate(cells, 1):
    states = []
    for seed in seeds:
      step = latest_checkpoint_step(run_dir(out, cell.name, seed))
      states.append(f'seed{seed}: ' + ('done' if (cell.name, seed) in done else
                                       f'resume at step {step}' if step is not None else
                                       'to run'))
    extra = f' = {same[cell.name]} (run once)' if cell.name in same else ''
    after = f' after {", ".join(cell.depends)}' if cell.depends else ''
    lines.append(f'{i:3d}. {cell.name}{extra}{after}: {"; ".join(states)}')
    flags_ = config_lib.sweep_to_flags([{**common, **resolve(cell.overrides, out, seeds[0])}])[0]
    lines.append(f'       {flags_ or "(no overrides)"}')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# Reports.


def mean_std(values: Sequence[Optional[float]]) -> Tuple[float, float, int]:
  """(mean, sample std with ddof 1 (NaN for one value), n) of the finite values."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return math.nan, math.nan, 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def _format(mean: float, std: float, digits: int = 2) -> str:
  if not math.isfinite(mean):
    return '–'
  text = f'{mean:.{digits}f}'
  return text + (f' ± {std:.{digits}f}' if math.isfinite(std) else '')


def _by_cell(entries: Sequence[Dict[str, Any]], order: Optional[Sequence[str]] = None
             ) -> Dict[str, List[Dict[str, Any]]]:
  """Entries grouped by cell, in `order` first, then in order of appearance."""
  groups: Dict[str, List[Dict[str, Any]]] = {name: [] for name in (order or ())}
  for e in entries:
    groups.setdefault(e['cell'], []).append(e)
  return {k: sorted(v, key=lambda e: e['seed']) for k, v in groups.items() if v}


def _alpha(key: str) -> float:
  return float(key.rpartition('@')[2])


def pck_keys(entries: Sequence[Dict[str, Any]]) -> List[str]:
  """The final `val/pck@alpha` keys of the entries (the selected model's), by alpha."""
  keys = {k for e in entries for k in e['final'] if re.fullmatch(r'val/pck@[0-9.]+', k)}
  return sorted(keys, key=_alpha)


def pseudo_columns(entries: Sequence[Dict[str, Any]]) -> List[str]:
  """The pseudo-label metrics worth a column, named without `train/` and `a/`: network a's and
  the shared ones (network b is symmetric and stays in results.json), without the λ schedule.
  An 'st' run's `train/<x>` and an 'mt' run's `train/a/<x>` share the column `<x>`."""
  cols = set()
  for e in entries:
    for k in e.get('pseudo', {}):
      if k.startswith('train/b/') or k == 'train/pseudo_weight':
        continue
      cols.add(k.replace('train/', '', 1).replace('a/', '', 1) if k.startswith('train/a/')
               else k.replace('train/', '', 1))
  return sorted(cols)


def pseudo_value(entry: Dict[str, Any], column: str) -> Optional[float]:
  """The entry's value of a `pseudo_columns` column (network a's for 'mt')."""
  pseudo = entry.get('pseudo', {})
  return pseudo.get(f'train/a/{column}', pseudo.get(f'train/{column}'))


def _overrides_text(overrides: Dict[str, Any]) -> str:
  return ', '.join(f'{k}={v}' for k, v in overrides.items()) or '–'


def markdown_table(entries: Sequence[Dict[str, Any]], order: Optional[Sequence[str]] = None,
                   settings: Optional[Dict[str, Any]] = None) -> str:
  """results.md: per cell, mean ± std over seeds of the final validation PCK, the best one,
  the pseudo-label metrics and the times, with the number of seeds n."""
  groups = _by_cell(entries, order)
  pcks = pck_keys(entries)
  lines = []
  if settings:
    lines.append(f'# Sweep `{settings.get("sweep")}` on `{settings.get("config")}`\n')
    if settings.get('set'):
      lines.append('Overrides for every cell: '
                   + ', '.join(f'`{k}={v}`' for k, v in settings['set'].items()) + '.\n')
  select = next((e.get('select_metric') for e in entries if e.get('select_metric')),
                'val/pck@0.1')
  lines.append(
      f'Mean ± sample standard deviation over the n seeds of each cell. Final: the validation '
      f'at the end of training (for mt the network selected on this validation split; the '
      f'mean of its two networks is the fair comparison with one network). Best: the highest '
      f'{select} seen '
      f'during training (model selection on the same split, so optimistic). Times in seconds '
      f'per run on this machine (wall: the invocation that finished the run; compile: the '
      f'train step, near 0 when the persistent cache had it).\n')
  key = constants.metric_key(_alpha(select), scope='val/zero_flow')
  zero = [e.get('zero_flow', {}).get(key, e['final'].get(key)) for e in entries]
  m, s, n = mean_std(zero)
  if n:
    lines.append(f'Zero-flow (identity) {select}: {_format(m, s)} (n={n}).\n')
  two = any(networks_mean(e, select) is not None for e in entries)
  head = ['cell', 'overrides', 'n'] + [f'final {k[4:]}' for k in pcks] + (
      [f'final {select[4:]}, mean of networks a, b'] if two else []) + [
      f'best {select[4:]}', 'best epoch', 'wall s', 'compile s']
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, group in groups.items():
    row = [name + (f' (= {group[0]["same_as"]})' if group[0].get('same_as') else ''),
           _overrides_text(group[0]['overrides']), str(len(group))]
    row += [_format(*mean_std([e['final'].get(k) for e in group])[:2]) for k in pcks]
    if two:
      row.append(_format(*mean_std([networks_mean(e, select) for e in group])[:2]))
    row.append(_format(*mean_std([e['best'].get('value') for e in group])[:2]))
    row.append(_format(*mean_std([e['best'].get('epoch') for e in group])[:2], digits=1))
    row.append(_format(*mean_std([e.get('wall_s') for e in group])[:2], digits=0))
    row.append(_format(*mean_std([e.get('compile_s') for e in group])[:2], digits=1))
    lines.append('| ' + ' | '.join(row) + ' |')
  columns = pseudo_columns(entries)
  if columns:
    lines += ['', '## Pseudo-labels', '',
              'Averaged over the logged windows of the last epoch of each run (for mt network a; '
              'b and every other key in results.json).', '']
    head = ['cell', 'n'] + columns
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, group in groups.items():
      if not any(e.get('pseudo') for e in group):
        continue
      row = [name, str(len(group))]
      row += [_format(*mean_std([pseudo_value(e, k) for e in group])[:2], digits=3)
              for k in columns]
      lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'


BUDGET_KEY = 'data.keypoints_per_pair'


def networks_mean(entry: Dict[str, Any], metric: str) -> Optional[float]:
  """The mean of an mt run's two networks' final `metric` (`val/pck@0.1`: of `val/a/pck@0.1`
  and `val/b/pck@0.1`), or None for a run of one network. The selected network's number is
  chosen on the validation split itself, so the mean is the fair comparison with one network."""
  scope, _, key = metric.partition('/')
  values = [entry['final'].get(f'{scope}/{m}/{key}') for m in 'ab']
  return float(np.mean(values)) if all(v is not None for v in values) else None


def budget_series(entries: Sequence[Dict[str, Any]], metric: str, key: str = BUDGET_KEY,
                  networks: bool = False) -> Dict[str, List[Tuple[int, float, float, int]]]:
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
    label = (str(rest['learning_mode']) if list(rest) == ['learning_mode']
             else _overrides_text(rest))
    points.setdefault(label, {}).setdefault(int(e['overrides'][key]), []).append(value)
  return {label: [(k, *mean_std(v[k])) for k in sorted(v, key=lambda k: (k == 0, k))]
          for label, v in points.items()}


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
  styles = [(series, '-', 'o', ''),
            (budget_series(entries, metric, networks=True), '--', 's', ', mean of a and b')]
  for i, (label, _) in enumerate(series.items()):
    for curves, line, marker, suffix in styles:
      if label not in curves:
        continue
      points = curves[label]
      x = [k if k > 0 else all_x for k, *_ in points]
      y = [m for _, m, _, _ in points]
      err = [0.0 if not math.isfinite(s) else s for _, _, s, _ in points]
      n = sorted({c for *_, c in points})
      ax.errorbar(x, y, yerr=err, marker=marker, linestyle=line, capsize=4, color=f'C{i}',
                  label=f'{label}{suffix} (n={"/".join(map(str, n))})')
  ax.set_xscale('log', base=2)
  ticks = ks + [all_x]
  ax.set_xticks(ticks, [str(k) for k in ks] + ['all'])
  ax.minorticks_off()
  ax.set_title('mean ± std over seeds', fontsize=9)
  ax.set_xlabel('labelled keypoints per training pair (k)')
  ax.set_ylabel(f'validation {metric[4:]} (%)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_bars(entries: Sequence[Dict[str, Any]], metric: str, path: str,
              order: Optional[Sequence[str]] = None) -> None:
  """PNG: mean final `metric` per cell with std error bars and each seed as a dot."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = _by_cell(entries, order)
  names = list(groups)
  fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 1.5), 4), dpi=120)
  for i, name in enumerate(names):
    values = [e['final'].get(metric) for e in groups[name]]
    m, s, n = mean_std(values)
    ax.bar(i, m, yerr=s if math.isfinite(s) else 0.0, capsize=4, color='C0', alpha=0.6)
    finite = [v for v in values if v is not None]
    ax.plot([i] * len(finite), finite, 'k.', ms=4)
    ax.annotate(f'n={n}', (i, 0), textcoords='offset points', xytext=(0, 3), ha='center',
                fontsize=7)
  ax.set_title('mean ± std over seeds (dots: seeds)', fontsize=9)
  ax.set_xticks(range(len(names)), names, rotation=30, ha='right')
  ax.set_ylabel(f'validation {metric[4:]} (%)')
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_reports(out: str, entries: Sequence[Dict[str, Any]],
                  order: Optional[Sequence[str]] = None,
                  settings: Optional[Dict[str, Any]] = None) -> List[str]:
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


# ------------------------------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  """The command line's flags (defined when run as a script, not on import: tests load this file
  beside other tools that define `--config` and `--out` too)."""
  flags.DEFINE_string('config', None, 'Config file and argument, e.g. configs/demo.py or '
                      'configs/demo.py:runlocal (required).')
  flags.DEFINE_string('sweep', None, 'Sweep name: modes, regime, budget, ablation, '
                      'strategies (required).')
  flags.DEFINE_integer('seeds', 3, 'Seeds 0 .. N-1 per cell (config.seed).', lower_bound=1)
  flags.DEFINE_string('out', None, 'Output directory (required); rerun to resume.')
  flags.DEFINE_bool('dry_run', False, 'List the cells in run order, with their overrides and '
                    'the state of each seed, and exit.')
  flags.DEFINE_list('cells', None, 'Run only these cells (and the cells they need).')
  flags.DEFINE_multi_string('set', [], 'key=value override for every cell, e.g. '
                            'optim.num_epochs=4 (repeatable; values as Python literals).')
  flags.DEFINE_string('compilation_cache_dir', None, 'Persistent XLA compilation cache, so '
                      'that runs of one shape (seeds, budgets, resumed runs) compile once '
                      '(default: <out>/jax_cache; "" = none). Sweeps may share one.')
  flags.DEFINE_integer('workers', 1, 'Runs at once. 1: in this process, one after another '
                       '(its log on the terminal). N > 1: in N worker processes, each pinned to '
                       'its share of the CPUs, each run\'s log in <workdir>/train.log. On a '
                       'CPU, N = the number of cores trains the demo ~1.4x faster in all (2 '
                       'cores; docs/experiments.md).', lower_bound=1)
  flags.mark_flags_as_required(['config', 'sweep', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  config_spec, sweep, out = f['config'].value, f['sweep'].value, f['out'].value
  seeds = list(range(f['seeds'].value))
  cli.check_config_file('config', config_spec)
  cli.new_output_dir('out', out)
  try:
    cells = plan_cells(load_sweep(config_spec, sweep), f['cells'].value)
    common = parse_set(f['set'].value)
    build_configs(config_spec, cells, seeds, out, common)  # Every mistake before any run.
  except (ValueError, config_lib.ConfigFileError) as e:
    cli.fail(str(e), e)  # One line, exit status 2, before anything ran.
  cli.quiet_libraries()  # Again, for what building the configs imported.
  if f['dry_run'].value:
    print(describe(config_spec, cells, seeds, out, common))
    return
  cache = f['compilation_cache_dir'].value
  if cache is None:
    cache = os.path.join(out, 'jax_cache')
  if cache:
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(cache))
  try:
    workers_lib.cpu_groups(f['workers'].value)
  except ValueError as e:
    cli.fail(str(e), e)
  t0 = time.time()
  try:
    runs = run_sweep(config_spec, sweep, cells, seeds, out, common,
                     workers=f['workers'].value, cache_dir=cache or None)
  except RuntimeError as e:
    cli.fail(str(e), e)
  print(f'{len(runs)} runs in {os.path.join(out, RESULTS_JSON)} ({time.time() - t0:.0f} s this '
        f'invocation); table in {os.path.join(out, RESULTS_MD)}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
