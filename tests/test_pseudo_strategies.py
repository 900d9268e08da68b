"""Pseudo-label strategies (issue 18): regions, gates, targets and pairs without keypoints.

Hand-made cases whose answer can be written down: first each piece of `losses` on tiny arrays,
then the real training steps (`mutual_teacher_step`, `single_teacher_step`) on hand-made
features through a head-only SCorrSAN (the features are the model's inputs, so the teacher's
affinity, correlation, peak mass and swapped-pair flow follow from them), in float64 and
float32; one compile of the tiny ResNet's mt step with every option on; the config keys, their
checks and the `strategies` sweep. The paper's defaults through the real step are
`test_mt_objective.py`'s fixture test.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sccorr_jax import config_lib
from sccorr_jax import geometry
from sccorr_jax import losses
from sccorr_jax import models
from sccorr_jax import schedules
from sccorr_jax import train
from sccorr_jax import train_step
from sccorr_jax.models import SCorrSAN
from sccorr_jax.models import flow as flow_lib

pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.fixture(params=[True, False], ids=['x64', 'f32'])
def x64(request):
  """Runs the test in float64 (jax x64 on) and in float32."""
  with jax.enable_x64(request.param):
    yield request.param


def _dtype(x64):
  return np.float64 if x64 else np.float32


def _tol(x64):
  return dict(rtol=0, atol=1e-9 if x64 else 1e-5)


def _gt(dtype, *labels):
  """[len(labels), 3, 3, 2] sparse labels; each entry: {(y, x): (dx, dy)}."""
  gt = np.zeros((len(labels), 3, 3, 2), dtype)
  for i, cells in enumerate(labels):
    for (y, x), v in cells.items():
      gt[i, y, x] = v
  return gt


def _run(fn, *args, **static):
  """`fn(*args, **static)`, compiled as one program (op-by-op dispatch costs seconds here)."""
  return jax.jit(functools.partial(fn, **static))(*args)


def _pseudo_labels(teacher_flow, gt, signals=None, percentile=0.0, *, options, dilation_kernel=7):
  """`losses.pseudo_labels` with the static arguments last (for `_run`)."""
  return losses.pseudo_labels(options, teacher_flow, gt, signals, percentile, dilation_kernel)


def _cells(mask):
  """The True cells of a [h, w] mask as a sorted list of (y, x)."""
  return sorted(map(tuple, np.argwhere(np.asarray(mask)).tolist()))


# ------------------------------------------------------------------------------------------------
# Regions.


def test_affinity_is_the_cosine_on_one_grid_and_resized_bilinearly(x64):
  dt = _dtype(x64)
  # Two orthogonal features on a 1 x 2 grid, resized to 1 x 3: the middle cell is half of each.
  feats = np.array([[[[1, 0], [0, 1]]]], dt)
  a = np.asarray(_run(losses.affinity_windows, feats, size_hw=(1, 3), radius=1))[0, 0]
  cos = 1 / (1 + 1e-6)  # The L2 normalisation's epsilon.
  # Row i = 1 of the window is the cell's own row; out-of-grid entries are 0.
  np.testing.assert_allclose(a[0, 1], [0, cos, cos / 2], **_tol(x64))
  np.testing.assert_allclose(a[1, 1], [cos / 2, cos / 2, cos / 2], **_tol(x64))
  np.testing.assert_allclose(a[2, 1], [cos / 2, cos, 0], **_tol(x64))
  np.testing.assert_array_equal(a[:, 0], 0)
  np.testing.assert_array_equal(a[:, 2], 0)


def test_affinity_region_threshold_top_k_and_radius(x64):
  dt = _dtype(x64)
  # Object (left column and centre) and background features on a 3 x 3 grid.
  feats = np.zeros((1, 3, 3, 2), dt)
  feats[..., 1] = 1
  feats[0, :, 0] = feats[0, 1, 1] = (1, 0)
  labelled = np.zeros((4, 3, 3), bool)
  labelled[:2, 1, 1] = True
  labelled[2, 0, 0] = True  # labelled[3]: no label
  threshold = np.array([0.5, -1.0, 0.5, -1.0], _dtype(x64))

  def regions(feats, labelled, threshold, top_k):
    affinity = losses.affinity_windows(jnp.repeat(feats, 4, axis=0), (3, 3), 1)
    return losses.affinity_region(affinity, labelled, threshold[:, None, None, None, None], top_k)

  region = _run(regions, feats, labelled, threshold, top_k=0)
  assert _cells(region[0]) == [(0, 0), (1, 0), (1, 1), (2, 0)]
  # A labelled corner reaches only its radius; the same image's cells beyond do not count.
  assert _cells(region[2]) == [(0, 0), (1, 0), (1, 1)]
  # An image without labels has no affinity region at all.
  assert not np.any(region[3])
  # Top 2 of the centre's window (ties: row-major), whatever the threshold.
  region = _run(regions, feats, labelled, threshold, top_k=2)
  assert _cells(region[1]) == [(0, 0), (1, 0)]


def test_object_region_is_the_normalised_best_match_resized(x64):
  dt = _dtype(x64)
  corr = np.zeros((2, 1, 2, 2, 2), dt)  # [b, hs, ws, ht, wt]
  corr[0, 0, 0] = [[1.0, 0.0], [0.5, 0.25]]
  corr[0, 0, 1] = [[0.25, 0.0], [0.75, 0.125]]  # Best match per target: [[1, 0], [.75, .25]].
  corr[1] = 0.4  # A flat pair: nothing stands out.
  score = np.asarray(_run(losses.object_score, corr, size_hw=(2, 2)))
  np.testing.assert_allclose(score[0], [[1, 0], [0.75, 0.25]], **_tol(x64))
  np.testing.assert_array_equal(score[1], 0)
  # Align-corners resizing to the 3 x 3 flow grid: midpoints are averages; the region.
  options = losses.PseudoLabelOptions(region='object', object_threshold=0.5)

  def region(corr, gt):
    score = losses.object_score(corr, (3, 3))
    signals = losses.TeacherSignals(object_score=score)
    return score, losses.pseudo_labels(options, jnp.zeros_like(gt), gt, signals).candidates

  score, candidates = _run(region, corr, _gt(dt, {(2, 2): (1, 1)}, {(2, 2): (1, 1)}))
  np.testing.assert_allclose(
      score[0], [[1, 0.5, 0], [0.875, 0.5, 0.125], [0.75, 0.5, 0.25]], **_tol(x64)
  )
  assert _cells(candidates[0]) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
  assert not np.any(candidates[1])


def test_pairs_without_keypoints_get_nothing_or_object_and_cycle(x64):
  dt = _dtype(x64)
  gt = _gt(dt, {(1, 1): (2.0, -1.0)}, {})  # Pair 1 carries no keypoint.
  teacher = np.zeros((2, 3, 3, 2), dt)
  default = _run(
      _pseudo_labels, teacher, gt, options=losses.PseudoLabelOptions(), dilation_kernel=3
  )
  np.testing.assert_array_equal(default.candidates[0], True)  # The 3 x 3 square.
  assert default.gate is None and not np.any(default.candidates[1])
  # No mask at all: every position of the labelled pair, still nothing on the other.
  everywhere = _run(
      _pseudo_labels, teacher, gt, options=losses.PseudoLabelOptions(), dilation_kernel=None
  )
  assert np.all(everywhere.candidates[0]) and not np.any(everywhere.candidates[1])
  # 'object_cycle': the unlabelled pair's region is its object region, its gate the cycle
  # check (here the back flow returns every cell but (2, 1)); the labelled pair keeps its
  # square and, without a gate, passes everything.
  score = np.zeros((2, 3, 3), dt)
  score[1, 2, :] = 1
  back = np.zeros((2, 3, 3, 2), dt)
  back[1, 2, 1] = (3.0, 0.0)
  options = losses.PseudoLabelOptions(unlabelled_pairs='object_cycle', cycle_delta=1.0)
  signals = losses.TeacherSignals(object_score=score, back_flow=back)
  labels = _run(_pseudo_labels, teacher, gt, signals, options=options, dilation_kernel=3)
  np.testing.assert_array_equal(labels.candidates[0], True)
  assert _cells(labels.candidates[1]) == [(2, 0), (2, 1), (2, 2)]
  np.testing.assert_array_equal(labels.gate[0], True)
  assert _cells(labels.gate[1] & labels.candidates[1]) == [(2, 0), (2, 2)]


# ------------------------------------------------------------------------------------------------
# Gates.


def test_cycle_gate_follows_the_flow_there_and_back(x64):
  dt = _dtype(x64)
  flow = np.zeros((1, 1, 4, 2), dt)  # target -> source, one row of 4 cells
  flow[0, 0, :, 0] = [2.0, 1.5, 0.0, -3.0]
  back = np.zeros((1, 1, 4, 2), dt)  # source -> target
  back[0, 0, :, 0] = [2.5, 0.0, -2.0, -1.0]
  # x=0 -> 2 -> 0 (miss 0); x=1 -> 2.5, back is (-2 - 1) / 2 there -> 1 (0); x=2 -> 2 -> 0
  # (2); x=3 -> 0 -> 2.5 (0.5).
  np.testing.assert_array_equal(
      _run(losses.cycle_consistent, flow, back, delta=1.0)[0, 0], [True, True, False, True]
  )
  np.testing.assert_array_equal(
      _run(losses.cycle_consistent, flow, back, delta=0.25)[0, 0], [True, True, False, False]
  )
  # Bilinear sampling between cells, clamped at the border.
  grid = np.arange(6, dtype=dt).reshape(1, 2, 3, 1)
  got = _run(geometry.sample_cells, grid, np.array([[[0.5, 0], [1.5, 0.5], [5, -3]]], dt))
  np.testing.assert_allclose(np.asarray(got)[0, :, 0], [0.5, 3.0, 2.0], **_tol(x64))


def test_confidence_gate_drops_the_lowest_percentile_of_the_candidates(x64):
  conf = np.array([[[0.9, 0.2, 0.5], [0.2, 0.7, 0.99]]], _dtype(x64))
  cand = np.array([[[1, 1, 1], [1, 1, 0]]], bool)  # 5 candidates; 0.99 is not one.
  gate_fn = jax.jit(losses.confidence_gate)
  gate = lambda p: _cells(gate_fn(conf, cand, p)[0])  # noqa: E731
  assert gate(0.0) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
  assert gate(20.0) == [(0, 0), (0, 2), (1, 0), (1, 1)]  # floor(1.0): the first 0.2 goes.
  assert gate(50.0) == [(0, 0), (0, 2), (1, 1)]  # floor(2.5) = 2: both 0.2s.
  assert gate(80.0) == [(0, 0)]
  assert gate(100.0) == []


def test_peak_mass_is_one_at_a_sharp_match_and_the_disc_share_when_flat(x64):
  dt = _dtype(x64)
  corr = np.zeros((1, 3, 3, 3, 3), dt)  # [b, ys, xs, yt, xt]
  corr[0, 1, 2, 0, 0] = 1.0  # Target (0, 0) matches source (x=2, y=1) sharply.
  coords = np.linspace(-1, 1, 3).astype(dt)
  mass_fn = jax.jit(flow_lib.upsampled_peak_mass, static_argnums=(1,))
  mass = np.asarray(mass_fn(corr, 3, coords, coords, 0.02, 1.0))[0]
  assert mass[0, 0] == pytest.approx(1.0, abs=1e-6)
  # Every other target sees a flat correlation: the mean is the centre, and 5 of the 9
  # source cells lie within 1 cell of it; within 1.5 cells all 9 do.
  np.testing.assert_allclose(mass.reshape(-1)[1:], 5 / 9, **_tol(x64))
  wide = np.asarray(mass_fn(corr, 3, coords, coords, 0.02, 1.5))[0]
  np.testing.assert_allclose(wide.reshape(-1)[1:], 1.0, **_tol(x64))


def test_gates_compose_and_the_selection_ranks_what_passed(x64):
  dt = _dtype(x64)
  gt = _gt(dt, {(1, 1): (1.0, 0.0)})
  teacher = np.zeros((1, 3, 3, 2), dt)
  back = np.zeros((1, 3, 3, 2), dt)
  back[0, 0, :] = (2.0, 0.0)  # The top row fails the cycle check.
  conf = np.arange(9, dtype=dt).reshape(1, 3, 3)  # Row-major rising confidence.
  options = losses.PseudoLabelOptions(gate='cycle+confidence', cycle_delta=0.5)
  signals = losses.TeacherSignals(back_flow=back, confidence=conf)
  labels = _run(_pseudo_labels, teacher, gt, signals, 50.0, options=options, dilation_kernel=3)
  # Confidence drops floor(4.5) = 4 of the 9 candidates (the lowest: cells 0-3); the cycle
  # drops the top row.
  assert _cells(labels.gate[0]) == [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
  # The small-loss selection at rate 0.5 keeps int(0.5 * 5) = 2 of those 5: the student is
  # furthest from the teacher on the gated cells but (2, 1) and (2, 2).
  student = np.full((1, 3, 3, 2), 3.0, dt)
  student[0, 2, 1] = (0.6, 0.8)
  student[0, 2, 2] = (0.0, 2.0)
  loss, terms = _run(
      losses.pseudo_label_objective,
      student,
      labels.target,
      gt,
      labels.candidates,
      losses.num_remember_table(0.5, 9),
      1.0,
      labels.gate,
  )
  assert _cells(terms.kept[0]) == [(2, 1), (2, 2)]
  assert int(terms.num_candidates) == 9 and int(terms.num_remember) == 2
  np.testing.assert_allclose(float(terms.loss_pseudo), (1.0 + 2.0) / 2, **_tol(x64))
  assert float(terms.kept_fraction) == pytest.approx(2 / 9)  # float32: a count ratio
  np.testing.assert_allclose(float(loss), float(terms.loss_sup) + 1.5, **_tol(x64))


# ------------------------------------------------------------------------------------------------
# Targets.


def test_propagated_target_spreads_labelled_displacements_by_affinity(x64):
  dt = _dtype(x64)
  # One row of 3 cells: labels at x=0 (1, 0) and x=2 (3, 0); x=1 has x=0's feature.
  feats = np.array([[[[1, 0], [1, 0], [0, 1]]]], dt)
  gt = np.zeros((2, 1, 3, 2), dt)
  gt[0, 0, 0], gt[0, 0, 2] = (1, 0), (3, 0)
  affinity = _run(losses.affinity_windows, np.concatenate([feats, feats]), size_hw=(1, 3), radius=1)
  flow, exists = _run(losses.propagate_labels, affinity, gt, temperature=1.0)
  cos = 1 / (1 + 1e-6)
  e = math.exp(cos)  # softmax weights exp(cos / T) vs exp(0 / T) at T = 1
  np.testing.assert_allclose(
      np.asarray(flow)[0, 0, :, 0], [1, (e * 1 + 3) / (e + 1), 3], **_tol(x64)
  )
  np.testing.assert_array_equal(np.asarray(flow)[..., 1], 0)
  assert np.all(exists[0]) and not np.any(exists[1])
  # Mixed with the teacher's flow where both exist; the teacher's alone on the other pair.
  teacher = np.full((2, 1, 3, 2), 5.0, dt)
  options = losses.PseudoLabelOptions(
      target='propagated', affinity_radius=1, propagation_mix=0.5, propagation_temperature=1.0
  )
  labels = _run(
      _pseudo_labels, teacher, gt, losses.TeacherSignals(affinity=affinity), options=options
  )
  np.testing.assert_allclose(
      np.asarray(labels.target)[0, 0, :, 0], [3, (5 + (e + 3) / (e + 1)) / 2, 4], **_tol(x64)
  )
  np.testing.assert_allclose(np.asarray(labels.target)[1], 5.0, **_tol(x64))


# ------------------------------------------------------------------------------------------------
# Metrics.


def test_recall_counts_the_right_candidates_that_were_kept():
  truth = np.zeros((1, 2, 3, 2), np.float32)
  pseudo = truth.copy()
  pseudo[0, 0, 1] = (3.0, 4.0)  # wrong (5 cells off)
  pseudo[0, 1, 0] = (0.5, 0.0)  # right
  candidates = np.array([[[1, 1, 1], [1, 1, 0]]], bool)
  kept = np.array([[[1, 1, 0], [0, 1, 0]]], bool)
  valid = np.ones((1, 2, 3), bool)
  valid[0, 1, 1] = False  # no truth here
  terms = losses.PseudoLabelTerms(
      jnp.float32(0), jnp.float32(0), candidates, kept, jnp.int32(3), jnp.int32(5), target=pseudo
  )
  batch = {'flow': np.zeros_like(truth), 'dense_flow': truth, 'dense_valid': valid}
  m = jax.device_get(train_step.pseudo_label_metrics(terms, None, batch))
  # Right candidates with a truth: (0, 0), (0, 2), (1, 0); kept of them: (0, 0) only.
  assert m['pseudo_recall'] == pytest.approx(1 / 3)
  assert m['kept_fraction'] == pytest.approx(3 / 5)


# ------------------------------------------------------------------------------------------------
# Through the real steps, on hand-made features.


class _Head(SCorrSAN):
  """SCorrSAN whose inputs are backbone features (no backbone parameters are created)."""

  def __call__(self, src_img, trg_img, train=False, return_aux=False):
    del train
    return self.head(src_img, trg_img, return_aux=return_aux)


def _feature(cls, unique):
  f = np.zeros(16)
  f[cls], f[4 + unique] = 0.8, 0.6  # unit norm; same class, other cell: cosine 0.64
  return f


def _features(dtype):
  """Two pairs of 3 x 3 feature grids (classes: 0 object, 1 and 2 clutter).

  Rows 0-1 are the object in both images, row 2 clutter that differs between them. Pair 0:
  target (0, 2) and source (0, 2) carry source (0, 0)'s feature, so target (0, 0) and (0, 2)
  each match source (0, 0) and (0, 2) equally (their flows are +1 and -1 cell, and their
  soft-argmax mass sits between two cells), and the round trip misses by 1 cell. Pair 1:
  every object cell matches its twin.
  """
  src = np.zeros((2, 3, 3, 16))
  for y in range(3):
    for x in range(3):
      cls = 0 if y < 2 else 1
      src[:, y, x] = _feature(cls, 3 * y + x)
  trg = src.copy()
  trg[:, 2] = [_feature(2, 9 + x) for x in range(3)]
  src[0, 0, 2] = trg[0, 0, 2] = src[0, 0, 0]
  return src.astype(dtype), trg.astype(dtype)


def _head_setup(dtype, mt=True, **teacher):
  model = _Head(use_context=False, feature_size=3)
  coords = jnp.linspace(-1, 1, 3, dtype=dtype)
  params = {'x_normal': coords, 'y_normal': coords}
  if mt:
    params = jax.tree.map(lambda x: jnp.stack([x, x]), params)
  tx = optax.sgd(1e-3)
  cfg = train_step.StepConfig(
      model=model, tx=tx, dilation_kernel=3, pseudo_label=losses.PseudoLabelOptions(**teacher)
  )
  state = train_step.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats={},
      opt_state=(jax.vmap(tx.init) if mt else tx.init)(params),
  )
  src, trg = _features(dtype)
  label = (2.0, -1.0)
  truth = np.zeros((2, 3, 3, 2), dtype)
  truth[0] = label  # what the propagated target says on pair 0
  truth[0, 0, 0], truth[0, 0, 2] = (1, 0), (-1, 0)  # the teacher's flow there
  batch = {
      'src_img': src,
      'trg_img': trg,
      'flow': _gt(dtype, {(1, 1): label}, {}),
      'dense_flow': truth,
      'dense_valid': np.ones((2, 3, 3), bool),
  }
  return cfg, state, batch


def _hparams(dtype, percentile=0.0):
  return schedules.StepHparams(
      pseudo_weight=jnp.asarray(1.0, dtype),
      remember_table=losses.num_remember_table(1.0, 2 * 9),
      confidence_percentile=jnp.asarray(percentile, jnp.float32),
  )


def test_mt_step_affinity_cycle_propagated_and_unlabelled_pairs(x64):
  """Network a's pseudo-labels from b (the same network): on pair 0 the affinity region of
  the labelled centre is the object (rows 0-1), the cycle check drops (0, 0) and (0, 2), the
  target is the centre's displacement; on pair 1 (no keypoint) the region is the object the
  correlation shows (rows 0-1), every cell of it returns, the target is the teacher's flow."""
  dt = _dtype(x64)
  cfg, state, batch = _head_setup(
      dt,
      region='affinity',
      gate='cycle',
      target='propagated',
      unlabelled_pairs='object_cycle',
      affinity_radius=1,
      cycle_delta=0.5,
  )
  hp = _hparams(dt)
  new_state, metrics = jax.jit(functools.partial(train_step.mutual_teacher_step, cfg))(
      state, batch, hp
  )
  _, (_, _, (terms_a, _), (flow_a, _)) = jax.jit(
      functools.partial(train_step.mutual_teacher_objective, cfg)
  )(state.params, {}, batch, hp)
  tol = _tol(x64)
  np.testing.assert_allclose(np.asarray(flow_a)[0, 0, [0, 2]], [[1, 0], [-1, 0]], **tol)
  object_rows = [(y, x) for y in range(2) for x in range(3)]
  assert _cells(terms_a.candidates[0]) == object_rows
  assert _cells(terms_a.candidates[1]) == object_rows
  assert _cells(terms_a.kept[0]) == [(0, 1), (1, 0), (1, 1), (1, 2)]
  assert _cells(terms_a.kept[1]) == object_rows
  np.testing.assert_allclose(
      np.asarray(terms_a.target)[0], np.broadcast_to((2.0, -1.0), (3, 3, 2)), **tol
  )
  np.testing.assert_allclose(np.asarray(terms_a.target)[1], np.asarray(flow_a)[1], **tol)
  m = jax.device_get(metrics)
  assert not m['nonfinite'] and int(new_state.step) == 1
  for net in 'ab':
    # 10 kept of 12 candidates; the student's flow is ~0: 4 kept cells of pair 0 are
    # |(2, -1)| from their target, pair 1's 6 are on it.
    assert m[f'{net}/kept_fraction'] == pytest.approx(10 / 12)
    assert m[f'{net}/loss_pseudo'] == pytest.approx(4 * math.sqrt(5) / 10, abs=1e-5)
    # Every candidate's label is right but (0, 0), (0, 2) of pair 0 (truth: the teacher's
    # flow there): all right ones were kept.
    assert m[f'{net}/pseudo_recall'] == pytest.approx(1.0)
    assert m[f'{net}/pseudo_rejected_acc'] == pytest.approx(0.0)
  assert not np.array_equal(
      np.asarray(new_state.params['x_normal']), np.asarray(state.params['x_normal'])
  )


