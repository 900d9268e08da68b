"""Tests of the training steps and schedules (tiny model, hand-made batches of the contract)."""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import common  # noqa: E402  pylint: disable=g-import-not-at-top

from sccorr_jax import checkpoint as ckpt_lib  # noqa: E402
from sccorr_jax import geometry  # noqa: E402
from sccorr_jax import schedules  # noqa: E402
from sccorr_jax import train  # noqa: E402
from sccorr_jax import train_step as ts  # noqa: E402


def make_batch(b=4, img=32, fs=8, rf=7, seed=0):
  """A batch of the contract's training keys: random images, keypoints -> sparse flow labels."""
  rng = np.random.default_rng(seed)
  src = rng.uniform(2, img - 2, (b, 40, 2)).astype(np.float32)
  trg = np.clip(src + rng.normal(0, 3, src.shape), 0, img - 1).astype(np.float32)
  valid = np.zeros((b, 40), bool)
  valid[:, :8] = True
  flow = np.stack([np.asarray(geometry.keypoints_to_flow(src[i], trg[i], valid[i], fs, rf, img))
                   for i in range(b)])
  return {'src_img': rng.normal(size=(b, img, img, 3)).astype(np.float32),
          'trg_img': rng.normal(size=(b, img, img, 3)).astype(np.float32),
          'flow': flow}


pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.fixture(scope='module')
def setup(fast_compiles):  # pylint: disable=redefined-outer-name,unused-argument
  config = common.tiny_config('mt')
  model = ckpt_lib.build_model(config)
  tx = schedules.make_optimizer(config.optim, 2)
  cfg = ts.StepConfig(model=model, tx=tx, dilation_kernel=7)
  state = train.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  batch = make_batch()
  hp = schedules.step_hparams(config.teacher, 1, 4 * 8 * 8)
  mt = jax.jit(functools.partial(ts.mutual_teacher_step, cfg))
  new_state, metrics = mt(state, batch, jax.random.PRNGKey(0), hp)
  return dict(config=config, model=model, tx=tx, cfg=cfg, state=state, batch=batch, hp=hp,
              mt=mt, new_state=new_state, metrics=metrics)


def _close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _close_to_scale(a, b, tol):
  """Per leaf, `max |a - b| <= tol * max |b|` (float32 rounding is relative to a leaf's scale,
  not to each element: a gradient entry near zero carries its neighbours' absolute error)."""
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    err = np.abs(x - y).max(initial=0.0)
    assert err <= tol * np.abs(y).max(initial=0.0), (jax.tree_util.keystr(path), err)


def test_mt_step_updates_both_models_and_reports_metrics(setup):
  m = jax.device_get(setup['metrics'])
  for key in ('a/loss_sup', 'b/loss_sup', 'a/loss_pseudo', 'b/loss_pseudo', 'a/kept_fraction',
              'a/pseudo_label_acc', 'a/loss', 'b/loss'):
    assert np.isfinite(m[key]), key
  assert not m['nonfinite']
  # Remember rate of epoch 1 with a 2-epoch schedule 0.2 -> 0.9: 0.9 of the candidates.
  assert m['a/kept_fraction'] == pytest.approx(0.9, abs=0.02)  # k = int(0.9 * n)
  s0, s1 = setup['state'], setup['new_state']
  assert int(s1.step) == 1
  for i in range(2):
    moved = [not np.array_equal(np.asarray(x)[i], np.asarray(y)[i])
             for x, y in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params))]
    assert all(moved), f'model {i}: every parameter (weight decay included) must move'
  assert not np.array_equal(np.asarray(jax.tree.leaves(s1.batch_stats)[0])[0],
                            np.asarray(jax.tree.leaves(s0.batch_stats)[0])[0])


