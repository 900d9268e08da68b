"""SCorrSAN on a DINOv2 backbone (issue 12): configs, frozen blocks, weight import, training.

Tiny random ViTs (`configs/spair_dinov2.py:TINY_DINOV2`, 2 blocks of 32 channels) on 42-pixel
images (3x3 tokens, flow grid 6x6) of the synthetic dataset in its real on-disk format. Covers:
the DINOv2 configs and their link between the model's trained blocks and the optimiser's frozen
partition; frozen parameters getting exactly no update; the official-name checkpoint feeding
`model.pretrained` and `tools/convert_torch.py`; the three learning modes; stop-and-resume
giving bitwise the same state.
"""

from __future__ import annotations

import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sccorr_jax import checkpoint as ckpt_lib
from sccorr_jax import config_lib
from sccorr_jax import convert
from sccorr_jax import models
from sccorr_jax import schedules
from sccorr_jax import train
from sccorr_jax.models import dinov2
from conftest import run_python

pytestmark = pytest.mark.usefixtures('fast_compiles')

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPAIR = config_lib.load_config_module(str(ROOT / 'configs' / 'spair_dinov2.py'))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('synthetic_data'))


def _config(mode, data_dir=None, layers=(0, 1), trained_blocks=1):
  c = config_lib.tiny_config(mode, data_dir)
  SPAIR.apply_dinov2(c, 'vits14', layers, trained_blocks)
  SPAIR.apply_dinov2_tiny(c, img_size=42, feature_size=6)
  return c


def _tiny_state_dict(seed=0):
  """A full tiny DINOv2 (both blocks) under the official torch-hub names, plus a mask_token."""
  model = dinov2.DINOv2(**SPAIR.TINY_DINOV2)
  v = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 3)))
  v = jax.tree.map(
      lambda a: a + 0.01 * jax.random.normal(jax.random.PRNGKey(seed + 1), a.shape), v
  )  # Non-trivial LayerNorm/LayerScale values.
  sd = convert.to_dinov2_state_dict(jax.tree.map(np.asarray, v))
  sd['mask_token'] = np.zeros((1, 32), np.float32)
  return sd


# ------------------------------------------------------------------------------------------------
# Configs and model construction.


@pytest.mark.parametrize('name', ['spair_dinov2', 'pfpascal_dinov2'])
def test_dinov2_configs_build_the_documented_model(name):
  config = config_lib.load_config(f'{ROOT}/configs/{name}.py:mt')
  model = models.build_model(config)
  assert model.backbone_type == 'dinov2' and model.dinov2_preset == 'vitb14'
  assert model.dinov2_blocks() == (11,) and model.dinov2_frozen_blocks() == 10
  assert config.data.img_size == 448 and config.data.img_size % 14 == 0
  assert config.data.img_size % config.data.feature_size == 0
  assert config.model.feature_size == config.data.feature_size == 64
  # One value for the model's stop_gradient and the optimiser's partition, also when overridden.
  assert config.optim.backbone_trained_blocks == 2
  config.model.dinov2_trained_blocks = 4
  assert config.optim.backbone_trained_blocks == 4
  x = jax.ShapeDtypeStruct((1, 448, 448, 3), jnp.float32)
  shapes = jax.eval_shape(lambda a, b: model.init(jax.random.PRNGKey(0), a, b), x, x)
  assert shapes['params']['backbone']['pos_embed'].shape == (1, 1 + 37 * 37, 768)
  feat = jax.eval_shape(
      lambda v, a: model.apply(v, a, a, return_aux=True)[1]['src_feat'], shapes, x
  )
  assert feat.shape == (1, 32, 32, 768)  # Image / 14.
  small = config_lib.load_config(
      f'{ROOT}/configs/{name}.py:baseline,runlocal,preset=vits14_reg,' 'trained_blocks=0'
  )
  m = models.build_model(small)
  assert m.dinov2_preset == 'vits14_reg' and m.dinov2_kwargs()['embed_dim'] == 32
  assert small.optim.backbone_trained_blocks == 0 and small.learning_mode == 'baseline'


def test_resnet_stays_the_default():
  model = models.build_model(config_lib.tiny_config('mt'))
  assert model.backbone_type == 'resnet'
  with pytest.raises(ValueError, match='model.backbone must be'):
    c = config_lib.tiny_config('mt')
    c.model.backbone = 'vit'
    models.build_model(c)


