"""Cells of a sweep: their order, their configs, and which of them are one run.

A sweep (`config_lib.get_sweep`, or the config file's own `get_sweep`) is an ordered dict cell
name -> dotted-key overrides of the base config. A value `'cell:NAME'`
(`config_lib.CELL_REFERENCE`) is the workdir of cell NAME at the same seed (an 'st' cell's
teacher): NAME runs first. Every run is one cell at one seed, in `<out>/runs/<cell>/seed<k>`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sccorr_jax import config_lib
from sccorr_jax import train


@dataclasses.dataclass(frozen=True)
class Cell:
  """One point of a sweep: a name and the dotted-key overrides of the base config."""

  name: str
  overrides: Dict[str, Any]

  @property
  def depends(self) -> Tuple[str, ...]:
    """Names of the cells whose workdirs this cell's overrides refer to (`'cell:NAME'`)."""
    prefix = config_lib.CELL_REFERENCE
    return tuple(
        v[len(prefix) :]
        for v in self.overrides.values()
        if isinstance(v, str) and v.startswith(prefix)
    )


def load_sweep(config_spec: str, name: str) -> Dict[str, Dict[str, Any]]:
  """The config file's `get_sweep(name)` if it defines one, else `config_lib.get_sweep(name)`."""
  module = config_lib.load_config_module(config_spec.partition(':')[0])
  return getattr(module, 'get_sweep', config_lib.get_sweep)(name)


def plan_cells(
    sweep: Dict[str, Dict[str, Any]], only: Optional[Sequence[str]] = None
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
    raise ValueError(f'unknown cell(s) {", ".join(unknown)}; the sweep has: ' f'{", ".join(cells)}')
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
  return {
      k: (
          os.path.abspath(run_dir(out, v[len(prefix) :], seed))
          if isinstance(v, str) and v.startswith(prefix)
          else v
      )
      for k, v in overrides.items()
  }


def make_config(
    config_spec: str, cell: Cell, seed: int, out: str, common: Optional[Dict[str, Any]] = None
):
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


def build_configs(
    config_spec: str, cells: Sequence[Cell], seeds: Sequence[int], out: str, common: Dict[str, Any]
) -> Dict[Tuple[str, int], Any]:
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
