"""Training logs: scalars to `<workdir>/metrics.jsonl` and TensorBoard, and window means.

`metrics.jsonl` holds one JSON object per logged step (`step` plus keys such as
`train/a/loss_sup`, `train/a/pseudo_kept_epe`, `val/pck@0.1`); TensorBoard event files go to
`<workdir>/tensorboard` (written without TensorFlow, by tensorboardX). A resumed run drops what
the interrupted one logged after the restored step, so every step is logged once.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, List, Optional

import numpy as np

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Scalars to TensorBoard event files and `<workdir>/metrics.jsonl` (process 0 only).

  A run resumed at `resume_step` first drops what the interrupted run logged after that step
  (JSONL rows with a later step, or torn; TensorBoard events from `resume_step + 1` on), so
  that every step is logged once.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      path = os.path.join(workdir, METRICS_FILE)
      _drop_rows_after(path, resume_step)
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=resume_step + 1)
      self._jsonl = open(path, 'a')

  def write(self, step: int, scalars: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: to_python(v) for k, v in scalars.items()}
    for k, v in clean.items():
      if isinstance(v, (int, float)) and v is not None:
        # TensorBoard tags allow [A-Za-z0-9_./-]: `val/pck@0.1` -> `val/pck_0.1` (the JSONL
        # keeps the original names).
        self._tb.add_scalar(re.sub(r'[^A-Za-z0-9_./-]', '_', k), v, step)
    self._jsonl.write(json.dumps({'step': int(step), **clean}) + '\n')
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def read_rows(workdir: str) -> List[Dict[str, Any]]:
  """The rows of `<workdir>/metrics.jsonl` (a torn last line is skipped)."""
  path = os.path.join(workdir, METRICS_FILE)
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          pass
  return rows


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites the JSONL file `path` (atomically) without rows of steps after `step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)['step']) <= step and line.endswith('\n'):
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # A row torn by a kill: dropped.
  if len(keep) != len(lines):
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


def to_python(v):
  v = np.asarray(v).item() if not isinstance(v, (int, float, str)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return None if math.isnan(v) else v
  return v


class Window:
  """Means of per-step scalars over a logging window (its sums travel in the checkpoint, so a
  resumed run logs the means an uninterrupted one would)."""

  def __init__(self, state: Optional[Dict[str, Dict[str, float]]] = None):
    state = state or {}
    self.sums, self.counts = dict(state.get('sums', {})), dict(state.get('counts', {}))

  def state(self) -> Dict[str, Dict[str, float]]:
    return {'sums': dict(self.sums), 'counts': dict(self.counts)}

  def add(self, metrics: Dict[str, Any]) -> None:
    for k, v in metrics.items():
      v = float(v)
      if math.isfinite(v):
        self.sums[k] = self.sums.get(k, 0.0) + v
        self.counts[k] = self.counts.get(k, 0) + 1

  def means(self) -> Dict[str, float]:
    out = {k: self.sums[k] / self.counts[k] for k in self.sums}
    self.sums, self.counts = {}, {}
    return out
