"""End-to-end tests of the trainer on the synthetic dataset in its real on-disk format.

Tiny model and images (`config_lib.tiny_config`). Covers: the three learning modes
running through the real data pipeline, checkpointing and validation; an 'st' run loading a
baseline checkpoint as its teacher; stopping and resuming giving bitwise the same parameters as
an uninterrupted run; non-finite losses stopping a run with a clear message.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from sccorr_jax import models
from sccorr_jax import config_lib

from sccorr_jax import checkpoint as ckpt_lib  # noqa: E402
from sccorr_jax import data as data_lib  # noqa: E402
from sccorr_jax import train  # noqa: E402
from sccorr_jax.data import pipeline as data_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('synthetic_data'))


def _config(mode, data_dir, **overrides):
  c = config_lib.tiny_config(mode, data_dir)
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def _read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def baseline_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('baseline'))
  config = _config('baseline', data_dir)
  config.optim.num_epochs = 1
  opened = []  # The data config is read (its builder opened) once per run: `data.resolve`.
  with pytest.MonkeyPatch.context() as mp:
    get_builder = data_pipeline.get_builder
    mp.setattr(data_pipeline, 'get_builder', lambda c: opened.append(c) or get_builder(c))
    summary = train.train_and_evaluate(config, workdir)
  return workdir, config, summary, len(opened)


def test_baseline_run_trains_validates_and_checkpoints(baseline_run):
  workdir, _, summary, data_sections_read = baseline_run
  assert data_sections_read == 1  # Training and validation use the same resolved data.
  assert summary['step'] == 2 and summary['nonfinite_total'] == 0
  assert np.isfinite(summary['val']['val/pck@0.1'])
  records = _read_metrics(workdir)
  assert 'compile/train_step_s' in records[0]
  train_records = [r for r in records if 'train/loss_sup' in r]
  assert [r['step'] for r in train_records] == [1, 2]
  assert all(np.isfinite(r['train/loss_sup']) for r in train_records)
  assert {'train/lr/head', 'train/lr/backbone', 'train/steps_per_s'} <= set(train_records[0])
  val = [r for r in records if 'val/pck@0.1' in r]
  assert len(val) == 1 and 'val/zero_flow/pck@0.1' in val[0]
  assert json.load(open(os.path.join(workdir, 'config.json')))['learning_mode'] == 'baseline'
  assert list(pathlib.Path(workdir, 'tensorboard').glob('events.out.tfevents.*'))
  assert (pathlib.Path(workdir) / 'checkpoints' / '2' / 'state').is_dir()


def test_st_run_loads_the_baseline_as_fixed_teacher(baseline_run, data_dir, tmp_path):
  base_dir, base_config, *_ = baseline_run
  teacher, _ = ckpt_lib.load_model_variables(base_dir)
  config = _config('st', data_dir, **{'teacher.checkpoint': base_dir})
  config.optim.num_epochs = 1
  summary = train.train_and_evaluate(config, str(tmp_path))
  state = summary['state']
  # The teacher is the baseline's final model, carried unchanged through the st steps.
  for x, y in zip(jax.tree.leaves(state.teacher), jax.tree.leaves(teacher)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  records = [r for r in _read_metrics(str(tmp_path)) if 'train/loss_pseudo' in r]
  assert len(records) == 2
  assert all(
      np.isfinite(r['train/loss_pseudo']) and r['train/pseudo_weight'] == 10.0 for r in records
  )
  del base_config


def test_the_step_is_compiled_for_data_max_kps_slots(data_dir):
  """`data.max_kps` is the one source of the keypoint slots: the pipeline pads to it and the
  step is compiled for it (it used to be compiled for `records.MAX_KPS` whatever the config)."""
  config = _config('mt', data_dir, **{'data.max_kps': 10})
  batch = next(data_lib.create_train_iterator(config.data, batch_size=4, seed=0))
  abstract = train.abstract_train_batch(config, None)
  assert abstract['withheld_kps_valid'].shape == (4, 10)
  for key, spec in abstract.items():
    assert (batch[key].shape, batch[key].dtype) == (spec.shape, spec.dtype), key


def test_st_without_teacher_checkpoint_is_a_clear_error(data_dir, tmp_path):
  with pytest.raises(ValueError, match='teacher.checkpoint'):
    train.train_and_evaluate(_config('st', data_dir), str(tmp_path))


def test_mt_stop_and_resume_is_bitwise_identical(data_dir, tmp_path):
  """2k steps straight == k steps, stop (mid-epoch), restart from the checkpoint, k more."""
  config = _config('mt', data_dir, **{'optim.num_epochs': 1, 'optim.steps_per_epoch': 4})
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  first = train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_after_steps=2)
  assert first['step'] == 2
  second = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert second['step'] == 4
  for name in ('params', 'batch_stats', 'opt_state'):
    a = jax.tree.leaves(getattr(straight['state'], name))
    b = jax.tree.leaves(getattr(second['state'], name))
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  pck = lambda v: {k: x for k, x in v.items() if 'pck' in k}  # noqa: E731
  assert pck(second['val']) == pytest.approx(pck(straight['val']))
  # Both mutual teachers are validated; the best one is recorded and kept with the latest.
  records = [r for r in _read_metrics(str(tmp_path / 'resumed')) if 'val/pck@0.1' in r]
  assert {'val/a/pck@0.1', 'val/b/pck@0.1', 'val/best_model'} <= set(records[-1])
  resumed_steps = [
      r['step'] for r in _read_metrics(str(tmp_path / 'resumed')) if 'train/a/loss_sup' in r
  ]
  assert resumed_steps == [1, 2, 3, 4]
  best = second['best']
  assert best['model'] in (0, 1) and best['step'] == 4
  variables, cfg = ckpt_lib.load_model_variables(str(tmp_path / 'resumed'), 'best')
  expected = jax.tree.map(lambda x: np.asarray(x)[best['model']], second['state'].params)
  for x, y in zip(jax.tree.leaves(variables['params']), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(x), y)
  assert cfg.learning_mode == 'mt'


def test_too_many_nonfinite_steps_stop_the_run(data_dir, tmp_path):
  config = _config(
      'baseline', data_dir, **{'optim.lr': float('nan'), 'optim.backbone_lr': float('nan')}
  )
  config.max_consecutive_nonfinite = 1
  config.optim.num_epochs = 1
  with pytest.raises(FloatingPointError, match='consecutive training steps'):
    train.train_and_evaluate(config, str(tmp_path))


def test_mt_models_share_the_pretrained_backbone_and_differ_in_the_head(tmp_path):
  from sccorr_jax import convert  # pylint: disable=g-import-not-at-top

  config = _config('mt', None)
  model = models.build_model(config)
  source = models.init_variables(config, model, jax.random.PRNGKey(42), 1)
  np.savez(tmp_path / 'resnet.npz', **convert.backbone_state_dict(source, model))
  config.model.pretrained = str(tmp_path / 'resnet.npz')
  stacked = models.init_variables(config, model, jax.random.PRNGKey(0), 2)
  for x, y in zip(
      jax.tree.leaves(stacked['params']['backbone']), jax.tree.leaves(source['params']['backbone'])
  ):
    np.testing.assert_array_equal(np.asarray(x)[0], np.asarray(y))
    np.testing.assert_array_equal(np.asarray(x)[1], np.asarray(y))
  kernel = np.asarray(stacked['params']['sce']['conv']['kernel'])
  assert not np.array_equal(kernel[0], kernel[1])
