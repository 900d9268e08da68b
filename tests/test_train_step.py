"""Tests of the training steps and schedules (tiny model, hand-made batches of the contract)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest
import scipy.ndimage

from conftest import assert_trees_close
from sccorr_jax import config_lib
from sccorr_jax import geometry
from sccorr_jax import losses
from sccorr_jax import models
from sccorr_jax import schedules
from sccorr_jax import train
from sccorr_jax import train_step


def make_batch(b=4, img=32, fs=8, rf=7, seed=0):
  """A batch of the contract's training keys: random images, keypoints -> sparse flow labels."""
  rng = np.random.default_rng(seed)
  src = rng.uniform(2, img - 2, (b, 40, 2)).astype(np.float32)
  trg = np.clip(src + rng.normal(0, 3, src.shape), 0, img - 1).astype(np.float32)
  valid = np.zeros((b, 40), bool)
  valid[:, :8] = True
  flow = np.stack(
      [
          np.asarray(geometry.keypoints_to_flow(src[i], trg[i], valid[i], fs, rf, img))
          for i in range(b)
      ]
  )
  return {
      'src_img': rng.normal(size=(b, img, img, 3)).astype(np.float32),
      'trg_img': rng.normal(size=(b, img, img, 3)).astype(np.float32),
      'flow': flow,
  }


pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.fixture(scope='module')
def setup(fast_compiles):  # pylint: disable=redefined-outer-name,unused-argument
  config = config_lib.tiny_config('mt')
  model = models.build_model(config)
  tx = schedules.make_optimizer(config.optim, 2)
  cfg = train_step.StepConfig(model=model, tx=tx, dilation_kernel=7)
  state = train.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  batch = make_batch()
  hp = schedules.step_hparams(config.teacher, 1, 4 * 8 * 8)
  mt = jax.jit(functools.partial(train_step.mutual_teacher_step, cfg))
  new_state, metrics = mt(state, batch, hp)
  return dict(
      config=config,
      model=model,
      tx=tx,
      cfg=cfg,
      state=state,
      batch=batch,
      hp=hp,
      mt=mt,
      new_state=new_state,
      metrics=metrics,
  )


def _equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Two compilations of one step (mt vs single, sharded vs one device) agree to float32 rounding,
# which differs between CPU models; after an Adam step a rounding difference in an eps-sized
# gradient entry can move that one parameter by up to 2 lr (the failure seen on a Zen 3: one
# entry of the stacked 18,432-entry layer3 conv2 kernel off by 2e-4 = 2 x backbone lr). Leaves
# are compared norm-wise (`assert_trees_close`). Measured on a Zen 5 (AVX-512): worst leaf
# 1.1e-7 (params), 2.4e-7 (BN statistics), 9.3e-6 (Adam moments). A full 2 lr flip of one entry
# is <= 8.5e-4 of any weight leaf's norm (the SCE kernel, 2 x 1e-3 / 2.36). A wrong step, e.g.
# one pair's labels lost, moves the parameters by 0.87 of their norm.
PARAMS_RTOL = 1e-3
STATS_RTOL = 1e-5
MOMENTS_RTOL = 1e-3


def test_mt_step_updates_both_models_and_reports_metrics(setup):
  m = jax.device_get(setup['metrics'])
  for key in (
      'a/loss_sup',
      'b/loss_sup',
      'a/loss_pseudo',
      'b/loss_pseudo',
      'a/kept_fraction',
      'a/pseudo_label_acc',
      'a/loss',
      'b/loss',
  ):
    assert np.isfinite(m[key]), key
  assert not m['nonfinite']
  # Remember rate of epoch 1 with a 2-epoch schedule 0.2 -> 0.9: 0.9 of the candidates.
  assert m['a/kept_fraction'] == pytest.approx(0.9, abs=0.02)  # k = int(0.9 * n)
  s0, s1 = setup['state'], setup['new_state']
  assert int(s1.step) == 1
  for i in range(2):
    moved = [
        not np.array_equal(np.asarray(x)[i], np.asarray(y)[i])
        for x, y in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params))
    ]
    assert all(moved), f'model {i}: every parameter (weight decay included) must move'
  assert not np.array_equal(
      np.asarray(jax.tree.leaves(s1.batch_stats)[0])[0],
      np.asarray(jax.tree.leaves(s0.batch_stats)[0])[0],
  )


