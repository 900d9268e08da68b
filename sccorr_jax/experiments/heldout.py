"""A sweep's finished runs evaluated on a held-out split (`tools/experiment.py --eval_split=test`).

A sweep validates (and, for mt, selects its network) on `eval.split`, the validation split, so
a cell picked by its validation numbers (the best-looking strategy) is optimistic there. The
same runs' final checkpoints evaluated on the test split give the numbers to report for it.

Each run's final checkpoint (`<workdir>/checkpoints/<step>`, the one its `final` numbers come
from) is evaluated with `evaluation.evaluate_checkpoint` and read at the trainer's validation
protocol (`Protocol.from_config(..., validation=True)`: its alphas and threshold kind, and its
`eval.max_batches` when a smoke config sets one), so the
keys are the validation's with the split as scope: `test/pck@0.1`, and for mt `test/a/...`,
`test/b/...` with the unscoped keys those of the network selected on validation
(`val/best_model`). They are stored in the run's results.json entry under `heldout[split]`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence

from absl import logging

from sccorr_jax.evaluation import evaluator
from sccorr_jax.evaluation.protocol import Protocol
from sccorr_jax.evaluation.validation import scalars
from sccorr_jax.experiments.results import Results

HELDOUT = 'heldout'
NETWORKS = 'ab'


def heldout_entry(entry: Dict[str, Any], split: str) -> Optional[Dict[str, Any]]:
  """`entry` with its `split` numbers as its `final` ones (what the reports read), or None when
  it was not evaluated on `split`."""
  metrics = entry.get(HELDOUT, {}).get(split)
  return None if metrics is None else dict(entry, final=metrics)


def run_metrics(config, checkpoint: str, split: str, selected: Optional[int]) -> Dict[str, float]:
  """The flat PCK scalars (`validation.scalars`) of one checkpoint step on `split`.

  Args:
    config: the run's config (its data, and the validation protocol of its `eval`).
    checkpoint: `<workdir>/checkpoints/<step>`.
    split: the split evaluated.
    selected: an mt checkpoint's network chosen on validation (0: a, 1: b): both are
      evaluated, scoped `<split>/a/`, `<split>/b/`, and the selected one also unscoped; None:
      a one-network checkpoint.
  """
  protocol = Protocol.from_config(config, split, validation=True)
  out = {}
  for index in (None,) if selected is None else (0, 1):
    result = evaluator.evaluate_checkpoint(
        config,
        checkpoint,
        split=split,
        model_index=index,
        max_batches=config.eval.get('max_batches'),
        progress=False,
    )
    scope = f'{split}/' if index is None else f'{split}/{NETWORKS[index]}/'
    out.update(scalars(result, protocol, scope))
    if index == selected:
      out.update(scalars(result, protocol, f'{split}/'))
  return out


def evaluate_runs(
    results: Results,
    configs: Dict[Any, Any],
    out: str,
    split: str,
    metrics_fn: Callable[..., Dict[str, float]] = run_metrics,
) -> int:
  """Evaluates every entry of `results` whose (cell, seed) is in `configs` and that has no
  `split` numbers yet; records them (results.json is rewritten after each). Returns how many
  were evaluated.

  Raises:
    FileNotFoundError: a run's final checkpoint is gone (its path named).
  """
  done = 0
  for entry in results.runs:
    key = (entry['cell'], entry['seed'])
    if key not in configs or heldout_entry(entry, split) is not None:
      continue
    workdir = os.path.join(out, entry['workdir'])  # Absolute for runs reused from elsewhere.
    checkpoint = os.path.join(workdir, 'checkpoints', str(entry['step']))
    if not os.path.isdir(checkpoint):
      raise FileNotFoundError(
          f'{checkpoint}: the final checkpoint of cell {entry["cell"]} seed {entry["seed"]} '
          f'is gone; it cannot be evaluated on {split!r}'
      )
    best = entry['final'].get('val/best_model')
    selected = None if best is None else int(best)
    entry.setdefault(HELDOUT, {})[split] = metrics_fn(configs[key], checkpoint, split, selected)
    results.save()
    done += 1
    logging.info(
        'cell %s seed %d on %s: %s', entry['cell'], entry['seed'], split, entry[HELDOUT][split]
    )
  return done


def heldout_splits(entries: Sequence[Dict[str, Any]]) -> Sequence[str]:
  """The held-out splits some entry was evaluated on, sorted."""
  return sorted({s for e in entries for s in e.get(HELDOUT, {})})