def test_features_are_the_concatenated_blocks_after_the_final_norm():
  config = _config('baseline', layers=(0, 1))
  model = models.build_model(config)
  with jax.enable_x64(True):  # Two compilations of one formula: compare in float64.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 42, 42, 3), jnp.float64)
    v = model.init(jax.random.PRNGKey(1), x, x)
    _, aux = model.apply(v, x, x, return_aux=True)
    vit = dinov2.DINOv2(**model.dinov2_kwargs())
    out = vit.apply({'params': v['params']['backbone']}, x, layers=(0, 1))
    assert aux['src_feat'].dtype == jnp.float64
    np.testing.assert_allclose(
        aux['src_feat'], jnp.concatenate(out['intermediate'], -1), rtol=0, atol=1e-12
    )
  assert aux['src_feat'].shape == (2, 3, 3, 64)
  # Negative indices count from the end; one block index is accepted as an int.
  assert model.clone(dinov2_layers=-1).dinov2_blocks() == (1,)
  assert model.clone(dinov2_layers=(-2, 1)).dinov2_blocks() == (0, 1)


@pytest.mark.parametrize('layers,trained', [((0, 1), 0), ((0, 1), 1), ((1,), 2)])
def test_frozen_parameters_get_no_gradient_and_no_update(layers, trained):
  config = _config('baseline', layers=layers, trained_blocks=trained)
  model = models.build_model(config)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 42, 42, 3))
  params = flax.core.unfreeze(model.init(jax.random.PRNGKey(1), x, x))['params']
  run = max(layers) + 1
  assert sorted(k for k in params['backbone'] if k.startswith('blocks_')) == [
      f'blocks_{i}' for i in range(run)
  ]  # Blocks after the last used one are not built.

  def loss(p):
    return jnp.sum(jnp.square(model.apply({'params': p}, x, x[::-1])))

  grads = jax.jit(jax.grad(loss))(params)
  tx = schedules.make_optimizer(config.optim, steps_per_epoch=2)
  labels = schedules.param_groups(params, True, config.optim.backbone_trained_blocks)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat_g = flax.traverse_util.flatten_dict(grads['backbone'])
  flat_u = flax.traverse_util.flatten_dict(updates['backbone'])
  flat_l = flax.traverse_util.flatten_dict(labels['backbone'])
  for path in flat_g:
    trained_here = dinov2.is_trained(path, run, trained)
    assert flat_l[path] == ('backbone' if trained_here else 'frozen'), path
    assert bool(np.any(np.asarray(flat_g[path]) != 0)) == trained_here, path
    assert bool(np.any(np.asarray(flat_u[path]) != 0)) == trained_here, path
  assert all(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates['sce']))


def test_a_dinov2_backbone_without_the_trained_blocks_key_is_refused():
  config = _config('baseline')
  config.optim.backbone_trained_blocks = None
  model = models.build_model(config)
  x = jnp.zeros((1, 42, 42, 3))
  params = model.init(jax.random.PRNGKey(0), x, x)['params']
  with pytest.raises(ValueError, match='backbone_trained_blocks'):
    schedules.make_optimizer(config.optim, 2).init(params)


# ------------------------------------------------------------------------------------------------
# Pretrained weights.


def test_pretrained_official_weights_fill_the_backbone(tmp_path):
  sd = _tiny_state_dict()
  np.savez(tmp_path / 'dinov2_tiny.npz', **sd)
  config = _config('mt', layers=(0,))  # Block 1 of the checkpoint is not used: ignored.
  config.model.pretrained = str(tmp_path / 'dinov2_tiny.npz')
  model = models.build_model(config)
  v = models.init_variables(config, model, jax.random.PRNGKey(0), 2)
  back = convert.to_dinov2_state_dict(
      jax.tree.map(lambda a: np.asarray(a)[1], v['params']['backbone'])
  )
  assert sorted(back) == sorted(
      k for k in sd if not k.startswith('blocks.1.') and k != 'mask_token'
  )
  for k, a in back.items():
    np.testing.assert_array_equal(a, sd[k], err_msg=k)
  # Both mutual teachers start from the checkpoint and differ in their heads.
  assert not np.array_equal(
      v['params']['sce']['conv']['kernel'][0], v['params']['sce']['conv']['kernel'][1]
  )
  bad = dict(sd)
  del bad['blocks.0.ls2.gamma']
  with pytest.raises(convert.ConversionError, match=r'missing keys \(1\): blocks.0.ls2.gamma'):
    convert.from_torch_state_dict(bad, model)