def test_st_step_object_region_and_confidence_gate(x64):
  """A fixed teacher (the same network): the object region of pair 0 (rows 0-1; pair 1 has
  no keypoint and gets nothing), the confidence gate at percentile 34 drops the two cells
  whose soft-argmax mass sits between two source cells; a new percentile does not
  recompile."""
  dt = _dtype(x64)
  cfg, state, batch = _head_setup(
      dt, mt=False, region='object', gate='confidence', confidence_radius=0.5
  )
  state = state.replace(teacher={'params': state.params, 'batch_stats': {}})
  step = jax.jit(functools.partial(train_step.single_teacher_step, cfg))
  new_state, metrics = step(state, batch, _hparams(dt, 34.0))

  @jax.jit
  def terms_of(params, hp):
    flow, _, aux = train_step.forward(cfg, params, {}, batch, train=False, return_aux=True)
    signals = train_step.teacher_signals(cfg, params, {}, batch, flow, aux, train=False)
    return train_step.student_objective(cfg, params, {}, batch, flow, hp, signals)[1][1], signals

  terms, signals = terms_of(state.params, _hparams(dt, 34.0))
  mass = np.asarray(signals.confidence)[0]
  assert mass[0, 0] < 1e-6 and mass[0, 2] < 1e-6 and mass[1].min() > 1 - 1e-6
  object_rows = [(y, x) for y in range(2) for x in range(3)]
  assert _cells(terms.candidates[0]) == object_rows and not np.any(terms.candidates[1])
  assert _cells(terms.kept[0]) == [(0, 1), (1, 0), (1, 1), (1, 2)]
  m = jax.device_get(metrics)
  assert not m['nonfinite'] and int(new_state.step) == 1
  assert m['kept_fraction'] == pytest.approx(4 / 6)
  # Truth: the propagated label on pair 0 except the teacher's flow at (0, 0), (0, 2); the
  # teacher's ~0 flow is right only at those two, which the gate dropped.
  assert m['pseudo_recall'] == pytest.approx(0.0)
  before = step._cache_size()  # pylint: disable=protected-access
  _, metrics = step(state, batch, _hparams(dt, 0.0))
  assert step._cache_size() == before  # pylint: disable=protected-access
  assert float(metrics['kept_fraction']) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# The tiny ResNet's real mt step with every option on.


