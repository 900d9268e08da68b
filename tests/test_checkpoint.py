"""Checkpoints: the two latest + the best kept, checksummed; model exports; loading from
exports, workdirs and step dirs. Damaged checkpoints: tests/test_checkpoint_damage.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sccorr_jax import models
from sccorr_jax import config_lib

from sccorr_jax import checkpoint as ckpt_lib  # noqa: E402
from sccorr_jax import schedules  # noqa: E402
from sccorr_jax import train  # noqa: E402
from sccorr_jax.models import SCorrSAN  # noqa: E402

pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.fixture(scope='module')
def tiny(fast_compiles):  # pylint: disable=redefined-outer-name,unused-argument
  config = config_lib.tiny_config('mt')
  model = models.build_model(config)
  variables = jax.jit(model.init)(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3))
  )
  return config, model, variables


def test_build_model_from_config(tiny):
  config, model, _ = tiny
  assert isinstance(model, SCorrSAN)
  assert model.stage_sizes == (1, 1, 1, 1) and model.backbone_width == 8
  assert model.sce_features == 16 and model.feature_size == 8
  assert models.build_model(config.model) == model


def test_export_roundtrip_and_errors(tiny, tmp_path):
  config, _, variables = tiny
  path = ckpt_lib.save_model_variables(tmp_path / 'export', variables, config)
  loaded, cfg = ckpt_lib.load_model_variables(path)
  assert cfg.model.sce_features == 16
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ckpt_lib.CheckpointError, match='already exists'):
    ckpt_lib.save_model_variables(path, variables, config)
  with pytest.raises(FileNotFoundError, match='nowhere'):
    ckpt_lib.load_model_variables(tmp_path / 'nowhere')
  with pytest.raises(ckpt_lib.CheckpointError, match='neither'):
    ckpt_lib.load_model_variables(tmp_path)
  other = config_lib.tiny_config('mt')
  other.model.sce_features = 24
  with pytest.raises(
      ckpt_lib.CheckpointError,
      match=r'export/variables does not fit .*sce/conv/kernel has shape '
      r'\(44, 16\), the model needs \(44, 24\).* another config '
      r'\(model.sce_features: 16 in the checkpoint, 24 here\)$',
  ):
    ckpt_lib.load_model_variables(path, model_config=other)
  # The export is sealed with checksums; a changed byte is named, in one line.
  manifest = json.loads((tmp_path / 'export' / ckpt_lib.MANIFEST).read_text())['files']
  assert 'config/metadata' in manifest and 'variables/_METADATA' in manifest
  target = tmp_path / 'export' / 'config' / 'metadata'
  target.write_text(target.read_text().replace('"sce_features": 16', '"sce_features": 61'))
  with pytest.raises(
      ckpt_lib.CheckpointError,
      match=r'^damaged checkpoint: .*export/config/metadata: contents changed '
      r'since the save \(CRC-32 mismatch\)$',
  ):
    ckpt_lib.load_model_variables(path)


def test_manager_keeps_latest_and_best_and_restores_abstract(tiny, tmp_path):
  config, model, variables = tiny
  tx = schedules.make_optimizer(config.optim, 2)
  state = train.create_train_state(config, model, tx, jax.random.PRNGKey(1))
  manager = ckpt_lib.make_manager(tmp_path, 'val/pck@0.1', async_saves=True)
  meta = {'config': config.to_json_best_effort(), 'best_model': 1}
  for step, pck in [(1, 50.0), (2, 70.0), (3, 40.0), (4, None), (5, 60.0)]:
    metrics = None if pck is None else {'val/pck@0.1': pck}
    ckpt_lib.save(
        manager,
        step,
        state.replace(step=jnp.int32(step)),
        dict(meta, step=step, metrics=metrics or {}),
        metrics=metrics,
    )
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 4, 5]  # the best (70) and the two latest
  assert manager.best_step() == 2
  # Async saves are sealed too: every kept step verifies, its manifest covers the arrays.
  for step in manager.all_steps():
    ckpt_lib.verify(tmp_path / 'checkpoints' / str(step), ('state', 'meta'))
    files = json.loads((tmp_path / 'checkpoints' / str(step) / ckpt_lib.MANIFEST).read_text())
    assert any(f.startswith('state/ocdbt.process_0/d/') for f in files['files'])
  # A crash mid-save leaves only Orbax's temporary directory: the latest good step is used.
  partial = tmp_path / 'checkpoints' / '6.orbax-checkpoint-tmp-1234567'
  (partial / 'state').mkdir(parents=True)
  manager = ckpt_lib.make_manager(tmp_path, 'val/pck@0.1', async_saves=True)
  assert manager.all_steps() == [2, 4, 5]
  restored, meta_back = ckpt_lib.restore(manager, ckpt_lib.abstract_like(state))
  assert int(restored.step) == 5 and meta_back['step'] == 5
  for x, y in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # A workdir loads its best step; mt picks the recorded best model, or the one asked for.
  v_best, _ = ckpt_lib.load_model_variables(tmp_path)
  v_b, _ = ckpt_lib.load_model_variables(tmp_path / 'checkpoints' / '5', model_index=1)
  v_a, _ = ckpt_lib.load_model_variables(tmp_path, model_index=0, step=5)
  expect = lambda i: jax.tree.map(lambda x: np.asarray(x)[i], state.params)  # noqa: E731
  for got, want in ((v_best, expect(1)), (v_b, expect(1)), (v_a, expect(0))):
    for x, y in zip(jax.tree.leaves(got['params']), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(x), y)
  with pytest.raises(ckpt_lib.CheckpointError, match='model_index'):
    ckpt_lib.load_model_variables(tmp_path, model_index=2)
  # Restoring into another configuration's state names the path and the arrays.
  other = config_lib.tiny_config('mt')
  other.model.sce_features = 24
  other_state = train.create_train_state(
      other, models.build_model(other), tx, jax.random.PRNGKey(1)
  )
  with pytest.raises(
      ckpt_lib.CheckpointError,
      match=r'checkpoints/5/state does not fit the training state .*sce.* '
      r'another config \(model.sce_features: 16 in the checkpoint, 24 '
      r'here\)$',
  ):
    ckpt_lib.restore(manager, ckpt_lib.abstract_like(other_state), config=other)
  del variables
