"""Damaged checkpoints (issue 13, finding 3): each way of damaging a step, and what resuming,
`--mode=eval` (`train.run_evaluation`), `load_model_variables` and `tools/match.py` make of it.

One tiny 'mt' run is trained once per module (stopped at step 4: steps 2 and 4 are kept, both
validated); every case damages a copy of its workdir. Resuming from a damaged latest step must
take step 2 with one warning line naming the step, the file and the problem; loading a damaged
model must raise a one-line `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import shutil

import jax
import numpy as np
from PIL import Image
import pytest

from sccorr_jax import checkpoint as ckpt_lib
from sccorr_jax import config_lib
from sccorr_jax import data as data_lib
from sccorr_jax import models
from sccorr_jax import schedules
from sccorr_jax import train
from conftest import run_python

pytestmark = pytest.mark.usefixtures('fast_compiles')

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(data_dir):
  config = config_lib.tiny_config('mt', str(data_dir))
  config.optim.num_epochs = 3  # 2 steps per epoch: 6 steps, validated and saved at 2, 4, 6.
  config.log_every_steps = 3  # Windows 1-3 and 4-6 straddle the checkpoints.
  config.eval.alphas = (0.1, 0.15)
  config.eval.select_alpha = 0.05  # Not among eval.alphas: still validated and selecting.
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir) of a run stopped at step 4, as a preemption would."""
  root = tmp_path_factory.mktemp('damage')
  config = _config(root / 'data')
  train.train_and_evaluate(config, str(root / 'run'), stop_after_steps=4)
  return config, root / 'run'


@pytest.fixture
def workdir(trained, tmp_path):
  shutil.copytree(trained[1], tmp_path / 'run')
  return tmp_path / 'run'


def _step(workdir, step=4) -> pathlib.Path:
  return workdir / 'checkpoints' / str(step)


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and '/d/' in p.as_posix()]
  return max(files, key=lambda p: p.stat().st_size)


def _garble(path: pathlib.Path, n: int, offset: int = 64) -> None:
  data = bytearray(path.read_bytes())
  data[offset : offset + n] = np.random.default_rng(0).integers(0, 256, n, np.uint8).tobytes()
  path.write_bytes(bytes(data))


def _restore(config, workdir):
  """The trainer's restore: (restored step, log records of the checkpoint module)."""
  model = models.build_model(config)
  tx = schedules.make_optimizer(config.optim, 2)
  abstract = jax.eval_shape(
      lambda: train.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  )
  it = data_lib.create_train_iterator(config.data, batch_size=4, seed=0)
  manager = ckpt_lib.make_manager(workdir, ckpt_lib.select_metric(config), async_saves=False)
  state, meta = ckpt_lib.restore(manager, ckpt_lib.abstract_like(abstract), it, config=config)
  assert int(state.step) == meta['step']
  return meta['step'], manager


def _warnings(caplog):
  """The warnings `sccorr_jax/checkpoint/` logged (not, say, asyncio reporting late an Orbax
  read error of an earlier test's damaged step, when its future is garbage-collected)."""
  return [
      r.getMessage()
      for r in caplog.records
      if r.levelno >= logging.WARNING
      and pathlib.Path(r.pathname).parts[-3:-1] == ('sccorr_jax', 'checkpoint')
  ]


def _one_line(e) -> str:
  text = str(e.value)
  assert '\n' not in text, text
  return text


# ------------------------------------------------------------------------------------------------
# Resuming from a damaged latest step: the previous step, one warning line.