def test_mt_step_equals_two_single_model_steps(setup):
  """One compiled mt step == each model updated alone against its peer's flow."""
  cfg, state, batch, hp = setup['cfg'], setup['state'], setup['batch'], setup['hp']
  one = lambda tree, i: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
  singles = []
  for i in range(2):
    singles.append(
        train_step.TrainState(
            step=state.step,
            params=one(state.params, i),
            batch_stats=one(state.batch_stats, i),
            opt_state=one(state.opt_state, i),
        )
    )
  fwd = jax.jit(lambda p, s: train_step.forward(cfg, p, s, batch)[0])
  flows = [fwd(s.params, s.batch_stats) for s in singles]
  update = jax.jit(functools.partial(train_step.student_update, cfg))
  for i, name in enumerate('ab'):
    new, metrics = update(singles[i], batch, flows[1 - i], hp)
    mt_metrics = jax.device_get(setup['metrics'])
    for key in ('loss', 'loss_sup', 'loss_pseudo', 'kept_fraction', 'pseudo_label_acc'):
      np.testing.assert_allclose(
          float(metrics[key]),
          float(mt_metrics[f'{name}/{key}']),
          rtol=1e-5,
          err_msg=f'{name}/{key}',
      )
    # Same math, different XLA fusions (see PARAMS_RTOL).
    assert_trees_close(new.params, one(setup['new_state'].params, i), PARAMS_RTOL, 'params')
    assert_trees_close(new.batch_stats, one(setup['new_state'].batch_stats, i), STATS_RTOL)
    assert_trees_close(new.opt_state, one(setup['new_state'].opt_state, i), MOMENTS_RTOL)


def test_sharded_step_equals_single_device(setup):
  """The same mt step with the batch sharded over 4 devices gives the single-device result."""
  assert jax.device_count() >= 4, 'tests/conftest.py simulates 4 CPU devices'
  mesh = jax.make_mesh(
      (4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4]
  )
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  step = jax.jit(
      functools.partial(train_step.mutual_teacher_step, setup['cfg']),
      in_shardings=(repl, data, repl),
      out_shardings=(repl, repl),
  )
  state = jax.device_put(setup['state'], repl)
  batch = jax.device_put(setup['batch'], data)
  new_state, metrics = step(state, batch, jax.device_put(setup['hp'], repl))
  assert len(new_state.params['sce']['conv']['kernel'].sharding.device_set) == 4
  assert_trees_close(new_state.params, setup['new_state'].params, PARAMS_RTOL, 'params')
  assert_trees_close(new_state.batch_stats, setup['new_state'].batch_stats, STATS_RTOL)
  assert_trees_close(new_state.opt_state, setup['new_state'].opt_state, MOMENTS_RTOL)
  for k, v in jax.device_get(setup['metrics']).items():
    np.testing.assert_allclose(float(metrics[k]), float(v), rtol=1e-5, atol=1e-6, err_msg=k)


def test_batch_without_labels_changes_nothing_and_is_not_nonfinite(setup):
  """E.g. data.labelled_pair_fraction < 1: a batch whose pairs all lack labels."""
  batch = dict(setup['batch'], flow=np.zeros_like(setup['batch']['flow']))
  state, metrics = setup['mt'](setup['state'], batch, setup['hp'])
  assert not bool(metrics['nonfinite']) and int(state.nonfinite_total) == 0
  assert metrics['a/loss_sup'] == 0.0 and int(state.step) == 1
  _equal(state.params, setup['state'].params)
  _equal(state.opt_state, setup['state'].opt_state)


def test_dense_step_counts_every_valid_position_once_and_no_other(setup):
  """The oracle's loss is the EPE to `dense_flow` over `dense_valid` of the whole batch; the
  sparse labels and the invalid positions (set to absurd values here) never reach it."""
  config, model, tx = setup['config'], setup['model'], setup['tx']
  cfg = train_step.StepConfig(model=model, tx=tx)
  state = train.create_train_state(
      config_lib.tiny_config('baseline'), model, tx, jax.random.PRNGKey(1)
  )
  rng = np.random.default_rng(3)
  fs = setup['batch']['flow'].shape[1]
  truth = rng.normal(0, 2, (4, fs, fs, 2)).astype(np.float32)
  valid = rng.random((4, fs, fs)) < 0.3
  valid[2] = False  # a pair without any valid position adds nothing
  batch = dict(
      setup['batch'],
      flow=np.full_like(setup['batch']['flow'], 1e4),
      dense_flow=np.where(valid[..., None], truth, 1e6).astype(np.float32),
      dense_valid=valid,
  )
  flow, _ = jax.jit(functools.partial(train_step.forward, cfg))(
      state.params, state.batch_stats, batch
  )
  err = np.linalg.norm(np.asarray(flow, np.float64) - truth, axis=-1)
  expected = err[valid].sum() / valid.sum()
  step = jax.jit(functools.partial(train_step.dense_step, cfg))  # one compile, both batches
  new_state, metrics = step(state, batch, setup['hp'])
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)
  assert int(new_state.step) == 1 and not bool(metrics['nonfinite'])
  # No valid position anywhere: nothing changes, nothing is counted as non-finite.
  empty = dict(batch, dense_valid=np.zeros_like(valid))
  same, metrics = step(state, empty, setup['hp'])
  assert float(metrics['loss']) == 0.0 and not bool(metrics['nonfinite'])
  _equal(same.params, state.params)
  del config


