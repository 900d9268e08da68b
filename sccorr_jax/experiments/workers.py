"""Training runs in worker processes, each pinned to its own CPUs (`tools/experiment.py --workers`).

On a CPU, one training process does not keep every core busy with a small model: XLA's thread
pool parallelises the demo's small convolutions poorly. Measured on this project's 2-core AMD
EPYC VM (Zen 5), `configs/demo.py` mt: one process on both cores trains 5.8 steps/s; two
processes pinned to one core each (`intra_op_parallelism_threads=1`) train 4.0 steps/s each, 8.0
together (1.37x). A sweep is many independent runs, so it runs N of them at once, one per group
of `len(CPUs) / N` cores.

Each worker is a fresh (spawned) interpreter: the parent's JAX runtime is never forked. A run's
log goes to `<workdir>/train.log`; the parent logs when each run starts and ends.
"""

from __future__ import annotations

from concurrent import futures
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax

from sccorr_jax import cli
from sccorr_jax import train

LOG_NAME = 'train.log'
_ONE_THREAD_XLA_FLAGS = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'


def cpu_groups(n: int, cpus: Optional[Sequence[int]] = None) -> List[List[int]]:
  """The CPUs this process may use (or `cpus`) split into `n` contiguous groups of near-equal size.

  Raises:
    ValueError: more groups than CPUs.
  """
  cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
  if not 1 <= n <= len(cpus):
    raise ValueError(
        f'--workers={n}: this process may use {len(cpus)} CPU(s), so 1 to ' f'{len(cpus)} workers'
    )
  bounds = [round(i * len(cpus) / n) for i in range(n + 1)]
  return [cpus[bounds[i] : bounds[i + 1]] for i in range(n)]


_PR_SET_PDEATHSIG, _PR_GET_PDEATHSIG = 1, 2


def parent_death_signal() -> int:
  """The signal this process gets when its parent dies (Linux; 0 = none or unknown)."""
  try:
    out = ctypes.c_int(0)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_PDEATHSIG, ctypes.byref(out), 0, 0, 0)
    return out.value
  except (OSError, AttributeError):
    return 0


def _init_worker(groups, cache_dir: Optional[str]) -> None:
  """Pool initializer: asks for SIGTERM when the runner dies, takes the next CPU group, pins to
  it, and sets up JAX before first use.

  A runner that is killed (SIGTERM, SIGKILL, a closed terminal) leaves no orphan training on
  into a workdir that the next invocation resumes: the worker gets SIGTERM, and the trainer's
  handler checkpoints the step and stops.
  """
  try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
  except (OSError, AttributeError):  # Not Linux: a killed runner may leave its runs going.
    pass
  group = groups.get()
  os.sched_setaffinity(0, group)
  if len(group) == 1:
    # Read when the backend starts (the first computation), not when jax is imported.
    flags = os.environ.get('XLA_FLAGS', '')
    os.environ['XLA_FLAGS'] = f'{flags} {_ONE_THREAD_XLA_FLAGS}'.strip()
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
  # No absl flags are parsed in a worker: log at INFO, as `sccorr_jax.main` does.
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  cli.quiet_libraries()


@contextlib.contextmanager
def _output_to(path: str):
  """Points this process's stdout and stderr (file descriptors 1 and 2) at `path` (appending)."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  with open(path, 'a') as log:
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
      yield
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      for fd in saved:
        os.close(fd)


def train_run(
    train_fn: Optional[Callable[..., Dict[str, Any]]],
    config,
    workdir: str,
    log_to_file: bool = True,
) -> Tuple[Dict[str, Any], float]:
  """One run: `train_fn(config, workdir)` (default `train.train_and_evaluate`), its output in
  `<workdir>/train.log` (or, without `log_to_file`, where this process's goes); returns (its
  summary without the trained state, wall seconds)."""
  train_fn = train_fn or train.train_and_evaluate
  os.makedirs(workdir, exist_ok=True)
  log = _output_to(os.path.join(workdir, LOG_NAME)) if log_to_file else contextlib.nullcontext()
  with log:
    t0 = time.time()
    summary = train_fn(config, workdir)
    wall_s = time.time() - t0
  summary = dict(summary)
  summary.pop('state', None)  # Arrays stay in the worker.
  return summary, wall_s


def pool(n: int, cache_dir: Optional[str] = None):
  """A `ProcessPoolExecutor` of `n` spawned workers, the i-th pinned to `cpu_groups(n)[i]`."""
  context = multiprocessing.get_context('spawn')
  groups = context.Queue()
  for group in cpu_groups(n):
    groups.put(group)
  return futures.ProcessPoolExecutor(
      n,
      mp_context=context,
      initializer=_init_worker,
      initargs=(groups, os.path.abspath(cache_dir) if cache_dir else None),
  )