@pytest.mark.parametrize(
    'damage, problem',
    [
        ('truncate_array', r'\d+ bytes, \d+ when saved \(truncated'),
        ('delete_array', 'missing'),
        ('garble_array_4k', r'CRC-32 mismatch'),
        ('garble_meta', r'meta/metadata: not valid JSON'),
        ('garble_data', r'data/process_0-of-1\.json: not valid JSON'),
        ('empty_state_metadata', r'state/_METADATA: empty \(0 bytes\)'),
        ('delete_state_metadata', r'state/_METADATA: missing'),
        ('delete_manifest', r'4/checksums\.json: missing'),
    ],
)
def test_damaged_latest_step_resumes_from_the_previous_one(
    trained, workdir, caplog, damage, problem
):
  config = trained[0]
  step4 = _step(workdir)
  array = _largest_array_file(step4)
  if damage == 'truncate_array':
    array.write_bytes(array.read_bytes()[:100])
  elif damage == 'delete_array':
    array.unlink()
  elif damage == 'garble_array_4k':
    _garble(array, 4096)
  elif damage == 'garble_meta':
    _garble(step4 / 'meta' / 'metadata', 16, offset=0)
  elif damage == 'garble_data':
    (step4 / 'data' / 'process_0-of-1.json').write_text('{"next_index": 4,,')
  elif damage == 'empty_state_metadata':
    (step4 / 'state' / '_METADATA').write_bytes(b'')
  elif damage == 'delete_state_metadata':
    (step4 / 'state' / '_METADATA').unlink()
  elif damage == 'delete_manifest':
    (step4 / ckpt_lib.MANIFEST).unlink()
  with caplog.at_level(logging.WARNING):
    step, manager = _restore(config, workdir)
  assert step == 2
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and '\n' not in warnings[0], warnings
  assert 'step 4' in warnings[0] and 'resuming from step 2' in warnings[0]
  assert str(step4) in warnings[0]  # The file is named by its path.
  assert re.search(problem, warnings[0]), warnings[0]
  assert 'another config' not in warnings[0]
  # The damaged step is set aside (not deleted), and the manager no longer lists it.
  assert manager.all_steps() == [2]
  assert (workdir / ckpt_lib.DAMAGED_DIR / '4').is_dir() and not step4.exists()


def test_checkpoint_without_manifest_gets_orbax_checks(trained, workdir, caplog):
  """A step written before manifests existed: used if Orbax reads it, else skipped."""
  step4 = _step(workdir)
  (step4 / ckpt_lib.MANIFEST).unlink()
  orbax_meta = json.loads((step4 / '_CHECKPOINT_METADATA').read_text())
  orbax_meta['custom_metadata'] = {}
  (step4 / '_CHECKPOINT_METADATA').write_text(json.dumps(orbax_meta))
  backup = workdir.parent / 'legacy'
  shutil.copytree(workdir, backup)
  assert _restore(trained[0], workdir)[0] == 4
  array = _largest_array_file(_step(backup))
  array.write_bytes(array.read_bytes()[:100])
  with caplog.at_level(logging.WARNING):
    assert _restore(trained[0], backup)[0] == 2
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and 'step 4' in warnings[0] and 'Orbax cannot read it' in warnings[0]


def test_resume_after_fallback_logs_each_step_once_with_uninterrupted_means(trained, workdir):
  """Resumed from step 2 (step 4 damaged): step 4 is recomputed exactly (its validation equals
  the first run's), each step is logged once, and the window 1-3 has the first run's means."""
  config, base = trained
  (_step(workdir) / 'meta' / 'metadata').write_text('{"step": 4, "epo')
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['step'] == 6

  def rows(run, kind):
    out = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    return {r['step']: r for r in out if any(k.startswith(kind) for k in r)}, [
        r['step'] for r in out if any(k.startswith(kind) for k in r)
    ]

  (train_rows, train_steps), (first_train, _) = rows(workdir, 'train/a/'), rows(base, 'train/a/')
  (val_rows, val_steps), (first_val, _) = rows(workdir, 'val/'), rows(base, 'val/')
  assert train_steps == [3, 6] and val_steps == [2, 4, 6]  # Each once: nothing repeated.
  assert rows(workdir, 'compile/')[1] == [0, 2]  # The first run's and the resumed run's.
  assert train_rows[3] == pytest.approx(
      {k: v for k, v in first_train[3].items() if k != 'train/steps_per_s'}
      | {'train/steps_per_s': train_rows[3]['train/steps_per_s']},
      rel=1e-6,
  )
  assert {k: v for k, v in val_rows[4].items() if 'pck' in k} == pytest.approx(
      {k: v for k, v in first_val[4].items() if 'pck' in k}
  )


def test_no_intact_step_to_resume_from_is_one_line_naming_the_directory(trained, workdir):
  for step in (2, 4):
    (_step(workdir, step) / 'state' / '_METADATA').write_bytes(b'')
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    _restore(trained[0], workdir)
  text = _one_line(e)
  assert f'{workdir / "checkpoints"}: no intact checkpoint' in text
  assert 'step 4:' in text and 'step 2:' in text and 'empty (0 bytes)' in text


