"""Losses against the reference (losses.npz, the objective part of mt_step.npz) and properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sccorr_jax import losses

# Fixture README tolerances: x64 rtol 1e-12 (the reference ran in float64 on the upcast float32
# inputs); float32 rtol 1e-5; masks, counts and selected indices exact. mt_step losses: x64
# rtol 1e-10, float32 rtol 1e-5.
RTOL = {True: 1e-12, False: 1e-5}
MT_RTOL = {True: 1e-10, False: 1e-5}
PRECISIONS = pytest.mark.parametrize("x64", [True, False], ids=["x64", "f32"])


def _nhwc(a, x64):
  """(b, 2, h, w) fixture flow -> [b, h, w, 2] in the tested dtype."""
  return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).astype(np.float64 if x64 else np.float32)


@pytest.fixture(scope="module")
def ref(fixtures_dir):
  return dict(np.load(fixtures_dir / "losses.npz"))


@pytest.fixture(scope="module")
def mt(fixtures_dir):
  return dict(np.load(fixtures_dir / "mt_step.npz"))


# ------------------------------------------------------------------------------------------------
# losses.npz


@PRECISIONS
def test_sparse_epe_matches_reference(ref, x64):
  with jax.enable_x64(x64):
    gt = _nhwc(ref["gt_flow"], x64)
    for m in "ab":
      epe = losses.sparse_epe(_nhwc(ref[f"pred_flow_{m}"], x64), gt)
      assert epe.dtype == (jnp.float64 if x64 else jnp.float32)
      np.testing.assert_allclose(float(epe), ref[f"epe_{m}"], rtol=RTOL[x64], atol=0)


def test_sparse_epe_without_labels_is_nan_and_sum_count_is_zero():
  pred = jnp.ones((2, 4, 4, 2), jnp.float32)
  gt = jnp.zeros((2, 4, 4, 2), jnp.float32)
  assert np.isnan(float(losses.sparse_epe(pred, gt)))
  total, count = losses.sparse_epe_sum_count(pred, gt)
  assert float(total) == 0.0 and int(count) == 0


def test_sparse_epe_is_a_batch_mean_and_uses_the_both_zero_rule():
  gt = np.zeros((2, 3, 3, 2), np.float32)
  gt[0, 0, 0] = (3.0, 0.0)  # one zero component: still labelled
  gt[1, 1, 2] = (0.0, -4.0)
  gt[1, 2, 2] = (1.0, 1.0)
  pred = np.zeros_like(gt)
  pred[1, 2, 2] = (1.0, 1.0)  # exact hit: error 0
  # Errors 3, 4, 0 over the batch: mean 7/3 (a mean of per-image means would be 2.5).
  np.testing.assert_allclose(float(losses.sparse_epe(pred, gt)), 7.0 / 3.0, rtol=1e-6)


@PRECISIONS
def test_dilated_mask_matches_reference(ref, x64):
  with jax.enable_x64(x64):
    mask = losses.dilated_label_mask(_nhwc(ref["gt_flow"], x64), int(ref["pseudo_ksize"]))
  np.testing.assert_array_equal(np.asarray(mask), ref["dilated_mask"])


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_dilated_mask_matches_a_brute_force_window(k):
  rng = np.random.default_rng(k)
  gt = np.where(rng.uniform(size=(2, 9, 13, 1)) < 0.05, rng.normal(size=(2, 9, 13, 2)), 0.0)
  gt[0, 0, 12] = (1.0, 0.0)  # corners and edges exercise the zero padding
  gt[1, 8, 0] = (0.0, 2.0)
  gt = gt.astype(np.float32)
  labelled = np.any(gt != 0, axis=-1)
  p = k // 2
  padded = np.pad(labelled, ((0, 0), (p, p), (p, p)))
  want = np.zeros_like(labelled)
  for dy in range(k):
    for dx in range(k):
      want |= padded[:, dy : dy + 9, dx : dx + 13]
  got = jax.jit(losses.dilated_label_mask, static_argnums=1)(gt, k)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_dilated_mask_rejects_even_kernels():
  with pytest.raises(ValueError):
    losses.dilated_label_mask(jnp.zeros((1, 4, 4, 2)), 4)


@PRECISIONS
def test_pseudo_vectors_match_reference(ref, x64):
  with jax.enable_x64(x64):
    a, b = _nhwc(ref["pred_flow_a"], x64), _nhwc(ref["pred_flow_b"], x64)
    mask = ref["dilated_mask"]
    vec_a = np.asarray(losses.pseudo_label_epe(a, b))
    vec_b = np.asarray(losses.pseudo_label_epe(b, a))
  # Boolean-mask order is row-major (b, y, x), the reference's gather order.
  for m, vec in (("a", vec_a), ("b", vec_b)):
    np.testing.assert_allclose(vec[mask], ref[f"pseudo_vec_{m}"], rtol=RTOL[x64], atol=0)
    np.testing.assert_allclose(vec[mask].mean(), ref[f"pseudo_mean_{m}"], rtol=RTOL[x64])


@PRECISIONS
def test_selection_of_dilated_vectors_matches_reference(ref, x64):
  with jax.enable_x64(x64):
    a, b = _nhwc(ref["pred_flow_a"], x64), _nhwc(ref["pred_flow_b"], x64)
    vec_a, vec_b = losses.pseudo_label_epe(a, b), losses.pseudo_label_epe(b, a)
    for i, rate in enumerate(ref["remember_rates"]):
      sel = losses.small_loss_selection_with_masks(vec_a, vec_b, ref["dilated_mask"], float(rate))
      assert int(sel.num_remember) == ref["selection_num_remember"][i]
      assert int(sel.num_candidates) == ref["pseudo_vec_a"].shape[0]
      np.testing.assert_allclose(
          [float(sel.loss_a), float(sel.loss_b)], ref["selection_losses"][i], rtol=RTOL[x64], atol=0
      )
      # Equal vectors choose the same positions: the exchange is a no-op in training.
      np.testing.assert_array_equal(np.asarray(sel.kept_a), np.asarray(sel.kept_b))


def _vec_case(ref, i, dtype):
  """The i-th direct case as [1, 1, 100] maps; the unused tail holds NaN garbage."""
  n = int(ref["vec_lengths"][i])
  l1 = np.full((1, 1, 100), np.nan, dtype)
  l2 = np.full((1, 1, 100), np.nan, dtype)
  l1[0, 0, :n] = ref["vec_loss_1"][i, :n]
  l2[0, 0, :n] = ref["vec_loss_2"][i, :n]
  return l1, l2, np.arange(100).reshape(1, 1, 100) < n


@PRECISIONS
def test_selection_exchange_matches_reference(ref, x64):
  dtype = np.float64 if x64 else np.float32
  with jax.enable_x64(x64):
    for i in range(3):
      l1, l2, mask = _vec_case(ref, i, dtype)
      rate = float(ref["vec_rates"][i])
      sel = losses.small_loss_selection_with_masks(l1, l2, mask, rate)
      k = int(ref["vec_num_remember"][i])
      assert int(sel.num_remember) == k
      got = losses.small_loss_selection(l1, l2, mask, rate)
      np.testing.assert_allclose(
          [float(got[0]), float(got[1])], ref["vec_selection_losses"][i], rtol=RTOL[x64], atol=0
      )
      # The exchange is visible: loss_1 is averaged where loss_2 is smallest, and vice versa.
      n = int(ref["vec_lengths"][i])
      v1, v2 = l1[0, 0, :n].astype(np.float64), l2[0, 0, :n].astype(np.float64)
      i1, i2 = np.argsort(v1)[:k], np.argsort(v2)[:k]
      np.testing.assert_array_equal(np.flatnonzero(np.asarray(sel.kept_a)), np.sort(i1))
      np.testing.assert_array_equal(np.flatnonzero(np.asarray(sel.kept_b)), np.sort(i2))
      if set(i1) != set(i2):
        assert not np.isclose(float(got[0]), v1[i1].mean(), rtol=1e-6)


def test_num_remember_table_truncates_like_python():
  assert losses.num_remember_table(0.29, 100)[100] == 28
  assert losses.num_remember_table(0.5111111111111111, 225)[225] == 114
  n_max = 13000
  rates = list(np.linspace(0.2, 0.9, 10)) + [0.0, 0.29, 0.5111111111111111, 1.0]
  for rate in rates:
    table = losses.num_remember_table(rate, n_max)
    assert table.dtype == np.int32 and table.shape == (n_max + 1,)
    want = np.array([max(1, int(float(rate) * n)) for n in range(n_max + 1)])
    np.testing.assert_array_equal(table, want, err_msg=str(rate))
  with pytest.raises(ValueError):
    losses.num_remember_table(1.5, 10)


def test_selection_with_a_table_argument_does_not_retrace(ref):
  l1, l2, mask = _vec_case(ref, 0, np.float32)
  traces = []

  @jax.jit
  def step(l1, l2, mask, table):
    traces.append(None)
    return losses.small_loss_selection(l1, l2, mask, table)

  for rate in (0.2, 0.29, 0.5111111111111111, 0.9):
    got = step(l1, l2, mask, losses.num_remember_table(rate, mask.size))
    want = losses.small_loss_selection(l1, l2, mask, rate)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6)
  assert len(traces) == 1


def test_traced_rate_is_rejected_and_short_tables_too():
  x = jnp.ones((1, 2, 3))
  m = jnp.ones((1, 2, 3), bool)
  with pytest.raises(TypeError, match="num_remember_table"):
    jax.jit(lambda r: losses.small_loss_selection(x, x, m, r))(0.5)
  with pytest.raises(ValueError):
    losses.small_loss_selection(x, x, m, losses.num_remember_table(0.5, 5))


def test_empty_mask_gives_zero_and_zero_gradient():
  loss = jnp.full((2, 3, 4), jnp.nan)  # garbage everywhere outside the (empty) mask
  mask = jnp.zeros((2, 3, 4), bool)
  a, b = losses.small_loss_selection(loss, loss, mask, 0.5)
  assert float(a) == 0.0 and float(b) == 0.0
  g = jax.grad(lambda l: losses.small_loss_selection(l, l, mask, 0.5)[0])(loss)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_selection_gradient_reaches_only_the_peer_chosen_positions(ref):
  l1, l2, mask = _vec_case(ref, 0, np.float32)
  sel = losses.small_loss_selection_with_masks(l1, l2, mask, 0.29)
  k = int(sel.num_remember)
  ga, gb = jax.grad(lambda a, b: losses.small_loss_selection(a, b, mask, 0.29)[0], argnums=(0, 1))(
      jnp.asarray(l1), jnp.asarray(l2)
  )
  # d sel_a / d loss_a = 1/k on the positions loss_b chose; nothing through the sort, nothing
  # from the NaN garbage outside the mask.
  np.testing.assert_allclose(
      np.asarray(ga), np.where(np.asarray(sel.kept_b), 1.0 / k, 0.0), rtol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(gb), 0.0)


def test_safe_norm_value_and_gradient():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(losses.safe_norm(x)), [5.0, 0.0])
  g = jax.grad(lambda x: losses.safe_norm(x).sum())(x)
  np.testing.assert_allclose(np.asarray(g), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
  g0 = jax.grad(lambda x: losses.safe_norm(x, axis=0).sum())(x)
  np.testing.assert_allclose(np.asarray(g0), [[1.0, 1.0], [0.0, 0.0]], rtol=1e-6)
  # Second order stays finite too (e.g. Hessian-vector products in diagnostics).
  h = jax.hessian(lambda v: losses.safe_norm(v))(jnp.array([0.0, 0.0]))
  assert np.isfinite(np.asarray(h)).all()


# ------------------------------------------------------------------------------------------------
# mt_step.npz: the pseudo-label objective, fed with the stored flows (the whole step, with
# gradients, is checked in test_mt_objective.py).


def _objective(mt, x64, own="a"):
  rate = float(mt["remember_rate"])
  flows = {"a": _nhwc(mt["flow_a"], x64), "b": _nhwc(mt["flow_b"], x64)}
  gt = _nhwc(mt["gt_flow"], x64)
  peer = "b" if own == "a" else "a"
  mask = losses.dilated_label_mask(gt, int(mt["pseudo_ksize"]))
  fn = jax.jit(
      lambda f, p, g, m: losses.pseudo_label_objective(
          f, p, g, m, losses.num_remember_table(rate, m.size), float(mt["lambda_pseudo"])
      )
  )
  return fn(flows[own], flows[peer], gt, mask)


@PRECISIONS
def test_pseudo_label_objective_matches_mt_step(mt, x64):
  rtol = MT_RTOL[x64]
  with jax.enable_x64(x64):
    for own in "ab":
      loss, terms = _objective(mt, x64, own)
      for got, key in (
          (loss, f"loss_{own}"),
          (terms.loss_sup, f"epe_gt_{own}"),
          (terms.loss_pseudo, f"pseudo_loss_{own}"),
      ):
        np.testing.assert_allclose(float(got), mt[key], rtol=rtol, atol=0, err_msg=key)
      assert int(terms.num_candidates) == mt["n_dilated"]
      assert int(terms.num_remember) == mt["num_remember"]
      kept = np.asarray(terms.kept)
      assert not (kept & ~np.asarray(terms.candidates)).any()
      np.testing.assert_array_equal(
          np.flatnonzero(kept[np.asarray(terms.candidates)]), mt["selected_index"]
      )
      np.testing.assert_allclose(float(terms.kept_fraction), mt["num_remember"] / mt["n_dilated"])


def test_pseudo_label_objective_gradient_is_own_and_finite_when_flows_coincide(mt):
  gt = _nhwc(mt["gt_flow"], False)
  flow, peer = _nhwc(mt["flow_a"], False), _nhwc(mt["flow_b"], False)
  mask = losses.dilated_label_mask(gt, 7)

  def loss(f, p):
    return losses.pseudo_label_objective(f, p, gt, mask, 0.2, 10.0)[0]

  # Identical flows: every pseudo distance is exactly 0, and the gradient stays finite.
  g_own, g_peer = jax.grad(loss, argnums=(0, 1))(flow, flow)
  assert np.isfinite(np.asarray(g_own)).all()
  # The pseudo-label is a constant target: no gradient reaches the peer (or teacher).
  np.testing.assert_array_equal(np.asarray(jax.grad(loss, argnums=1)(flow, peer)), 0.0)
  np.testing.assert_array_equal(np.asarray(g_peer), 0.0)
  # The distance is symmetric to the bit, so both networks keep the same positions (the
  # reference's exchange is the identity).
  _, ta = losses.pseudo_label_objective(flow, peer, gt, mask, 0.2, 10.0)
  _, tb = losses.pseudo_label_objective(peer, flow, gt, mask, 0.2, 10.0)
  np.testing.assert_array_equal(np.asarray(ta.kept), np.asarray(tb.kept))
