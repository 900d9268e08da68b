r"""Runs a sweep of config overrides x seeds and reports mean ± std over seeds.

    python tools/experiment.py --config=configs/demo.py --sweep=modes --seeds=3 --out=runs/modes \
        --workers=2
    python tools/experiment.py --config=configs/demo.py --sweep=budget --seeds=3 \
        --out=runs/budget --dry_run
    python tools/experiment.py --config=configs/demo.py --sweep=modes --seeds=1 \
        --out=/tmp/modes --cells=st --set=optim.num_epochs=2

The sweeps are `get_sweep(name)` of the config file if it defines one, else
`sccorr_jax.config_lib.get_sweep(name)`. Every cell runs once per seed, in
`<out>/runs/<cell>/seed<k>` (`sccorr_jax.experiments`); `--set key=value` applies to every cell
(the cell's own overrides win); a value `'cell:NAME'` is cell NAME's workdir at the same seed,
and NAME runs first. Writes `results.json`, `results.md`, `<sweep>.png`, `runs/` and
`jax_cache/` into `--out` (docs/experiments.md); the same command resumes.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import jax

from sccorr_jax import cli
from sccorr_jax import config_lib
from sccorr_jax import experiments
from sccorr_jax.experiments import workers as workers_lib


def define_flags() -> None:
  """The command line's flags (defined when run as a script, not on import: tests load this file
  beside other tools that define `--config` and `--out` too)."""
  flags.DEFINE_string(
      'config',
      None,
      'Config file and argument, e.g. configs/demo.py or configs/demo.py:runlocal (required).',
  )
  flags.DEFINE_string(
      'sweep', None, 'Sweep name: modes, regime, budget, ablation, strategies (required).'
  )
  flags.DEFINE_integer('seeds', 3, 'Seeds 0 .. N-1 per cell (config.seed).', lower_bound=1)
  flags.DEFINE_string('out', None, 'Output directory (required); rerun to resume.')
  flags.DEFINE_bool(
      'dry_run',
      False,
      'List the cells in run order, with their overrides and the state of each seed, and exit.',
  )
  flags.DEFINE_list('cells', None, 'Run only these cells (and the cells they need).')
  flags.DEFINE_multi_string(
      'set',
      [],
      'key=value override for every cell, e.g. '
      'optim.num_epochs=4 (repeatable; values as Python literals).',
  )
  flags.DEFINE_string(
      'compilation_cache_dir',
      None,
      'Persistent XLA compilation cache, so '
      'that runs of one shape (seeds, budgets, resumed runs) compile once '
      '(default: <out>/jax_cache; "" = none). Sweeps may share one.',
  )
  flags.DEFINE_integer(
      'workers',
      1,
      'Runs at once. 1: in this process, one after another '
      '(its log on the terminal). N > 1: in N worker processes, each pinned to '
      "its share of the CPUs, each run's log in <workdir>/train.log. On a "
      'CPU, N = the number of cores trains the demo ~1.4x faster in all (2 '
      'cores; docs/experiments.md).',
      lower_bound=1,
  )
  flags.DEFINE_string(
      'eval_split',
      None,
      'After the runs: evaluate every finished run of the chosen cells and seeds on this '
      'held-out split (e.g. test; each run once), at the validation protocol, and report it '
      '(results.md: "Held-out split").',
  )
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
    cells = experiments.plan_cells(experiments.load_sweep(config_spec, sweep), f['cells'].value)
    common = config_lib.parse_overrides(f['set'].value)
    # Every mistake before any run.
    experiments.build_configs(config_spec, cells, seeds, out, common)
  except (ValueError, config_lib.ConfigFileError) as e:
    cli.fail(str(e), e)  # One line, exit status 2, before anything ran.
  cli.quiet_libraries()  # Again, for what building the configs imported.
  if f['dry_run'].value:
    print(experiments.describe(config_spec, cells, seeds, out, common))
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
    runs = experiments.run_sweep(
        config_spec,
        sweep,
        cells,
        seeds,
        out,
        common,
        workers=f['workers'].value,
        cache_dir=cache or None,
    )
    if f['eval_split'].value:
      runs = experiments.evaluate_sweep(
          config_spec, sweep, cells, seeds, out, f['eval_split'].value, common
      )
  except (RuntimeError, FileNotFoundError) as e:
    cli.fail(str(e), e)
  print(
      f'{len(runs)} runs in {os.path.join(out, experiments.RESULTS_JSON)} '
      f'({time.time() - t0:.0f} s this invocation); table in '
      f'{os.path.join(out, experiments.RESULTS_MD)}'
  )


if __name__ == '__main__':
  define_flags()
  cli.run(main)