def test_truth_teacher_step_is_the_student_objective_against_the_known_truth(setup):
  """truth_teacher: sparse EPE + λ · the mean distance to `dense_flow` over the dilated label
  mask where the truth is known (every candidate kept at remember rate 1), checked against a
  NumPy recomputation from the step's own forward; unknown positions (absurd values) never
  reach it."""
  config, model, tx = setup['config'], setup['model'], setup['tx']
  cfg = train_step.StepConfig(model=model, tx=tx, dilation_kernel=3)
  state = train.create_train_state(
      config_lib.tiny_config('baseline'), model, tx, jax.random.PRNGKey(1)
  )
  rng = np.random.default_rng(4)
  gt = np.asarray(setup['batch']['flow'])
  fs = gt.shape[1]
  truth = rng.normal(0, 2, (4, fs, fs, 2)).astype(np.float32)
  valid = rng.random((4, fs, fs)) < 0.6
  batch = dict(
      setup['batch'],
      dense_flow=np.where(valid[..., None], truth, 1e6).astype(np.float32),
      dense_valid=valid,
  )
  teacher = config.teacher.copy_and_resolve_references()
  teacher.pseudo_start_epoch, teacher.pseudo_weight = 0, 0.5
  teacher.remember_rate_start = teacher.remember_rate_end = 1.0
  hp = schedules.step_hparams(teacher, 0, 4 * fs * fs)
  flow, _ = jax.jit(functools.partial(train_step.forward, cfg))(
      state.params, state.batch_stats, batch
  )
  flow = np.asarray(flow, np.float64)
  labelled = (gt != 0).any(-1)
  square = scipy.ndimage.maximum_filter(labelled, size=(1, 3, 3), mode='constant')
  candidates = square & valid
  assert 0 < candidates.sum() < square.sum()
  sparse = np.linalg.norm(flow - gt, axis=-1)[labelled].mean()
  pseudo = np.linalg.norm(flow - truth, axis=-1)[candidates].mean()
  new_state, metrics = jax.jit(functools.partial(train_step.truth_teacher_step, cfg))(
      state, batch, hp
  )
  np.testing.assert_allclose(float(metrics['loss']), sparse + 0.5 * pseudo, rtol=1e-5)
  assert int(new_state.step) == 1 and not bool(metrics['nonfinite'])
  truth_config = config_lib.tiny_config('truth_teacher')
  train.check_config(truth_config)
  truth_config.teacher.gate = 'cycle'
  with pytest.raises(config_lib.ConfigError, match="'truth_teacher' takes the paper's"):
    train.check_config(truth_config)


def test_dense_mode_refuses_a_dataset_without_dense_truth():
  config = config_lib.tiny_config('dense')
  train.check_config(config)  # the tiny config's synthetic warps have a dense truth
  config.data.name = 'pfpascal'
  with pytest.raises(
      config_lib.ConfigError,
      match="learning_mode 'dense' needs a dataset with a "
      r"dense ground truth \(synthetic, parts\); data.name is 'pfpascal'",
  ):
    train.check_config(config)


def test_nonfinite_step_is_skipped_and_counted(setup):
  batch = dict(setup['batch'], src_img=np.full_like(setup['batch']['src_img'], np.nan))
  state, metrics = setup['mt'](setup['state'], batch, setup['hp'])
  assert bool(metrics['nonfinite'])
  assert int(state.nonfinite_streak) == 1 and int(state.nonfinite_total) == 1
  assert int(state.step) == 1
  _equal(state.params, setup['state'].params)
  _equal(state.opt_state, setup['state'].opt_state)
  state, _ = setup['mt'](state, setup['batch'], setup['hp'])
  assert int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 1


def test_new_remember_rate_does_not_recompile(setup):
  mt = setup['mt']
  before = mt._cache_size()  # pylint: disable=protected-access
  hp = schedules.step_hparams(setup['config'].teacher, 0, 4 * 8 * 8)
  mt(setup['state'], setup['batch'], hp)
  assert mt._cache_size() == before  # pylint: disable=protected-access


