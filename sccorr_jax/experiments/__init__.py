"""Experiments: sweeps of config overrides x seeds, their runs, results, reports and plots.

* `cells`: a sweep's cells (`Cell`), their run order (`plan_cells`), each run's config
  (`make_config`, `build_configs`) and workdir (`run_dir`), and cells that are one run.
* `results`: `results.json` (`Results`, `make_entry`) and statistics over seeds.
* `runner`: runs a sweep (`run_sweep`), in this process or in pinned worker processes, each
  run after the cells it needs; `describe` (`--dry_run`).
* `heldout`: the finished runs evaluated on a held-out split (`evaluate_sweep`).
* `reports`: `results.md` and the plot (`write_reports`); `plots`: the figures.
* `workers`: training runs in worker processes, each pinned to its own CPUs.

The command is `tools/experiment.py` (docs/experiments.md).
"""

from sccorr_jax.experiments.cells import build_configs
from sccorr_jax.experiments.cells import Cell
from sccorr_jax.experiments.cells import identical_cells
from sccorr_jax.experiments.cells import load_sweep
from sccorr_jax.experiments.cells import make_config
from sccorr_jax.experiments.cells import plan_cells
from sccorr_jax.experiments.cells import resolve
from sccorr_jax.experiments.cells import run_dir
from sccorr_jax.experiments.heldout import evaluate_runs
from sccorr_jax.experiments.heldout import heldout_entry
from sccorr_jax.experiments.plots import plot_bars
from sccorr_jax.experiments.plots import plot_budget
from sccorr_jax.experiments.reports import comparisons
from sccorr_jax.experiments.reports import markdown_table
from sccorr_jax.experiments.reports import pck_keys
from sccorr_jax.experiments.reports import pseudo_columns
from sccorr_jax.experiments.reports import pseudo_value
from sccorr_jax.experiments.reports import RESULTS_MD
from sccorr_jax.experiments.reports import write_reports
from sccorr_jax.experiments.results import baseline_cell
from sccorr_jax.experiments.results import BUDGET_KEY
from sccorr_jax.experiments.results import budget_series
from sccorr_jax.experiments.results import by_cell
from sccorr_jax.experiments.results import default_teacher_cell
from sccorr_jax.experiments.results import last_epoch_pseudo_metrics
from sccorr_jax.experiments.results import make_entry
from sccorr_jax.experiments.results import mean_std
from sccorr_jax.experiments.results import networks_mean
from sccorr_jax.experiments.results import paired
from sccorr_jax.experiments.results import Results
from sccorr_jax.experiments.results import RESULTS_JSON
from sccorr_jax.experiments.results import welch
from sccorr_jax.experiments.runner import describe
from sccorr_jax.experiments.runner import evaluate_sweep
from sccorr_jax.experiments.runner import run_sweep