def test_tiny_model_mt_step_with_every_option():
  config = config_lib.tiny_config('mt')
  for key, value in dict(
      region='affinity',
      gate='cycle+confidence',
      target='propagated',
      unlabelled_pairs='object_cycle',
      propagation_mix=0.5,
      affinity_threshold=-1.0,
      object_threshold=0.0,
      cycle_delta=100.0,
      confidence_percentile_start=50.0,
  ).items():
    config.teacher[key] = value
  train.check_config(config)
  model = models.build_model(config)
  tx = schedules.make_optimizer(config.optim, 2)
  cfg = train_step.StepConfig.from_config(config, model, tx)
  state = train.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  b, fs = 4, 8
  flow = np.zeros((b, fs, fs, 2), np.float32)
  flow[:2, 3, 4] = (1.0, -2.0)  # pairs 2, 3 carry no keypoint
  batch = {
      'src_img': rng.normal(size=(b, 32, 32, 3)).astype(np.float32),
      'trg_img': rng.normal(size=(b, 32, 32, 3)).astype(np.float32),
      'flow': flow,
      'dense_flow': rng.normal(size=(b, fs, fs, 2)).astype(np.float32),
      'dense_valid': np.ones((b, fs, fs), bool),
  }
  hp = schedules.step_hparams(config.teacher, 0, b * fs * fs)
  assert float(hp.confidence_percentile) == 50.0
  step = jax.jit(functools.partial(train_step.mutual_teacher_step, cfg))
  new_state, metrics = step(state, batch, hp)
  m = jax.device_get(metrics)
  assert not m['nonfinite'] and np.isfinite(m['a/loss_pseudo']) and m['a/loss_pseudo'] > 0
  # Candidates: the labelled pairs' 7 x 7 windows (threshold -1 passes all) and every cell of
  # the unlabelled ones (threshold 0); the gate passes half, the selection 0.2 of those.
  assert 0 < m['a/kept_fraction'] < 0.6 and 0 <= m['a/pseudo_recall'] <= 1
  moved = [
      not np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params))
  ]
  assert all(moved)
  # A batch of unlabelled pairs only still teaches through the object region and the cycle.
  unlabelled = dict(batch, flow=np.zeros_like(flow))
  new_state, metrics = step(state, unlabelled, hp)
  assert float(metrics['a/loss_sup']) == 0.0 and float(metrics['a/loss_pseudo']) > 0
  assert not np.array_equal(
      np.asarray(new_state.params['x_normal']), np.asarray(state.params['x_normal'])
  )


