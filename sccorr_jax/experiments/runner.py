"""Running a sweep: every (seed, cell) not yet recorded, in this process or in worker processes,
each run once the cells it needs have finished at its seed.

Every cell runs once per seed (`config.seed` = 0 .. --seeds - 1) through
`sccorr_jax.train.train_and_evaluate` in `<out>/runs/<cell>/seed<k>`, in this process or, with
`workers=N`, N at a time in worker processes pinned to their share of the CPUs (each run's log
in its workdir's train.log; `workers.py`). Cells whose resolved configs are identical
run once and are reported under each name (`same_as`).

Writes into `out`:
  results.json    the sweep's settings and one entry per finished run: cell, overrides, seed,
                  final and best validation metrics, the pseudo-label metrics (keys containing
                  'pseudo', averaged over the last epoch's logged windows), wall time (of the
                  invocation that finished the run) and compile time. Rewritten atomically
                  after every run.
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

from concurrent import futures
import gc
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging

from sccorr_jax import checkpoint
from sccorr_jax import config_lib
from sccorr_jax.experiments import workers as workers_lib
from sccorr_jax.experiments.cells import build_configs
from sccorr_jax.experiments.cells import Cell
from sccorr_jax.experiments.cells import identical_cells
from sccorr_jax.experiments.cells import resolve
from sccorr_jax.experiments.cells import run_dir
from sccorr_jax.experiments.heldout import evaluate_runs
from sccorr_jax.experiments.reports import write_reports
from sccorr_jax.experiments.results import jsonable
from sccorr_jax.experiments.results import make_entry
from sccorr_jax.experiments.results import Results
from sccorr_jax.experiments.results import RESULTS_JSON


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


def run_sweep(
    config_spec: str,
    sweep_name: str,
    cells: Sequence[Cell],
    seeds: Sequence[int],
    out: str,
    common: Optional[Dict[str, Any]] = None,
    train_fn: Optional[Callable[..., Dict[str, Any]]] = None,
    workers: int = 1,
    cache_dir: Optional[str] = None,
) -> List[Dict[str, Any]]:
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
      processes, each pinned to its share of the CPUs (`experiments.workers`); a run starts when
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
  results = Results(
      os.path.join(out, RESULTS_JSON), {'config': config_spec, 'sweep': sweep_name, 'set': common}
  )
  for cell in cells:
    for seed in seeds:
      entry = results.get(cell.name, seed)
      if entry is not None and entry['overrides'] != jsonable(cell.overrides):
        raise ValueError(
            f'{results.path}: cell {cell.name!r} was run with overrides '
            f'{entry["overrides"]}, the sweep now says {cell.overrides}; use '
            'another --out'
        )
  todo = [(seed, cell) for seed in seeds for cell in cells if results.get(cell.name, seed) is None]
  logging.info(
      '%d of %d runs to do in %s%s',
      len(todo),
      len(cells) * len(seeds),
      out,
      f', {workers} at a time' if workers > 1 else '',
  )
  same_by_seed = {
      seed: identical_cells(cells, [configs[c.name, seed] for c in cells]) for seed in seeds
  }
  executor = _InProcess() if workers == 1 else workers_lib.pool(workers, cache_dir)
  with executor:
    failed = _schedule(
        executor,
        workers,
        todo,
        configs,
        same_by_seed,
        results,
        out,
        train_fn,
        [c.name for c in cells],
    )
  write_reports(out, results.runs, [c.name for c in cells], results.settings)
  if failed:
    raise RuntimeError(failed)
  return results.runs


def evaluate_sweep(
    config_spec: str,
    sweep_name: str,
    cells: Sequence[Cell],
    seeds: Sequence[int],
    out: str,
    split: str,
    common: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
  """Evaluates the finished runs of `cells` x `seeds` in `<out>/results.json` on the held-out
  `split` (`heldout.evaluate_runs`, each once) and rewrites the reports; returns the entries.

  Raises:
    ValueError: results.json holds other settings (`Results`).
    FileNotFoundError: a run's final checkpoint is gone.
  """
  common = dict(common or {})
  configs = build_configs(config_spec, cells, list(seeds), out, common)
  results = Results(
      os.path.join(out, RESULTS_JSON), {'config': config_spec, 'sweep': sweep_name, 'set': common}
  )
  n = evaluate_runs(results, configs, out, split)
  logging.info('%d runs evaluated on %s', n, split)
  write_reports(out, results.runs, [c.name for c in cells], results.settings)
  return results.runs


def _schedule(
    executor,
    slots: int,
    todo: Sequence[Tuple[int, Cell]],
    configs: Dict[Tuple[str, int], Any],
    same_by_seed: Dict[int, Dict[str, str]],
    results: Results,
    out: str,
    train_fn,
    order: Sequence[str],
) -> Optional[str]:
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
        results.add(
            dict(results.get(same, seed), cell=cell.name, overrides=cell.overrides, same_as=same)
        )
        logging.info('cell %s seed %d: identical to %s, not rerun', cell.name, seed, same)
      elif len(running) < slots:
        pending.remove((seed, cell))
        workdir = run_dir(out, cell.name, seed)
        resumed = checkpoint.latest_step(workdir)
        logging.info(
            '[%d/%d] cell %s seed %d in %s%s%s',
            len(todo) - len(pending),
            len(todo),
            cell.name,
            seed,
            workdir,
            f' (resuming from step {resumed})' if resumed is not None else '',
            f', log in {workers_lib.LOG_NAME}' if slots > 1 else '',
        )
        future = executor.submit(workers_lib.train_run, train_fn, configs[cell.name, seed], workdir)
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
        logging.warning(
            'cell %s seed %d stopped at step %d (epoch %d of %d); the sweep stops '
            'here, run the same command to resume',
            cell.name,
            seed,
            summary['step'],
            summary['epoch'],
            config.optim.num_epochs,
        )
        stop = True
        continue
      entry = make_entry(cell, seed, config, workdir, summary, wall_s, resumed, out, slots)
      results.add(entry)
      logging.info(
          'cell %s seed %d: %s = %s (best %s), %.0f s',
          cell.name,
          seed,
          entry['select_metric'],
          entry['final'].get(entry['select_metric']),
          entry['best'].get('value'),
          wall_s,
      )
      write_reports(out, results.runs, order, results.settings)
  return failed


def describe(
    config_spec: str, cells: Sequence[Cell], seeds: Sequence[int], out: str, common: Dict[str, Any]
) -> str:
  """The `--dry_run` listing: each cell in run order with its overrides and each seed's state
  (done, a checkpoint to resume from, or to run), and the equivalent `sccorr_jax.main` flags."""
  configs = build_configs(config_spec, cells, seeds, out, common)
  path = os.path.join(out, RESULTS_JSON)
  done, conflict = set(), []
  if os.path.exists(path):
    with open(path) as f:
      data = json.load(f)
    done = {(r['cell'], r['seed']) for r in data.get('runs', [])}
    given = jsonable({'config': config_spec, 'set': dict(common)})
    conflict = [
        f'{k}={data.get("settings", {}).get(k)!r}'
        for k, v in given.items()
        if data.get('settings', {}).get(k) != v
    ]
  same = identical_cells(cells, [configs[c.name, seeds[0]] for c in cells])
  lines = [
      f'{len(cells)} cells x {len(seeds)} seeds of {config_spec}'
      + (f' with {common}' if common else '')
      + f', into {out}:'
  ]
  if conflict:
    lines.append(
        f'NOTE: {path} was written with {", ".join(conflict)}; running this would stop '
        'with an error (use another --out)'
    )
  for i, cell in enumerate(cells, 1):
    states = []
    for seed in seeds:
      step = checkpoint.latest_step(run_dir(out, cell.name, seed))
      states.append(
          f'seed{seed}: '
          + (
              'done'
              if (cell.name, seed) in done
              else f'resume at step {step}'
              if step is not None
              else 'to run'
          )
      )
    extra = f' = {same[cell.name]} (run once)' if cell.name in same else ''
    after = f' after {", ".join(cell.depends)}' if cell.depends else ''
    lines.append(f'{i:3d}. {cell.name}{extra}{after}: {"; ".join(states)}')
    flags_ = config_lib.sweep_to_flags([{**common, **resolve(cell.overrides, out, seeds[0])}])[0]
    lines.append(f'       {flags_ or "(no overrides)"}')
  return '\n'.join(lines)
