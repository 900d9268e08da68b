"""The backbone's hand-written gradients (BatchNorm (+ ReLU), the output-saving ReLU, the
residual-stream materialisation) against JAX autodiff of the plain expressions in float64, and
what they are for: a trunk's training step keeps much less activation memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sccorr_jax.models import backbone as bb
from sccorr_jax.models import batchnorm as bn


def _plain_bn(x, scale, bias, mean=None, var=None, *, groups=1, relu=False, eps=1e-5):
  """BatchNorm the way autodiff sees it (batch statistics per group unless mean/var given)."""
  if mean is None:
    xg = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    m = jnp.mean(xg, axis=axes, keepdims=True)
    v = jnp.mean(jnp.square(xg - m), axis=axes, keepdims=True)
    y = ((xg - m) * jax.lax.rsqrt(v + eps)).reshape(x.shape)
  else:
    y = (x - mean) * jax.lax.rsqrt(var + eps)
  y = y * scale + bias
  return jax.nn.relu(y) if relu else y


def _inputs(seed, shape=(4, 5, 6, 3)):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = rng.normal(1.5, 2.0, shape)  # a non-zero mean, as after a convolution
  return (
      jnp.asarray(x),
      jnp.asarray(rng.normal(1.0, 0.5, c)),
      jnp.asarray(rng.normal(0, 0.5, c)),
      jnp.asarray(rng.normal(0, 1.0, shape)),
  )


def _close(a, b, name):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, name
  np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(b).max()), err_msg=name)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_batch_statistics_bn_matches_autodiff(relu, groups):
  with jax.enable_x64(True):
    x, scale, bias, w = _inputs(groups + 2 * relu)
    module = bn.BatchNorm(relu=relu)
    variables = module.init(jax.random.PRNGKey(0), x)

    def ours(x, scale, bias):
      v = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}
      y, _ = module.apply(
          v, x, use_running_average=False, num_groups=groups, mutable=["batch_stats"]
      )
      return y

    plain = functools.partial(_plain_bn, groups=groups, relu=relu)
    _close(ours(x, scale, bias), plain(x, scale, bias), "forward")
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
    g_ours = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
    g_plain = jax.grad(loss(plain), argnums=(0, 1, 2))(x, scale, bias)
    for name, a, b in zip(("x", "scale", "bias"), g_ours, g_plain):
      _close(a, b, name)
    # The groups really are separate: a group's input gets no gradient from another's output.
    if groups == 2:
      half = jax.grad(lambda x: jnp.sum(ours(x, scale, bias)[:2] * w[:2]))(x)
      assert np.all(np.asarray(half[2:]) == 0)


@pytest.mark.parametrize("relu", [False, True])
def test_running_statistics_bn_matches_autodiff(relu):
  with jax.enable_x64(True):
    x, scale, bias, w = _inputs(7)
    rng = np.random.default_rng(8)
    mean, var = jnp.asarray(rng.normal(1.0, 1.0, 3)), jnp.asarray(rng.uniform(0.5, 4.0, 3))

    def ours(x, scale, bias, mean, var):
      return bn._bn_fixed(x, scale, bias, mean, var, 1e-5, relu, jnp.dtype(jnp.float64))  # pylint: disable=protected-access

    plain = lambda x, s, b, m, v: _plain_bn(x, s, b, m, v, relu=relu)
    args = (x, scale, bias, mean, var)
    _close(ours(*args), plain(*args), "forward")
    # Through the module too (use_running_average=True reads the batch_stats).
    module = bn.BatchNorm(relu=relu)
    v = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
    _close(module.apply(v, x), plain(*args), "module forward")
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
    g_ours = jax.grad(loss(ours), argnums=range(5))(*args)
    g_plain = jax.grad(loss(plain), argnums=range(5))(*args)
    for name, a, b in zip(("x", "scale", "bias", "mean", "var"), g_ours, g_plain):
      _close(a, b, name)


def test_relu_saving_its_output_matches_autodiff():
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 5)))
    x = x.at[0, 0, :2].set(0.0)  # the kink: both give 0 there
    w = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))
    _close(bn.relu(x), jax.nn.relu(x), "forward")
    _close(
        jax.grad(lambda x: jnp.sum(bn.relu(x) * w))(x),
        jax.grad(lambda x: jnp.sum(jax.nn.relu(x) * w))(x),
        "grad",
    )


def test_materialize_is_the_identity_with_the_identity_gradient():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 5)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
  np.testing.assert_array_equal(jax.jit(bb.materialize)(x), x)
  np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: jnp.sum(bb.materialize(x) * w)))(x), w)


def test_bfloat16_bn_gradient_close_to_float32():
  x, scale, bias, w = (a.astype(jnp.float32) for a in _inputs(3, (4, 8, 8, 16)))
  x = x.astype(jnp.bfloat16).astype(jnp.float32)  # the same input values for both
  module = bn.BatchNorm(relu=True)
  bf16 = bn.BatchNorm(relu=True, dtype=jnp.bfloat16)
  variables = module.init(jax.random.PRNGKey(0), x)

  def grads(m, x):
    def loss(x, params):
      y, _ = m.apply(
          {"params": params, "batch_stats": variables["batch_stats"]},
          x,
          use_running_average=False,
          num_groups=2,
          mutable=["batch_stats"],
      )
      return jnp.sum(y.astype(jnp.float32) * w)

    return jax.grad(loss, argnums=(0, 1))(x, variables["params"])

  (gx32, gp32), (gx16, gp16) = grads(module, x), grads(bf16, x.astype(jnp.bfloat16))
  assert gx16.dtype == jnp.bfloat16 and gp16["scale"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(gx16, np.float32), gx32, atol=0.05 * np.abs(gx32).max())
  for k in ("scale", "bias"):
    np.testing.assert_allclose(gp16[k], gp32[k], atol=0.02 * np.abs(gp32[k]).max())


def _trunk_grad(x, groups, train=True):
  model = bb.resnet(50, stage_sizes=(1, 1, 1, 1), width=8)
  variables = model.init(jax.random.PRNGKey(0), x[:groups])
  # Running statistics away from the initial (0, 1), so the frozen path is exercised.
  variables = {
      "params": variables["params"],
      "batch_stats": jax.tree.map(lambda a: a + 0.5, variables["batch_stats"]),
  }

  def loss(params):
    (f, _), _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        train=train,
        num_groups=groups,
        mutable=["batch_stats"],
    )
    return jnp.sum(jnp.sin(f))

  return model, variables, jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize("train", [True, False])
def test_trunk_gradient_matches_plain_autodiff(train):
  """The whole tiny trunk (two groups; batch or running statistics): every parameter's
  gradient equals autodiff of the plain expressions."""
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)))
    _, variables, vg = _trunk_grad(x, 2, train)
    loss, grads = vg(variables["params"])
    with bn.plain_autodiff():
      _, _, vg_plain = _trunk_grad(x, 2, train)
      loss_plain, grads_plain = vg_plain(variables["params"])
  _close(loss, loss_plain, "loss")
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(jax.tree.leaves(grads_plain)) > 20
  for (path, a), b in zip(flat, jax.tree.leaves(grads_plain)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-9 * np.abs(b).max(), jax.tree_util.keystr(path)


def test_training_step_keeps_less_activation_memory():
  """XLA's temporary memory of a trunk's forward+backward, custom gradients vs autodiff."""
  x = jnp.zeros((4, 32, 32, 3), jnp.float32)
  _, variables, vg = _trunk_grad(x, 2)
  ours = vg.lower(variables["params"]).compile().memory_analysis()
  with bn.plain_autodiff():
    _, variables, vg_plain = _trunk_grad(x, 2)
    plain = vg_plain.lower(variables["params"]).compile().memory_analysis()
  if ours is None or plain is None:
    pytest.skip("no memory analysis on this backend")
  assert ours.temp_size_in_bytes < 0.8 * plain.temp_size_in_bytes
