"""The command line: train and eval through `python -m sccorr_jax.main`, config errors."""

from __future__ import annotations

import json
import os
import pathlib

from conftest import run_python

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  return run_python('-m', 'sccorr_jax.main', *args, cwd=ROOT, env=env, timeout=timeout)


def test_mistyped_config_key_fails_clearly(tmp_path):
  r = _main('--config=configs/demo.py:tiny', f'--workdir={tmp_path}', '--config.optim.lrr=1')
  assert r.returncode != 0
  assert 'unknown config key in --config.optim.lrr=1' in r.stderr
  assert 'Did you mean "lr"' in r.stderr and 'Traceback' not in r.stderr


def test_workdir_is_required():
  r = _main('--config=configs/demo.py:tiny')
  assert r.returncode != 0 and 'workdir' in r.stderr


# Library lines a normal run must not print (repeated, or untrue for this project).
CHATTER = (
    'Using custom data configuration',
    'Unable to initialize backend',
    'Downloading and preparing dataset',
    'downloaded and prepared',
    'Requested `tracked_metric`',
    'Metadata file does not exist',
    'OpenCV is not installed',
    'Load dataset info from',
)


def _assert_quiet(stderr):
  for line in CHATTER:
    assert line not in stderr, (line, stderr[-3000:])


def test_help_exits_0():
  r = _main('--help')
  assert r.returncode == 0, r.stderr
  assert '--config: Experiment config file (required)' in r.stdout
  assert "(default: 'None')" not in r.stdout


def test_train_then_eval_from_the_command_line(tmp_path):
  workdir, data = tmp_path / 'run', tmp_path / 'data'
  common = [
      '--config=configs/demo.py:baseline,tiny',
      f'--config.data.data_dir={data}',
      '--config.optim.num_epochs=1',
  ]
  r = _main(*common, f'--workdir={workdir}')
  assert r.returncode == 0, r.stderr[-3000:]
  _assert_quiet(r.stderr)  # the first run also generates the dataset
  assert 'preparing dataset sccorr_synthetic' in r.stderr
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
  r = _main(*common, '--mode=eval', f'--checkpoint={workdir}', f'--workdir={tmp_path / "eval"}')
  assert r.returncode == 0, r.stderr[-3000:]
  _assert_quiet(r.stderr)
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out['val/pck@0.1'] == summary['val']['val/pck@0.1']
  assert list((tmp_path / 'eval').glob('eval_synthetic_val.json'))
