"""The mutual-teacher objective through the network head, with gradients (mt_step.npz).

Two heads (SCE -> L2 norm -> correlation -> mutual-NN -> upsampling -> soft-argmax -> flow) on
fixed backbone features; each model's loss uses the other's flow as a constant pseudo-label.
The gradients w.r.t. the SCE parameters, the trainable coordinate vectors and the input features
check the backward pass of every part (the SCE through both its raw and self-similarity paths).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sccorr_jax import losses
from sccorr_jax.models import SCorrSAN

nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))


def _params(fx, m, dtype):
  return {"sce": {"conv": {"kernel": fx[f"{m}_sce_weight"][:, :, 0, 0].T.astype(dtype),
                           "bias": fx[f"{m}_sce_bias"].astype(dtype)}},
          "x_normal": fx[f"{m}_x_normal"].astype(dtype),
          "y_normal": fx[f"{m}_y_normal"].astype(dtype)}


@pytest.mark.parametrize("mode", ["x64", "f32"])
def test_mt_step_objective_and_gradients(fixtures_dir, mode):
  fx = dict(np.load(fixtures_dir / "mt_step.npz"))
  dtype = np.float64 if mode == "x64" else np.float32
  sce_out = fx["a_sce_bias"].shape[0]
  model = SCorrSAN(sce_kernel_size=int(fx["sce_ksize"]), sce_features=sce_out,
                   feature_size=int(fx["feature_size"]))
  rate = float(fx["remember_rate"])
  lam = float(fx["lambda_pseudo"])
  k = int(fx["pseudo_ksize"])

  def head(params, src, trg):
    return model.apply({"params": params}, src, trg, method=SCorrSAN.head)

  def total(pa, pb, src, trg, gt):
    fa, fb = head(pa, src, trg), head(pb, src, trg)
    la, lb, aux = losses.mutual_teacher_objective(fa, fb, gt, pseudo_kernel_size=k,
                                                  remember_rate=rate, pseudo_weight=lam)
    # Each loss only reaches its own network (the peer's flow is a stop-gradient target), so
    # the gradient of the sum w.r.t. each network is that network's own gradient.
    return la + lb, (la, lb, fa, fb, aux)

  with jax.enable_x64(mode == "x64"):
    pa, pb = _params(fx, "a", dtype), _params(fx, "b", dtype)
    src = jnp.asarray(nhwc(fx["src_feat"]).astype(dtype))
    trg = jnp.asarray(nhwc(fx["trg_feat"]).astype(dtype))
    gt = jnp.asarray(nhwc(fx["gt_flow"]).astype(dtype))
    grad_fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3), has_aux=True))
    (_, (la, lb, fa, fb, aux)), grads = grad_fn(pa, pb, src, trg, gt)
    # Per-model gradients w.r.t. the shared features: differentiate each loss separately.
    ga_feat = jax.grad(lambda s, t: total(pa, jax.lax.stop_gradient(pb), s, t, gt)[1][0],
                       argnums=(0, 1))(src, trg)
    gb_feat = jax.grad(lambda s, t: total(jax.lax.stop_gradient(pa), pb, s, t, gt)[1][1],
                       argnums=(0, 1))(src, trg)
  x64 = mode == "x64"
  np.testing.assert_allclose(fa, nhwc(fx["flow_a"]), atol=1e-9 if x64 else 1e-4, rtol=0)
  np.testing.assert_allclose(fb, nhwc(fx["flow_b"]), atol=1e-9 if x64 else 1e-4, rtol=0)
  ltol = 1e-10 if x64 else 1e-5
  np.testing.assert_allclose(la, fx["loss_a"], rtol=ltol)
  np.testing.assert_allclose(lb, fx["loss_b"], rtol=ltol)
  np.testing.assert_allclose(aux["epe_a"], fx["epe_gt_a"], rtol=ltol)
  np.testing.assert_allclose(aux["pseudo_b"], fx["pseudo_loss_b"], rtol=ltol)
  assert int(aux["n_dilated"]) == int(fx["n_dilated"])
  assert int(aux["num_remember"]) == int(fx["num_remember"])
  kept = np.flatnonzero(np.asarray(aux["kept_a"])[np.asarray(aux["dilated_mask"])])
  np.testing.assert_array_equal(kept, fx["selected_index"])

  # Gradients: |d| <= 1e-8 * max|ref| per array in float64, 2e-4 * max|ref| in float32.
  gtol = 1e-8 if x64 else 2e-4

  def close(ours, ref, name):
    ours = np.asarray(ours)
    assert np.abs(ours - ref).max() <= gtol * np.abs(ref).max(), name

  for m, g, gfeat in (("a", grads[0], ga_feat), ("b", grads[1], gb_feat)):
    close(g["sce"]["conv"]["kernel"], fx[f"{m}_grad_sce_weight"][:, :, 0, 0].T, f"{m} weight")
    close(g["sce"]["conv"]["bias"], fx[f"{m}_grad_sce_bias"], f"{m} bias")
    close(g["x_normal"], fx[f"{m}_grad_x_normal"], f"{m} x_normal")
    close(g["y_normal"], fx[f"{m}_grad_y_normal"], f"{m} y_normal")
    close(gfeat[0], nhwc(fx[f"{m}_grad_src_feat"]), f"{m} src_feat")
    close(gfeat[1], nhwc(fx[f"{m}_grad_trg_feat"]), f"{m} trg_feat")
