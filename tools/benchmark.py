r"""Speed and memory of the SCorrSAN training steps and of the evaluation forward.

    python tools/benchmark.py --config=configs/spair.py --mode=mt --batch_size=2 \
        --dtype=float32 --json=/tmp/mt_f32.json
    python tools/benchmark.py --config=configs/spair.py --mode=eval --batch_size=2
    python tools/benchmark.py --config=configs/spair.py:mt,runlocal --steps=2 --warmup=1
    python tools/benchmark.py --config=configs/spair.py --mode=mt --batch_size=16 \
        --dtype=bfloat16 --fit_batch              # on a GPU/TPU: also the largest batch that fits
    python tools/benchmark.py ... --config.model.target_chunks=4   # any config override

Modes: `baseline`, `st`, `mt` (one compiled training step of `sccorr_jax.train_step`, state and
step built with the trainer's own functions, the state donated as in `train.py`) and `eval` (the
jitted forward `images -> flow` with running BatchNorm statistics). Inputs are random images and
a sparse random flow label; the pseudo-label loss is switched on (the epoch where it starts), so
every term of the step runs.

Reported (readable line on stdout, everything in `--json`):
* `compile_s`: lowering + XLA compilation of the step.
* `step_time_{min,median,max}_s` over `--steps` runs after `--warmup` discarded runs (the warm-up
  also touches the working set: this kind of VM backs fresh memory lazily, ~2 ms/MiB).
* `pairs_per_s` = batch / median step time.
* `flops_per_step` from XLA's cost analysis of the compiled step; `achieved_flops_per_s`; `mfu`:
  its fraction of `peak_flops_per_s`, measured once on the device with a large matrix product in
  the compute dtype (`--peak_flops` overrides).
* `peak_memory_bytes`: the device's peak bytes in use on GPU/TPU, the process's peak RSS on CPU
  (`peak_memory_kind` says which; freed compiler heap is returned to the OS before timing);
  `compiled_memory_bytes`: XLA's own estimate for the step
  (arguments + outputs + temporaries - donated aliases).
* With `--fit_batch`: `max_batch_estimate`, the largest batch whose compiled memory fits the
  device (linear in the batch between two compiled sizes, checked by compiling it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import resource
import time
from typing import Any, Dict, Optional

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from sccorr_jax import cli
from sccorr_jax import models
from sccorr_jax import sharding
from sccorr_jax import train

MODES = ('baseline', 'st', 'mt', 'eval')
GIB = 2**30


# ------------------------------------------------------------------------------------------------
# Configuration.


def prepare_config(
    config,
    mode: Optional[str] = None,
    batch_size: Optional[int] = None,
    dtype: Optional[str] = None,
):
  """A copy of `config` with the benchmark's mode, batch size and compute dtype."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if mode is not None and mode != 'eval':
      config.learning_mode = mode
    if batch_size is not None:
      config.optim.batch_size = int(batch_size)
      config.eval.batch_size = int(batch_size)
    if dtype is not None:
      config.model.dtype = None if dtype == 'float32' else str(dtype)
    if not config.optim.get('steps_per_epoch'):
      config.optim.steps_per_epoch = 1000  # No dataset is read; only the schedule needs it.
  return config


# ------------------------------------------------------------------------------------------------
# Device facts.


def device_kind() -> str:
  d = jax.devices()[0]
  return f'{d.platform}:{getattr(d, "device_kind", "")} x{jax.device_count()}'


def _timed(fn, *args, runs: int, warmup: int):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(dtype: str = 'float32', n: Optional[int] = None) -> float:
  """FLOP/s of one large `n x n` matrix product on the default device (best of 5).

  Args:
    dtype: compute dtype of the product.
    n: side (default 2048 on CPU, 8192 on accelerators).
  """
  if n is None:
    n = 2048 if jax.devices()[0].platform == 'cpu' else 8192
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=a.dtype))
  times = _timed(f, a, b, runs=5, warmup=2)
  return 2.0 * n**3 / min(times)


def _cost_flops(compiled) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def _compiled_memory(compiled) -> Optional[int]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )


def peak_memory() -> Dict[str, Any]:
  """`{'bytes', 'kind'}`: device peak bytes in use (GPU/TPU) or process peak RSS (CPU)."""
  d = jax.devices()[0]
  if d.platform != 'cpu':
    stats = d.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      return {'bytes': int(stats['peak_bytes_in_use']), 'kind': 'device_peak_bytes_in_use'}
  # ru_maxrss is in KiB on Linux.
  return {
      'bytes': int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
      'kind': 'process_peak_rss',
  }


