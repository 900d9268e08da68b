"""The mutual-teacher training step against the reference's `mt_step.npz`, with gradients.

The fixture is one step of the reference's two networks on fixed backbone features: two heads
(SCE -> L2 norm -> correlation -> mutual-NN -> upsampling -> soft-argmax -> flow), each loss
using the other's flow as a constant pseudo-label. It is checked through
`train_step.mutual_teacher_step` itself, the function training compiles: the model is SCorrSAN
fed with the features in place of images (`_Head`), and the optimiser is a recorder whose state
is the gradient it was given, so the step's own vmapped update hands back each network's exact
gradient. The gradients w.r.t. the input features (through `mutual_teacher_objective`, what the
step differentiates) check the backward of every head part, the SCE through both its raw and
self-similarity paths.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sccorr_jax import losses
from sccorr_jax import train_step
from sccorr_jax.models import SCorrSAN
from sccorr_jax.schedules import StepHparams

nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))


class _Head(SCorrSAN):
  """SCorrSAN whose inputs are backbone features (no backbone parameters are created)."""

  def __call__(self, src_img, trg_img, train=False, return_aux=False):
    del train
    return self.head(src_img, trg_img, return_aux=return_aux)


def _gradient_recorder() -> optax.GradientTransformation:
  """A 'optimiser' that leaves the parameters alone and keeps the last gradient as its state."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


def _params(fx, m, dtype):
  return {
      "sce": {
          "conv": {
              "kernel": fx[f"{m}_sce_weight"][:, :, 0, 0].T.astype(dtype),
              "bias": fx[f"{m}_sce_bias"].astype(dtype),
          }
      },
      "x_normal": fx[f"{m}_x_normal"].astype(dtype),
      "y_normal": fx[f"{m}_y_normal"].astype(dtype),
  }


@pytest.mark.parametrize("mode", ["x64", "f32"])
def test_mt_step_matches_reference(fixtures_dir, mode):
  fx = dict(np.load(fixtures_dir / "mt_step.npz"))
  x64 = mode == "x64"
  dtype = np.float64 if x64 else np.float32
  model = _Head(
      sce_kernel_size=int(fx["sce_ksize"]),
      sce_features=fx["a_sce_bias"].shape[0],
      feature_size=int(fx["feature_size"]),
  )
  cfg = train_step.StepConfig(
      model=model, tx=_gradient_recorder(), dilation_kernel=int(fx["pseudo_ksize"])
  )

  with jax.enable_x64(x64):
    params = jax.tree.map(
        lambda a, b: jnp.stack([a, b]), _params(fx, "a", dtype), _params(fx, "b", dtype)
    )
    state = train_step.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={},
        opt_state=jax.vmap(cfg.tx.init)(params),
    )
    batch = {
        "src_img": jnp.asarray(nhwc(fx["src_feat"]).astype(dtype)),
        "trg_img": jnp.asarray(nhwc(fx["trg_feat"]).astype(dtype)),
        "flow": jnp.asarray(nhwc(fx["gt_flow"]).astype(dtype)),
    }
    n = int(np.prod(batch["flow"].shape[:-1]))
    hp = StepHparams(
        pseudo_weight=jnp.asarray(float(fx["lambda_pseudo"]), dtype),
        remember_table=losses.num_remember_table(float(fx["remember_rate"]), n),
    )
    step = jax.jit(functools.partial(train_step.mutual_teacher_step, cfg))
    new_state, metrics = step(state, batch, hp)
    # What the step differentiates, for the flows, the selection and the feature gradients.
    objective = jax.jit(functools.partial(train_step.mutual_teacher_objective, cfg))
    _, (_, _, (terms_a, terms_b), (fa, fb)) = objective(params, {}, batch, hp)

    def own_loss(i, src, trg):
      return train_step.mutual_teacher_objective(
          cfg, params, {}, dict(batch, src_img=src, trg_img=trg), hp
      )[1][1][i]

    feat_grads = [
        jax.jit(jax.grad(functools.partial(own_loss, i), argnums=(0, 1)))(
            batch["src_img"], batch["trg_img"]
        )
        for i in range(2)
    ]

  metrics = jax.device_get(metrics)
  assert not metrics["nonfinite"] and int(new_state.step) == 1
  np.testing.assert_allclose(fa, nhwc(fx["flow_a"]), atol=1e-9 if x64 else 1e-4, rtol=0)
  np.testing.assert_allclose(fb, nhwc(fx["flow_b"]), atol=1e-9 if x64 else 1e-4, rtol=0)
  ltol = 1e-10 if x64 else 1e-5
  for key, ref in (
      ("a/loss", "loss_a"),
      ("b/loss", "loss_b"),
      ("a/loss_sup", "epe_gt_a"),
      ("b/loss_sup", "epe_gt_b"),
      ("a/loss_pseudo", "pseudo_loss_a"),
      ("b/loss_pseudo", "pseudo_loss_b"),
  ):
    np.testing.assert_allclose(metrics[key], fx[ref], rtol=ltol, err_msg=key)
  for terms in (terms_a, terms_b):
    assert int(terms.num_candidates) == int(fx["n_dilated"])
    assert int(terms.num_remember) == int(fx["num_remember"])
    kept = np.flatnonzero(np.asarray(terms.kept)[np.asarray(terms.candidates)])
    np.testing.assert_array_equal(kept, fx["selected_index"])
  assert metrics["a/kept_fraction"] == pytest.approx(fx["num_remember"] / fx["n_dilated"])

  # Gradients: |d| <= 1e-8 * max|ref| per array in float64, 2e-4 * max|ref| in float32.
  gtol = 1e-8 if x64 else 2e-4

  def close(ours, ref, name):
    ours = np.asarray(ours)
    assert np.abs(ours - ref).max() <= gtol * np.abs(ref).max(), name

  grads = new_state.opt_state  # The recorder's state: the gradient of each network, stacked.
  for i, m in enumerate("ab"):
    g = jax.tree.map(lambda x, i=i: np.asarray(x)[i], grads)
    close(g["sce"]["conv"]["kernel"], fx[f"{m}_grad_sce_weight"][:, :, 0, 0].T, f"{m} weight")
    close(g["sce"]["conv"]["bias"], fx[f"{m}_grad_sce_bias"], f"{m} bias")
    close(g["x_normal"], fx[f"{m}_grad_x_normal"], f"{m} x_normal")
    close(g["y_normal"], fx[f"{m}_grad_y_normal"], f"{m} y_normal")
    close(feat_grads[i][0], nhwc(fx[f"{m}_grad_src_feat"]), f"{m} src_feat")
    close(feat_grads[i][1], nhwc(fx[f"{m}_grad_trg_feat"]), f"{m} trg_feat")
  # The recorder never moves a parameter: the step applied exactly what it was given.
  for x, y in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
