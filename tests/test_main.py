"""The command line: train and eval through `python -m sccorr_jax.main`, config errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  return subprocess.run([sys.executable, '-m', 'sccorr_jax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_mistyped_config_key_fails_clearly(tmp_path):
  r = _main('--config=configs/demo.py:tiny', f'--workdir={tmp_path}', '--config.optim.lrr=1')
  assert r.returncode != 0
  assert 'unknown config key in --config.optim.lrr=1' in r.stderr
  assert 'Did you mean "lr"' in r.stderr and 'Traceback' not in r.stderr


def test_workdir_is_required():
  r = _main('--config=configs/demo.py:tiny')
  assert r.returncode != 0 and 'workdir' in r.stderr


def test_train_then_eval_from_the_command_line(tmp_path):
  workdir, data = tmp_path / 'run', tmp_path / 'data'
  common = ['--config=configs/demo.py:baseline,tiny', f'--config.data.data_dir={data}',
            '--config.optim.num_epochs=1']
  r = _main(*common, f'--workdir={workdir}')
  assert r.returncode == 0, r.stderr[-3000:]
  config = json.loads((workdir / 'config.json').read_text())
  assert config['learning_mode'] == 'baseline' and config['optim']['num_epochs'] == 1
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary['best']['step'] == 2
  records = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('val/pck@0.1' in x for x in records)
  # Rerunning the same command resumes: nothing left to train.
  r = _main(*common, f'--workdir={workdir}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from' in r.stderr
  r = _main(*common, '--mode=eval', f'--checkpoint={workdir}',
            f'--workdir={tmp_path / "eval"}')
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out['val/pck@0.1'] == summary['val']['val/pck@0.1']
  assert list((tmp_path / 'eval').glob('eval_synthetic_val.json'))