def test_mt_step_equals_two_single_model_steps(setup):
  """One compiled mt step == each model updated alone against its peer's flow."""
  cfg, state, batch, hp = setup['cfg'], setup['state'], setup['batch'], setup['hp']
  one = lambda tree, i: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
  singles = []
  for i in range(2):
    singles.append(ts.TrainState(step=state.step, params=one(state.params, i),
                                 batch_stats=one(state.batch_stats, i),
                                 opt_state=one(state.opt_state, i)))
  fwd = jax.jit(lambda p, s: ts.forward(cfg, p, s, batch)[0])
  flows = [fwd(s.params, s.batch_stats) for s in singles]
  update = jax.jit(functools.partial(ts.student_update, cfg))
  for i, name in enumerate('ab'):
    new, metrics = update(singles[i], batch, flows[1 - i], hp)
    mt_metrics = jax.device_get(setup['metrics'])
    for key in ('loss', 'loss_sup', 'loss_pseudo', 'kept_fraction', 'pseudo_label_acc'):
      np.testing.assert_allclose(float(metrics[key]), float(mt_metrics[f'{name}/{key}']),
                                 rtol=1e-5, err_msg=f'{name}/{key}')
    # Same math, different XLA fusions: float32 rounding of the gradients. Adam's first step is
    # ~lr * g / |g|, so where |g| is near eps (1e-8) a rounding difference in g moves a
    # parameter by up to ~1e-5 * lr / 1e-3; atol 1e-5 is 1% of the largest step (lr 1e-3).
    _close(new.params, one(setup['new_state'].params, i), rtol=1e-4, atol=1e-5)
    _close(new.batch_stats, one(setup['new_state'].batch_stats, i))
    # Adam's moments are (functions of) the gradients: 1e-4 of each leaf's largest entry.
    _close_to_scale(new.opt_state, one(setup['new_state'].opt_state, i), 1e-4)


def test_sharded_step_equals_single_device(setup):
  """The same mt step with the batch sharded over 4 devices gives the single-device result."""
  assert jax.device_count() >= 4, 'tests/conftest.py simulates 4 CPU devices'
  mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  step = jax.jit(functools.partial(ts.mutual_teacher_step, setup['cfg']),
                 in_shardings=(repl, data, repl, repl), out_shardings=(repl, repl))
  state = jax.device_put(setup['state'], repl)
  batch = jax.device_put(setup['batch'], data)
  new_state, metrics = step(state, batch, jax.device_put(jax.random.PRNGKey(0), repl),
                            jax.device_put(setup['hp'], repl))
  assert len(new_state.params['sce']['conv']['kernel'].sharding.device_set) == 4
  _close(new_state.params, setup['new_state'].params, rtol=1e-4, atol=1e-5)  # As above.
  _close(new_state.batch_stats, setup['new_state'].batch_stats)
  for k, v in jax.device_get(setup['metrics']).items():
    np.testing.assert_allclose(float(metrics[k]), float(v), rtol=1e-5, atol=1e-6, err_msg=k)


def test_nonfinite_step_is_skipped_and_counted(setup):
  batch = dict(setup['batch'], flow=np.zeros_like(setup['batch']['flow']))  # No label: NaN EPE.
  state, metrics = setup['mt'](setup['state'], batch, jax.random.PRNGKey(0), setup['hp'])
  assert bool(metrics['nonfinite'])
  assert int(state.nonfinite_streak) == 1 and int(state.nonfinite_total) == 1
  assert int(state.step) == 1
  _close(state.params, setup['state'].params, rtol=0, atol=0)
  _close(state.opt_state, setup['state'].opt_state, rtol=0, atol=0)
  state, _ = setup['mt'](state, setup['batch'], jax.random.PRNGKey(0), setup['hp'])
  assert int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 1


def test_new_remember_rate_does_not_recompile(setup):
  mt = setup['mt']
  before = mt._cache_size()  # pylint: disable=protected-access
  hp = schedules.step_hparams(setup['config'].teacher, 0, 4 * 8 * 8)
  mt(setup['state'], setup['batch'], jax.random.PRNGKey(0), hp)
  assert mt._cache_size() == before  # pylint: disable=protected-access