def device_memory_limit() -> int:
  """Bytes the device may hold (GPU/TPU `bytes_limit`; on CPU the physical memory)."""
  d = jax.devices()[0]
  if d.platform != 'cpu':
    stats = d.memory_stats() or {}
    if 'bytes_limit' in stats:
      return int(stats['bytes_limit'])
  return int(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))


# ------------------------------------------------------------------------------------------------
# What is timed.


@dataclasses.dataclass
class Built:
  """A compiled function with its arguments; `run(args) -> new args` feeds donated state back."""

  compiled: Any
  args: tuple
  run: Any
  compile_s: float


def random_batch(config, seed: int = 0) -> Dict[str, np.ndarray]:
  """Random images (features for `model.inputs='features'`), a sparse random label and a
  half-valid dense truth with the shapes of the trainer's batch (`train.abstract_train_batch`),
  numpy."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in train.abstract_train_batch(config, None).items():
    if v.dtype == np.bool_:
      out[k] = rng.random(v.shape) < 0.5
    else:
      out[k] = rng.standard_normal(v.shape).astype(v.dtype)
  b, fs = out['flow'].shape[:2]
  flow = np.zeros((b, fs, fs, 2), np.float32)
  n = min(20, fs * fs)
  for i in range(b):
    pos = rng.choice(fs * fs, n, replace=False)
    flow[i].reshape(-1, 2)[pos] = rng.uniform(-fs / 4, fs / 4, (n, 2)).astype(np.float32)
  out['flow'] = flow
  return out


def build(config, mode: str) -> Built:
  """Compiles the `mode` step of `config` with the trainer's own set-up and makes its arguments."""
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  batch = random_batch(config)
  if mode == 'eval':
    mesh = sharding.make_mesh()
    replicated, data_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    model = models.build_model(config)
    variables = jax.device_put(
        models.init_variables(config, model, jax.random.PRNGKey(int(config.seed)), 1), replicated
    )
    imgs = [jax.device_put(batch[k], data_sharding) for k in ('src_img', 'trg_img')]
    fn = jax.jit(lambda v, s, t: model.apply(v, s, t), out_shardings=data_sharding)
    t0 = time.perf_counter()
    compiled = fn.lower(variables, *imgs).compile()
    compile_s = time.perf_counter() - t0
    return Built(compiled, (variables, *imgs), lambda args: (args, compiled(*args)), compile_s)

  config = config.copy_and_resolve_references()
  config.learning_mode = mode
  teacher = None
  if mode == 'st':  # A random fixed teacher: the benchmark reads no checkpoint.
    teacher = models.init_variables(config, models.build_model(config), jax.random.PRNGKey(1), 1)
  s = train.setup(config, teacher=teacher)
  # Pseudo-label loss on (its start epoch): every term runs.
  hparams = s.hparams(int(config.teacher.pseudo_start_epoch))
  batch = {k: jax.device_put(v, s.data_sharding) for k, v in batch.items()}
  t0 = time.perf_counter()
  compiled = s.step_fn.lower(s.state, batch, hparams).compile()
  compile_s = time.perf_counter() - t0

  def run(args):
    new_state, metrics = compiled(*args)
    return (new_state,) + args[1:], metrics

  return Built(compiled, (s.state, batch, hparams), run, compile_s)


def time_built(built: Built, steps: int, warmup: int):
  """Runs `warmup` discarded then `steps` timed calls, threading the donated state through."""
  train.release_free_heap()
  args = built.args
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    args, out = built.run(args)
    jax.block_until_ready((args[0], out))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return times


