"""Smoke test of tools/benchmark.py at a tiny size (no timing assertion: timings live in tools/)."""

from __future__ import annotations

import json
import math

from sccorr_jax import config_lib
from conftest import ROOT, load_tool, run_python

benchmark = load_tool("benchmark")
# The command-line runs' environment: nothing inherited but a plain PATH, on the CPU.
BARE_ENV = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}

KEYS = (
    "compile_s",
    "step_time_min_s",
    "step_time_median_s",
    "step_time_max_s",
    "pairs_per_s",
    "flops_per_step",
    "mfu",
    "peak_memory_bytes",
    "compiled_memory_bytes",
)


def test_training_step_report():
  config = config_lib.load_config(str(ROOT / "configs" / "spair.py") + ":baseline,runlocal")
  config = benchmark.prepare_config(config, "baseline", batch_size=4)
  report = benchmark.benchmark(config, "baseline", steps=1, warmup=1, peak_flops=1e9)
  for k in KEYS:
    assert report[k] is not None and math.isfinite(report[k]) and report[k] > 0, k
  assert report["mode"] == "baseline" and report["batch_size"] == 4
  assert report["step_time_min_s"] <= report["step_time_median_s"] <= report["step_time_max_s"]
  assert "pairs/s" in benchmark.summary_line(report)


def test_command_line_eval_json(tmp_path):
  out = tmp_path / "eval.json"
  cmd = [
      ROOT / "tools" / "benchmark.py",
      f"--config={ROOT / 'configs' / 'spair.py'}:runlocal",
      "--mode=eval",
      "--batch_size=2",
      "--dtype=bfloat16",
      "--steps=1",
      "--warmup=1",
      "--peak_flops=1e9",
      f"--json={out}",
  ]
  result = run_python(*cmd, cwd=ROOT, env=BARE_ENV, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["mode"] == "eval" and report["dtype"] == "bfloat16"
  for k in KEYS:
    assert report[k] is not None and report[k] > 0, k
  assert "eval bfloat16 b=2" in result.stdout


def test_no_mask_ablation_benchmarks():
  """`--config.teacher.dilation_kernel=0` (the "no mask" ablation) trains, so it benchmarks."""
  config = config_lib.load_config(str(ROOT / "configs" / "spair.py") + ":mt,runlocal")
  config.teacher.dilation_kernel = 0
  config = benchmark.prepare_config(config, "mt", batch_size=4)
  report = benchmark.benchmark(config, "mt", steps=1, warmup=0, peak_flops=1e9)
  assert report["mode"] == "mt" and math.isfinite(report["step_time_median_s"])


def test_accelerator_suite_writes_one_table(tmp_path):
  """`--suite=accelerator` runs each row in its own process and writes one Markdown table."""
  cmd = [
      ROOT / "tools" / "benchmark.py",
      "--suite=accelerator",
      "--suite_rows=eval:float32",
      f"--suite_out={tmp_path}",
      f"--config={ROOT / 'configs' / 'spair.py'}:runlocal",
      "--batch_size=2",
      "--steps=1",
      "--warmup=1",
      "--peak_flops=1e9",
  ]
  result = run_python(*cmd, cwd=tmp_path, env=BARE_ENV, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  table = (tmp_path / "table.md").read_text()
  assert table.count("\n| eval | float32 | 2 |") == 1 and "Device: cpu" in table
  assert json.loads((tmp_path / "eval_float32.json").read_text())["batch_size"] == 2