def test_pseudo_weight_and_remember_rate_schedules():
  c = config_lib.base_config('synthetic').teacher  # SPair-71k values: start 4, 0.2 -> 0.9 / 10.
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
  optim = config_lib.base_config('synthetic').optim  # lr 3e-5 head, 3e-6 backbone, wd 0.05.
  params = {
      'backbone': {'w': jnp.ones(3)},
      'sce': {'b': jnp.ones(3)},
      'x_normal': jnp.ones(3),
      'y_normal': jnp.ones(3),
  }
  labels = schedules.param_groups(params)
  assert labels == {
      'backbone': {'w': 'backbone'},
      'sce': {'b': 'head'},
      'x_normal': 'head',
      'y_normal': 'head',
  }
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
  cfg = train_step.StepConfig(model=setup['model'], tx=setup['tx'], batch_norm='frozen')
  s0 = setup['state']
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
  state = train_step.TrainState(
      step=s0.step,
      params=first(s0.params),
      batch_stats=first(s0.batch_stats),
      opt_state=first(s0.opt_state),
  )
  new, metrics = jax.jit(functools.partial(train_step.baseline_step, cfg))(
      state, setup['batch'], setup['hp']
  )
  assert np.isfinite(float(metrics['loss']))
  _equal(new.batch_stats, state.batch_stats)
  with pytest.raises(ValueError, match='batch_norm'):
    train_step.StepConfig(model=setup['model'], tx=setup['tx'], batch_norm='sync')


def test_candidate_mask_dilated_or_everywhere(setup):
  gt = jnp.asarray(setup['batch']['flow'])
  dilated = train_step.candidate_mask(setup['cfg'], gt)
  labelled = ~np.all(np.asarray(gt) == 0, axis=-1)
  assert dilated.shape == labelled.shape and np.all(np.asarray(dilated)[labelled])
  assert np.asarray(dilated).sum() > labelled.sum()
  everywhere = train_step.StepConfig(model=setup['model'], tx=setup['tx'], dilation_kernel=None)
  assert np.all(np.asarray(train_step.candidate_mask(everywhere, gt)))


def test_pseudo_label_metrics_on_a_hand_made_case():
  """Kept vs rejected pseudo-labels against a dense truth, and the withheld-keypoint fallback."""
  gt = np.zeros((1, 2, 3, 2), np.float32)
  gt[0, 0, 0] = (1.0, 0.0)  # one sparse label
  truth = np.zeros((1, 2, 3, 2), np.float32)
  truth[0, 0, 0] = (1.0, 0.0)
  truth[0, 1, 2] = (2.0, 2.0)
  valid = np.ones((1, 2, 3), bool)
  valid[0, 1, 1] = False  # no true match here (e.g. occluded in the source)
  pseudo = truth.copy()
  pseudo[0, 0, 1] = (3.0, 4.0)  # 5 cells off
  pseudo[0, 1, 2] = (2.5, 2.0)  # 0.5 cells off
  candidates = np.array([[[1, 1, 1], [0, 1, 1]]], bool)
  kept = np.array([[[1, 0, 0], [0, 1, 1]]], bool)
  terms = losses.PseudoLabelTerms(
      loss_sup=jnp.float32(0.5),
      loss_pseudo=jnp.float32(0.25),
      candidates=candidates,
      kept=kept,
      num_remember=jnp.int32(3),
      num_candidates=jnp.int32(5),
  )
  batch = {'flow': gt, 'dense_flow': truth, 'dense_valid': valid}
  m = jax.device_get(train_step.pseudo_label_metrics(terms, pseudo, batch))
  assert m['kept_fraction'] == pytest.approx(0.6) and m['pseudo_label_acc'] == 1.0
  # Kept with a true match: (0,0) err 0 and (1,2) err 0.5 ((1,1) has none) -> epe 0.25, acc 1.
  assert m['pseudo_kept_epe'] == pytest.approx(0.25) and m['pseudo_kept_acc'] == 1.0
  # Rejected: (0,1) err 5 and (0,2) err 0 -> epe 2.5, acc 0.5.
  assert m['pseudo_rejected_epe'] == pytest.approx(2.5) and m['pseudo_rejected_acc'] == 0.5
  # A pair without dense truth falls back to its withheld keypoints (cells of 4 pixels here).
  img = np.zeros((1, 8, 12, 3), np.float32)
  withheld = {
      'src_img': img,
      'withheld_trg_kps': np.array([[[5.0, 1.0], [9.0, 6.0]]], np.float32),
      'withheld_src_kps': np.array([[[17.0, 17.0], [0.0, 0.0]]], np.float32),
      'withheld_kps_valid': np.array([[True, False]]),
  }
  batch = dict(batch, dense_valid=np.zeros_like(valid), **withheld)
  m = jax.device_get(train_step.pseudo_label_metrics(terms, pseudo, batch))
  # The withheld keypoint (5, 1) -> (17, 17) is cell (0, 1), truth (3, 4): the rejected
  # pseudo-label there was right after all; the invalid slot adds nothing.
  assert m['pseudo_rejected_epe'] == 0.0 and m['pseudo_rejected_acc'] == 1.0
  assert np.isnan(m['pseudo_kept_epe'])  # no withheld keypoint among the kept positions
  assert 'pseudo_kept_epe' not in train_step.pseudo_label_metrics(terms, pseudo, {'flow': gt})