# ------------------------------------------------------------------------------------------------
# Config keys, checks, sweep.


def test_defaults_are_the_papers_in_one_place():
  teacher = config_lib.base_config('synthetic').teacher
  options = train_step.pseudo_label_options(teacher)
  assert options == losses.PseudoLabelOptions()
  assert (options.region, options.gate, options.target, options.unlabelled_pairs) == (
      'square',
      'small_loss',
      'teacher_flow',
      'none',
  )
  assert not options.needs_signals
  for key, value in schedules.CONFIDENCE_PERCENTILE.items():
    assert teacher[key] == value, key
  # A config saved before the keys existed reads the defaults.
  old = teacher.to_dict()
  for key in [f.name for f in __import__('dataclasses').fields(losses.PseudoLabelOptions)]:
    old.pop(key)
  assert train_step.pseudo_label_options(old) == options


@pytest.mark.parametrize(
    'key, value, message',
    [
        ('region', 'circle', "teacher.region must be one of 'square', 'affinity', 'object'"),
        ('gate', 'small_loss+cycle', "teacher.gate must be 'small_loss' or a '\\+'-join"),
        ('gate', 'cycle+cycle', "teacher.gate must be 'small_loss' or a '\\+'-join"),
        ('target', 'teacher', "teacher.target must be one of 'teacher_flow', 'propagated'"),
        ('unlabelled_pairs', 'square', "teacher.unlabelled_pairs must be one of 'none'"),
        ('affinity_radius', -1, 'teacher.affinity_radius must be an int >= 0'),
        ('affinity_threshold', 1.5, r'teacher.affinity_threshold must be in \[-1, 1\]'),
        ('object_threshold', -0.1, r'teacher.object_threshold must be in \[0, 1\]'),
        ('cycle_delta', 0.0, r'teacher.cycle_delta must be in \(0, inf\]'),
        ('propagation_mix', 2.0, r'teacher.propagation_mix must be in \[0, 1\]'),
        ('propagation_temperature', 0.0, r'teacher.propagation_temperature must be in \(0'),
        ('confidence_percentile_end', 101.0, r'teacher.confidence_percentile_end must be in'),
        ('confidence_percentile_epochs', 0, 'teacher.confidence_percentile_epochs must be'),
    ],
)
def test_unknown_values_are_one_config_error(key, value, message):
  config = config_lib.tiny_config('mt')
  config.teacher[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    train.check_config(config)


def test_strategies_sweep_reaches_every_option_and_compiles_apart():
  sweep = config_lib.get_sweep('strategies')
  assert list(sweep)[:2] == ['baseline', 'mt'] and sweep['mt'] == {'learning_mode': 'mt'}
  expected = {
      'mt_region_affinity',
      'mt_region_object',
      'mt_gate_cycle',
      'mt_gate_confidence',
      'mt_target_propagated',
      'mt_unlabelled_pairs_object_cycle',
  }
  expected |= {f'mt_{name}' for name in config_lib.STRATEGY_COMBINATIONS}
  assert 'mt_object_confidence_propagated' in expected  # The one chosen at k = 1.
  assert set(sweep) == {'baseline', 'mt'} | expected
  keys = set()
  for name, overrides in sweep.items():
    config = config_lib.apply_overrides(config_lib.tiny_config('mt'), overrides)
    train.check_config(config)
    options = train_step.pseudo_label_options(config.teacher)
    for key, value in overrides.items():
      if key.startswith('teacher.'):
        assert getattr(options, key[len('teacher.') :]) == value, name
    setup = types.SimpleNamespace(
        config=config,
        steps_per_epoch=2,
        abstract_batch={},
        mesh=types.SimpleNamespace(devices=np.array([])),
        step_config=types.SimpleNamespace(pseudo_label=options),
    )
    keys.add(train._compile_key(setup))  # pylint: disable=protected-access
  assert len(keys) == len(sweep)  # No cell reuses another's compiled step.
  # A named combination is one more cell; the others stay as they were.
  combination = {'teacher.region': 'affinity', 'teacher.gate': 'cycle'}
  config_lib.STRATEGY_COMBINATIONS['affinity_cycle'] = combination
  try:
    with_combination = config_lib.get_sweep('strategies')
  finally:
    del config_lib.STRATEGY_COMBINATIONS['affinity_cycle']
  assert with_combination == {**sweep, 'mt_affinity_cycle': {'learning_mode': 'mt', **combination}}


def test_confidence_percentile_schedule():
  teacher = config_lib.base_config('synthetic').teacher  # start epoch 4, 20 -> 80 over 10
  assert schedules.confidence_percentile(teacher, 0) == 20.0
  assert schedules.confidence_percentile(teacher, 4) == 20.0
  assert schedules.confidence_percentile(teacher, 7) == pytest.approx(40.0)
  assert schedules.confidence_percentile(teacher, 13) == 80.0
  assert schedules.confidence_percentile(teacher, 99) == 80.0
  assert float(schedules.step_hparams(teacher, 7, 10).confidence_percentile) == 40.0


def test_unknown_value_on_the_command_line_is_one_error_line(tmp_path):
  """What a check outside the repository sees: exit 2 and one last `error:` line."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'sccorr_jax.main',
          f'--config={root}/configs/demo.py:tiny',
          f'--workdir={tmp_path / "w"}',
          '--config.teacher.gate=cycles',
      ],
      cwd=tmp_path,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert r.returncode == 2, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert [x for x in lines if x.startswith('error:')] == lines[-1:], r.stderr[-3000:]
  assert "teacher.gate must be 'small_loss' or a '+'-join" in lines[-1]
  assert 'Traceback' not in r.stderr