def test_convert_tool_writes_a_dinov2_scorrsan_export(tmp_path):
  sd = _tiny_state_dict(seed=3)
  src = tmp_path / 'dinov2_tiny.npz'
  np.savez(src, **sd)
  tool = [ROOT / 'tools' / 'convert_torch.py', f'--input={src}']
  res = run_python(
      *tool, '--config=configs/spair_dinov2.py:runlocal', f'--output={tmp_path / "out"}', cwd=ROOT
  )
  assert res.returncode == 0, res.stderr[-3000:]
  variables, config = ckpt_lib.load_model_variables(tmp_path / 'out')
  assert config.model.backbone == 'dinov2'
  back = convert.to_dinov2_state_dict(jax.tree.map(np.asarray, variables['params']['backbone']))
  for k, a in back.items():
    np.testing.assert_array_equal(a, sd[k], err_msg=k)
  # DINOv2 weights with a ResNet config: a clear error, nothing written.
  res = run_python(*tool, '--config=configs/spair.py', f'--output={tmp_path / "x"}', cwd=ROOT)
  assert res.returncode != 0 and 'DINOv2' in res.stderr and not (tmp_path / 'x').exists()


# ------------------------------------------------------------------------------------------------
# Training.


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """(path of an official-name tiny DINOv2 checkpoint, its state dict)."""
  sd = _tiny_state_dict(seed=5)
  path = tmp_path_factory.mktemp('weights') / 'dinov2_tiny.npz'
  np.savez(path, **sd)
  return str(path), sd


def _train_config(mode, data_dir, pretrained):
  config = _config(mode, data_dir, layers=(0, 1), trained_blocks=1)
  config.model.pretrained = pretrained[0]
  config.optim.num_epochs = 1
  return config


def _assert_only_trained_blocks_moved(backbone, sd, model_index=None):
  """Frozen backbone parameters still equal the checkpoint; the trained ones (block 1 and the
  final norm of 2 blocks run, 1 trained) moved."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(backbone))
  assert flat
  for path, a in flat.items():
    a = np.asarray(a) if model_index is None else np.asarray(a)[model_index]
    name, _ = convert._dinov2_torch_name(path)  # pylint: disable=protected-access
    ref = convert.to_dinov2_state_dict(flax.traverse_util.unflatten_dict({path: a}))[name]
    assert np.array_equal(ref, sd[name]) != dinov2.is_trained(path, 2, 1), (path, model_index)


@pytest.fixture(scope='module')
def baseline_run(data_dir, pretrained, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('dinov2_baseline'))
  return workdir, train.train_and_evaluate(_train_config('baseline', data_dir, pretrained), workdir)


def test_baseline_trains_only_the_last_blocks(baseline_run, pretrained):
  _, summary = baseline_run
  assert summary['step'] == 2 and summary['nonfinite_total'] == 0
  assert np.isfinite(summary['val']['val/pck@0.1'])
  _assert_only_trained_blocks_moved(summary['state'].params['backbone'], pretrained[1])


def test_st_trains_with_the_dinov2_baseline_as_teacher(
    baseline_run, data_dir, pretrained, tmp_path
):
  base_dir, _ = baseline_run
  config = _train_config('st', data_dir, pretrained)
  config.teacher.checkpoint = base_dir
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['step'] == 2 and summary['nonfinite_total'] == 0
  teacher, _ = ckpt_lib.load_model_variables(base_dir)
  for x, y in zip(jax.tree.leaves(summary['state'].teacher), jax.tree.leaves(teacher)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  _assert_only_trained_blocks_moved(summary['state'].params['backbone'], pretrained[1])


def test_mt_stop_and_resume_is_bitwise_identical(data_dir, pretrained, tmp_path):
  config = _train_config('mt', data_dir, pretrained)
  config.optim.steps_per_epoch = 4
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  first = train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_after_steps=2)
  assert first['step'] == 2
  second = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert second['step'] == 4 and second['nonfinite_total'] == 0
  for name in ('params', 'opt_state'):
    a = jax.tree.leaves(getattr(straight['state'], name))
    b = jax.tree.leaves(getattr(second['state'], name))
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  for index in (0, 1):  # Both mutual teachers.
    _assert_only_trained_blocks_moved(second['state'].params['backbone'], pretrained[1], index)
  variables, cfg = ckpt_lib.load_model_variables(str(tmp_path / 'resumed'), 'best')
  assert cfg.model.backbone == 'dinov2' and 'pos_embed' in variables['params']['backbone']