def test_pseudo_weight_and_remember_rate_schedules():
  c = common.base_config('synthetic').teacher  # SPair-71k values: start 4, 0.2 -> 0.9 / 10.
  assert schedules.pseudo_weight(c, 3) == 0.0
  assert schedules.pseudo_weight(c, 4) == 10.0
  assert schedules.remember_rate(c, 4) == pytest.approx(0.2)
  assert schedules.remember_rate(c, 5) == pytest.approx(0.2 + 0.7 / 9)
  assert schedules.remember_rate(c, 13) == pytest.approx(0.9)
  assert schedules.remember_rate(c, 100) == pytest.approx(0.9)
  c.small_loss_selection = False
  assert schedules.remember_rate(c, 4) == 1.0
  hp = schedules.step_hparams(c, 4, 100)
  assert hp.remember_table.shape == (101,) and hp.remember_table[100] == 100


def test_optimizer_groups_and_frozen_backbone():
  optim = common.base_config('synthetic').optim  # lr 3e-5 head, 3e-6 backbone, wd 0.05.
  params = {'backbone': {'w': jnp.ones(3)}, 'sce': {'b': jnp.ones(3)},
            'x_normal': jnp.ones(3), 'y_normal': jnp.ones(3)}
  labels = schedules.param_groups(params)
  assert labels == {'backbone': {'w': 'backbone'}, 'sce': {'b': 'head'}, 'x_normal': 'head',
                    'y_normal': 'head'}
  tx = schedules.make_optimizer(optim, 10)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is -lr * (sign + wd * p) = -lr * 1.05 per element.
  np.testing.assert_allclose(updates['backbone']['w'], -3e-6 * 1.05, rtol=1e-5)
  np.testing.assert_allclose(updates['x_normal'], -3e-5 * 1.05, rtol=1e-5)
  optim.freeze_backbone = True
  tx = schedules.make_optimizer(optim, 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates['backbone']['w'], 0.0)
  # Step schedule: MultiStepLR(milestones=[2], gamma=0.5) at 10 steps per epoch.
  optim.lr_milestones_epochs = (2,)
  sched = schedules.lr_schedule(optim, 1.0, 10)
  assert float(sched(19)) == 1.0 and float(sched(20)) == 0.5
  assert isinstance(tx, optax.GradientTransformation)


def test_frozen_batch_norm_keeps_running_statistics(setup):
  cfg = ts.StepConfig(model=setup['model'], tx=setup['tx'], batch_norm='frozen')
  s0 = setup['state']
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
  state = ts.TrainState(step=s0.step, params=first(s0.params),
                        batch_stats=first(s0.batch_stats), opt_state=first(s0.opt_state))
  new, metrics = jax.jit(functools.partial(ts.baseline_step, cfg))(
      state, setup['batch'], jax.random.PRNGKey(0), setup['hp'])
  assert np.isfinite(float(metrics['loss']))
  _close(new.batch_stats, state.batch_stats, rtol=0, atol=0)
  with pytest.raises(ValueError, match='batch_norm'):
    ts.StepConfig(model=setup['model'], tx=setup['tx'], batch_norm='sync')


def test_candidate_mask_dilated_or_everywhere(setup):
  gt = jnp.asarray(setup['batch']['flow'])
  dilated = ts.candidate_mask(setup['cfg'], gt)
  labelled = ~np.all(np.asarray(gt) == 0, axis=-1)
  assert dilated.shape == labelled.shape and np.all(np.asarray(dilated)[labelled])
  assert np.asarray(dilated).sum() > labelled.sum()
  everywhere = ts.StepConfig(model=setup['model'], tx=setup['tx'], dilation_kernel=None)
  assert np.all(np.asarray(ts.candidate_mask(everywhere, gt)))