def test_another_config_is_named_and_damage_is_not(trained, workdir):
  other = _config(trained[0].data.data_dir)
  other.model.sce_features = 24
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    _restore(other, workdir)
  text = _one_line(e)
  assert 'another config' in text and 'model.sce_features: 16 in the checkpoint, 24 here' in text
  # Same config, damaged tree metadata on both steps: damage, never "another config".
  for step in (2, 4):
    (_step(workdir, step) / 'state' / '_METADATA').write_text('{"tree_metadata": {}}')
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    _restore(trained[0], workdir)
  assert 'holds no tree metadata' in _one_line(e) and 'another config' not in str(e.value)


def test_garbled_orbax_metrics_file_is_set_aside(trained, workdir, caplog):
  (_step(workdir) / 'metrics' / 'metrics').write_text('{"val/pck@0.05": 1.')
  with pytest.raises(ckpt_lib.CheckpointError, match=r'metrics/metrics: not valid JSON'):
    ckpt_lib.load_model_variables(workdir)
  with caplog.at_level(logging.WARNING):
    step, _ = _restore(trained[0], workdir)
  assert step == 2
  assert len(_warnings(caplog)) == 1 and 'metrics/metrics' in _warnings(caplog)[0]


# ------------------------------------------------------------------------------------------------
# The best step: selected by eval.select_alpha; evaluating or matching it when damaged.


def test_select_alpha_picks_the_model_and_the_checkpoint(trained):
  config, workdir = trained
  manager = ckpt_lib.make_manager(workdir, ckpt_lib.select_metric(config), async_saves=False)
  assert ckpt_lib.select_metric(config) == 'val/pck@0.05'
  assert manager.all_steps() == [2, 4]
  metas = {s: json.loads((_step(workdir, s) / 'meta' / 'metadata').read_text()) for s in (2, 4)}
  assert 'rng' not in metas[4] and 'best' not in metas[4]
  for meta in metas.values():
    m = meta['metrics']
    assert m['val/pck@0.05'] == m[f"val/{'ab'[meta['best_model']]}/pck@0.05"]
    assert (
        m[f"val/{'ab'[meta['best_model']]}/pck@0.05"]
        >= m[f"val/{'ab'[1 - meta['best_model']]}/pck@0.05"]
    )
    saved = json.loads((_step(workdir, meta['step']) / 'metrics' / 'metrics').read_text())
    assert saved['val/pck@0.05'] == m['val/pck@0.05']  # What the manager ranks by.
  values = {s: metas[s]['metrics']['val/pck@0.05'] for s in (2, 4)}
  best = max((v, s) for s, v in values.items())[1]  # Ties: the newer step.
  assert manager.best_step() == best
  assert ckpt_lib.best_checkpoint(manager)['step'] == best
  # A workdir loads its best step's recorded best model.
  _, loaded_config = ckpt_lib.load_model_variables(workdir)
  assert loaded_config.eval.select_alpha == 0.05


def test_eval_and_match_on_a_damaged_best_checkpoint_name_the_file(trained, workdir, tmp_path):
  config = trained[0]
  manager = ckpt_lib.make_manager(workdir, ckpt_lib.select_metric(config), async_saves=False)
  array = _largest_array_file(_step(workdir, manager.best_step()))
  _garble(array, 2048)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    train.run_evaluation(config, str(workdir))
  text = _one_line(e)
  assert str(array) in text and 'CRC-32 mismatch' in text
  image = tmp_path / 'img.png'
  Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image)
  match = ['tools/match.py', f'--checkpoint={workdir}', image, image, f'--out={tmp_path / "out"}']
  evaluate = [
      '-m',
      'sccorr_jax.main',
      '--mode=eval',
      '--config=configs/demo.py:baseline,tiny',
      f'--checkpoint={workdir}',
      f'--config.data.data_dir={config.data.data_dir}',
      f'--workdir={tmp_path / "eval"}',
  ]
  for command in (match, evaluate):
    r = run_python(*command, cwd=ROOT, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and str(array) in errors[0] and 'CRC-32 mismatch' in errors[0], errors
    assert not (tmp_path / 'out').exists()


def test_missing_empty_and_foreign_paths_are_one_line(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    ckpt_lib.load_model_variables(tmp_path / 'nowhere')
  assert 'nowhere: no checkpoint there' in _one_line(e)
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'foreign').mkdir()
  (tmp_path / 'foreign' / 'notes.txt').write_text('hello')
  for name in ('empty', 'foreign'):
    with pytest.raises(ckpt_lib.CheckpointError) as e:
      ckpt_lib.load_model_variables(tmp_path / name)
    assert f'{tmp_path / name} is neither a model export' in _one_line(e)