def fit_batch(config, mode: str, limit: Optional[int] = None, probe: int = 0) -> Dict[str, Any]:
  """Largest batch whose compiled memory fits `limit` (default: the device's memory).

  Compiles at two batch sizes (`probe` and `2 * probe`, default one and two per device), fits
  memory = fixed + per_pair * batch, rounds the estimate down to a multiple of the device count
  and checks it by compiling that size (stepping down if it does not fit).
  """
  ndev = jax.device_count()
  limit = limit or device_memory_limit()
  probe = probe or ndev
  mem = {}
  for b in (probe, 2 * probe):
    c = prepare_config(config, batch_size=b)
    mem[b] = _compiled_memory(build(c, mode).compiled)
  if mem[probe] is None or mem[2 * probe] is None:
    return {'max_batch_estimate': None, 'memory_limit_bytes': limit}
  per_pair = (mem[2 * probe] - mem[probe]) / probe
  fixed = mem[probe] - per_pair * probe
  est = int((limit - fixed) // max(per_pair, 1)) // ndev * ndev
  checked = None
  while est >= ndev:
    m = _compiled_memory(build(prepare_config(config, batch_size=est), mode).compiled)
    if m is not None and m <= limit:
      checked = m
      break
    est -= ndev
  return {
      'max_batch_estimate': est if checked else None,
      'memory_limit_bytes': limit,
      'memory_per_pair_bytes': per_pair,
      'memory_fixed_bytes': fixed,
      'compiled_memory_at_max_bytes': checked,
  }


def benchmark(
    config,
    mode: Optional[str] = None,
    *,
    steps: int = 5,
    warmup: int = 2,
    peak_flops: Optional[float] = None,
    with_fit_batch: bool = False,
) -> Dict[str, Any]:
  """Compiles and times one mode of `config` (see the module docstring); returns the report."""
  mode = mode or config.learning_mode
  t_start = time.perf_counter()
  built = build(config, mode)
  times = time_built(built, steps, warmup)
  mem = peak_memory()
  dtype = config.model.get('dtype') or 'float32'
  if peak_flops is None:
    peak_flops = matmul_peak_flops(str(dtype))
  flops = _cost_flops(built.compiled)
  median = float(np.median(times))
  b = int(config.optim.batch_size)
  out = {
      'mode': mode,
      'dtype': str(dtype),
      'batch_size': b,
      'img_size': int(config.data.img_size),
      'feature_size': int(config.data.feature_size),
      'backbone_depth': int(config.model.backbone_depth),
      'backbone': backbone_name(config),
      'target_chunks': int(config.model.get('target_chunks', 1)),
      'remat_backbone': bool(config.model.get('remat_backbone', False)),
      'device': device_kind(),
      'platform': jax.devices()[0].platform,
      'jax_version': jax.__version__,
      'compile_s': built.compile_s,
      'steps': steps,
      'warmup': warmup,
      'step_times_s': times,
      'step_time_min_s': float(min(times)),
      'step_time_median_s': median,
      'step_time_max_s': float(max(times)),
      'pairs_per_s': b / median,
      'flops_per_step': flops,
      'achieved_flops_per_s': flops / median if flops else None,
      'peak_flops_per_s': peak_flops,
      'mfu': flops / median / peak_flops if flops and peak_flops else None,
      'peak_memory_bytes': mem['bytes'],
      'peak_memory_kind': mem['kind'],
      'compiled_memory_bytes': _compiled_memory(built.compiled),
      'load_average': list(os.getloadavg()),
  }
  del built
  if with_fit_batch:
    out.update(fit_batch(config, mode))
  out['wall_s'] = time.perf_counter() - t_start
  return out


def backbone_name(config) -> str:
  """'ResNet-101', or the DINOv2 preset ('DINOv2 vitb14', '+ cached' for the head alone on
  cached features, `model.inputs='features'`)."""
  m = config.model
  if m.get('backbone') != 'dinov2':
    return f'ResNet-{int(m.backbone_depth)}'
  cached = ' cached' if m.get('inputs', 'images') == 'features' else ''
  return f"DINOv2 {m.dinov2_preset}{' (tiny)' if m.get('dinov2_overrides') else ''}{cached}"


def summary_line(r: Dict[str, Any]) -> str:
  """One readable line of a report."""

  def fmt(x, spec):
    return 'n/a' if x is None else format(x, spec)

  backbone = r.get('backbone') or f"ResNet-{r['backbone_depth']}"
  line = (
      f"{r['mode']} {r['dtype']} b={r['batch_size']} {r['img_size']}px "
      f"{backbone} on {r['device']}: compile {r['compile_s']:.1f} s, "
      f"step {r['step_time_min_s']:.3f}/{r['step_time_median_s']:.3f}/"
      f"{r['step_time_max_s']:.3f} s (min/median/max of {r['steps']}), "
      f"{r['pairs_per_s']:.2f} pairs/s, "
      f"{fmt(r['flops_per_step'] and r['flops_per_step'] / 1e9, '.1f')} GFLOP/step, "
      f"{fmt(r['achieved_flops_per_s'] and r['achieved_flops_per_s'] / 1e9, '.1f')} GFLOP/s"
      f" = {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}% of "
      f"{r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s matmul peak, "
      f"peak memory {r['peak_memory_bytes'] / GIB:.2f} GiB ({r['peak_memory_kind']}), "
      f"load {r['load_average'][0]:.1f}"
  )
  if 'max_batch_estimate' in r:
    line += (
        f"; largest batch that fits {r['max_batch_estimate']} "
        f"(limit {r['memory_limit_bytes'] / GIB:.1f} GiB)"
    )
  return line


# ------------------------------------------------------------------------------------------------
# The accelerator suite: the GPU/TPU table of docs/performance.md in one command.

SUITE_ROWS = tuple(f'{m}:{d}' for m in MODES for d in ('float32', 'bfloat16'))


def suite_table(reports) -> str:
  """A Markdown table of benchmark reports, one row each, the device named above it."""
  lines = [
      f"Device: {reports[0]['device']} (jax {reports[0]['jax_version']}).",
      '',
      '| mode | dtype | batch | step median s | pairs/s | MFU | peak memory GiB | '
      'XLA memory GiB | compile s |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in reports:
    mfu = 'n/a' if r['mfu'] is None else f"{100 * r['mfu']:.0f}%"
    xla = r['compiled_memory_bytes']
    lines.append(
        f"| {r['mode']} | {r['dtype']} | {r['batch_size']} | {r['step_time_median_s']:.4f} | "
        f"{r['pairs_per_s']:.1f} | {mfu} | {r['peak_memory_bytes'] / GIB:.2f} | "
        f"{'n/a' if xla is None else format(xla / GIB, '.2f')} | {r['compile_s']:.1f} |"
    )
  return '\n'.join(lines) + '\n'


def run_suite(rows, out_dir: str, passthrough, timeout_s: int = 300) -> str:
  """Each `mode:dtype` row in its own process (clean peak memory), then one table.

  Args:
    rows: `'mode:dtype'` strings (`SUITE_ROWS` by default).
    out_dir: where each row's JSON and `table.md` go.
    passthrough: command-line arguments given to every row (`--config=...`, overrides,
      `--batch_size`, `--steps`, ...).
    timeout_s: per row; a row that fails or times out is reported and skipped.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  reports = []
  for row in rows:
    mode, _, dtype = row.partition(':')
    path = os.path.join(out_dir, f'{mode}_{dtype}.json')
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        *passthrough,
        f'--mode={mode}',
        f'--dtype={dtype or "float32"}',
        f'--json={path}',
    ]
    try:
      done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
      ok = done.returncode == 0
      why = (done.stderr.strip().splitlines() or ['?'])[-1]
    except subprocess.TimeoutExpired:
      ok, why = False, f'timed out after {timeout_s} s'
    if not ok:
      print(f'{row}: failed: {why}', flush=True)
      continue
    with open(path) as f:
      reports.append(json.load(f))
    print(summary_line(reports[-1]), flush=True)
  if not reports:
    raise RuntimeError('every row of the suite failed')
  table = suite_table(reports)
  with open(os.path.join(out_dir, 'table.md'), 'w') as f:
    f.write(table)
  return table


# ------------------------------------------------------------------------------------------------
# Command line.

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file ' '(configs/spair.py[:variant,...]).', lock_config=True
)
_MODE = flags.DEFINE_enum(
    'mode', None, list(MODES), "What to time (default: the config's " 'learning_mode).'
)
_BATCH = flags.DEFINE_integer('batch_size', None, "Pairs per step (default: the config's).")
_DTYPE = flags.DEFINE_enum(
    'dtype',
    None,
    ['float32', 'bfloat16'],
    'Compute dtype (parameters, ' 'optimiser state, correlation softmax and losses stay float32).',
)
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed runs.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Discarded runs before timing.')
_PEAK = flags.DEFINE_float('peak_flops', None, 'Device peak FLOP/s (default: measured).')
_FIT = flags.DEFINE_bool('fit_batch', False, 'Also find the largest batch that fits.')
_JSON = flags.DEFINE_string('json', None, 'Write the report here as JSON.')
_SUITE = flags.DEFINE_enum(
    'suite',
    None,
    ['accelerator'],
    'accelerator: every mode in float32 '
    'and bfloat16, one process each, then one Markdown table '
    '(docs/performance.md); --batch_size and --config.* apply to all.',
)
_SUITE_ROWS = flags.DEFINE_list('suite_rows', list(SUITE_ROWS), 'mode:dtype rows of the suite.')
_SUITE_OUT = flags.DEFINE_string(
    'suite_out', 'runs/benchmark_suite', 'Where the suite writes ' "each row's JSON and table.md."
)


def main(argv):
  del argv
  if _SUITE.value:
    import sys  # pylint: disable=g-import-not-at-top

    keep = ('--config', '--batch_size', '--steps', '--warmup', '--peak_flops')
    passthrough = [a for a in sys.argv[1:] if a.startswith(keep)]
    print(run_suite(_SUITE_ROWS.value, _SUITE_OUT.value, passthrough), flush=True)
    return
  config = prepare_config(_CONFIG.value, _MODE.value, _BATCH.value, _DTYPE.value)
  report = benchmark(
      config,
      _MODE.value,
      steps=_STEPS.value,
      warmup=_WARMUP.value,
      peak_flops=_PEAK.value,
      with_fit_batch=_FIT.value,
  )
  print(summary_line(report), flush=True)
  if _JSON.value:
    pathlib.Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
    with open(_JSON.value, 'w') as f:
      json.dump(report, f, indent=2)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
